"""Stage 5: extend the context of the stage 4 model (YaRN, linear interpolation, or plain continued
training at the longer length) and measure long context before and after.

Reads runs/<name>/04_pretrain/ (weights only, from its newest complete checkpoint), 03_shards/ (training and
validation windows at the new length) and 02_tokenizer/. Writes runs/<name>/05_extend/: checkpoints whose
model_config.json carries the new max_seq_len and rope_scaling, metrics.jsonl, TensorBoard logs, and
long_context.{json,md,png}. The optimizer and schedule start fresh; an interrupted run resumes from its
newest checkpoint exactly as stage 4 does. All logic is in dante/extend.py, dante/engine.py and
dante/evaluation/long_context.py.

Examples:
    python 5_extend_context.py --config configs/tiny/extend.yaml
    python 5_extend_context.py --config configs/tiny/extend.yaml --set extend.mode=continued --set run.root=runs-ab
        (the A/B: plain RoPE, same steps; copy runs/tiny/0[1-4]_* to runs-ab/tiny/ first)
    python 5_extend_context.py --config configs/dante-2b/extend.yaml --dry-run    # checks and plan, no weights
    deepspeed --num_gpus 2 5_extend_context.py --config configs/dante-2b/extend.yaml
"""

from __future__ import annotations

import gc

import torch

from dante import config as C
from dante.checkpoint import WEIGHTS, load_model, seed_rngs, training_resume_check
from dante.cli import run_stage
from dante.distributed import init_distributed, start_ranks
from dante.engine import Trainer
from dante.errors import StageError
from dante.extend import before_variants, evaluate, load_weights_as, make_plan, write_report
from dante.flops import preflight_report

STAGE = "05_extend"
DESCRIPTION = __doc__.split("\n\n")[0]


def log(msg: str) -> None:
    print(f"[{STAGE}] {msg}", flush=True)


def validate(stage, cfg: C.ExtendStageConfig, args):
    """``run_stage``'s validate hook: every check of config and inputs (``make_plan``: extend.*, the stage 4
    checkpoint verified against its checksums, shards, tokenizer), read-only and before --force resets
    anything; the plan is ``stage.plan`` for ``main`` and ``args.plan`` for ``dry_run``."""
    plan = make_plan(cfg)
    for name in ("02_tokenizer", "03_shards", "04_pretrain"):
        stage.require(name)
    stage.add_input("base_checkpoint", plan.base_checkpoint / WEIGHTS)
    args.plan = plan
    return plan


def main(stage, cfg: C.ExtendStageConfig, args) -> None:
    plan = stage.plan or validate(stage, cfg, args)  # run_stage validated; a caller of main alone checks here
    seed_rngs(cfg.run.seed)  # nothing draws from them, but the checkpoints' RNG files then have the same bytes
    dist = init_distributed(cfg.train.backend, cfg.train.expected_world_size)
    if dist.is_main:
        for line in plan.describe():
            log(line)

    state = stage.load_progress()
    base = {"checkpoint": str(plan.base_checkpoint), "step": plan.base_step}
    if state.get("base", base) != base:
        raise StageError(f"{stage.dir} is an unfinished run extending {state['base']}, but 04_pretrain now ends at "
                         f"{base}; pass --force to start stage 5 over from the new stage 4 model")
    if "before" not in state:
        # Every rank measures (same numbers, same wall time as rank 0 alone): no rank then waits in a
        # collective while rank 0 evaluates, which could outlast the process group's timeout.
        before = []
        for key, label, model_cfg in before_variants(plan, cfg.extend.mode):
            log(f"long context before training: {label}")
            before.append(evaluate(load_weights_as(plan.base_checkpoint, model_cfg, dist.device), plan, cfg, key, label))
        state = {"base": base, "before": before}
        if dist.is_main:
            stage.save_progress(state)

    model = load_weights_as(plan.base_checkpoint, plan.model_cfg)  # weights only: fresh optimizer and schedule
    trainer = Trainer(model=model, model_cfg=plan.model_cfg, train_cfg=cfg.train, stage_dir=stage.dir, data=plan.data,
                      val_data=plan.val_data, stage_config=C.to_dict(cfg), dist=dist, desc=STAGE,
                      on_checkpoint=lambda step, path: stage.save_progress({**state, "step": step, "checkpoint": str(path)}))
    result = trainer.fit()
    if result.stopped_by_signal:
        log(f"stopped by signal {result.stopped_by_signal} at step {result.steps}; rerun the same command to resume")
        raise SystemExit(128 + result.stopped_by_signal)
    del trainer, model
    gc.collect()
    if dist.device.type == "cuda":
        torch.cuda.empty_cache()
    if not dist.is_main:
        return

    after_model, _, meta = load_model(stage.dir, device=dist.device)  # the fp32 weights of the final checkpoint
    label = f"after {cfg.extend.mode} training ({meta['step']} steps)"
    log(f"long context: {label}")
    evaluations = state["before"] + [evaluate(after_model, plan, cfg, "after", label)]
    report = {
        "mode": cfg.extend.mode, "rope_scaling": plan.model_cfg.rope_scaling, "original_length": plan.original_len,
        "new_length": plan.new_len, "base_checkpoint": str(plan.base_checkpoint), "base_step": plan.base_step,
        "checkpoint": result.checkpoint, "eval_source": plan.eval_source, "notes": plan.notes,
        "training": {"steps": result.steps, "tokens_seen": result.tokens_seen, "seq_len": cfg.train.seq_len,
                     "final_loss": result.final_loss, "final_val_loss": result.final_val_loss,
                     "resumed_from": result.resumed_from, **result.extra},
        "evaluations": evaluations,
    }
    written = write_report(stage.dir, report)
    stage.finish(outputs={"checkpoint": result.checkpoint, **written},
                 counts={"steps": result.steps, "tokens_seen": result.tokens_seen, "new_length": plan.new_len},
                 extra={"summary": {e["key"]: {**e["summary"], "passkey_rank_accuracy":
                                               e["long_context"]["passkey"]["rank_accuracy"]} for e in evaluations},
                        "engine": result.extra})
    log(f"done: {stage.dir / 'long_context.md'}")


def dry_run(cfg: C.ExtendStageConfig, args) -> None:
    plan = getattr(args, "plan", None) or make_plan(cfg)  # made by validate
    for line in plan.describe() + preflight_report(plan.model_cfg, cfg.train).splitlines():
        log(line)
    log("dry run: all checks passed; no weights loaded")


if __name__ == "__main__":
    raise SystemExit(run_stage(STAGE, DESCRIPTION, main, validate=validate, dry_run=dry_run,
                               resume_check=training_resume_check, setup=start_ranks))
