"""How the cost of data preparation (stages 1-3) grows with input size and worker count, measured.

Builds unique inputs of several sizes from the embedded sample (``data/sample/*.jsonl.gz``, or any folder
of ``<source>.jsonl[.gz]`` files given by ``--corpus``): every document is repeated with a first line
``[copy K]`` so that stage 1's exact dedup keeps every copy, and each source keeps its share of the sample.
Then, for each size and worker count, it runs the real scripts as subprocesses (stage 1, then stage 3
with the run's own tokenizer from one stage-2 run) and prints, per stage and size: seconds, chars/s,
tokens/s, the peak RSS of the largest process, and the bytes written. ``--baseline-repo`` runs the
same commands in another checkout (e.g. a worktree of an older commit) for an A/B of code versions.
Last, the per-core rates are extrapolated to a corpus config (its ``char_budget`` sum) on a given
number of cores; linear scaling per core is an assumption, stated with the numbers.

The machine's load average is printed: other jobs on a shared machine change the numbers.

Examples::

    python bench/data_scale.py                                  # sizes 8M and 24M chars, 1 and 2 workers
    python bench/data_scale.py --sizes 16,48 --workers 1,2 --extrapolate configs/dante-2b/corpus.yaml --cores 16
    git worktree add /tmp/dante-old <commit>
    python bench/data_scale.py --baseline-repo /tmp/dante-old
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent

@dataclass
class Measured:
    label: str
    stage: str
    size_chars: int
    workers: int
    seconds: float
    chars: int
    tokens: int
    peak_rss_mb: float
    out_bytes: int
    main_cpu: float = 0.0
    """CPU seconds of the script's own process (stage 1: the committer, and the chunks it took while
    the worker processes started)"""
    total_cpu: float = 0.0
    """CPU seconds of the script and every process under it"""
    inner_seconds: float = 0.0
    """stage 3: the encode loop's own seconds (its manifest's throughput.seconds: no start-up, no encoder proof)"""


def read_sources(corpus: Path, tiny_cfg: dict) -> list[tuple[dict, list[str]]]:
    """(source entry of the tiny corpus config, its texts) for each source whose file exists in ``corpus``."""
    out = []
    for src in tiny_cfg["corpus"]["sources"]:
        name = Path(src["path"]).name
        path = corpus / name
        if not path.exists():
            path = corpus / name.removesuffix(".gz")
        if not path.exists():
            continue
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", encoding="utf-8") as f:
            texts = [json.loads(line)["text"] for line in f if line.strip()]
        out.append((src, texts))
    if not out:
        raise SystemExit(f"no source of configs/tiny/corpus.yaml found in {corpus}")
    return out


def build_input(sources: list[tuple[dict, list[str]]], target_chars: int, folder: Path, tiny_cfg: dict) -> Path:
    """Write unique copies of the sources (same shares) to ``folder`` and a stage-1 config reading them."""
    folder.mkdir(parents=True, exist_ok=True)
    total = sum(len(t) for _, texts in sources for t in texts)
    cfg = json.loads(json.dumps(tiny_cfg))
    cfg["corpus"]["docs_per_shard"] = 20_000
    new_sources = []
    for src, texts in sources:
        want = target_chars * sum(len(t) for t in texts) / total
        path = folder / f"{src['name']}.jsonl"
        written, copy = 0, 0
        with open(path, "w", encoding="utf-8") as f:
            while written < want:
                for t in texts:
                    doc = f"[copy {copy}]\n{t}"
                    f.write(json.dumps({"text": doc}, ensure_ascii=False) + "\n")
                    written += len(doc)
                    if written >= want:
                        break
                copy += 1
        new_sources.append({**src, "path": str(path)})
    cfg["corpus"]["sources"] = new_sources
    cfg_path = folder / "corpus.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    return cfg_path


def run_script(repo: Path, script: str, args: list[str], env: dict) -> tuple[float, float, float, float]:
    """Run ``script`` of ``repo`` with ``args``; (wall seconds, peak MB, CPU seconds of the script's own
    process, CPU seconds of it and all its descendants). Exits on failure.

    Peak memory is the largest sum of RSS over the process and all its descendants (the workers), sampled
    every 20 ms with psutil (a DeepSpeed dependency, so always installed): what the machine must hold.
    CPU times are each process's last sample (user + system), so each misses at most its last 20 ms."""
    import psutil

    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, str(repo / script), *args], cwd=repo, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    ps, peak = psutil.Process(proc.pid), 0
    cpu: dict[int, float] = {}
    out_chunks: list[str] = []
    import threading

    reader = threading.Thread(target=lambda: out_chunks.append(proc.stdout.read()), daemon=True)
    reader.start()
    while proc.poll() is None:
        try:
            tree = [ps, *ps.children(recursive=True)]
            peak = max(peak, sum(_rss(p) for p in tree))
            for p in tree:
                with contextlib.suppress(psutil.Error):
                    t = p.cpu_times()
                    cpu[p.pid] = t.user + t.system
        except psutil.NoSuchProcess:
            pass
        time.sleep(0.02)
    seconds = time.perf_counter() - start
    reader.join()
    if proc.returncode != 0:
        raise SystemExit(f"{script} {' '.join(args)} failed ({proc.returncode}):\n{''.join(out_chunks)[-4000:]}")
    return seconds, peak / 2**20, cpu.get(proc.pid, 0.0), sum(cpu.values())


def _rss(p) -> int:
    try:
        return p.memory_info().rss
    except Exception:  # the process ended between listing and reading
        return 0


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def sets(pairs: dict) -> list[str]:
    out = []
    for k, v in pairs.items():
        out += ["--set", f"{k}={v}"]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="8,24", help="input sizes in millions of characters (comma separated)")
    ap.add_argument("--workers", default="1,2", help="worker counts to run (comma separated)")
    ap.add_argument("--corpus", default=str(REPO / "data" / "sample"), help="folder of <source>.jsonl[.gz] files")
    ap.add_argument("--baseline-repo", default="", help="another checkout to run the same commands in (A/B)")
    ap.add_argument("--extrapolate", default=str(REPO / "configs" / "dante-2b" / "corpus.yaml"),
                    help="corpus config whose char_budget sum the per-core rates are extrapolated to")
    ap.add_argument("--cores", default="16,64", help="core counts for the extrapolation")
    ap.add_argument("--tokenizer-chars", type=int, default=2_000_000, help="stage-2 sample size (one run, reused)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="run stage 1 this many times per size and worker count and keep the fastest (a shared "
                         "machine's other jobs only ever slow a run down)")
    ap.add_argument("--stages", default="1,3", help="'1' measures stage 1 only (no tokenizer, no stage 3)")
    ap.add_argument("--keep", default="", help="keep the work folder here (default: a temporary folder)")
    args = ap.parse_args()
    sizes = [int(float(s) * 1e6) for s in args.sizes.split(",")]
    workers = [int(w) for w in args.workers.split(",")]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    tiny = yaml.safe_load((REPO / "configs" / "tiny" / "corpus.yaml").read_text(encoding="utf-8"))
    sources = read_sources(Path(args.corpus), tiny)
    work = Path(args.keep or tempfile.mkdtemp(prefix="dante-data-scale-"))
    load_before = os.getloadavg()
    print(f"machine: {os.cpu_count()} cores ({len(os.sched_getaffinity(0))} usable), python {sys.version.split()[0]}; "
          f"work folder {work}")
    repos = [("this", REPO)] + ([("baseline", Path(args.baseline_repo).resolve())] if args.baseline_repo else [])
    results: list[Measured] = []
    tok_folder = None
    for size in sizes:
        cfg_path = build_input(sources, size, work / f"input-{size // 1_000_000}M", tiny)
        for label, repo in repos:
            for w in workers:
                root = work / f"runs-{label}-{size // 1_000_000}M-w{w}"
                common = ["--set", f"run.root={root}", "--set", "run.name=bench"]
                s1 = sets(STAGE1_SETTINGS[label](w))
                runs = []
                for _ in range(max(1, args.repeat)):
                    if (root / "bench" / "01_corpus").exists():
                        shutil.rmtree(root / "bench" / "01_corpus")
                    runs.append(run_script(repo, "1_download_corpus.py", ["--config", str(cfg_path), *common, *s1], env))
                sec, peak, main_cpu, total_cpu = min(runs)
                spread = f" (best of {len(runs)}: {', '.join(f'{r[0]:.2f}' for r in runs)} s)" if len(runs) > 1 else ""
                m1 = json.loads((root / "bench" / "01_corpus" / "manifest.json").read_text())
                chars = int(m1["counts"]["chars"])
                results.append(Measured(label, "1", size, w, sec, chars, 0, peak, folder_bytes(root / "bench" / "01_corpus"),
                                        main_cpu, total_cpu))
                print(f"  {label:8} {size / 1e6:5.0f}M w{w} stage 1: {sec:7.2f} s  {chars / sec / 1e6:6.2f} M chars/s  "
                      f"peak {peak:7.0f} MB{spread}", flush=True)
                if "3" not in args.stages.split(","):
                    continue
                if tok_folder is None:  # one tokenizer for every run: stage 3's speed, not stage 2's, is measured
                    tok_args = ["--config", str(REPO / "configs" / "tiny" / "tokenizer.yaml"), *common,
                                *sets({"tokenizer.sample_chars": args.tokenizer_chars, "tokenizer.baseline": "false",
                                       "tokenizer.ab_presets": "[]", "tokenizer.references": "[]"})]
                    run_script(REPO, "2_train_tokenizer.py", tok_args, env)
                    tok_folder = work / "tokenizer"
                    shutil.copytree(root / "bench" / "02_tokenizer", tok_folder)
                else:
                    shutil.copytree(tok_folder, root / "bench" / "02_tokenizer")
                for enc_label, extra in STAGE3_SETTINGS[label](w):
                    out = root / "bench" / "03_shards"
                    if out.exists():
                        shutil.rmtree(out)
                    s3 = ["--config", str(repo / "configs" / "tiny" / "shards.yaml"), *common, *sets(extra)]
                    sec, peak, main_cpu, total_cpu = run_script(repo, "3_tokenize_shards.py", s3, env)
                    m3 = json.loads((out / "manifest.json").read_text())
                    tokens = sum(int(v["tokens"]) for v in m3["counts"]["total"].values())
                    used = (m3.get("encoder") or {}).get("used", "tokenizers")
                    if used != enc_label:
                        print(f"  note: {enc_label} asked, {used} used: {(m3.get('encoder') or {}).get('reason')}")
                    inner = float(m3.get("throughput", {}).get("seconds") or sec)
                    results.append(Measured(f"{label}/{enc_label}", "3", size, w, sec, chars, tokens, peak,
                                            folder_bytes(out), main_cpu, total_cpu, inner))
                    print(f"  {label + '/' + enc_label:16} {size / 1e6:5.0f}M w{w} stage 3: {sec:7.2f} s  "
                          f"{tokens / sec / 1e3:7.0f} K tok/s (encode loop {tokens / inner / 1e3:7.0f} K tok/s, "
                          f"{tokens / inner / w / 1e3:7.0f} per worker)  peak {peak:7.0f} MB", flush=True)
    load_after = os.getloadavg()
    print()
    print_table(results)
    print()
    extrapolate(results, Path(args.extrapolate), [int(c) for c in args.cores.split(",")])
    print(f"\nload average (1, 5, 15 min) before: {', '.join(f'{x:.2f}' for x in load_before)}; after: "
          f"{', '.join(f'{x:.2f}' for x in load_after)} (above the core count means other jobs shared the CPUs)")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def print_table(results: list[Measured]) -> None:
    print("seconds and rates are wall clock of the whole script (start-up included); 'loop K tok/s' is stage 3's "
          "encode loop alone")
    print(f"{'code':18} {'stage':>5} {'input':>7} {'workers':>7} {'seconds':>8} {'M chars/s':>9} {'K tok/s':>8} "
          f"{'loop K tok/s':>12} {'peak MB':>8} {'out MB':>8} {'CPU s':>7} {'main CPU s':>10}")
    for r in results:
        tok = f"{r.tokens / r.seconds / 1e3:8.0f}" if r.tokens else f"{'':>8}"
        loop = f"{r.tokens / r.inner_seconds / 1e3:12.0f}" if r.tokens else f"{'':>12}"
        print(f"{r.label:18} {r.stage:>5} {r.size_chars / 1e6:6.0f}M {r.workers:7d} {r.seconds:8.2f} "
              f"{r.chars / r.seconds / 1e6:9.2f} {tok} {loop} {r.peak_rss_mb:8.0f} {r.out_bytes / 1e6:8.1f} "
              f"{r.total_cpu:7.2f} {r.main_cpu:10.2f}")
    speedups(results)


def speedups(results: list[Measured]) -> None:
    """The ratios the data-scale issue asks for, from the rows above (same input size each)."""
    print()
    by = {(r.label, r.stage, r.size_chars, r.workers): r for r in results}
    for size in sorted({r.size_chars for r in results}):
        ws = sorted({r.workers for r in results if r.size_chars == size})
        one, most = ws[0], ws[-1]
        s1a, s1b = by.get(("this", "1", size, one)), by.get(("this", "1", size, most))
        if s1a and s1b and most > one:
            print(f"{size / 1e6:.0f}M: stage 1 with {most} workers vs {one}: {s1a.seconds / s1b.seconds:.2f}x")
        fast, slow = by.get(("this/tiktoken", "3", size, one)), by.get(("this/tokenizers", "3", size, one))
        base = by.get(("baseline/tokenizers", "3", size, one)) or slow
        if fast and base:
            print(f"{size / 1e6:.0f}M: stage 3 tiktoken vs {base.label}, tokens/s per worker ({one} worker): encode loop "
                  f"{base.inner_seconds / fast.inner_seconds:.2f}x, whole script {base.seconds / fast.seconds:.2f}x")
        b1, b3 = by.get(("baseline", "1", size, most)), by.get(("baseline/tokenizers", "3", size, most))
        n1, n3 = s1b, by.get(("this/tiktoken", "3", size, most))
        if b1 and b3 and n1 and n3:
            print(f"{size / 1e6:.0f}M: stages 1+3 with {most} workers, this vs baseline: "
                  f"{(b1.seconds + b3.seconds) / (n1.seconds + n3.seconds):.2f}x faster "
                  f"({b1.seconds + b3.seconds:.1f} s -> {n1.seconds + n3.seconds:.1f} s)")


def extrapolate(results: list[Measured], corpus_cfg: Path, cores: list[int]) -> None:
    """Hours for the corpus config's character budget on ``cores`` cores, from the largest input's
    per-core rates. Stage 1 is bounded twice: by its workers (CPU seconds of all processes per character,
    spread over the cores) and by its one committer (its own CPU seconds per character, which no core
    count divides); the larger bound is taken. Linear scaling beyond the measured cores is an assumption."""
    cfg = yaml.safe_load(corpus_cfg.read_text(encoding="utf-8"))
    budget = sum(int(s.get("char_budget") or 0) for s in cfg["corpus"]["sources"])
    mine = [r for r in results if r.label.startswith("this")]
    if not mine or not budget:
        return
    biggest = max(r.size_chars for r in mine)
    s1 = [r for r in mine if r.stage == "1" and r.size_chars == biggest]
    par = max(s1, key=lambda r: r.workers)
    cpu_per_char = par.total_cpu / par.chars  # every process: what the cores must supply
    committer_rate = par.chars / par.main_cpu if par.workers > 1 and par.main_cpu else 0.0
    s3 = [r for r in mine if r.stage == "3" and r.size_chars == biggest]
    best3 = max(s3, key=lambda r: r.tokens / r.inner_seconds / r.workers) if s3 else None
    tok_per_char = best3.tokens / best3.chars if best3 else 0.0
    t3 = best3.tokens / best3.inner_seconds / best3.workers if best3 else 0.0  # the proof and start-up are fixed costs
    print(f"extrapolation to {corpus_cfg} ({budget / 1e9:.0f}B chars"
          + (f", ~{budget * tok_per_char / 1e9:.0f}B tokens at this tokenizer's {tok_per_char:.3f} tokens/char" if best3 else "")
          + f"), from the {biggest / 1e6:.0f}M input: stage 1 {1 / cpu_per_char / 1e6:.1f} M chars per CPU-second "
          f"({par.workers} workers, all processes)"
          + (f", its committer {committer_rate / 1e6:.0f} M chars/s at most" if committer_rate else "")
          + (f"; stage 3 {t3 / 1e3:.0f} K tok/s per core ({best3.label}, {best3.workers} workers)" if best3 else "")
          + "; assumes linear scaling per core (an estimate, not a measurement)")
    for n in cores:
        h1 = max(budget * cpu_per_char / n, budget / committer_rate if committer_rate else 0.0) / 3600
        line = f"  {n:3d} cores: stage 1 {h1:6.1f} h"
        if best3:
            h3 = budget * tok_per_char / (t3 * n) / 3600
            line += f" + stage 3 {h3:6.1f} h = {h1 + h3:6.1f} h"
        print(line)


# How each code version is told its worker count and encoder (the baseline predates corpus.workers and
# shards.encoder: stage 1 was one process, stage 3 used `tokenizers` only).
STAGE1_SETTINGS = {
    "this": lambda w: {"corpus.workers": w},
    "baseline": lambda w: {},
}
STAGE3_SETTINGS = {
    "this": lambda w: [("tiktoken", {"shards.workers": w, "shards.encoder": "auto"}),
                       ("tokenizers", {"shards.workers": w, "shards.encoder": "tokenizers"})],
    "baseline": lambda w: [("tokenizers", {"shards.workers": w})],
}

if __name__ == "__main__":
    sys.exit(main())
