"""Stage 3: tokenize stage 1's documents into fixed-size token shards with a document index.

Reads ``01_corpus/`` and ``02_tokenizer/tokenizer.json``; writes ``03_shards/t<tier>-<split>-<nnnnn>.bin``
+ ``.idx`` (format: dante/shards.py) and ``manifest.json`` with token/doc/char counts per tier, language
and source. Every core encodes (one process per stage-1 file, ``encode_batch``); a killed run resumes
at shard granularity and writes byte-identical shards. ``--verify`` re-reads a finished stage: headers,
sizes, checksums, id range and decode/encode round trips on a sample of documents, naming bad files.

    python 3_tokenize_shards.py --config configs/tiny/shards.yaml
    python 3_tokenize_shards.py --config configs/tiny/shards.yaml --verify
"""

from __future__ import annotations

import os
import shutil
import sys
import time

from dante.artifacts import file_sha256, read_manifest, stage_dir, tokenizer_path
from dante.cli import run_command, run_stage
from dante.corpus import FORMAT_VERSION as CORPUS_FORMAT
from dante.errors import UserError, problems_message
from dante.shards import (
    FORMAT_VERSION,
    WORK_DIR,
    EncodeSettings,
    check_dtype_fits,
    collect_stats,
    corpus_files,
    tokenize_corpus,
    tokenizer_sha16,
    verify_shards,
)
from dante.tokenizer import EOS_ID, load_tokenizer

STAGE = "03_shards"


def main(stage, cfg, args):
    s = cfg.shards
    corpus = stage.require("01_corpus", CORPUS_FORMAT)
    tok_manifest = stage.require("02_tokenizer")
    tok_path = tokenizer_path(cfg.run)
    tok = load_tokenizer(tok_path)
    vocab_size = tok.get_vocab_size(with_added_tokens=True)
    check_dtype_fits(vocab_size, s.dtype, tok_path)
    stage.add_input("tokenizer", tok_path)
    files = corpus_files(stage_dir(cfg.run, "01_corpus"), corpus)
    workers = s.workers or len(os.sched_getaffinity(0))
    settings = EncodeSettings(str(tok_path), s.dtype, EOS_ID, cfg.run.seed, s.val_fraction, s.batch_docs,
                              str(stage.dir / WORK_DIR))
    header = {"dtype": s.dtype, "vocab_size": vocab_size, "eos_id": EOS_ID, "tokenizer_sha16": tokenizer_sha16(tok_path)}
    print(f"[{STAGE}] {len(files)} input files, {workers} worker(s), {s.shard_tokens:,} tokens per shard", flush=True)
    sha = file_sha256(tok_path)
    if tok_manifest["outputs"].get("tokenizer_sha256", sha) != sha:
        raise UserError(f"{tok_path} changed after stage 2 finished (sha256 differs from its manifest). "
                        f"HINT: rerun `python 2_train_tokenizer.py --force`.")
    progress = stage.load_progress()
    if progress.get("tokenizer_sha256", sha) != sha:  # resuming with another tokenizer would mix two encodings
        raise UserError(f"{stage.dir} holds an unfinished run made with another tokenizer. HINT: add --force to start over.")
    stage.save_progress({"tokenizer_sha256": sha, "streams": progress.get("streams", {})})  # before any work file
    start = time.time()
    streams = tokenize_corpus(
        files, settings, stage.dir, s.shard_tokens, header, workers, progress.get("streams", {}),
        lambda state: stage.save_progress({"tokenizer_sha256": sha, "streams": state}),
        log=lambda m: print(f"[{STAGE}] {m}", flush=True),
    )
    seconds = time.time() - start
    stats = collect_stats(files, stage.dir / WORK_DIR)
    shutil.rmtree(stage.dir / WORK_DIR)  # after the stats: only shards and the manifest remain
    shards = {split: {} for split in ("train", "val")}
    for st in streams.values():
        if st["names"]:
            shards[st["split"]][str(st["tier"])] = st["names"]
    total = stats["total"]
    if s.val_fraction > 0 and not total.get("val", {}).get("tokens"):
        print(f"[{STAGE}] warning: no document fell in the validation split (val_fraction={s.val_fraction})")
    n_bytes = sum(v["bytes"] for v in total.values())
    n_tokens = sum(v["tokens"] for v in total.values())
    print(f"[{STAGE}] {n_tokens:,} tokens in {sum(len(v) for sp in shards.values() for v in sp.values())} shards, "
          f"{seconds:.1f} s ({n_bytes / 1e6 / seconds:.2f} MB/s, {n_tokens / seconds:,.0f} tokens/s this run)")
    stage.finish(
        outputs={"format": "dante-shards", "shard_format_version": FORMAT_VERSION, "dtype": s.dtype,
                 "vocab_size": vocab_size, "eos_id": EOS_ID, "shard_tokens": s.shard_tokens, "shards": shards},
        counts=stats,
        extra={"throughput": {"seconds": round(seconds, 2), "workers": workers, "resumed": stage.resumed}},
    )


def verify(cfg, args) -> int:
    """``--verify``: check a finished 03_shards (the stage is not reopened, nothing is written)."""
    manifest = read_manifest(cfg.run, STAGE)
    tok = load_tokenizer(tokenizer_path(cfg.run))
    problems = verify_shards(stage_dir(cfg.run, STAGE), manifest, tok, cfg.shards.verify_samples, cfg.run.seed)
    n = sum(len(v) for sp in manifest["outputs"]["shards"].values() for v in sp.values())
    if problems:
        raise UserError(problems_message(f"{len(problems)} problem(s) in {n} shard(s)", problems)
                        + "\n  HINT: rerun `python 3_tokenize_shards.py --force` to rebuild them.")
    print(f"[{STAGE}] verified {n} shard(s): headers, sizes, checksums, ids and round trips OK")
    return 0


def add_args(ap):
    ap.add_argument("--verify", action="store_true", help="check the shards of a finished run and name bad files")


if __name__ == "__main__":
    if "--verify" in sys.argv[1:]:
        sys.exit(run_command(STAGE, "verify token shards", verify, extra_args=add_args))
    sys.exit(run_stage(STAGE, __doc__.split("\n")[0], main, extra_args=add_args))
