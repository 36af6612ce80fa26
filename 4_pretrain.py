"""Stage 4: pretrain the Dante transformer on the stage 3 token shards.

Reads ``03_shards/`` (tiered train/val shards) and ``02_tokenizer/`` (its vocabulary must match
``model.vocab_size``), trains with the engine of ``dante/engine.py`` (DeepSpeed ZeRO-1, AdamW, cosine
schedule, optional torch.compile / FP8 / activation checkpointing), and writes ``04_pretrain/``:
``checkpoints/step-NNNNNNN/`` (docs/DESIGN.md), ``metrics.jsonl``, ``tensorboard/`` and, last,
``manifest.json``. Every input is checked before anything is written (``load_inputs``, also under
``--dry-run`` and before ``--force`` deletes a finished folder). A killed run resumes from its newest checkpoint with the same loss curve; SIGTERM or
Ctrl-C saves a checkpoint first and exits with 128 + the signal number. ``--dry-run`` prints the plan:
parameters, FLOPs per token, steps, per-GPU memory under ZeRO-1 and ZeRO-2 and the ETA. Launched by
``deepspeed`` or ``torchrun``, the ranks must number train.expected_world_size.

Example::

    python 4_pretrain.py --config configs/tiny/pretrain.yaml                     # CPU, one process
    python 4_pretrain.py --config configs/dante-2b/pretrain.yaml --dry-run
    deepspeed --num_gpus 2 4_pretrain.py --config configs/dante-2b/pretrain.yaml
    torchrun --nproc_per_node 2 4_pretrain.py --config configs/dante-2b/pretrain.yaml
"""

from __future__ import annotations

from dante import config as C
from dante.artifacts import stage_dir, tokenizer_path
from dante.checkpoint import check_vocab, seed_rngs, training_resume_check
from dante.cli import run_stage
from dante.distributed import init_distributed, start_ranks
from dante.engine import Trainer
from dante.errors import UserError, raise_problems
from dante.flops import preflight_report
from dante.model import Transformer, count_parameters
from dante.pretrain_data import DataError, TieredMemmapDataset, ValidationWindows
from dante.tokenizer import load_tokenizer

STAGE = "04_pretrain"


def load_inputs(stage, cfg, args=None):
    """``run_stage``'s validate hook: check stages 2 and 3 and build the data sources, read-only and before
    --force resets anything (a wrong model.vocab_size leaves a finished 04_pretrain as it was); every problem
    is reported in one error. The (train, val) sources are ``stage.plan`` for ``main``."""
    stage.require("02_tokenizer")
    stage.require("03_shards")
    tok_path = tokenizer_path(cfg.run)
    tokenizer = load_tokenizer(tok_path)
    problems = check_vocab(tokenizer, cfg.model, tok_path, trained=False)
    shards, t = stage_dir(cfg.run, "03_shards"), cfg.train
    data = val = None
    try:
        data = TieredMemmapDataset.from_stage_dir(shards, t.tier_weights, t.seq_len, t.micro_batch, cfg.run.seed,
                                                   vocab_size=cfg.model.vocab_size)
    except DataError as e:
        problems += e.problems
    val = ValidationWindows.from_stage_dir(shards, t.seq_len, t.micro_batch, vocab_size=cfg.model.vocab_size)
    if t.eval_every and len(val) == 0:
        problems.append(f"no validation window of {t.seq_len + 1} tokens in {shards} (val shards missing or too short); "
                        "set train.eval_every=0 or give stage 3 a larger shards.val_fraction")
    raise_problems(UserError, "inputs do not fit this config", problems)
    return data, val


def main(stage, cfg, args) -> None:
    dist = init_distributed(cfg.train.backend, cfg.train.expected_world_size)
    data, val = stage.plan or load_inputs(stage, cfg)  # run_stage validated; a caller of main alone checks here
    seed_rngs(cfg.run.seed)  # every rank builds the same initial weights; every RNG file has the same bytes
    model = Transformer(cfg.model)
    n_params = count_parameters(model)
    if dist.is_main:
        print(f"[{STAGE}] {n_params:,} parameters; data: {data.summary()['tiers']}; {len(val)} validation windows",
              flush=True)
    trainer = Trainer(model=model, model_cfg=cfg.model, train_cfg=cfg.train, stage_dir=stage.dir, data=data,
                      val_data=val, stage_config=C.to_dict(cfg), dist=dist, desc=STAGE,
                      on_checkpoint=lambda step, path: stage.save_progress({"step": step, "checkpoint": str(path)}))
    result = trainer.fit()
    if result.stopped_by_signal:
        if dist.is_main:
            print(f"[{STAGE}] stopped at step {result.steps} by signal {result.stopped_by_signal}; checkpoint "
                  f"{result.checkpoint}. Rerun the same command to resume.", flush=True)
        raise SystemExit(128 + result.stopped_by_signal)
    if not dist.is_main:
        return
    stage.finish(
        outputs={"checkpoint": result.checkpoint, "metrics": "metrics.jsonl", "tensorboard": "tensorboard"},
        counts={"parameters": n_params, "steps": result.steps, "tokens_seen": result.tokens_seen,
                "final_loss": result.final_loss, "final_val_loss": result.final_val_loss,
                "world_size": dist.world_size},
        extra={"training": {"resumed_from_step": result.resumed_from, "train_seconds_this_run": result.train_seconds,
                            **result.extra}, "data": data.summary()},
    )
    print(f"[{STAGE}] done: {result.steps} steps, {result.tokens_seen:,} tokens, loss {result.final_loss:.4f}"
          + (f", val loss {result.final_val_loss:.4f}" if result.final_val_loss is not None else "")
          + f"; checkpoint {result.checkpoint}", flush=True)


def dry_run(cfg, args) -> None:
    print(f"[{STAGE}] plan for run {cfg.run.name!r} (nothing is trained)")
    print(preflight_report(cfg.model, cfg.train))


if __name__ == "__main__":
    raise SystemExit(run_stage(STAGE, __doc__.split("\n\n")[0], main, validate=load_inputs, dry_run=dry_run,
                               resume_check=training_resume_check, setup=start_ranks))
