"""Stage 7: supervised fine-tuning on the packed conversations of stage 6, with the shared engine.

Starts from the newest checkpoint of 05_extend (or 04_pretrain when there is no stage 5; sft.init_from),
trains sft.epochs passes over 06_sft_data's blocks (reshuffled every epoch) with attention kept inside
each conversation and positions restarting per conversation, and the loss weighted to the answers and
normalized by the weighted tokens of the whole accumulation window. The held-out conversations give an
eval loss before training, every train.eval_every steps and at the end. Writes runs/<name>/07_sft/:
checkpoints (the init model's config, rope_scaling included), metrics.jsonl, TensorBoard, manifest.json.

Resume: rerun the same command; the engine continues from the newest complete checkpoint on the same
loss curve (SIGTERM/SIGINT save one first). Logic: dante/sft_train.py (plan, checks, batch sources),
dante/engine.py (training), dante/sft_data.py (the packed format).

Examples:
    python 7_sft.py --config configs/tiny/sft.yaml
    python 7_sft.py --config configs/tiny/sft.yaml --dry-run                      # checks and plan only
    deepspeed --num_gpus 2 7_sft.py --config configs/dante-2b/sft.yaml             # one rank per GPU
"""

from __future__ import annotations

import dataclasses
import signal

from dante import config as C
from dante.artifacts import read_manifest
from dante.checkpoint import WEIGHTS, load_model, plan_resume, seed_rngs, training_resume_check
from dante.cli import run_stage
from dante.distributed import init_distributed, start_ranks
from dante.engine import Trainer
from dante.flops import preflight_report
from dante.sft_train import (
    SFTBatches,
    SFTEvalBatches,
    check_same_init,
    init_identity,
    plan_sft,
)

STAGE = "07_sft"


def log(msg: str) -> None:
    print(f"[{STAGE}] {msg}", flush=True)


def validate(stage, cfg: C.SFTStageConfig, args):
    """``run_stage``'s validate hook: every check of config and inputs (``plan_sft``: 06_sft_data, the init
    checkpoint verified against its checksums, the tokenizer), read-only and before --force resets anything.
    Planned for train.expected_world_size ranks and the configured grad_accum; ``main`` plans again once a
    resume has fixed the accumulation (another rank count keeps the checkpoint's global batch)."""
    args.plan = plan_sft(cfg, cfg.train.expected_world_size, stage.require)
    return args.plan


def dry_run(cfg: C.SFTStageConfig, args) -> None:
    world = cfg.train.expected_world_size
    plan = getattr(args, "plan", None) or plan_sft(cfg, world, lambda s: read_manifest(cfg.run, s))  # made by validate
    for line in plan.describe(cfg):
        log(line)
    print(preflight_report(plan.model_cfg, dataclasses.replace(cfg.train, max_steps=plan.total_steps), world))
    log("dry run: all checks passed; no weights loaded")


def main(stage, cfg: C.SFTStageConfig, args) -> None:
    dist = init_distributed(cfg.train.backend, cfg.train.expected_world_size)
    seed_rngs(cfg.run.seed)  # nothing draws from them, but the checkpoints' RNG files then have the same bytes
    # resuming on another number of GPUs changes grad_accum, which the SFT order and step count depend on
    resume = plan_resume(stage.dir, C.to_dict(cfg), cfg.train.micro_batch, cfg.train.grad_accum, dist.rank,
                         dist.world_size)
    run = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, grad_accum=resume.grad_accum))
    # the weights were verified by validate, and load_model verifies them again right below
    plan = plan_sft(run, dist.world_size, stage.require, verify=False)
    saved = stage.load_progress()
    check_same_init(saved, plan)
    if dist.is_main:
        for line in plan.describe(run):
            log(line)
    model, model_cfg, init_meta = load_model(plan.checkpoint)
    t, s = run.train, cfg.sft
    data = SFTBatches(plan.train, t.micro_batch, t.grad_accum, s.epochs, cfg.run.seed, s.document_mask, plan.data_id)
    val = SFTEvalBatches(plan.eval, t.micro_batch, s.document_mask) if plan.eval.n_blocks else None
    if val is None and dist.is_main:
        log("note: 06_sft_data has no held-out conversations (sft_data.heldout_fraction 0): no eval loss")
    progress = {"init_checkpoint": init_identity(plan), "init_eval": saved.get("init_eval")}
    trainer = Trainer(model=model, model_cfg=model_cfg, train_cfg=dataclasses.replace(t, max_steps=plan.total_steps),
                      stage_dir=stage.dir, data=data, val_data=val, stage_config=C.to_dict(cfg), dist=dist, desc=STAGE,
                      resume=resume, on_checkpoint=lambda step, path: stage.save_progress({**progress, "step": step, "checkpoint": str(path)}))
    if "init_eval" not in saved and resume.step_dir is None:  # the starting point of the eval curve
        progress["init_eval"] = trainer.evaluate()  # collective: every rank
        if progress["init_eval"] and dist.is_main:
            log(f"eval loss of the init model: {progress['init_eval']['val_loss']:.4f}")
    if dist.is_main:
        stage.save_progress(progress)
    result = trainer.fit()
    if result.stopped_by_signal:
        if dist.is_main:
            log(f"stopped by {signal.Signals(result.stopped_by_signal).name} at step {result.steps}; rerun to resume")
        raise SystemExit(128 + result.stopped_by_signal)
    if not dist.is_main:
        return
    init_loss = progress["init_eval"]["val_loss"] if progress["init_eval"] else None
    final = result.final_val_loss
    if init_loss is not None and final is not None:
        log(f"eval loss {init_loss:.4f} -> {final:.4f}")
    stage.add_input("init_checkpoint", plan.checkpoint / WEIGHTS)
    stage.add_input("tokenizer", plan.tokenizer_path)
    stage.finish(
        outputs={"checkpoint": result.checkpoint, "metrics": "metrics.jsonl", "tensorboard": "tensorboard"},
        counts={"steps": result.steps, "epochs": s.epochs, "epochs_trained": round(min(s.epochs, result.steps / plan.steps_per_epoch), 4),
                "steps_per_epoch": plan.steps_per_epoch, "tokens_seen": result.tokens_seen,
                "train_blocks": plan.train.n_blocks, "eval_blocks": plan.eval.n_blocks,
                "weighted_tokens_per_epoch": plan.weighted_tokens, "world_size": dist.world_size},
        extra={
            "init": {"stage": plan.init_stage, "checkpoint": str(plan.checkpoint), "step": init_meta.get("step"),
                     "tokens_seen": init_meta.get("tokens_seen")},
            "model_config": C.to_dict(model_cfg),
            "attention": {"document_mask": s.document_mask, "kernel": trainer.transforms["attention"]["kernel"]},
            "eval": {"init_loss": init_loss, "final_loss": final},
            "final_train_loss": result.final_loss,
            "resumed_from_step": result.resumed_from,
            "train_seconds": result.train_seconds,
            "engine": result.extra,
        },
    )
    log(f"done: {result.steps} steps, checkpoint {result.checkpoint}")


if __name__ == "__main__":
    raise SystemExit(run_stage(STAGE, __doc__.splitlines()[0], main, validate=validate, dry_run=dry_run,
                               resume_check=training_resume_check, setup=start_ranks))
