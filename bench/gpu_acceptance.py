"""The one GPU acceptance command (issue 12, item 10): the production path on one H100/H200 in <= 8 minutes.

Cases, in order of importance, each in a fresh process so that one failure or out-of-memory cannot
leak into the next:
  bf16-2048   the stage-4 engine (dante.engine.Trainer with the DeepSpeed backend and the train section of
              configs/dante-2b/pretrain.yaml) launched by ``deepspeed --num_gpus 1``: Dante-2B, bf16 +
              torch.compile, seq 2048, micro-batch 8                          goal >= 34,000 tok/s
  fp8-2048    the same with train.fp8 (torchao float8 linears)                goal >= 45,000 tok/s
  bf16-4096   seq 4096, micro-batch 4, no activation checkpointing            goal: fits an 80 GB card
              per GPU of the 2-GPU run (one GPU holds all optimizer states, so the measured peak minus
              the estimated ZeRO sharding saving of a second rank, dante/flops.py, is compared)
  sft-4096    packed SFT (stage 7's SFTBatches over synthetic conversations packed by stage 6's packer,
              document mask on) through the kernel dante.kernels chooses, with the train section of
              configs/dante-2b/sft.yaml; a throughput figure, no goal
  decode      single-stream greedy decode with the KV cache (dante.evaluation.generation.generate), bf16
              weights, 256 new tokens after a 512-token prompt                 goal >= 400 tok/s
Training cases time ``--steps`` optimizer steps (grad_accum 1) after ``--warmup`` (compilation), with a
``torch.cuda.synchronize()`` around each timed step, and report the median. One table is printed (tok/s
and its goal, MFU against the GPU's dense bf16 peak, peak memory, graphs Dynamo compiled, the attention
kernel chosen) and everything is written as JSON to ``--out``. A training case that runs out of memory
is retried once at half the micro-batch (never below the goal's 4 at seq 4096); cases that would pass
``--time-limit`` are skipped and listed.

``--dry-run`` loads and validates every case's config, estimates its memory (dante/flops.py), checks the
launcher, DeepSpeed and torchao, and prints the plan and the commands: on any machine, no GPU needed.
Without ``--dry-run`` it refuses to start on a machine without CUDA.

Example::

    python bench/gpu_acceptance.py --dry-run                              # the plan, on CPU
    python bench/gpu_acceptance.py --out gpu_acceptance.json              # on one H100/H200, <= 8 min
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(1, str(REPO / "bench"))  # the sibling benchmarks whose pieces are reused below

import torch  # noqa: E402

from dante import config as C  # noqa: E402
from dante.errors import ConfigError, UserError  # noqa: E402
from dante.flops import detect_peak, estimate_memory, mfu, training_flops_per_token  # noqa: E402

PRETRAIN_CONFIG = REPO / "configs" / "dante-2b" / "pretrain.yaml"
SFT_CONFIG = REPO / "configs" / "dante-2b" / "sft.yaml"
# What an H100 80GB offers the allocator: 79.1 GiB total, of which the CUDA context and cuBLAS/NCCL
# workspaces take about 1 GiB (the figure torch prints in its out-of-memory message is 79.1).
H100_ALLOCATOR_GIB = 78.0
ESTIMATED_CASE_S = {"train": 95.0, "decode": 45.0}  # launcher + build + compile + steps: an estimate, not measured


@dataclass(frozen=True)
class Case:
    name: str
    kind: str  # "train", "sft" or "decode"
    seq_len: int
    micro_batch: int
    fp8: bool = False
    goal_tok_s: float | None = None
    goal_memory_gib: float | None = None
    min_micro_batch: int = 1
    """The out-of-memory retry never goes below this (the seq-4096 goal is micro-batch >= 4)."""

    @property
    def goal(self) -> str:
        if self.goal_tok_s:
            return f">= {self.goal_tok_s:,.0f} tok/s"
        if self.goal_memory_gib:
            return f"mb >= {self.min_micro_batch}, <= {self.goal_memory_gib:g} GiB/GPU at 2 GPUs"
        return "-"


CASES = [
    Case("bf16-2048", "train", 2048, 8, goal_tok_s=34_000),
    Case("fp8-2048", "train", 2048, 8, fp8=True, goal_tok_s=45_000),
    Case("bf16-4096", "train", 4096, 4, goal_memory_gib=H100_ALLOCATOR_GIB, min_micro_batch=4),
    Case("sft-4096", "sft", 4096, 4),
    Case("decode", "decode", 512, 1, goal_tok_s=400),
]


# ---------------------------------------------------------------------------------------------------
# Configs: the production files, with only what a 1-GPU benchmark must change
# ---------------------------------------------------------------------------------------------------


def stage_config(case: Case):
    """The stage config of a case: the Dante-2B file, one rank, grad_accum 1, no evaluation or checkpoints."""
    over = [f"train.seq_len={case.seq_len}", f"train.micro_batch={case.micro_batch}", "train.grad_accum=1",
            "train.expected_world_size=1", "train.eval_every=0", "train.max_steps=1000000",
            "train.checkpoint_every=1000000", f"train.fp8={str(case.fp8).lower()}",
            "train.activation_checkpointing=false"]
    if case.kind == "sft":
        return C.load_config(C.SFTStageConfig, SFT_CONFIG, over)
    return C.load_config(C.PretrainStageConfig, PRETRAIN_CONFIG, over + _context_override(case))


def _context_override(case: Case) -> list[str]:
    # seq 4096 needs the model's table that long (stage 5 extends it; throughput does not depend on RoPE scaling)
    return [f"model.max_seq_len={case.seq_len}"] if case.seq_len > 2048 else []


def model_config(case: Case) -> C.ModelConfig:
    return C.load_config(C.PretrainStageConfig, PRETRAIN_CONFIG, _context_override(case)).model


def plan(args) -> dict:
    """Every case's settings, checks and memory estimate; raises UserError listing all problems."""
    problems, cases = [], []
    selected = [c for c in CASES if not args.only or c.name in args.only]
    unknown = sorted(set(args.only or []) - {c.name for c in CASES})
    if unknown:
        problems.append(f"--only {', '.join(unknown)}: unknown case(s); known: {', '.join(c.name for c in CASES)}")
    if args.steps < 3 or args.warmup < 1:
        problems.append(f"--steps {args.steps} / --warmup {args.warmup}: need >= 3 timed steps and >= 1 warm-up "
                        "step (the first compiles)")
    if deepspeed_launcher() is None and any(c.kind != "decode" for c in selected):
        problems.append("the `deepspeed` launcher is not on PATH: `pip install deepspeed` (the production path "
                        "runs through it)")
    for case in selected:
        entry = {"case": case.name, "kind": case.kind, "seq_len": case.seq_len, "micro_batch": case.micro_batch,
                 "fp8": case.fp8, "goal": case.goal}
        try:
            model = model_config(case)
            if case.kind != "decode":
                train = stage_config(case).train
                entry["train"] = {k: getattr(train, k) for k in ("precision", "compile", "compile_mode", "fp8",
                                                                  "activation_checkpointing", "backend", "zero_stage",
                                                                  "deepspeed_config", "loss_chunk_size")}
                one, two = estimate_memory(model, train, 1)["total"], estimate_memory(model, train, 2)["total"]
                entry["estimated_memory_gib"] = round(one / 2**30, 1)
                # one GPU holds all optimizer states; the production run shards them over 2 (ZeRO), which
                # the memory goal is about: the projection subtracts the estimated difference
                entry["zero_sharding_saving_2gpu_gib"] = round((one - two) / 2**30, 2)
                if case.fp8 and not _importable("torchao"):
                    problems.append(f"{case.name}: train.fp8 needs torchao (`pip install torchao`)")
                if case.min_micro_batch > 1 and train.activation_checkpointing:
                    problems.append(f"{case.name}: the goal is without activation checkpointing")
            entry["command"] = " ".join(worker_command(case, args, case.micro_batch, "RESULT.json", port="PORT"))
            entry["params"] = _n_params(model)
        except (UserError, ConfigError) as e:
            problems.append(f"{case.name}: {e}")
        cases.append(entry)
    estimate = sum(ESTIMATED_CASE_S["decode" if c.kind == "decode" else "train"] for c in selected)
    if problems:
        raise UserError("the GPU acceptance plan has problems:\n" + "\n".join(f"  - {p}" for p in problems))
    return {"cases": cases, "estimated_seconds": estimate, "time_limit_s": args.time_limit,
            "steps": args.steps, "warmup": args.warmup}


def _n_params(model: C.ModelConfig) -> int:
    from dante.model import Transformer

    with torch.device("meta"):
        return sum(p.numel() for p in Transformer(model).parameters())


def _importable(name: str) -> bool:
    return importlib.util.find_spec(name) is not None  # without importing it (torchao's import is slow and loud)


def deepspeed_launcher() -> str | None:
    """The ``deepspeed`` launcher: on PATH, or beside this Python (a virtual environment not activated)."""
    beside = Path(sys.executable).parent / "deepspeed"
    return shutil.which("deepspeed") or (str(beside) if beside.is_file() else None)


def worker_command(case: Case, args, micro_batch: int, result: str, port: int | str) -> list[str]:
    tail = [str(Path(__file__).resolve()), "--worker", case.name, "--micro-batch", str(micro_batch),
            "--result", result, "--steps", str(args.steps), "--warmup", str(args.warmup)]
    if case.kind == "decode":  # one process, no collectives: the launcher adds nothing
        return [sys.executable, *tail]
    return [deepspeed_launcher() or "deepspeed", "--num_gpus", "1", "--master_port", str(port), *tail]


# ---------------------------------------------------------------------------------------------------
# Workers (one case, in the launched process)
# ---------------------------------------------------------------------------------------------------


def _sync() -> None:  # the workers also run on CPU in tests/test_gpu_acceptance.py (tiny configs)
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _graphs_compiled() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def run_training_case(case: Case, micro_batch: int, args) -> dict:
    from train_step import make_trainer  # bench/train_step.py: the trainer over random tokens

    case = replace(case, micro_batch=micro_batch)
    cfg = stage_config(case)
    model_cfg = model_config(case)
    data = None
    if case.kind == "sft":
        data = synthetic_sft_batches(cfg, model_cfg)
    trainer = make_trainer(model_cfg, cfg.train, tempfile.mkdtemp(prefix="dante-accept-"), device_model=True,
                           data=data)
    for step in range(args.warmup):  # the first step compiles
        trainer.train_step(step)
    times = []
    for step in range(args.warmup, args.warmup + args.steps):
        _sync()
        t0 = time.perf_counter()
        trainer.train_step(step)
        _sync()
        times.append(time.perf_counter() - t0)
    trainer.prefetcher.close()
    tok_s = micro_batch * case.seq_len / statistics.median(times)
    fpt = training_flops_per_token(model_cfg, case.seq_len)
    return {"tokens_per_sec": tok_s, "median_step_s": statistics.median(times), "step_s": times,
            "mfu_vs_bf16_peak": mfu(tok_s, fpt, detect_peak(False)),
            "mfu_vs_fp8_peak": mfu(tok_s, fpt, detect_peak(True)) if case.fp8 else None,
            "flops_per_token": fpt, "graphs_compiled": _graphs_compiled(),
            "kernel": trainer.transforms["attention"]["kernel"], "transforms": trainer.transforms}


def synthetic_sft_batches(cfg: C.SFTStageConfig, model_cfg: C.ModelConfig):
    """Stage 7's batch source over synthetic conversations packed by stage 6's packer."""
    from sft_throughput import synthetic_blocks  # bench/sft_throughput.py: log-normal lengths, best-fit packing

    from dante.sft_packing import PackedSFT
    from dante.sft_train import SFTBatches
    from dante.tokenizer import PAD_ID

    t = cfg.train
    blocks = synthetic_blocks(64, t.seq_len, median_len=300, vocab=model_cfg.vocab_size, seed=0)
    packed = PackedSFT(blocks["tokens"], blocks["weights"], blocks["docs"], blocks["pos"], PAD_ID)
    return SFTBatches(packed, t.micro_batch, t.grad_accum, epochs=1000, seed=cfg.run.seed,
                      document_mask=cfg.sft.document_mask, data_id="synthetic")


def run_decode_case(case: Case, args) -> dict:
    from dante.evaluation.generation import GREEDY, generate
    from dante.model import Transformer

    model_cfg = model_config(case)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Transformer(model_cfg).to(torch.bfloat16).eval()
    prompt = torch.randint(0, model_cfg.vocab_size, (case.seq_len,), generator=torch.Generator().manual_seed(0))
    generate(model, prompt[:32].tolist(), max_new_tokens=16, params=GREEDY)  # warm-up
    out = generate(model, prompt.tolist(), max_new_tokens=256, params=GREEDY)
    decode_s = out.seconds - out.prefill_seconds
    return {"tokens_per_sec": (len(out.new_tokens) - 1) / decode_s if decode_s > 0 else None,
            "tokens_per_sec_with_prefill": out.tokens_per_s, "prefill_s": out.prefill_seconds,
            "new_tokens": len(out.new_tokens), "graphs_compiled": _graphs_compiled(), "kernel": "causal (KV cache)"}


def worker_main(args) -> int:
    case = next(c for c in CASES if c.name == args.worker)
    args.micro_batch = args.micro_batch or case.micro_batch
    torch.cuda.reset_peak_memory_stats()
    try:
        result = run_decode_case(case, args) if case.kind == "decode" else \
            run_training_case(case, args.micro_batch, args)
    except torch.cuda.OutOfMemoryError as e:
        result = {"oom": True, "error": str(e)[:300]}
    result.update(case=case.name, micro_batch=args.micro_batch, seq_len=case.seq_len,
                  peak_allocated_gib=torch.cuda.max_memory_allocated() / 2**30,
                  peak_reserved_gib=torch.cuda.max_memory_reserved() / 2**30)
    if int(os.environ.get("RANK", "0")) == 0:
        Path(args.result).write_text(json.dumps(result, indent=2))
    return 0


# ---------------------------------------------------------------------------------------------------
# The driver
# ---------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_case(case: Case, args, deadline: float) -> dict:
    micro_batch = case.micro_batch
    while True:
        with tempfile.TemporaryDirectory() as tmp:
            result_path = Path(tmp) / "result.json"
            cmd = worker_command(case, args, micro_batch, str(result_path), _free_port())
            t0 = time.time()
            try:
                proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=max(1, deadline - t0))
                output, code = proc.stdout + proc.stderr, proc.returncode
            except subprocess.TimeoutExpired as e:
                output, code = f"{e.stdout or ''}{e.stderr or ''}\ntimed out (time limit)", -1
            result = json.loads(result_path.read_text()) if result_path.is_file() else \
                {"case": case.name, "error": f"exit {code}: " + output[-1500:]}
            result["wall_s"] = time.time() - t0
        if result.get("oom") and micro_batch // 2 >= case.min_micro_batch and case.kind != "decode":
            print(f"{case.name}: out of memory at micro-batch {micro_batch}; retrying at {micro_batch // 2}", flush=True)
            micro_batch //= 2
            continue
        return result


def verdict(case: Case, r: dict) -> str:
    if r.get("error") or r.get("oom"):
        return "FAIL (oom)" if r.get("oom") else "FAIL (error)"
    if case.goal_tok_s:
        return "met" if (r.get("tokens_per_sec") or 0) >= case.goal_tok_s else "missed"
    if case.goal_memory_gib:
        ok = r["micro_batch"] >= case.min_micro_batch and r["projected_2gpu_reserved_gib"] <= case.goal_memory_gib
        return "met" if ok else "missed"
    return "-"


def table(results: list[dict]) -> str:
    head = f"{'case':<10} {'mb':>3} {'tok/s':>9} {'goal':<36} {'verdict':<12} {'MFU bf16':>8} " \
           f"{'peak GiB (reserved)':>24} {'graphs':>6}  kernel"
    lines = [head, "-" * len(head)]
    by_name = {c.name: c for c in CASES}
    for r in results:
        case = by_name[r["case"]]
        tok = f"{r['tokens_per_sec']:,.0f}" if r.get("tokens_per_sec") else "-"
        util = f"{100 * r['mfu_vs_bf16_peak']:.1f}%" if r.get("mfu_vs_bf16_peak") is not None else "-"
        mem = f"{r['peak_reserved_gib']:.1f}" if r.get("peak_reserved_gib") is not None else "-"
        if r.get("projected_2gpu_reserved_gib") is not None and case.goal_memory_gib:
            mem += f" ({r['projected_2gpu_reserved_gib']:.1f} at 2 GPUs)"
        lines.append(f"{case.name:<10} {r.get('micro_batch', '-'):>3} {tok:>9} {case.goal:<36} {verdict(case, r):<12} "
                     f"{util:>8} {mem:>24} {r.get('graphs_compiled', '-'):>6}  {r.get('kernel', r.get('error', '-'))[:60]}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="validate and print the plan; no GPU needed")
    ap.add_argument("--out", default="gpu_acceptance.json", help="JSON results (with --dry-run: the plan)")
    ap.add_argument("--only", nargs="*", help="run only these cases")
    ap.add_argument("--steps", type=int, default=6, help="timed optimizer steps per training case")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per training case (compilation)")
    ap.add_argument("--time-limit", type=float, default=480.0, help="seconds for all cases (the goal: 8 minutes)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)  # internal: run one case in this (launched) process
    ap.add_argument("--micro-batch", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("--local_rank", "--local-rank", type=int, default=0, help=argparse.SUPPRESS)  # the launchers'
    args = ap.parse_args(argv)
    if args.worker:
        return worker_main(args)
    started = time.time()
    if not args.dry_run and not torch.cuda.is_available():
        print("error: the GPU acceptance run needs a CUDA GPU (one H100/H200), and this machine has none. "
              "Run `python bench/gpu_acceptance.py --dry-run` here to check the plan.", file=sys.stderr)
        return 2
    try:
        the_plan = plan(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(f"GPU acceptance plan: {len(the_plan['cases'])} case(s), estimated {the_plan['estimated_seconds']:.0f} s "
              f"of {args.time_limit:.0f} s (an estimate; nothing is measured in a dry run)")
        for c in the_plan["cases"]:
            mem = f", estimated {c['estimated_memory_gib']} GiB on 1 GPU" if "estimated_memory_gib" in c else ""
            print(f"  {c['case']:<10} seq {c['seq_len']:>5} micro-batch {c['micro_batch']}{mem}; goal {c['goal']}")
            print(f"             {c['command']}")
        Path(args.out).write_text(json.dumps({"dry_run": True, **the_plan}, indent=2))
        print(f"dry run: all checks passed; plan written to {args.out}")
        return 0
    from train_step import versions

    results, skipped = [], []
    deadline = started + args.time_limit
    for case in (c for c in CASES if not args.only or c.name in args.only):
        need = ESTIMATED_CASE_S["decode" if case.kind == "decode" else "train"]
        if time.time() + need > deadline:
            skipped.append(f"{case.name}: would pass --time-limit {args.time_limit:.0f} s")
            continue
        result = run_case(case, args, deadline)
        saving = next(c for c in the_plan["cases"] if c["case"] == case.name).get("zero_sharding_saving_2gpu_gib")
        if saving is not None and result.get("peak_reserved_gib") is not None:
            result["projected_2gpu_reserved_gib"] = result["peak_reserved_gib"] - saving
        results.append(result)
        print(f"{case.name}: {verdict(case, result)} ({result['wall_s']:.0f} s)", flush=True)
    print()
    print(table(results))
    for s in skipped:
        print(f"skipped: {s}")
    report = {"results": results, "skipped": skipped, "elapsed_s": time.time() - started,
              "command": " ".join([Path(sys.executable).name, *sys.argv]), "versions": versions(),
              "plan": the_plan, "cases": [asdict(c) for c in CASES]}
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"elapsed {report['elapsed_s']:.0f} s; results written to {args.out}")
    return 0 if all(verdict(c, r) in ("met", "-") for r in results for c in CASES if c.name == r["case"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
