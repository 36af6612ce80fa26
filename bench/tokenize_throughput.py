"""Stage-3 throughput: the parallel shard writer next to a one-process ``encode`` loop, same input.

Both read the same stage-1 shards (zstd or, from older runs, gzip; JSON lines) and encode every document with the same tokenizer;
the loop calls ``Tokenizer.encode`` once per document in this process and keeps only the count, while
stage 3 (``dante.shards.tokenize_corpus``) runs one process per input file with ``encode_batch`` and
writes real shards into a temporary folder. MB are UTF-8 bytes of text. The machine's load average is
printed before and after, because other jobs on a shared machine change the numbers.

Needs a finished stages 1 and 2 (e.g. ``make demo`` or the first two numbered scripts):

    python bench/tokenize_throughput.py --run runs/tiny
    python bench/tokenize_throughput.py --run runs/tiny --workers 2 --repeat 2
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dante.artifacts import read_json  # noqa: E402
from dante.corpus import corpus_files, iter_shard_texts  # noqa: E402
from dante.shards import EncodeSettings, tokenize_corpus  # noqa: E402
from dante.tokenizer import EOS_ID, load_tokenizer  # noqa: E402


def cpu_seconds() -> float:
    """User + system CPU of this process and its reaped children (the stage-3 workers, once joined)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def one_process_loop(files, tokenizer_path: Path) -> tuple[float, int, int]:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # encode() is single-threaded anyway; be explicit
    tok = load_tokenizer(tokenizer_path)
    start = time.perf_counter()
    n_bytes = n_tokens = 0
    for cf in files:
        for _, text in iter_shard_texts(cf.path):
            n_tokens += len(tok.encode(text, add_special_tokens=False).ids) + 1  # + EOS, as stage 3
            n_bytes += len(text.encode("utf-8"))
    return time.perf_counter() - start, n_bytes, n_tokens


def stage3(files, tokenizer_path: Path, workers: int, batch_docs: int) -> float:
    with tempfile.TemporaryDirectory(prefix="dante-bench-") as tmp:
        out = Path(tmp)
        settings = EncodeSettings(str(tokenizer_path), "uint16", EOS_ID, 1234, 0.005, batch_docs, str(out / ".work"))
        header = {"dtype": "uint16", "vocab_size": load_tokenizer(tokenizer_path).get_vocab_size(), "eos_id": EOS_ID,
                  "tokenizer_sha16": b"\0" * 16}
        start = time.perf_counter()
        tokenize_corpus(files, settings, out, 10_000_000, header, workers, {}, lambda state: None, log=lambda m: None)
        return time.perf_counter() - start


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", default="runs/tiny", help="run folder holding 01_corpus/ and 02_tokenizer/")
    ap.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)), help="stage-3 processes (default: all cores)")
    ap.add_argument("--batch-docs", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=1, help="runs of each; the best time is reported")
    args = ap.parse_args()
    run = Path(args.run)
    for stage in ("01_corpus", "02_tokenizer"):
        if not (run / stage / "manifest.json").is_file():
            print(f"{run / stage} is not complete: run stages 1 and 2 first (e.g. `make demo`)", file=sys.stderr)
            return 2
    files = corpus_files(run / "01_corpus", read_json(run / "01_corpus/manifest.json"))
    tok_path = run / "02_tokenizer" / read_json(run / "02_tokenizer/manifest.json")["outputs"]["tokenizer"]
    load_before = os.getloadavg()
    cpu0 = cpu_seconds()
    loop = min((one_process_loop(files, tok_path) for _ in range(args.repeat)), key=lambda r: r[0])
    cpu1 = cpu_seconds()
    seconds_loop, n_bytes, n_tokens = loop
    seconds_stage = min(stage3(files, tok_path, args.workers, args.batch_docs) for _ in range(args.repeat))
    cpu2 = cpu_seconds()
    load_after = os.getloadavg()
    print(f"input: {len(files)} stage-1 files, {n_bytes / 1e6:.2f} MB, {n_tokens:,} tokens; cores: {os.cpu_count()}")
    print(f"{'':34} {'seconds':>8} {'MB/s':>8} {'tokens/s':>12}")
    print(f"{'one-process encode loop':34} {seconds_loop:8.2f} {n_bytes / 1e6 / seconds_loop:8.2f} {n_tokens / seconds_loop:12,.0f}")
    print(f"{f'stage 3, {args.workers} workers (writes shards)':34} {seconds_stage:8.2f} "
          f"{n_bytes / 1e6 / seconds_stage:8.2f} {n_tokens / seconds_stage:12,.0f}")
    print(f"speedup: {seconds_loop / seconds_stage:.2f}x (goal >= 1.8x on 2 cores)")
    # CPU time does not depend on how busy the machine is: equal CPU per byte means the parallel path
    # adds no work, so on idle cores its speedup is the worker count (bounded by the largest input file).
    print(f"CPU seconds per run: loop {(cpu1 - cpu0) / args.repeat:.2f}, stage 3 {(cpu2 - cpu1) / args.repeat:.2f} "
          f"(all processes); largest input file {max(cf.path.stat().st_size for cf in files) / 1e6:.2f} MB gz")
    print(f"load average (1, 5, 15 min) before: {', '.join(f'{x:.2f}' for x in load_before)}; "
          f"after: {', '.join(f'{x:.2f}' for x in load_after)} (> cores means other jobs shared the CPUs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
