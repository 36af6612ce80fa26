"""Stage 3: tokenize stage 1's documents into fixed-size token shards with a document index.

Reads ``01_corpus/`` and ``02_tokenizer/tokenizer.json``; writes ``03_shards/t<tier>-<split>-<nnnnn>.bin``
+ ``.idx`` (format: dante/shards.py) and ``manifest.json`` with token/doc/char counts per tier, language
and source, per-chunk checksums of every file and the encoder used. Every core encodes (one process per
stage-1 file; tiktoken when it is proven to give tokenizers' ids on this run's documents, else
``tokenizers``); a killed run resumes at shard granularity and writes byte-identical shards. Inputs are
checked before ``--force`` deletes anything; a second copy on the same run exits 2 naming the holder. ``--verify`` re-reads a finished stage: headers,
sizes, checksums, id range and decode/encode round trips on a sample of documents, naming bad files.
Logic: ``dante.shards.tokenize_stage`` and ``verify_stage``.

    python 3_tokenize_shards.py --config configs/tiny/shards.yaml
    python 3_tokenize_shards.py --config configs/tiny/shards.yaml --verify
"""

from __future__ import annotations

import sys

from dante.cli import run_command, run_stage
from dante.shards import tokenize_stage, validate_stage, verify_stage

STAGE = "03_shards"


def log(msg: str) -> None:
    print(f"[{STAGE}] {msg}", flush=True)


def main(stage, cfg, args):
    tokenize_stage(stage, cfg, log=log)


def verify(cfg, args) -> int:
    """``--verify``: check a finished 03_shards (the stage is not reopened, nothing is written)."""
    n = verify_stage(cfg)
    log(f"verified {n} shard(s): headers, sizes, checksums, ids and round trips OK")
    return 0


def add_args(ap):
    ap.add_argument("--verify", action="store_true", help="check the shards of a finished run and name bad files")


if __name__ == "__main__":
    if "--verify" in sys.argv[1:]:
        sys.exit(run_command(STAGE, "verify token shards", verify, extra_args=add_args))
    sys.exit(run_stage(STAGE, __doc__.split("\n")[0], main, extra_args=add_args, validate=validate_stage))
