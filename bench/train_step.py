"""Training-step benchmark: forward + backward + optimizer update, timed per step.

CPU part (``--part cpu``): a small config, fp32, four ways, interleaved step by step so that load
from other processes hits every variant alike:
  dante-plain   dante Transformer + chunked loss + torch AdamW in a bare loop
  hf-plain      transformers.LlamaForCausalLM of the same shape (same weights) + its loss + torch AdamW
  engine-torch  dante.engine.Trainer.train_step, torch backend
  engine-ds     dante.engine.Trainer.train_step, DeepSpeed ZeRO-2 backend (skipped without deepspeed)
Goal: dante-plain not slower than hf-plain.

GPU part (``--part gpu``): the dante-2b model (2.1B) on one GPU through Trainer.train_step, torch
backend (one process; DeepSpeed is one extra case at the end if installed): seq 2048 and 4096, bf16
and FP8 (torchao, skipped when missing or the GPU has no fp8 units), with torch.compile, gradient
accumulation 1 vs 4 at the same micro-batch, and an eager baseline. Each case reports tok/s, MFU
against the dense peak of the detected GPU (dante/flops.py) and peak memory. A case that runs out of
memory is retried once at half the micro-batch. Cases stop being started when ``--time-limit`` would
be exceeded; skipped cases are listed. Everything is also written as JSON to ``--out``.

Example::

    python bench/train_step.py --part cpu
    python bench/train_step.py --part gpu --time-limit 450 --out $OUT/bench_gpu.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PROCESS_START = time.time()

import torch  # noqa: E402

from dante.config import ModelConfig, PretrainStageConfig, TrainConfig, to_dict  # noqa: E402
from dante.flops import detect_peak, mfu, training_flops_per_token  # noqa: E402
from dante.loss import chunked_cross_entropy  # noqa: E402
from dante.model import Transformer  # noqa: E402

DANTE_2B = dict(dim=2560, n_layers=28, n_heads=20, n_kv_heads=4, head_dim=128, vocab_size=65536, multiple_of=256,
                rope_theta=500000.0, max_seq_len=4096)
CPU_MODEL = dict(dim=256, n_layers=4, n_heads=8, n_kv_heads=4, vocab_size=8192, multiple_of=64, max_seq_len=256)


class RandomTokens:
    """A batch source of random tokens (throughput does not depend on the text)."""

    def __init__(self, vocab: int, micro_batch: int, seq_len: int):
        self.vocab, self.micro_batch, self.seq_len = vocab, micro_batch, seq_len

    def batch(self, step, micro_step, rank, world_size):
        g = torch.Generator().manual_seed(step * 1000 + micro_step)
        rows = torch.randint(0, self.vocab, (self.micro_batch, self.seq_len + 1), generator=g)
        return {"tokens": rows[:, :-1].pin_memory() if torch.cuda.is_available() else rows[:, :-1],
                "targets": rows[:, 1:].pin_memory() if torch.cuda.is_available() else rows[:, 1:]}

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


def make_trainer(model_cfg: ModelConfig, train_cfg: TrainConfig, stage_dir: str, device_model: bool = False):
    from dante.engine import Trainer, init_distributed

    dist = init_distributed(train_cfg.backend)
    torch.manual_seed(0)
    if device_model:  # build and initialize the 2.1B weights directly on the GPU (seconds, not a minute on CPU)
        with torch.device(dist.device):
            model = Transformer(model_cfg)
    else:
        model = Transformer(model_cfg)
    data = RandomTokens(model_cfg.vocab_size, train_cfg.micro_batch, train_cfg.seq_len)
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


# ---------------------------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------------------------


GPU_CASES = [  # (name, seq, micro_batch, grad_accum, fp8, compile, backend), in order of importance
    ("bf16-compile-2048", 2048, 8, 1, False, True, "torch"),
    ("bf16-compile-2048-accum4", 2048, 8, 4, False, True, "torch"),
    ("fp8-compile-2048", 2048, 8, 1, True, True, "torch"),
    ("bf16-compile-4096", 4096, 4, 1, False, True, "torch"),
    ("fp8-compile-4096", 4096, 4, 1, True, True, "torch"),
    ("bf16-eager-2048", 2048, 8, 1, False, False, "torch"),
    ("bf16-compile-2048-deepspeed", 2048, 8, 1, False, True, "deepspeed"),
]


def run_gpu_case(name, seq, mb, accum, fp8, compile_, backend, args) -> dict:
    model_cfg = ModelConfig(**DANTE_2B)
    train = TrainConfig(seq_len=seq, micro_batch=mb, grad_accum=accum, max_steps=10**6, warmup_steps=100,
                        precision="bf16", compile=compile_, fp8=fp8, eval_every=0, backend=backend)
    torch.cuda.reset_peak_memory_stats()
    t_build = time.perf_counter()
    trainer = make_trainer(model_cfg, train, tempfile.mkdtemp(prefix="dante-bench-"), device_model=True)
    try:
        t0 = time.perf_counter()
        for step in range(args.gpu_warmup):  # the first step compiles
            trainer.train_step(step)
        warm_s = time.perf_counter() - t0
        times = []
        for step in range(args.gpu_warmup, args.gpu_warmup + args.gpu_steps):
            t0 = time.perf_counter()
            trainer.train_step(step)  # ends with torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        median = statistics.median(times)
        tokens = seq * mb * accum
        tok_s = tokens / median
        fpt = training_flops_per_token(model_cfg, seq)
        peak = detect_peak(fp8)
        util = mfu(tok_s, fpt, peak)
        util_bf16 = mfu(tok_s, fpt, detect_peak(False))  # FP8 cases against the bf16 peak too, for comparison
        return {"case": name, "seq_len": seq, "micro_batch": mb, "grad_accum": accum, "fp8": fp8, "compile": compile_,
                "backend": backend, "tokens_per_step": tokens, "median_step_s": median, "tokens_per_sec": tok_s,
                "mfu": util, "mfu_vs_bf16_peak": util_bf16, "peak": peak.label if peak else None, "flops_per_token": fpt,
                "peak_mem_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
                "peak_mem_reserved_gib": torch.cuda.max_memory_reserved() / 2**30,
                "warmup_s": warm_s, "build_s": t0 - t_build, "transforms": trainer.transforms}
    finally:
        del trainer


def _release_gpu_memory() -> None:
    gc.collect()
    torch.cuda.empty_cache()
    torch._dynamo.reset()  # a fresh compile for the next case: a new shape would otherwise go dynamic


def gpu_part(args) -> dict:
    if not torch.cuda.is_available():
        return {"part": "gpu", "skipped": ["no CUDA device"], "results": [], "versions": versions()}
    started = PROCESS_START  # the time limit counts the imports too
    results, skipped = [], []
    has_torchao = _importable("torchao")
    has_ds = _importable("deepspeed")
    fp8_units = torch.cuda.get_device_capability() >= (8, 9)
    budget_per_case = 70.0  # seconds: build + compile + warmup + timed steps, measured order of magnitude
    for name, seq, mb, accum, fp8, compile_, backend in GPU_CASES:
        if fp8 and not (has_torchao and fp8_units):
            skipped.append(f"{name}: {'torchao missing' if not has_torchao else 'no fp8 tensor cores'}")
            continue
        if backend == "deepspeed" and not has_ds:
            skipped.append(f"{name}: deepspeed missing")
            continue
        if time.time() - started + budget_per_case > args.time_limit:
            skipped.append(f"{name}: time limit")
            continue
        for attempt_mb in (mb, mb // 2):
            outcome = None
            try:
                outcome = run_gpu_case(name, seq, attempt_mb, accum, fp8, compile_, backend, args)
                print(_gpu_line(outcome), flush=True)
            except torch.cuda.OutOfMemoryError:
                print(f"{name}: out of memory at micro_batch {attempt_mb}", flush=True)
                outcome = {"case": name, "seq_len": seq, "micro_batch": attempt_mb, "oom": True}
            except Exception as e:  # report and go on: one broken case must not hide the others
                print(f"{name}: failed: {type(e).__name__}: {e}", flush=True)
                outcome = {"case": name, "error": f"{type(e).__name__}: {e}"[:500]}
            results.append(outcome)
            _release_gpu_memory()  # here, after the except block dropped the traceback that held the model
            if not outcome.get("oom"):
                break
    return {"part": "gpu", "model": DANTE_2B, "results": results, "skipped": skipped, "elapsed_s": time.time() - started,
            "gpu_steps": args.gpu_steps, "gpu_warmup": args.gpu_warmup, "versions": versions()}


def _importable(name: str) -> bool:
    try:
        __import__(name)
        return True
    except ImportError:
        return False


def _gpu_line(r: dict) -> str:
    mfu_text = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "n/a"
    return (f"{r['case']:<30} seq {r['seq_len']:>5} mb {r['micro_batch']:>2} accum {r['grad_accum']} "
            f"{r['tokens_per_sec']:>9,.0f} tok/s  MFU {mfu_text:>6}  peak {r['peak_mem_allocated_gib']:6.1f} GiB alloc "
            f"/ {r['peak_mem_reserved_gib']:6.1f} reserved  (warmup {r['warmup_s']:.0f}s)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", choices=["cpu", "gpu", "auto"], default="auto",
                    help="auto: gpu when CUDA is available, else cpu")
    ap.add_argument("--steps", type=int, default=10, help="timed CPU steps per variant")
    ap.add_argument("--warmup", type=int, default=2, help="untimed CPU steps per variant")
    ap.add_argument("--threads", type=int, default=1,
                    help="CPU threads (1: on a shared machine a multi-thread op waits for its slowest core, "
                         "measured 10x step-time spread with 2 threads on 2 busy cores)")
    ap.add_argument("--cpu-seq", type=int, default=256)
    ap.add_argument("--cpu-micro-batch", type=int, default=8)
    ap.add_argument("--gpu-steps", type=int, default=6, help="timed GPU steps per case")
    ap.add_argument("--gpu-warmup", type=int, default=3, help="untimed GPU steps per case (compilation)")
    ap.add_argument("--time-limit", type=float, default=450.0, help="GPU part: start no case past this (seconds)")
    ap.add_argument("--out", default="", help="write the results as JSON here")
    args = ap.parse_args()
    part = args.part if args.part != "auto" else ("gpu" if torch.cuda.is_available() else "cpu")
    if part == "cpu":
        torch.set_num_threads(args.threads)
    report = cpu_part(args) if part == "cpu" else gpu_part(args)
    if part == "cpu":
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
