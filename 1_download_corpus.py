"""Stage 1: stream the corpus sources, clean them and write compressed document shards.

Reads the sources declared in ``corpus.sources`` (hub datasets streamed through ``datasets``, local
jsonl/txt/parquet files in deterministic chunks), applies NFC normalization and the min_chars filter on
``corpus.workers`` processes, then stage-wide exact deduplication and per-source character budgets in one
committer, and writes ``runs/<run>/01_corpus/<source>/shard-NNNNN.jsonl.zst`` plus ``manifest.json``
(per-source statistics, totals per language): the same bytes for any worker count. A killed run resumes
from the last completed shard; ``--dry-run`` checks the local sources and prints the plan without
touching the network.
The logic lives in ``dante/corpus.py``.

Example::

    python 1_download_corpus.py --config configs/tiny/corpus.yaml
    python 1_download_corpus.py --config configs/tiny/corpus.yaml --set corpus.workers=2
    python 1_download_corpus.py --config configs/dante-2b/corpus.yaml --dry-run
"""

from __future__ import annotations

import time

from dante import corpus
from dante.artifacts import run_dir
from dante.cli import run_stage


def main(stage, cfg, args) -> None:
    started = time.perf_counter()
    manifest = corpus.build_corpus(stage, cfg)
    out = manifest["outputs"]
    for lang, t in out["totals"].items():
        print(f"[01_corpus] {lang}: {t['docs']:,} docs, {t['chars']:,} chars from {', '.join(t['sources'])}")
    c = manifest["counts"]
    print(f"[01_corpus] done in {time.perf_counter() - started:.1f}s: {c['docs']:,} docs, {c['chars']:,} chars, "
          f"{c['shards']} shards in {stage.dir}")


def dry_run(cfg, args) -> None:
    print(corpus.describe_plan(cfg, run_dir(cfg.run) / "01_corpus"))


if __name__ == "__main__":
    raise SystemExit(run_stage("01_corpus", __doc__.split("\n\n")[0], main,
                               format_version=corpus.FORMAT_VERSION, dry_run=dry_run, validate=corpus.validate,
                               resume_check=corpus.resume_check))
