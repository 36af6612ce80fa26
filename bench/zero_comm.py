"""Gradient communication per optimizer step under ZeRO-1 and ZeRO-2, measured with DeepSpeed's own
communication logger on 2 CPU ranks (gloo): the evidence behind the default ``train.zero_stage``.

Each case builds the production engine (dante.engine.Trainer with the DeepSpeed backend, bf16, the
built-in precision settings: fp32 gradient accumulation and reduction) from a DeepSpeed config file that
only adds ``comms_logger`` to the built-in config (``dante.backends.deepspeed_config``), runs one warm-up step, clears the log, runs
``--steps`` optimizer steps and prints, per DeepSpeed collective, how many calls and how many bytes one
optimizer step costs on one rank. The message sizes are what each rank hands to the collective (for an
all-reduce of n bytes a ring moves ~2n(W-1)/W per rank on the wire). The engine's own loss all-reduces
(16 bytes) go through torch.distributed directly and are not in DeepSpeed's log.

Example::

    python bench/zero_comm.py                   # ZeRO-1 and ZeRO-2 x grad_accum 1 and 4, bf16
    python bench/zero_comm.py --accum 1 16 --steps 2
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from dante.backends import deepspeed_config  # noqa: E402
from dante.config import ModelConfig, PretrainStageConfig, TrainConfig, to_dict  # noqa: E402
from dante.distributed import init_distributed  # noqa: E402
from dante.engine import Trainer  # noqa: E402
from dante.model import Transformer, count_parameters  # noqa: E402
from dante.pretrain_data import TieredMemmapDataset  # noqa: E402


def with_comms_logger(train: TrainConfig, folder: Path) -> TrainConfig:
    """``train`` pointed at a file holding its built-in DeepSpeed config plus the communication logger."""
    ds = deepspeed_config(train, world_size=2)
    ds["comms_logger"] = {"enabled": True, "verbose": False, "prof_all": True, "debug": False}
    path = folder / f"zero{train.zero_stage}-accum{train.grad_accum}.json"
    path.write_text(json.dumps(ds))
    return dataclasses.replace(train, deepspeed_config=str(path))


def measure(args, stage: int, accum: int, folder: Path) -> dict:
    import deepspeed.comm as ds_comm

    model_cfg = ModelConfig(dim=args.dim, n_layers=args.layers, n_heads=4, n_kv_heads=2, vocab_size=args.vocab,
                            max_seq_len=args.seq_len, multiple_of=32)
    train = TrainConfig(seq_len=args.seq_len, micro_batch=1, grad_accum=accum, max_steps=args.steps + 1,
                        warmup_steps=1, precision=args.precision, zero_stage=stage, expected_world_size=2,
                        eval_every=0, tier_weights={1: 1.0})
    train = with_comms_logger(train, folder)
    torch.manual_seed(0)
    model = Transformer(model_cfg)
    tokens = np.random.default_rng(0).integers(0, args.vocab, 200_000, dtype=np.uint16)
    data = TieredMemmapDataset({1: [tokens]}, train.tier_weights, train.seq_len, train.micro_batch, seed=1)
    trainer = Trainer(model=model, model_cfg=model_cfg, train_cfg=train, stage_dir=folder / f"z{stage}-a{accum}",
                      data=data, stage_config=to_dict(PretrainStageConfig(model=model_cfg, train=train)),
                      dist=init_distributed("deepspeed"), desc=f"zero{stage}-accum{accum}")
    trainer.train_step(0)  # warm-up: the first step also sets up buffers
    ds_comm.reset_log()
    for step in range(1, args.steps + 1):
        trainer.train_step(step)
    ops: dict[str, dict] = {}
    for name, by_size in ds_comm.comms_logger.get_raw_data().items():
        calls = sum(v[0] for v in by_size.values())
        ops[name] = {"calls_per_step": calls / args.steps,
                     "bytes_per_step": sum(size * v[0] for size, v in by_size.items()) / args.steps,
                     "sizes": sorted(by_size)}
    return {"zero_stage": stage, "grad_accum": accum, "params": count_parameters(model),
            "precision": trainer.backend.precision, "ops": ops}


def rank_main(rank: int, args, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for stage in args.stages:
            for accum in args.accum:
                results.append(measure(args, stage, accum, Path(tmp)))
    if rank == 0:
        Path(out).write_text(json.dumps(results))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stages", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--accum", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--steps", type=int, default=3, help="measured optimizer steps per case (after one warm-up)")
    ap.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--seq-len", type=int, default=32)
    args = ap.parse_args()

    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        mp.spawn(rank_main, args=(args, port, f.name), nprocs=2, join=True)
        results = json.loads(Path(f.name).read_text())
    n = results[0]["params"]
    print(f"model {n:,} parameters; {args.precision}; 2 CPU ranks (gloo); {args.steps} measured steps per case; "
          f"torch {torch.__version__}, deepspeed {__import__('deepspeed').__version__}, {platform.machine()}")
    print(f"4N = {4 * n:,} bytes (the whole gradient in fp32)")
    print(f"{'case':<22} {'collective':<26} {'calls/step':>10} {'bytes/step':>14} {'x 4N':>6}  message sizes (bytes)")
    for r in results:
        p = r["precision"]
        label = f"ZeRO-{r['zero_stage']} accum {r['grad_accum']}"
        print(f"{label:<22} (accumulation {p['grad_accumulation']}, reduction {p['grad_reduction']}, "
              f"{p['optimizer_wrapper']})")
        total = 0.0
        for name, op in sorted(r["ops"].items()):
            total += op["bytes_per_step"]
            print(f"{'':<22} {name:<26} {op['calls_per_step']:>10.1f} {op['bytes_per_step']:>14,.0f} "
                  f"{op['bytes_per_step'] / (4 * n):>6.2f}  {op['sizes'][:6]}")
        print(f"{'':<22} {'total':<26} {'':>10} {total:>14,.0f} {total / (4 * n):>6.2f}")


if __name__ == "__main__":
    main()
