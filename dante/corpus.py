"""Stage 1: read text sources, normalize, filter, deduplicate and write compressed document shards.
(The shard writer and the readers of stage 1's shards share the record format, so they stay together;
the chunks and the worker are in ``dante.corpus_chunks``, the dedup set in ``dante.dedup``.)

Reading: hub sources stream through ``datasets`` (``load_dataset(hf_id, ..., streaming=True)``, cut by
``IterableDataset.reshard()`` / ``shard()``: a parquet row group per chunk, streamed by the worker that
processes it); local jsonl / txt / parquet files are read directly, in deterministic chunks
(``dante.corpus_chunks``: line-aligned byte ranges of ``corpus.chunk_bytes``, parquet row groups, whole files
where a source cannot be cut, which the log says). ``corpus.workers`` processes (0: all cores; 1: all in
this process) turn each chunk's rows into candidates and compressed records through the same steps:

1. text extraction (``text_field``, a dotted path reaches into nested mappings such as Europarl's
   ``translation.it``; a missing field fails the source with the list of available fields; a line that is
   not JSON fails it naming the file and line);
2. the non-UTF-8 policy (``corpus.non_utf8``): undecodable bytes in local files are replaced by U+FFFD
   while reading (``error``: reported with file and line), and any document holding U+FFFD or a lone
   surrogate (what decoders leave behind) is dropped and counted (``skip``) or fails the source (``error``);
3. Unicode NFC normalization (a decomposed "e" + U+0300 becomes the single code point "è"), so the same
   word always reaches the tokenizer as the same bytes;
4. the ``min_chars`` filter (length after NFC, surrounding whitespace not counted);

then ONE committer (this process) applies, strictly in (source, chunk, row) order:

5. exact-duplicate removal over the whole stage by a 64-bit BLAKE2b of the UTF-8 text: the first
   occurrence wins, in the order sources are processed (config order in an uninterrupted run);
6. the character budget: a source stops at the row whose kept characters reach ``char_budget`` (0: no limit).

Guarantees: the documents, their order, the shard bytes and the statistics are the same for any
``corpus.workers`` (tests: 1, 2 and 3 workers byte-identical) and after a SIGKILL at any moment followed
by a rerun, with any worker count (tests: kill with 2, rerun with 1). Every problem of the local sources
is found by ``validate`` before anything is written (also by ``--dry-run``, and before ``--force`` deletes
a finished stage). Writes are atomic; the stage lock and the removal of a killed run's temporaries at
start (``Stage.open``) leave no ``.*.tmp`` in a finished folder. (The ``.progress.json.*.tmp`` seen in a
finished folder came from a run killed inside a progress write: nothing removed it when the rerun
resumed and finished; nothing else writes progress, so no write races the manifest.)

Output: ``01_corpus/<source>/shard-NNNNN.jsonl.zst``, records ``{"text", "source", "lang", "tier"}``,
``docs_per_shard`` documents each: zstd frames (level ``ZSTD_LEVEL``, content size and checksum in each;
the workers' frames of ~``FRAME_BYTES``, copied as they are, or re-encoded by the committer where a shard
boundary, a duplicate or the budget cuts one), then an end mark (``END_MAGIC``: a skippable frame holding
the record count, so a file cut between frames is refused). Any zstd decoder reads a shard as one stream
(``zstd -dc shard-00000.jsonl.zst``). Beside each, ``shard-NNNNN.hashes`` (the shard's dedup keys,
little-endian uint64). Both are written by writer threads while the committer goes on. Format version 3;
the readers below also read version 2 (one frame, no end mark) and version 1 (gzip, ``.jsonl.gz``): they
go by the magic bytes.

Resume: when a shard is written (shards are recorded strictly in order), ``progress.json`` records per
source the shards, the position after the shard's last document (chunk number, row in it, and the
chunk's start: file and byte offset, row group, stream shard, or the hub stream's ``state_dict()`` / row count) and the
statistics. A killed run reloads the dedup keys of the recorded shards, rebuilds the chunks from that
position (same bounds, same numbers) and continues at the recorded row. A failing source (missing hub
dataset, bad bytes with policy ``error``, bad JSON, no document kept) records its error and the others go
on; the stage then exits non-zero, names the failed sources and writes no manifest. Rerunning (with the
same config, or one where only failed or pending sources changed, or ``corpus.workers``:
``resume_check``) retries them after the sources completed meanwhile, which then come first in the dedup
order (recorded in the manifest as ``dedup_order``).

Readers of a finished stage 1 live here too, beside the writer of the format they read: ``corpus_files``
lists its shards as ``CorpusFile`` s (with their source, language and tier), ``iter_shard_texts`` yields
the checked texts of one shard (stages 2 and 3; a truncated zstd frame, bad gzip, bad UTF-8 or JSON is a
UserError naming the file), ``read_shard`` / ``iter_documents`` the raw records.

Memory: the dedup set holds one 64-bit key per kept document in a numpy open-addressing table,
10.7-21.3 bytes per key (measured numbers and the command: ``dante.dedup``); 64-bit keys collide with
probability ~n^2/2^65 (4e-4 at 1.2e8 documents: expect no false duplicate). The committer keeps at most
2 x workers chunks in flight, their compressed frames (~1/3 of the text; a worker spools them to a file in
``.spool-<pid>/``, read back in one call), and the shard being filled.

Speed (``python bench/data_scale.py``; numbers, machine and commands in docs/PERFORMANCE.md, "Data
preparation at scale"): on the 2-core dev VM, real text, one worker (everything in this process) 50-57M
chars/s, 3.4x the old one-process gzip code; 2 workers 1.62x one at 200M and 480M characters, 1.82x at
1000M (fixed costs: the worker processes' start, the last shards' fsync). The committer's own CPU was
0.98-2.5 s per run (1.5 at 480M, start-up included), so one committer can serve ~300M chars/s: about 6
workers' output. Past that it is the bottleneck (an estimate: only 2 cores were measured).

Example::

    python 1_download_corpus.py --config configs/tiny/corpus.yaml
    python 1_download_corpus.py --config configs/dante-2b/corpus.yaml --dry-run
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import glob
import gzip
import io
import json
import os
import shutil
import struct
import sys
import threading
import traceback
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import zstandard
from tqdm import tqdm

from dante import config as C
from dante.artifacts import Stage, atomic_write_bytes, describe_path
from dante.corpus_chunks import (  # noqa: F401 -- part of this module's API
    FILTERED,
    NON_UTF8,
    Chunk,
    ChunkResult,
    SourceError,
    ZSTD_LEVEL,
    HF_CHUNK_ROWS,
    SourceRules,
    compress_frame,
    cuttable_note,
    extract_text,
    file_chunks,
    hub_chunks,
    is_undecodable,
    line_chunks,
    parquet_chunks,
    process_chunk,
    process_task,
    records_frames,
    stream_shard_chunks,
)
from dante.dedup import (
    DedupIndex,
    read_hashes,  # noqa: F401 -- part of this module's API
    write_hashes_bytes,
)
from dante.errors import UserError, problems_message, raise_problems

FORMAT_VERSION = 3
"""3: zstd shards (``.jsonl.zst``) as a sequence of zstd frames (compressed by the workers) closed by an
end mark holding the record count. Versions 1 (gzip shards) and 2 (one zstd frame, no end mark) stay
readable by ``corpus_files`` / ``iter_shard_texts``: the readers go by the file's magic bytes."""
READABLE_FORMATS = (1, 2, 3)
SHARD_NAME = "shard-{:05d}.jsonl.zst"
HASHES_SUFFIX = ".hashes"
GZIP_MAGIC, ZSTD_MAGIC = b"\x1f\x8b", b"\x28\xb5\x2f\xfd"
END_MAGIC = struct.pack("<I", 0x184D2A5D)
"""A zstd skippable frame (magic 0x184D2A50-5F: every zstd decoder, the ``zstd`` command included, skips
it) that ends each format-3 shard: 8 bytes of payload, the shard's record count (uint64, little-endian).
A shard cut between two frames would otherwise read as a valid, shorter shard."""


@dataclass
class SourceStats:
    docs_read: int = 0
    """Rows read from the stream."""
    docs: int = 0
    """Documents kept (written to shards)."""
    chars: int = 0
    """Characters kept (after NFC)."""
    dropped_filter: int = 0
    """Empty or shorter than min_chars."""
    dropped_dedup: int = 0
    """Exact duplicates of an earlier document of the stage."""
    dropped_non_utf8: int = 0
    """Held undecodable bytes (policy skip)."""


# ---------------------------------------------------------------------------------------------------
# Shards
# ---------------------------------------------------------------------------------------------------


def write_shard(path: Path, records: list[dict]) -> None:
    """One JSON-lines shard, atomically: zstd (level ``ZSTD_LEVEL``, with a checksum) for ``.zst``, gzip
    (mtime 0, the version-1 format) for ``.gz``; identical content gives identical bytes."""
    payload = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
    write_shard_bytes(path, payload)


def write_shard_bytes(path: Path, payload: bytes) -> None:
    if path.suffix == ".gz":
        data = gzip.compress(payload, compresslevel=6, mtime=0)
    else:
        data = compress_frame(payload) + end_mark(payload.count(b"\n"))
    atomic_write_bytes(path, data)


def end_mark(records: int) -> bytes:
    """The skippable frame that closes a format-3 shard (``END_MAGIC``)."""
    return END_MAGIC + struct.pack("<IQ", 8, records)


def _open_shard_text(path: str | Path):
    """A shard's text, by its magic bytes (gzip: version 1; zstd: version 2)."""
    raw = open(path, "rb")
    magic = raw.read(4)
    raw.seek(0)
    if magic[:2] == GZIP_MAGIC:
        return io.TextIOWrapper(gzip.GzipFile(fileobj=raw, mode="rb"), encoding="utf-8")
    if magic == ZSTD_MAGIC:
        return io.TextIOWrapper(_CheckedZstd(raw), encoding="utf-8")
    raw.close()
    raise UserError(f"{path}: not a stage-1 shard (neither zstd nor gzip). HINT: rebuild it with "
                    f"`python 1_download_corpus.py --force`.")


class _CheckedZstd(io.RawIOBase):
    """A shard's zstd frames decoded in one pass, checked: a file cut inside a frame, or after a frame
    without the end mark (format 3; a format-2 shard is one frame without it), or whose end mark counts
    other than the records read, is an error (zstandard's stream reader would end quietly there). Each
    frame's checksum is verified by the decoder at its end."""

    def __init__(self, raw) -> None:
        self._raw = raw
        self._dobj = None  # the frame being decoded; None between frames
        self._pending = b""  # compressed bytes read but not decoded yet
        self._out = memoryview(b"")
        self._frames = self._records = 0
        self._ended = False

    def readable(self) -> bool:
        return True

    def _take(self, n: int) -> bytes:
        while len(self._pending) < n:
            piece = self._raw.read(1 << 20)
            if not piece:
                break
            self._pending += piece
        head, self._pending = self._pending[:n], self._pending[n:]
        return head

    def _between_frames(self) -> None:
        head = self._take(4)
        if not head:
            if self._frames > 1:
                raise zstandard.ZstdError(f"the file ends after {self._frames} frames without the shard's end mark (truncated)")
            self._ended = True  # a format-2 shard: one frame, no end mark
        elif head == END_MAGIC:
            size, count = struct.unpack("<IQ", self._take(12).ljust(12, b"\0"))
            if size != 8 or count != self._records:
                raise zstandard.ZstdError(f"the end mark counts {count} records, {self._records} were read")
            if self._take(1):
                raise zstandard.ZstdError("bytes after the shard's end mark")
            self._ended = True
        elif head == ZSTD_MAGIC:
            self._dobj = zstandard.ZstdDecompressor().decompressobj()
            self._pending = head + self._pending
        else:
            raise zstandard.ZstdError(f"not a zstd frame after frame {self._frames}")

    def readinto(self, b) -> int:
        while not self._out:
            if self._ended:
                return 0
            if self._dobj is None:
                self._between_frames()
                continue
            piece = self._pending or self._raw.read(1 << 20)
            self._pending = b""
            if not piece:
                raise zstandard.ZstdError("the file ends inside a zstd frame (truncated)")
            out = self._dobj.decompress(piece)
            if self._dobj.eof:
                self._pending, self._dobj = self._dobj.unused_data, None
                self._frames += 1
            self._records += out.count(b"\n")
            self._out = memoryview(out)
        n = min(len(b), len(self._out))
        b[:n] = self._out[:n]
        self._out = self._out[n:]  # a view: no copy of the rest
        return n

    def close(self) -> None:
        self._raw.close()
        super().close()


def read_shard(path: str | Path) -> Iterator[dict]:
    """Records of one shard (zstd or the version-1 gzip), in order."""
    with _open_shard_text(path) as f:
        for line in f:
            yield json.loads(line)


def iter_documents(stage_dir: str | Path, manifest: dict, langs: set[str] | None = None) -> Iterator[dict]:
    """Every record of a completed stage 1, source by source in manifest order (for stages 2 and 3)."""
    for info in manifest["outputs"]["sources"].values():
        if langs is not None and info["lang"] not in langs:
            continue
        for rel in info["shards"]:
            yield from read_shard(Path(stage_dir) / rel)


# ---------------------------------------------------------------------------------------------------
# Reading a finished stage 1 (stages 2 and 3)
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CorpusFile:
    """One stage-1 document shard, with the source facts every document in it shares."""

    index: int
    source: str
    lang: str
    tier: int
    path: Path


def corpus_files(corpus_dir: Path, corpus_manifest: dict) -> list[CorpusFile]:
    """Stage-1 shards in a fixed order (source name, then listed order); all problems in one UserError."""
    sources = (corpus_manifest.get("outputs") or {}).get("sources")
    if not isinstance(sources, dict) or not sources:
        raise UserError(
            f"{corpus_dir}/manifest.json lists no sources under outputs.sources. "
            f"HINT: rerun `python 1_download_corpus.py --force` with a config that declares sources."
        )
    files, missing = [], []
    for name in sorted(sources):
        info = sources[name]
        for rel in info.get("shards", []):
            p = corpus_dir / rel
            if not p.is_file():
                missing.append(str(p))
            files.append(CorpusFile(len(files), name, str(info.get("lang")), int(info.get("tier", 1)), p))
    if missing:
        raise UserError(
            f"{len(missing)} stage-1 shard(s) listed in {corpus_dir}/manifest.json are missing: "
            f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}. HINT: rerun `python 1_download_corpus.py --force`."
        )
    return files


def iter_shard_texts(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of one stage-1 shard, checked: bad input is a UserError naming the file and
    line (truncated gzip, bytes that are not UTF-8, a record without text, a lone surrogate)."""
    hint = "HINT: rebuild it with `python 1_download_corpus.py --force`."
    line_no = 0
    try:
        for line_no, record in enumerate(read_shard(path), 1):
            text = record.get("text") if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise UserError(f"{path}:{line_no}: record has no string field 'text'. {hint}")
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                raise UserError(f"{path}:{line_no}: text holds an unpaired surrogate (not valid Unicode). {hint}") from None
            yield line_no, text
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 after line {line_no} ({e.reason}). {hint}") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{line_no + 1}: not a JSON record ({e.msg}). {hint}") from None
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        raise UserError(f"{path}: unreadable or truncated gzip ({e}). {hint}") from None
    except zstandard.ZstdError as e:
        raise UserError(f"{path}: unreadable, damaged or truncated zstd shard ({e}). {hint}") from None


# ---------------------------------------------------------------------------------------------------
# Sources: files, streams, text extraction
# ---------------------------------------------------------------------------------------------------


def resolve_local_files(src: C.SourceConfig) -> list[Path]:
    """The files of a local source, sorted (the stream order); SourceError if there are none."""
    pattern = src.path
    if glob.has_magic(pattern):
        files = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
        if not files:
            raise SourceError(f"source {src.name!r}: no file matches path {pattern!r} (relative to {Path.cwd()})")
        return files
    p = Path(pattern)
    if p.is_dir():
        raise SourceError(f"source {src.name!r}: path {pattern!r} is a folder; give a file or a glob such as {pattern.rstrip('/')}/*.{src.format}")
    if not p.is_file():
        raise SourceError(f"source {src.name!r}: local path {pattern!r} does not exist (relative to {Path.cwd()})")
    return [p]


def check_sources(cfg: C.CorpusStageConfig) -> list[str]:
    """Problems found without reading any data (local paths); checked before the work starts."""
    problems = []
    for src in cfg.corpus.sources:
        if src.kind == "local":
            try:
                resolve_local_files(src)
            except SourceError as e:
                problems.append(str(e))
    return problems


def validate(stage: Stage, cfg: C.CorpusStageConfig, args: Any = None) -> dict[str, list[Path]]:
    """``cli.run_stage``'s hook: every local source resolves to readable files, checked before anything on
    disk is touched (also for ``--dry-run`` and before ``--force`` resets the folder). One UserError lists
    every problem; returns {source name: its files} for the local sources (hub sources are reached only
    when the stage runs: they fail alone, recorded, without stopping the others)."""
    files: dict[str, list[Path]] = {}
    problems = []
    for src in cfg.corpus.sources:
        if src.kind != "local":
            continue
        try:
            files[src.name] = resolve_local_files(src)
        except SourceError as e:
            problems.append(str(e))
            continue
        for f in files[src.name]:
            if not os.access(f, os.R_OK):
                problems.append(f"source {src.name!r}: {f} is not readable (permissions); fix them or change path")
    raise_problems(UserError, "stage 1 cannot start, the local sources cannot be read", problems)
    return files


def source_origin(src: C.SourceConfig) -> str:
    if src.kind == "hf":
        parts = [src.hf_id] + [f"{k}={v}" for k, v in (("config", src.hf_config), ("data_dir", src.hf_data_dir)) if v]
        return f"hf:{' '.join(parts)} split={src.split}"
    return f"local:{src.path} ({src.format}{', by ' + src.sample_by if src.format == 'txt' else ''})"


@contextlib.contextmanager
def _no_torch_import():
    """Build IterableDatasets without importing torch.

    When torch is installed, ``datasets.IterableDataset.__init__`` imports it only to put its epoch counter
    in shared memory for DataLoader workers (``_maybe_share_with_torch_persistent_workers``), which was
    half of a tiny-profile run (docs/PERFORMANCE.md). Stage 1 iterates in its own process and
    never uses a DataLoader. If a future datasets drops the flag, this only costs the import again.
    """
    from datasets import config as ds_config

    saved = getattr(ds_config, "TORCH_AVAILABLE", False)
    ds_config.TORCH_AVAILABLE = False
    try:
        yield
    finally:
        ds_config.TORCH_AVAILABLE = saved


def open_stream(src: C.SourceConfig):
    """The ``datasets`` streaming IterableDataset of a hub source (local files are read by
    ``dante.corpus_chunks`` directly, in line-aligned chunks)."""
    import datasets  # imported here: --dry-run and the config tests never pay for it

    with _no_torch_import():
        return datasets.load_dataset(
            src.hf_id, name=src.hf_config or None, data_dir=src.hf_data_dir or None, split=src.split, streaming=True
        )


# ---------------------------------------------------------------------------------------------------
# The stage: chunks in order, processed by workers, committed by one process
# ---------------------------------------------------------------------------------------------------


def _fresh_source_state() -> dict:
    return {"status": "pending", "shards": [], "pos": None, "stats": dataclasses.asdict(SourceStats())}


def worker_count(corpus: C.CorpusConfig) -> int:
    """``corpus.workers``, 0 meaning every core this process may run on."""
    if corpus.workers:
        return corpus.workers
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


class _End:
    """In the task stream: the source's chunks are all listed (or listing them failed: ``error``)."""

    def __init__(self, error: BaseException | None = None) -> None:
        self.error = error


class _Pool:
    """Tasks in, results out in submission order, at most ``2 x workers`` chunks in flight (bounded
    memory). ``workers`` processes do the chunks; one worker: everything inline, no process. ``_End`` items
    pass through in their place, so one stream carries every source and the workers never wait at a
    source's end.

    A worker writes its compressed frames to a spool file in the stage folder and returns the rest through
    the pipe: a result of ~1 MB through a 64 KB pipe needed the committer's result thread to take the GIL
    once per 64 KB, and while the committer held it the worker sat blocked in its write (measured: the
    workers idle ~30% of the time on 2 cores). The committer reads the file in one call and deletes it. The
    spool folder is the run's own (``.spool-<pid>``), removed at its end and, after a kill, when the next run
    starts; a worker orphaned by a killed committer finishes at most its current chunk, and its write into
    the removed folder fails instead of leaving debris.

    The processes start in a thread (~0.2 s: a fresh interpreter importing the worker's module, measured);
    until they are up the committer processes the chunks itself. A result is the same function of the
    chunk wherever it was computed, so the output does not depend on this timing; the log says how many
    chunks each did. ``DANTE_CORPUS_INLINE_START=0`` waits for the processes instead, so a small run
    (a test) still sends every chunk through them."""

    def __init__(self, workers: int, spool_dir: Path) -> None:
        self.workers = workers
        self.spool_dir = spool_dir
        self._pool = None
        self._failed: BaseException | None = None
        self._starter = None
        self.counts = {"workers": 0, "committer": 0}
        if workers > 1:
            self._starter = threading.Thread(target=self._start, name="worker-start", daemon=True)
            self._starter.start()

    def _start(self) -> None:
        import multiprocessing

        try:
            # forkserver: a child forked from this process would inherit the hub client's threads and locks
            # mid-use, and the stage lock's descriptor (a killed committer's orphans would keep the stage
            # locked); the server is a fresh interpreter that imports the worker's module once and forks
            # every worker from there (spawn imported it once per worker: ~0.6 CPU-s each, measured)
            ctx = multiprocessing.get_context("forkserver")
            ctx.set_forkserver_preload(["dante.corpus_chunks"])
            self._pool = ctx.Pool(self.workers)
        except BaseException as e:  # noqa: BLE001 -- raised in the committer by imap
            self._failed = e

    def imap(self, tasks: Iterator[tuple["_SourceRun", Any]]) -> Iterator[tuple["_SourceRun", Any, Any]]:
        """(run, chunk or _End, ChunkResult or None) for each task, in order."""
        window: collections.deque = collections.deque()  # (run, item, None | _Ready | AsyncResult)
        for n, (run, item) in enumerate(tasks):
            if isinstance(item, _End):
                window.append((run, item, None))
            elif self._use_pool():
                self.counts["workers"] += 1
                spool = str(self.spool_dir / f".spool-{n}.tmp")
                window.append((run, item, self._pool.apply_async(process_task, ((item, run.rules, spool),))))
            else:  # one worker, or the processes are not up yet
                if self._failed is not None:
                    raise UserError(f"stage 1 could not start its {self.workers} worker processes ({self._failed}); "
                                    f"HINT: --set corpus.workers=1 runs without them")
                self.counts["committer"] += 1
                if item.kind == "stream-shard":  # its frames go to disk here too: a shard can be gigabytes
                    result = process_task((item, run.rules, str(self.spool_dir / f".spool-{n}.tmp")))
                else:
                    result = process_chunk(item, run.rules)
                window.append((run, item, _Ready(result)))
            while window and (len(window) >= 2 * self.workers or _done(window[0][2])):
                yield _fetch(*window.popleft())
        while window:
            yield _fetch(*window.popleft())

    def _use_pool(self) -> bool:
        if self._starter is not None and self._pool is None and os.environ.get("DANTE_CORPUS_INLINE_START") == "0":
            self._starter.join()
        return self._pool is not None

    def summary(self) -> str:
        c = self.counts
        if self.workers == 1:
            return f"{c['committer']} chunks, in this process (corpus.workers=1)"
        return (f"{c['workers'] + c['committer']} chunks: {c['workers']} by the {self.workers} worker processes, "
                f"{c['committer']} by the committer while they started")

    def close(self) -> None:
        if self._starter is not None:
            self._starter.join()
        if self._pool is not None:
            self._pool.terminate()  # unread results of a source stopped by its budget are not needed
            self._pool.join()


def _fetch(run: "_SourceRun", item: Any, fut: Any) -> tuple["_SourceRun", Any, Any]:
    """The task's result, its frames read back from the worker's spool file."""
    result = fut and fut.get()
    if isinstance(result, ChunkResult):
        unspool(result)
    return run, item, result  # a stream shard's list is read one result at a time, by the commit


def unspool(result: ChunkResult) -> ChunkResult:
    if result.spool:
        path = Path(result.spool)
        result.frames = path.read_bytes()
        path.unlink()
        result.spool = None
    return result


def _done(fut: Any) -> bool:
    return fut is None or isinstance(fut, _Ready)


class _Ready:
    """A result computed inline, with the interface of an ``AsyncResult``."""

    def __init__(self, value: Any) -> None:
        self.value = value

    def get(self) -> Any:
        return self.value


class _SourceRun:
    """One source: its chunks committed in order (dedup, budget) into shards of zstd frames, each shard
    written by a writer thread (the write and its fsync overlap the next chunks) and recorded in
    progress, in shard order, once its files exist."""

    def __init__(self, stage: Stage, src: C.SourceConfig, corpus_cfg: C.CorpusConfig, state: dict,
                 dedup: DedupIndex, save_progress, writers: ThreadPoolExecutor) -> None:
        self.stage, self.src, self.cfg, self.state = stage, src, corpus_cfg, state
        self.dedup, self.save_progress, self.writers = dedup, save_progress, writers
        self.rules = SourceRules.of(src, corpus_cfg.non_utf8)
        self.dir = stage.dir / src.name
        self.stats = SourceStats(**state["stats"])
        self.frames: list[bytes] = []  # the shard being filled: its zstd frames ...
        self.buffer_keys: list[int] = []  # ... and its documents' dedup keys
        self.pending: collections.deque = collections.deque()  # (future, shard path, state after it)
        self.next_shard = len(state["shards"])
        self.closed = False
        """True once the source is done (budget, end) or failed: its late results are dropped."""
        self.pos: dict | None = None
        self.bar = None

    def chunks(self) -> Iterator[Chunk]:
        """Prepare the source and list its chunks from the recorded position (runs in the task stream)."""
        src = self.src
        if not self.state["shards"] and self.dir.exists():
            shutil.rmtree(self.dir)  # leftovers of a run that never completed a shard of this source
        self.state["status"] = "running"
        pos = self.state["pos"] or {"chunk": 0, "row": 0, "at": None}
        if pos.get("done"):  # killed after its last shard was recorded, before "done" was
            return iter(())
        self.pos = pos
        if src.kind == "hf":
            ds = open_stream(src)
            with _no_torch_import():
                sharded = ds.reshard() if hasattr(ds, "reshard") else ds  # parquet: one shard per row group
            shards = getattr(sharded, "num_shards", 1) or 1
            if shards > 1:

                def make_shard(k: int):
                    with _no_torch_import():
                        return sharded.shard(num_shards=shards, index=k)

                return stream_shard_chunks(shards, make_shard, pos["at"], pos["chunk"])
            print(f"[01_corpus] source {src.name!r}: the hub stream is one shard (a file that cannot be split); it is "
                  f"read in this process, {HF_CHUNK_ROWS} rows per chunk, processed by the workers", flush=True)
            at = pos["at"] or {}
            if at.get("stream_state") is not None:
                ds.load_state_dict(at["stream_state"])
            elif at.get("rows"):
                with _no_torch_import():
                    ds = ds.skip(at["rows"])
            return hub_chunks(ds, at, pos["chunk"], src.text_field, src.name)
        files = resolve_local_files(src)
        if note := cuttable_note(src, files):
            print(f"[01_corpus] {note}", flush=True)
        if src.format == "parquet":
            return parquet_chunks(files, pos["at"], pos["chunk"])
        if src.format == "txt" and src.sample_by != "line":
            return file_chunks(files, pos["at"], pos["chunk"])
        return line_chunks(files, pos["at"], pos["chunk"], self.cfg.chunk_bytes)

    def commit(self, chunk: Chunk, r: ChunkResult) -> None:
        """Apply dedup and the budget to one chunk's rows (from the recorded row, in the first chunk of a
        resumed source); finishes the source when its budget is reached."""
        if self.bar is None:
            budget = self.src.char_budget
            self.bar = tqdm(total=budget or None, initial=self.stats.chars, unit="char", unit_scale=True,
                            desc=f"{self.src.name} ({self.src.lang}, tier {self.src.tier})", mininterval=0.5, file=sys.stderr)
        before = self.stats.chars
        first_row = 0  # of this part, in the chunk (a stream shard comes as several parts)
        stopped = False
        for part in r if isinstance(r, list) else [r]:
            unspool(part)
            skip = self.pos["row"] - first_row if chunk.index == self.pos["chunk"] else 0
            stopped = self._commit(chunk, part, min(max(skip, 0), part.rows), self.src.char_budget, first_row)
            first_row += part.rows
            part.frames = b""  # committed: free it before the next part is read
            if stopped:
                break
        self.bar.update(self.stats.chars - before)
        self._drain(block=False)
        if stopped:
            self.finish()

    def finish(self) -> None:
        """The source's last shard, then its summary; SourceError if it kept nothing."""
        self.closed = True
        if self.frames:
            self._flush({"done": True})  # the source's last shard: nothing after it to resume
        self._drain(block=True)
        self._close_bar()
        if self.stats.docs == 0:
            s = self.stats
            raise SourceError(
                f"source {self.src.name!r} kept no document: {s.docs_read} read, {s.dropped_filter} shorter than "
                f"min_chars={self.src.min_chars}, {s.dropped_dedup} duplicates, {s.dropped_non_utf8} non-UTF-8; "
                f"check path/text_field or lower min_chars"
            )
        self.state["stats"] = dataclasses.asdict(self.stats)
        self._remove_stale_files()
        self.state["status"] = "done"
        self.state.pop("error", None)

    def abandon(self) -> None:
        """After a failure: shards already handed to the writers still count; the rest is dropped."""
        self.closed = True
        with contextlib.suppress(Exception):
            self._drain(block=True)
        self._close_bar()

    def _close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def _commit(self, chunk: Chunk, r: ChunkResult, skip: int, budget: int, first_row: int = 0) -> bool:
        """Apply dedup and the budget to one chunk's rows from ``skip`` on; True when the budget is reached.
        ``first_row``: where ``r``'s rows start in the chunk (a stream shard's later parts).
        Vectorized over the chunk (a Python loop per document was a third of the committer's time); the
        shard boundaries, the budget's stop row and every statistic are those of a row-by-row pass."""
        st = self.stats
        sel = np.nonzero(r.cand_rows >= skip)[0]  # candidates (indices into r.keys) from the skip row on
        keys = r.keys[sel]
        _, first = np.unique(keys, return_index=True)
        is_new = np.zeros(keys.size, dtype=bool)
        is_new[first] = True  # first occurrence inside the chunk ...
        is_new &= ~self.dedup.contains(keys)  # ... and not seen before it
        kept = sel[is_new]
        dup_rows = r.cand_rows[sel[~is_new]]  # sorted, as rows are
        cum_chars = st.chars + np.cumsum(r.chars[kept])
        stop = int(np.searchsorted(cum_chars, budget)) if budget else kept.size  # first kept doc reaching it
        cursor = skip  # rows before ``cursor`` are counted in the stats

        def count_rows(end: int) -> None:
            nonlocal cursor
            counts = np.bincount(r.kinds[cursor:end], minlength=3)
            st.docs_read += end - cursor
            st.dropped_filter += int(counts[FILTERED])
            st.dropped_non_utf8 += int(counts[NON_UTF8])
            st.dropped_dedup += int(np.searchsorted(dup_rows, end) - np.searchsorted(dup_rows, cursor))
            cursor = end

        at, last = 0, min(stop + 1, kept.size)  # kept[:last] enter shards
        while at < last:
            n = min(self.cfg.docs_per_shard - len(self.buffer_keys), last - at)
            seg = kept[at:at + n]
            at += n
            self.buffer_keys += r.keys[seg].tolist()
            self.frames += records_frames(r, seg)
            st.docs += n
            st.chars += int(r.chars[seg].sum())
            if at == stop + 1 or len(self.buffer_keys) >= self.cfg.docs_per_shard:
                count_rows(int(r.cand_rows[seg[-1]]) + 1)
                if at == stop + 1:
                    self.dedup.add_new(r.keys[kept[:last]])
                    return True
                self._flush({"chunk": chunk.index, "row": first_row + cursor, "at": chunk.pos})
        self.dedup.add_new(r.keys[kept])
        count_rows(r.rows)
        if r.error is not None:
            raise SourceError(r.error)
        return False

    def _flush(self, pos: dict) -> None:
        """Hand the shard's frames to a writer thread as shard ``next_shard``; recorded when written."""
        path = self.dir / SHARD_NAME.format(self.next_shard)
        self.next_shard += 1
        keys = self.buffer_keys
        payload = b"".join(self.frames) + end_mark(len(keys))
        self.frames, self.buffer_keys = [], []
        after = {"pos": pos, "stats": dataclasses.asdict(self.stats)}
        self.pending.append((self.writers.submit(_write_shard_files, path, payload, keys), path, after))
        while len(self.pending) > 2:  # bounded memory if the disk falls behind
            self._drain_one()

    def _drain(self, block: bool) -> None:
        """Record the written shards, oldest first: progress only ever names shards whose files exist,
        and a shard counts only once every shard before it does."""
        while self.pending and (block or self.pending[0][0].done()):
            self._drain_one()

    def _drain_one(self) -> None:
        future, path, after = self.pending.popleft()
        future.result()
        self.state["shards"].append(path.relative_to(self.stage.dir).as_posix())
        self.state.update(after)
        self.save_progress()

    def _remove_stale_files(self) -> None:
        """Shard files past the recorded ones (written just before a kill, then rewritten or not needed)."""
        keep = {Path(p).name for p in self.state["shards"]}
        keep |= {_hashes_path(Path(p)).name for p in self.state["shards"]}
        for f in self.dir.glob("shard-*"):
            if f.name not in keep:
                f.unlink()


def _write_shard_files(path: Path, payload: bytes, keys: list[int]) -> None:
    """A shard already compressed (its frames and end mark), then its dedup keys."""
    atomic_write_bytes(path, payload)
    atomic_write_bytes(_hashes_path(path), write_hashes_bytes(keys))


def _hashes_path(shard: Path) -> Path:
    name = shard.name
    for suffix in (".jsonl.zst", ".jsonl.gz"):
        name = name.removesuffix(suffix)
    return shard.with_name(name + HASHES_SUFFIX)


def resume_check(old_cfg: dict, new_cfg: dict, state: dict) -> str | None:
    """May an unfinished stage 1 continue under a changed config (``Stage.open``'s hook)?

    Yes when the stage-wide settings are unchanged and so is every source that already wrote shards:
    a failed or not-yet-started source may be corrected, added or removed (fixing a hub id must not throw
    away days of downloads). Returns None to accept, else the reason.
    """
    def rest(c: dict) -> dict:
        # corpus.workers does not change a byte of the output (a run killed with 2 may resume with 1)
        return {**c, "run": {k: v for k, v in c.get("run", {}).items() if k != "root"},
                "corpus": {k: v for k, v in c.get("corpus", {}).items() if k not in ("sources", "workers")}}

    if rest(old_cfg) != rest(new_cfg):
        return "settings outside corpus.sources changed"
    old_sources = {s["name"]: s for s in old_cfg.get("corpus", {}).get("sources", [])}
    new_sources = {s["name"]: s for s in new_cfg.get("corpus", {}).get("sources", [])}
    for name, st in state.get("sources", {}).items():
        if st.get("shards") and old_sources.get(name) != new_sources.get(name):
            return f"source {name!r} already wrote shards and was changed or removed"
    return None


def build_corpus(stage: Stage, cfg: C.CorpusStageConfig) -> dict:
    """Run stage 1 into ``stage.dir`` and write its manifest; raises SourceError summarizing failures."""
    corpus = cfg.corpus
    raise_problems(SourceError, "stage 1 cannot start, the local sources cannot be read", check_sources(cfg))
    progress = stage.load_progress()
    progress.setdefault("sources", {})
    progress.setdefault("completed_order", [])
    sources = progress["sources"]

    def recorded_keys() -> DedupIndex:
        dedup = DedupIndex()
        for state in sources.values():
            for rel in state["shards"]:
                dedup.load(_hashes_path(stage.dir / rel))
        return dedup

    dedup = recorded_keys()
    if stage.resumed:
        done = [n for n, s in sources.items() if s["status"] == "done"]
        print(f"[01_corpus] resuming: {len(done)} source(s) complete, {len(dedup):,} dedup keys reloaded", flush=True)

    recorder = _ProgressWriter(stage, progress)
    save = recorder.save

    workers = worker_count(corpus)
    print(f"[01_corpus] {workers} worker process(es)", flush=True)
    failures: dict[str, str] = {}
    runs: list[_SourceRun] = []

    def tasks() -> Iterator[tuple[_SourceRun, Any]]:
        """Every source's chunks in config order, then its _End: one stream, so the workers go on to the
        next source while the committer finishes the last chunks of one."""
        for run in runs:
            try:
                for chunk in run.chunks():
                    if run.closed:  # stopped by its budget, or failed: list no more of it
                        break
                    yield run, chunk
            except Exception as e:  # noqa: BLE001 -- listing failed (hub, damaged file): the source fails alone
                yield run, _End(e)
                continue
            yield run, _End()

    def fail(run: _SourceRun, e: BaseException) -> None:
        nonlocal dedup
        run.abandon()
        state = run.state
        message = str(e) if isinstance(e, SourceError) else f"{type(e).__name__}: {e}"
        if not _expected_failure(e):
            traceback.print_exception(e, file=sys.stderr)  # looks like a bug, not bad data or the network: keep the evidence
        if not state["shards"]:  # nothing written: the retry starts the source over (its data may be fixed)
            state.clear()
            state.update(_fresh_source_state())
        state["status"], state["error"] = "failed", message
        failures[run.src.name] = message
        # its unwritten documents' keys must not shadow later ones: the set is the recorded shards' again
        dedup = recorded_keys()
        for other in runs:
            other.dedup = dedup

    for old in stage.dir.glob(".spool-*"):  # a killed run's (the stage lock is ours: nobody else writes there)
        shutil.rmtree(old, ignore_errors=True)
    spool = stage.dir / f".spool-{os.getpid()}"
    spool.mkdir()
    pool = _Pool(workers, spool)
    described: dict[str, Any] = {}  # source name -> Future of its files' describe_path
    try:
        with ThreadPoolExecutor(max_workers=2, thread_name_prefix="shard-writer") as writers, \
                ThreadPoolExecutor(max_workers=1, thread_name_prefix="input-hash") as hasher:
            for src in corpus.sources:
                state = sources.setdefault(src.name, _fresh_source_state())
                if state["status"] == "done":
                    print(f"[01_corpus] {src.name}: already complete ({len(state['shards'])} shards)", flush=True)
                    continue
                runs.append(_SourceRun(stage, src, corpus, state, dedup, save, writers))
            for run, item, result in pool.imap(tasks()):
                if run.closed:
                    continue  # chunks listed before its budget stopped it, or after it failed
                try:
                    if isinstance(item, _End):
                        if item.error is not None:
                            raise item.error
                        run.finish()
                    else:
                        run.commit(item, result)
                except Exception as e:  # noqa: BLE001 -- any failure of one source (network, hub, data) is recorded
                    fail(run, e)
                if run.closed:
                    if run.state["status"] == "done":
                        progress["completed_order"].append(run.src.name)
                        if run.src.kind == "local":  # the manifest's input hashes, while the workers go on
                            described[run.src.name] = hasher.submit(_describe_files, resolve_local_files(run.src))
                    save()
                    _print_source_summary(run.src, run.state)
    finally:
        recorder.close()
        pool.close()
        shutil.rmtree(spool, ignore_errors=True)  # a late write of a dead run's worker then fails: no debris
    print(f"[01_corpus] {pool.summary()}", flush=True)

    if failures:
        raise SourceError(
            problems_message(f"{len(failures)} source(s) failed; the others' progress is kept in {stage.dir / 'progress.json'}",
                             [f"{name}: {msg}" for name, msg in failures.items()])
            + "\n  HINT: fix the cause and rerun the same command to retry only the failed sources."
        )
    return _finish(stage, cfg, progress, {name: f.result() for name, f in described.items()})


def _expected_failure(e: BaseException) -> bool:
    """Failures that come from the data or the hub (reported in one line), as opposed to bugs."""
    module = type(e).__module__.split(".")[0]
    return isinstance(e, (SourceError, OSError, ConnectionError)) or module in ("datasets", "huggingface_hub", "requests", "pyarrow")


def _print_source_summary(src: C.SourceConfig, state: dict) -> None:
    s = state["stats"]
    status = state["status"] if state["status"] != "failed" else "FAILED"
    print(
        f"[01_corpus] {src.name}: {status}; kept {s['docs']:,} docs / {s['chars']:,} chars of {s['docs_read']:,} read "
        f"(dropped: {s['dropped_filter']:,} filter, {s['dropped_dedup']:,} dup, {s['dropped_non_utf8']:,} non-UTF-8); "
        f"{len(state['shards'])} shard(s)",
        flush=True,
    )


class _ProgressWriter:
    """``progress.json`` written by one background thread, snapshots in the order they were taken.

    Each save is an atomic write with an fsync; done in the committer it blocked the pipeline once per shard
    (measured, 2 workers, 1000M characters: 11.0 s with the fsyncs in the committer's path, 9.8-10.1 s
    without any fsync). A snapshot is taken only after its shards' files are written, so a kill loses at most
    the last few records: the rerun resumes earlier and writes those shards again, to the same bytes."""

    def __init__(self, stage: Stage, progress: dict) -> None:
        self.stage, self.progress = stage, progress
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="progress")
        self.last = None

    def save(self) -> None:
        if self.last is not None and self.last.done():
            self.last.result()  # a failed write (disk full) stops the stage here
        snapshot = json.loads(json.dumps(self.progress))  # a deep copy: the committer goes on changing it
        self.last = self.pool.submit(self.stage.save_progress, snapshot)

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        if self.last is not None:
            self.last.result()


def _describe_files(files: list[Path]) -> list[dict]:
    return [describe_path(f) for f in files]


def _finish(stage: Stage, cfg: C.CorpusStageConfig, progress: dict, described: dict[str, list[dict]]) -> dict:
    """The manifest; ``described``: the input files' facts already computed (sources finished in this run)."""
    sources_out: dict[str, dict] = {}
    totals: dict[str, dict] = {}
    for src in cfg.corpus.sources:
        state = progress["sources"][src.name]
        entry = {"lang": src.lang, "tier": src.tier, "kind": src.kind, "origin": source_origin(src),
                 "shards": list(state["shards"]), **state["stats"]}
        sources_out[src.name] = entry
        t = totals.setdefault(src.lang, {"docs": 0, "chars": 0, "sources": []})
        t["docs"] += entry["docs"]
        t["chars"] += entry["chars"]
        t["sources"].append(src.name)
        if src.kind == "local":
            files = described.get(src.name) or _describe_files(resolve_local_files(src))
            stage.inputs[f"source:{src.name}"] = {"kind": "local", "files": files}
        else:
            stage.inputs[f"source:{src.name}"] = {"kind": "hf", "hf_id": src.hf_id, "hf_config": src.hf_config,
                                                   "hf_data_dir": src.hf_data_dir, "split": src.split}
    outputs = {"sources": sources_out, "totals": totals, "dedup_order": progress["completed_order"]}
    counts = {"docs": sum(t["docs"] for t in totals.values()), "chars": sum(t["chars"] for t in totals.values()),
              "sources": len(sources_out), "shards": sum(len(s["shards"]) for s in sources_out.values())}
    return stage.finish(outputs=outputs, counts=counts)


def describe_plan(cfg: C.CorpusStageConfig, stage_dir: Path) -> str:
    """The --dry-run text: sources, budgets, where output goes. Touches no network."""
    corpus = cfg.corpus
    lines = [f"stage 1 plan -> {stage_dir}  (docs_per_shard={corpus.docs_per_shard}, non_utf8={corpus.non_utf8}, "
             f"workers={worker_count(corpus)}, chunk_bytes={corpus.chunk_bytes:,})",
             f"{'source':24s} {'lang':4s} {'tier':4s} {'min_chars':>9s} {'char budget':>15s}  origin"]
    budgets: dict[str, list[int]] = {}
    for src in corpus.sources:
        budget = f"{src.char_budget:,}" if src.char_budget else "unlimited"
        note = ""
        if src.kind == "local":
            try:
                note = f"  [{len(resolve_local_files(src))} file(s)]"
            except SourceError as e:
                note = f"  [MISSING: {e}]"
        lines.append(f"{src.name:24s} {src.lang:4s} {src.tier:<4d} {src.min_chars:9d} {budget:>15s}  {source_origin(src)}{note}")
        budgets.setdefault(src.lang, []).append(src.char_budget)
    total = sum(sum(b) for b in budgets.values())
    lines.append("char budget per language:")
    for lang, bs in budgets.items():
        if 0 in bs:
            lines.append(f"  {lang}: unlimited (a source without budget)")
        else:
            lines.append(f"  {lang}: {sum(bs):,} chars ({sum(bs) / total:.0%} of the budgeted total)")
    return "\n".join(lines)
