"""Training-step benchmark: forward + backward + optimizer update, timed per step.

CPU part (``--part cpu``): a small config, fp32, four ways, interleaved step by step so that load
from other processes hits every variant alike:
  dante-plain   dante Transformer + chunked loss + torch AdamW in a bare loop
  hf-plain      transformers.LlamaForCausalLM of the same shape (same weights) + its loss + torch AdamW
  engine-torch  dante.engine.Trainer.train_step, torch backend
  engine-ds     dante.engine.Trainer.train_step, DeepSpeed ZeRO-2 backend (skipped without deepspeed)
Goal: dante-plain not slower than hf-plain.

GPU: ``bench/gpu_acceptance.py`` (the production path on one GPU: Dante-2B through the DeepSpeed
launcher, bf16 and FP8, seq 2048 and 4096, packed SFT, decode) reuses this file's batch source and
trainer builder.

Example::

    python bench/train_step.py --part cpu
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from dante.config import ModelConfig, PretrainStageConfig, TrainConfig, to_dict  # noqa: E402
from dante.loss import chunked_cross_entropy  # noqa: E402
from dante.model import Transformer  # noqa: E402

CPU_MODEL = dict(dim=256, n_layers=4, n_heads=8, n_kv_heads=4, vocab_size=8192, multiple_of=64, max_seq_len=256)


class RandomTokens:
    """A batch source of random tokens (throughput does not depend on the text)."""

    def __init__(self, vocab: int, micro_batch: int, seq_len: int):
        self.vocab, self.micro_batch, self.seq_len = vocab, micro_batch, seq_len

    def batch(self, step, micro_step, rank, world_size):  # the engine's prefetcher pins and copies them
        g = torch.Generator().manual_seed(step * 1000 + micro_step)
        rows = torch.randint(0, self.vocab, (self.micro_batch, self.seq_len + 1), generator=g)
        return {"tokens": rows[:, :-1], "targets": rows[:, 1:]}

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__, "machine": platform.machine(),
           "cpu": platform.processor() or platform.machine(), "cpu_threads": torch.get_num_threads()}
    for name in ("deepspeed", "torchao", "transformers"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            out[name] = None
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name()
        out["cuda"] = torch.version.cuda
    return out


def make_trainer(model_cfg: ModelConfig, train_cfg: TrainConfig, stage_dir: str, device_model: bool = False,
                 data=None):
    """A Trainer over ``data`` (default: random tokens); device_model builds the weights on the rank's GPU."""
    from dante.distributed import init_distributed
    from dante.engine import Trainer

    dist = init_distributed(train_cfg.backend)
    torch.manual_seed(0)
    if device_model:  # build and initialize the 2.1B weights directly on the GPU (seconds, not a minute on CPU)
        with torch.device(dist.device):
            model = Transformer(model_cfg)
    else:
        model = Transformer(model_cfg)
    data = data if data is not None else RandomTokens(model_cfg.vocab_size, train_cfg.micro_batch, train_cfg.seq_len)
    stage_cfg = to_dict(PretrainStageConfig(model=model_cfg, train=train_cfg))
    return Trainer(model=model, model_cfg=model_cfg, train_cfg=train_cfg, stage_dir=stage_dir, data=data,
                   stage_config=stage_cfg, dist=dist, desc="bench")


# ---------------------------------------------------------------------------------------------------
# CPU
# ---------------------------------------------------------------------------------------------------


def cpu_part(args) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    from dante.export.hf_format import llama_config_kwargs, to_hf_state_dict

    seq, mb = args.cpu_seq, args.cpu_micro_batch
    cfg = ModelConfig(**{**CPU_MODEL, "max_seq_len": seq})
    tokens_per_step = seq * mb
    g = torch.Generator().manual_seed(0)
    rows = torch.randint(0, cfg.vocab_size, (mb, seq + 1), generator=g)
    tokens, targets = rows[:, :-1], rows[:, 1:]

    torch.manual_seed(0)
    ours = Transformer(cfg)
    hf = LlamaForCausalLM(LlamaConfig(**llama_config_kwargs(cfg), attn_implementation="sdpa"))
    hf.load_state_dict(to_hf_state_dict(ours.state_dict(), cfg.tie_embeddings), strict=False)
    opt_ours = torch.optim.AdamW(ours.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    opt_hf = torch.optim.AdamW(hf.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)

    def step_ours():
        loss_sum, weight = chunked_cross_entropy(ours(tokens), ours.output.weight, targets, chunk_size=1024)
        (loss_sum / weight).backward()
        opt_ours.step()
        opt_ours.zero_grad(set_to_none=True)

    def step_hf():
        # transformers shifts the labels itself (T - 1 predictions per row vs our T: a 0.4% difference)
        hf(input_ids=tokens, labels=tokens).loss.backward()
        opt_hf.step()
        opt_hf.zero_grad(set_to_none=True)

    variants = {"dante-plain": step_ours, "hf-plain": step_hf}
    skipped = []
    train = dict(seq_len=seq, micro_batch=mb, grad_accum=1, max_steps=10**6, warmup_steps=10, precision="fp32",
                 eval_every=0, loss_chunk_size=1024)
    tmp = tempfile.mkdtemp(prefix="dante-bench-")
    engine_torch = make_trainer(cfg, TrainConfig(**train, backend="torch"), tmp + "/torch")
    variants["engine-torch"] = _engine_stepper(engine_torch)
    try:
        import deepspeed  # noqa: F401

        engine_ds = make_trainer(cfg, TrainConfig(**train, backend="deepspeed"), tmp + "/ds")
        variants["engine-ds"] = _engine_stepper(engine_ds)
    except ImportError:
        skipped.append("engine-ds: deepspeed is not installed")

    times = {k: [] for k in variants}
    cpu_times = {k: [] for k in variants}
    for rep in range(args.warmup + args.steps):
        for name, fn in variants.items():  # interleaved: a burst of load from elsewhere hits all variants
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            if rep >= args.warmup:
                times[name].append(time.perf_counter() - t0)
                cpu_times[name].append(time.process_time() - c0)
    results = {}
    for name, ts in times.items():
        median = statistics.median(ts)
        # CPU time of this process: with 1 thread it is the work done, insensitive to waiting for a core
        # that another process holds (wall time on a shared machine is not)
        results[name] = {"median_ms": 1000 * median, "mean_ms": 1000 * statistics.fmean(ts),
                         "min_ms": 1000 * min(ts), "tokens_per_sec": tokens_per_step / median,
                         "cpu_median_ms": 1000 * statistics.median(cpu_times[name])}
    return {"part": "cpu", "model": CPU_MODEL, "seq_len": seq, "micro_batch": mb, "tokens_per_step": tokens_per_step,
            "params": sum(p.numel() for p in ours.parameters()), "steps_timed": args.steps, "warmup": args.warmup,
            "results": results, "skipped": skipped, "versions": versions()}


def _engine_stepper(trainer):
    state = {"step": 0}

    def step():
        trainer.train_step(state["step"])
        state["step"] += 1

    return step


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", choices=["cpu"], default="cpu", help="cpu (the GPU part is bench/gpu_acceptance.py)")
    ap.add_argument("--steps", type=int, default=10, help="timed CPU steps per variant")
    ap.add_argument("--warmup", type=int, default=2, help="untimed CPU steps per variant")
    ap.add_argument("--threads", type=int, default=1,
                    help="CPU threads (1: on a shared machine a multi-thread op waits for its slowest core, "
                         "measured 10x step-time spread with 2 threads on 2 busy cores)")
    ap.add_argument("--cpu-seq", type=int, default=256)
    ap.add_argument("--cpu-micro-batch", type=int, default=8)
    ap.add_argument("--out", default="", help="write the results as JSON here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    report = cpu_part(args)
    for name, r in report["results"].items():
        print(f"{name:<14} {r['median_ms']:8.1f} ms/step wall (median of {args.steps}; min {r['min_ms']:.1f})  "
              f"{r['tokens_per_sec']:9,.0f} tok/s   {r['cpu_median_ms']:8.1f} ms CPU time")
    res = report["results"]
    print(f"dante-plain vs transformers.LlamaForCausalLM: {res['hf-plain']['median_ms'] / res['dante-plain']['median_ms']:.2f}x "
          f"the speed by wall time, {res['hf-plain']['cpu_median_ms'] / res['dante-plain']['cpu_median_ms']:.2f}x by "
          f"CPU time ({report['params']:,} params, {report['tokens_per_step']} tokens/step, fp32)")
    report["load_average"] = os.getloadavg()
    print(f"load average during the run: {report['load_average']}")
    for s in report.get("skipped", []):
        print(f"skipped: {s}")
    print(json.dumps(report["versions"]))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
