"""Stage 1's compression choices, measured: zstd level and frame size on real shard records.

Builds stage-1 records (``{"text", "source", "lang", "tier"}`` JSON lines, as ``dante.corpus_chunks``
writes them) from the embedded sample (or ``--corpus``: a folder of ``*.jsonl[.gz]``), then prints

- per compressor (gzip 6, the version-1 format; zstd levels 1-19): ratio and MB/s of one frame per 4 MiB;
- per frame size at ``ZSTD_LEVEL``: bytes vs one frame per 4 MiB (what ``FRAME_BYTES`` trades: smaller
  frames cost the committer less to re-encode when a shard boundary, a duplicate or the budget cuts one).

Example::

    python bench/zstd_frames.py
"""

from __future__ import annotations

import argparse
import glob
import gzip
import json
import sys
import time
from pathlib import Path

import zstandard

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from dante.corpus_chunks import FRAME_BYTES, ZSTD_LEVEL  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def records(corpus: Path) -> list[bytes]:
    out = []
    for f in sorted(glob.glob(str(corpus / "*.jsonl*"))):
        opener = gzip.open if f.endswith(".gz") else open
        with opener(f, "rt", encoding="utf-8") as fh:
            for line in fh:
                if line.strip():
                    rec = {"text": json.loads(line)["text"], "source": Path(f).name.split(".")[0], "lang": "it", "tier": 1}
                    out.append((json.dumps(rec, ensure_ascii=False) + "\n").encode())
    return out


def frames(recs: list[bytes], limit: int, compress) -> tuple[int, float]:
    """(compressed bytes, seconds) with frames cut between records once they reach ``limit`` bytes."""
    total, cur, size, secs = 0, [], 0, 0.0
    for i, r in enumerate(recs):
        cur.append(r)
        size += len(r)
        if size >= limit or i == len(recs) - 1:
            t = time.perf_counter()
            total += len(compress(b"".join(cur)))
            secs += time.perf_counter() - t
            cur, size = [], 0
    return total, secs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--corpus", default=str(REPO / "data" / "sample"))
    ap.add_argument("--repeat", type=int, default=3, help="best of N timings")
    args = ap.parse_args()
    recs = records(Path(args.corpus))
    raw = sum(len(r) for r in recs)
    print(f"{len(recs):,} records, {raw / 1e6:.1f} MB (from {args.corpus})")
    print(f"{'compressor':10} {'ratio':>6} {'MB/s':>7}")
    compressors = {"gzip-6": lambda b: gzip.compress(b, compresslevel=6, mtime=0)}
    for level in (1, 3, 6, 9, 19):
        compressors[f"zstd-{level}"] = zstandard.ZstdCompressor(level=level, write_checksum=True, write_content_size=True).compress
    for name, fn in compressors.items():
        best = min(frames(recs, 4 << 20, fn)[1] for _ in range(args.repeat if not name.endswith("19") else 1))
        size = frames(recs, 4 << 20, fn)[0]
        print(f"{name:10} {raw / size:6.2f} {raw / best / 1e6:7.1f}")
    fn = compressors[f"zstd-{ZSTD_LEVEL}"]
    base = frames(recs, 4 << 20, fn)[0]
    print(f"\nframe size at zstd level {ZSTD_LEVEL} (FRAME_BYTES = {FRAME_BYTES >> 10} KiB): bytes vs one frame per 4 MiB")
    for kib in (64, 256, 512, 1024, 4096):
        size = frames(recs, kib << 10, fn)[0]
        print(f"{kib:5d} KiB {size:12,d} {100 * (size / base - 1):+6.2f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
