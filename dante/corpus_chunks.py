"""Stage 1's units of parallel work: sources cut into deterministic chunks, and what a worker does with one.

A chunk is a piece of one source whose bounds depend only on the source's bytes (never on the number of
workers or on timing), so the committer in ``dante.corpus`` can apply dedup and budgets in (source,
chunk) order and get the same output for any ``corpus.workers``:

==========================  ========================================================================
source                      chunk
==========================  ========================================================================
local jsonl, txt by line    a line-aligned byte range of the (decompressed) file: from its start
                            offset, ``corpus.chunk_bytes`` bytes cut back to the last newline (a longer line
                            makes a longer chunk). A plain file's range is read again by the worker (only
                            its bounds travel); .gz/.bz2/.xz/.zst files are decompressed here and the
                            bytes are sent
local txt by paragraph/doc  one file (a single file cannot be cut: the log says so)
local parquet               one row group (a file written as one group cannot be cut: log)
hub (kind hf)               one shard of the stream after ``IterableDataset.reshard()`` (a parquet
                            row group; ``ds.shard(n, k)``, picklable): the worker streams it itself,
                            in batches of ``HF_CHUNK_ROWS`` rows, each batch's frames spooled to disk.
                            A stream of one shard (one file that cannot be split) is read by the
                            committer in batches of ``HF_CHUNK_ROWS`` rows, one chunk each (the log says
                            so); only their processing runs on the workers
==========================  ========================================================================

``process_chunk`` (in a worker process, or inline for one worker) parses the rows, applies the non-UTF-8
policy, NFC and ``min_chars``, hashes the kept texts, encodes their output records and compresses them
into zstd frames of about ``FRAME_BYTES`` each (so compression, 40% of the work, runs on the workers too,
and what travels back to the committer is a third of the text's size); the result lists,
per row, whether it was dropped and why, so the committer can stop a source at its budget on the exact
row. A problem in a row (bad JSON, a missing text field, bytes that are not UTF-8 under policy ``error``)
is returned with its row and message, and raised by the committer only if the source reaches that row.

Each chunk carries its start position (``pos``), which is what ``progress.json`` records: resuming
rebuilds the chunks from that position (a seek for plain files, a re-read for compressed ones, the
stream's ``state_dict`` for the hub) and yields the same chunks with the same numbers.
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import json
import lzma
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import zstandard

from dante import config as C
from dante.artifacts import stable_hash64
from dante.errors import UserError

HF_CHUNK_ROWS = 2000
ZSTD_LEVEL = 3
"""Measured by ``python bench/zstd_frames.py`` (the embedded sample as shard records, 6.5 MB, one frame
per 4 MiB, best of 3, this 2-core machine, 2026-12-02): gzip-6 (format 1) ratio 3.39 at 26 MB/s; zstd-1
3.07 at 270 MB/s; zstd-3 3.39 at 169 MB/s; zstd-6 3.69 at 70 MB/s; zstd-9 3.79 at 47 MB/s; zstd-19 4.18 at
2.2 MB/s. Level 3 keeps gzip's size at 6x its speed; 6 would save 8% of disk for 2.4x the time."""
FRAME_BYTES = 1 << 20
"""A worker's records are compressed in frames of at least this many bytes (cut between records). A frame
cut by a shard boundary, a duplicate or the budget is decompressed and re-encoded by the committer; every
other frame is copied as it is. Size vs one frame per 4 MiB (``python bench/zstd_frames.py``, same
input): 64 KiB frames +9.8%, 256 KiB +4.0%, 512 KiB +2.3%, 1 MiB +1.1%."""
REPLACEMENT_CHAR = "\ufffd"
# per-row outcome in ChunkResult.kinds
KEPT, FILTERED, NON_UTF8 = 0, 1, 2


class SourceError(UserError):
    """A problem with one source (its data or its settings); recorded, and the other sources go on."""


@dataclass
class Chunk:
    index: int
    pos: dict
    """Where the chunk starts (JSON): resuming at ``pos`` yields this chunk again, numbered ``index``."""
    kind: str
    """'lines' (bytes of whole lines), 'span' (whole lines the worker reads: path, offset, length), 'text'
    (a whole file's text, split by sample_by), 'parquet' (a row group the worker reads), 'rows' (hub rows)."""
    payload: Any
    label: str = ""
    """The file, for messages."""
    first_line: int = 1


@dataclass
class ChunkResult:
    rows: int
    kinds: np.ndarray
    """Outcome of each row read (KEPT = a candidate for dedup and budget, FILTERED, NON_UTF8)."""
    keys: np.ndarray
    """Dedup key of each candidate, in row order (uint64)."""
    chars: np.ndarray
    """Length of each candidate text (after NFC)."""
    frames: bytes
    """The candidates' output records (JSON lines), in zstd frames (``compress_frame``), concatenated."""
    frame_ends: np.ndarray
    """End offset of each frame in ``frames``."""
    frame_first: np.ndarray
    """Index of the first candidate of each frame."""
    ends: np.ndarray
    """End offset of each candidate's record in the concatenated (uncompressed) records."""
    error: str | None = None
    """A problem at row ``rows`` (the rows before it are valid); raised if the source gets there."""
    spool: str | None = None
    """Set by a worker process: ``frames`` are in this file instead (see ``dante.corpus._Pool``)."""
    cand_rows: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))


# ---------------------------------------------------------------------------------------------------
# Text checks shared by the worker and the readers
# ---------------------------------------------------------------------------------------------------


def compress_frame(payload: bytes) -> bytes:
    """One zstd frame (level ``ZSTD_LEVEL``, content size and checksum in it): same bytes in, same bytes out."""
    return zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_checksum=True, write_content_size=True).compress(payload)


def extract_text(row: Any, field_path: str, src_name: str, row_number: int | str) -> str | None:
    """The document text of one row (None for a null value); SourceError if the field is absent."""
    value: Any = row
    for part in field_path.split("."):
        if not isinstance(value, dict) or part not in value:
            available = sorted(value) if isinstance(value, dict) else type(value).__name__
            raise SourceError(
                f"source {src_name!r}: text field {field_path!r} not found at {row_number} "
                f"(available: {available}); set text_field in the source config"
            )
        value = value[part]
    if value is None or isinstance(value, str):
        return value
    raise SourceError(f"source {src_name!r}: text field {field_path!r} holds {type(value).__name__}, not text (row {row_number})")


def is_undecodable(text: str) -> bool:
    """True if the text carries the marks of bytes that were not valid UTF-8."""
    if REPLACEMENT_CHAR in text:
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates (e.g. surrogateescape-decoded bytes, "\udcxx" JSON escapes)
        return True
    return False


# ---------------------------------------------------------------------------------------------------
# Cutting sources into chunks (the committer's process)
# ---------------------------------------------------------------------------------------------------


COMPRESSED_SUFFIXES = (".gz", ".bz2", ".xz", ".lzma", ".zst")


def open_binary(path: Path):
    """A file's decompressed bytes, by suffix (what datasets' local builders accepted)."""
    suffix = path.suffix.lower()
    if suffix == ".gz":
        return gzip.open(path, "rb")
    if suffix == ".bz2":
        return bz2.open(path, "rb")
    if suffix in (".xz", ".lzma"):
        return lzma.open(path, "rb")
    if suffix == ".zst":
        import zstandard

        return zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True)
    return open(path, "rb")


def _skip_to(f, path: Path, offset: int) -> None:
    if path.suffix.lower() in COMPRESSED_SUFFIXES:
        left = offset  # compressed: no seek, decompress and drop
        while left:
            piece = f.read(min(left, 1 << 20))
            if not piece:
                raise SourceError(f"{path} is shorter than when stage 1 started reading it (resume offset {offset}); "
                                  f"the file changed: rerun with --force")
            left -= len(piece)
    else:
        f.seek(offset)


def line_chunks(files: list[Path], start: dict | None, index: int, chunk_bytes: int) -> Iterator[Chunk]:
    """Line-aligned byte ranges; chunk k+1 starts where chunk k was cut, so its bounds are a function of
    the file alone (each chunk is read from its own start, never from a carried-over remainder). The rule:
    the chunk ends after the last newline of its first ``chunk_bytes`` bytes; with none there, after the
    last newline of the next ``chunk_bytes``, and so on; the file's end ends the last one."""
    start = start or {"file": 0, "offset": 0, "line": 1}
    for fi in range(start["file"], len(files)):
        path = files[fi]
        offset, line = (start["offset"], start.get("line", 0)) if fi == start["file"] else (0, 1)
        if path.suffix.lower() not in COMPRESSED_SUFFIXES:
            index = yield from _plain_line_chunks(path, fi, offset, index, chunk_bytes)
            continue
        with open_binary(path) as f:
            _skip_to(f, path, offset)
            data, eof = b"", False
            while True:
                if not eof and len(data) < chunk_bytes:
                    more = f.read(chunk_bytes - len(data))
                    eof = not more
                    data += more
                    continue  # until chunk_bytes are in hand or the file ends
                if not data:
                    break
                cut = data.rfind(b"\n") + 1
                if cut == 0:
                    if not eof:  # one line longer than chunk_bytes: the chunk grows to its end
                        more = f.read(chunk_bytes)
                        eof = not more
                        data += more
                        continue
                    cut = len(data)  # the file's last line, without a newline
                yield Chunk(index, {"file": fi, "offset": offset, "line": line}, "lines", data[:cut], str(path), line)
                index += 1
                offset += cut
                line += data.count(b"\n", 0, cut)
                data = data[cut:]


def _plain_line_chunks(path: Path, fi: int, offset: int, index: int, chunk_bytes: int):
    """``line_chunks`` of an uncompressed file without reading it: each cut is found by reading backwards
    from the chunk's end to its last newline, and only (path, offset, length) is sent; the worker reads the
    bytes itself (sending them through a pipe cost the committer more than finding the cuts). Line numbers
    are counted only if a message needs one (``first_line`` 0: unknown). Returns the next chunk index."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        while offset < size:
            lo, end = offset, min(offset + chunk_bytes, size)
            while True:
                nl = _last_newline(f, lo, end)
                if nl >= 0:
                    end = nl + 1
                    break
                if end == size:
                    break  # the file's last line, without a newline
                lo, end = end, min(end + chunk_bytes, size)  # one line longer than chunk_bytes: the chunk grows
            yield Chunk(index, {"file": fi, "offset": offset}, "span", (str(path), offset, end - offset), str(path), 0)
            index += 1
            offset = end
    return index


def _last_newline(f, lo: int, hi: int, block: int = 1 << 16) -> int:
    """Offset of the last b"\n" in bytes [lo, hi) of ``f``, or -1."""
    while hi > lo:
        start = max(lo, hi - block)
        f.seek(start)
        k = f.read(hi - start).rfind(b"\n")
        if k >= 0:
            return start + k
        hi = start
    return -1


def line_number(chunk: Chunk, i: int) -> int:
    """The file line of row ``i`` of a 'lines'/'span' chunk (counted from the file's start if unknown)."""
    if chunk.first_line:
        return chunk.first_line + i
    path, offset, _ = chunk.payload
    newlines, left = 0, offset
    with open(path, "rb") as f:
        while left:
            piece = f.read(min(left, 1 << 20))
            if not piece:
                break
            newlines += piece.count(b"\n")
            left -= len(piece)
    return 1 + newlines + i


def file_chunks(files: list[Path], start: dict | None, index: int) -> Iterator[Chunk]:
    for fi in range((start or {"file": 0})["file"], len(files)):
        with open_binary(files[fi]) as f:
            data = f.read()
        yield Chunk(index, {"file": fi}, "text", data, str(files[fi]))
        index += 1


def parquet_chunks(files: list[Path], start: dict | None, index: int) -> Iterator[Chunk]:
    import pyarrow.parquet as pq

    start = start or {"file": 0, "group": 0}
    for fi in range(start["file"], len(files)):
        try:
            groups = pq.ParquetFile(files[fi]).num_row_groups
        except Exception as e:  # noqa: BLE001 -- pyarrow raises several types for a damaged file
            raise SourceError(f"{files[fi]} is not a readable parquet file ({type(e).__name__}: {e})") from None
        for g in range(start["group"] if fi == start["file"] else 0, groups):
            yield Chunk(index, {"file": fi, "group": g}, "parquet", (str(files[fi]), g), str(files[fi]))
            index += 1


def hub_chunks(ds, start: dict | None, index: int, text_field: str, src_name: str,
               rows_per_chunk: int = HF_CHUNK_ROWS) -> Iterator[Chunk]:
    """Rows of one hub stream, read in batches of ``rows_per_chunk`` (``IterableDataset.iter``), one chunk
    each, carrying only the text's top-level column to the workers. ``ds`` is already at ``start`` (the
    caller restored its state); each chunk's ``pos`` holds the stream state before its first row."""
    rows = (start or {}).get("rows", 0)
    pos = {"rows": rows, "stream_state": stream_state(ds)}
    for batch in ds.iter(batch_size=rows_per_chunk):
        values = batch_rows(batch, text_field, src_name, f"row {rows + 1}")
        yield Chunk(index, pos, "rows", values, first_line=rows + 1)
        index += 1
        rows += len(values)
        pos = {"rows": rows, "stream_state": stream_state(ds)}


def batch_rows(batch: dict, text_field: str, src_name: str, where: str) -> list[dict]:
    """The rows of one ``IterableDataset.iter`` batch, reduced to the text's top-level column (all a worker
    needs); SourceError naming the columns there are if the column is missing."""
    top = text_field.split(".")[0]
    if top not in batch:
        raise SourceError(f"source {src_name!r}: text field {text_field!r} not found at {where} "
                          f"(available: {sorted(batch)}); set text_field in the source config")
    return [{top: v} for v in batch[top]]


def stream_shard_chunks(shards: int, make_shard, start: dict | None, index: int) -> Iterator[Chunk]:
    """One chunk per stream shard, from the recorded one on: ``make_shard(k)`` is ``ds.shard(shards, k)``
    of the resharded stream (concatenated in k order they are the stream in its own order, as the
    ``datasets`` documentation of ``shard`` states). The shard count is part of each position: a dataset
    whose files changed since the run started is refused on resume."""
    start = start or {"shard": 0, "of": shards}
    if start.get("of") != shards:
        raise SourceError(f"the hub dataset now has {shards} stream shards, {start.get('of')} when this run started "
                          f"(its files changed): rerun with --force to start the source over")
    for k in range(start["shard"], shards):
        yield Chunk(index, {"shard": k, "of": shards}, "stream-shard", make_shard(k), f"stream shard {k + 1} of {shards}")
        index += 1


def stream_state(ds) -> Any:
    try:
        state = ds.state_dict()
        json.dumps(state)
        return state
    except (AttributeError, NotImplementedError, TypeError, ValueError):
        return None  # resume then falls back to skipping the recorded number of rows


def cuttable_note(src: C.SourceConfig, files: list[Path]) -> str | None:
    """Why a source runs as one chunk (the log line), or None."""
    if src.kind == "local" and src.format == "txt" and src.sample_by != "line" and len(files) == 1:
        return f"source {src.name!r}: one txt file read by {src.sample_by} cannot be cut; it runs on one worker"
    if src.kind == "local" and src.format == "parquet" and len(files) == 1:
        import pyarrow.parquet as pq

        with contextlib.suppress(Exception):
            if pq.ParquetFile(files[0]).num_row_groups == 1:
                return f"source {src.name!r}: {files[0]} is one parquet row group and cannot be cut; it runs on one worker"
    return None


# ---------------------------------------------------------------------------------------------------
# The worker
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SourceRules:
    """What a worker needs of a source (picklable, small)."""

    name: str
    lang: str
    tier: int
    min_chars: int
    text_field: str
    non_utf8: str
    fmt: str
    sample_by: str

    @classmethod
    def of(cls, src: C.SourceConfig, non_utf8: str) -> "SourceRules":
        return cls(src.name, src.lang, src.tier, src.min_chars, src.text_field, non_utf8, src.format, src.sample_by)


def _not_utf8(rules: SourceRules, where: str, reason: str) -> str:
    return (f"source {rules.name!r}: bytes that are not UTF-8 at {where} ({reason}); corpus.non_utf8 is 'error'. "
            f"Fix the file, or set corpus.non_utf8: skip to drop such documents and count them")


def line_bytes(chunk: Chunk) -> bytes | None:
    """The bytes of a 'lines' or 'span' chunk (None: the file is now shorter than the span)."""
    if chunk.kind == "lines":
        return chunk.payload
    path, offset, length = chunk.payload
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read(length)
    return data if len(data) == length else None


class _LineRef:
    """'<file> line <n>' for messages, its line number counted only when a message is written."""

    __slots__ = ("chunk", "i")

    def __init__(self, chunk: Chunk, i: int) -> None:
        self.chunk, self.i = chunk, i

    def __str__(self) -> str:
        return f"{self.chunk.label} line {line_number(self.chunk, self.i)}"

    def __format__(self, spec: str) -> str:  # f-strings call this, not __str__
        return format(str(self), spec)


def _rows_of(chunk: Chunk, rules: SourceRules) -> Iterator[tuple[Any, str | None, str]]:
    """(row value, problem, where) per row of the chunk; a problem ends the chunk."""
    errors = "strict" if rules.non_utf8 == "error" else "replace"
    if chunk.kind in ("lines", "span"):
        data = line_bytes(chunk)
        if data is None:
            yield None, (f"source {rules.name!r}: {chunk.label} is shorter than when stage 1 cut it into chunks; the "
                         f"file changed while stage 1 ran: rerun with --force"), chunk.label
            return
        lines = data.split(b"\n")
        if lines and lines[-1] == b"":
            lines.pop()
        for i, raw in enumerate(lines):
            where = _LineRef(chunk, i)
            try:
                line = raw.decode("utf-8", errors)
            except UnicodeDecodeError as e:
                yield None, _not_utf8(rules, where, e.reason), where
                return
            if rules.fmt == "txt":
                yield line.removesuffix("\r"), None, where
                continue
            if not line.strip():
                continue  # a blank line between records is not a row (as datasets' json builder read it)
            try:
                yield json.loads(line), None, where
            except json.JSONDecodeError as e:
                yield None, (f"source {rules.name!r}: {chunk.label}:{line_number(chunk, i)}: not a JSON record "
                             f"({e.msg} at column {e.colno}). Fix or remove the line (one JSON object per line)"), where
                return
    elif chunk.kind == "text":
        try:
            text = chunk.payload.decode("utf-8", errors)
        except UnicodeDecodeError as e:
            line = chunk.payload.count(b"\n", 0, e.start) + 1
            yield None, _not_utf8(rules, f"{chunk.label} line {line}", e.reason), chunk.label
            return
        for i, t in enumerate(text.split("\n\n") if rules.sample_by == "paragraph" else [text]):
            yield t, None, f"{chunk.label} paragraph {i + 1}" if rules.sample_by == "paragraph" else chunk.label
    elif chunk.kind == "parquet":
        import pyarrow.parquet as pq

        path, group = chunk.payload
        pf = pq.ParquetFile(path)
        top = rules.text_field.split(".")[0]
        if top not in pf.schema_arrow.names:
            yield None, (f"source {rules.name!r}: text field {rules.text_field!r} not found in {path} "
                         f"(available: {sorted(pf.schema_arrow.names)}); set text_field in the source config"), path
            return
        first = sum(pf.metadata.row_group(g).num_rows for g in range(group))
        for i, value in enumerate(pf.read_row_group(group, columns=[top]).column(0).to_pylist()):
            yield {top: value}, None, f"{path} row {first + i + 1}"
    else:
        for i, row in enumerate(chunk.payload):
            yield row, None, f"row {chunk.first_line + i}"


def process_chunk(chunk: Chunk, rules: SourceRules) -> ChunkResult:
    """Parse, check, normalize, filter, hash and encode one chunk (pure: same chunk, same result)."""
    kinds = bytearray()
    keys: list[int] = []
    chars: list[int] = []
    cand_rows: list[int] = []
    parts: list[bytes] = []
    error = None
    # the record {"text", "source", "lang", "tier"} as json.dumps(..., ensure_ascii=False) spells it
    suffix = (f', "source": {json.dumps(rules.name, ensure_ascii=False)}, '
              f'"lang": {json.dumps(rules.lang, ensure_ascii=False)}, "tier": {rules.tier}}}\n')
    min_chars = max(rules.min_chars, 1)
    for value, problem, where in _rows_of(chunk, rules):
        if problem:
            error = problem
            break
        if isinstance(value, str):
            text = value
        else:
            try:
                text = extract_text(value, rules.text_field, rules.name, where)
            except SourceError as e:
                error = str(e)
                break
        if text and is_undecodable(text):
            if rules.non_utf8 == "error":
                error = (f"source {rules.name!r}: {where} holds bytes that are not UTF-8 (U+FFFD or a lone "
                         f"surrogate); corpus.non_utf8 is 'error'. Fix the data, or set corpus.non_utf8: skip")
                break
            kinds.append(NON_UTF8)
            continue
        text = text or ""
        if not unicodedata.is_normalized("NFC", text):
            text = unicodedata.normalize("NFC", text)
        if len(text.strip()) < min_chars:
            kinds.append(FILTERED)
            continue
        cand_rows.append(len(kinds))
        kinds.append(KEPT)
        keys.append(stable_hash64(text))
        chars.append(len(text))
        parts.append(('{"text": ' + json.dumps(text, ensure_ascii=False) + suffix).encode("utf-8"))
    ends = np.cumsum([len(p) for p in parts], dtype=np.int64) if parts else np.zeros(0, np.int64)
    frames, frame_first, start, size = [], [], 0, 0
    for i, part in enumerate(parts):  # frames cut between records, each >= FRAME_BYTES but the last
        size += len(part)
        if size >= FRAME_BYTES or i == len(parts) - 1:
            frames.append(compress_frame(b"".join(parts[start:i + 1])))
            frame_first.append(start)
            start, size = i + 1, 0
    return ChunkResult(rows=len(kinds), kinds=np.frombuffer(bytes(kinds), dtype=np.uint8), keys=np.array(keys, dtype=np.uint64),
                       chars=np.array(chars, dtype=np.int64), frames=b"".join(frames),
                       frame_ends=np.cumsum([len(f) for f in frames], dtype=np.int64),
                       frame_first=np.array(frame_first, dtype=np.int64), ends=ends, error=error,
                       cand_rows=np.array(cand_rows, dtype=np.int64))


def records_frames(r: ChunkResult, cands: np.ndarray) -> list[bytes]:
    """zstd frames holding the records of candidates ``cands`` (sorted indices) of one chunk, in order: a
    frame of the worker's whose candidates are all in ``cands`` is used as it is; any other frame they
    touch is decompressed and its records among ``cands`` re-encoded as one frame. The bytes depend only on
    (chunk, cands), never on how the commits were split, so every worker count writes the same shards."""
    if len(cands) == 0:
        return []
    cands = np.asarray(cands, dtype=np.int64)
    frame_of = np.searchsorted(r.frame_first, cands, side="right") - 1
    bounds = np.append(r.frame_first, len(r.ends))
    out = []
    for k in np.unique(frame_of):
        members = cands[frame_of == k]
        c0, c1 = (int(r.frame_ends[k - 1]) if k else 0), int(r.frame_ends[k])
        a, b = int(bounds[k]), int(bounds[k + 1])
        if members.size == b - a:
            out.append(r.frames[c0:c1])
            continue
        raw = zstandard.ZstdDecompressor().decompress(r.frames[c0:c1])
        base = int(r.ends[a - 1]) if a else 0
        out.append(compress_frame(b"".join(raw[(int(r.ends[i - 1]) if i else 0) - base:int(r.ends[i]) - base] for i in members)))
    return out


def process_task(task: tuple[Chunk, SourceRules, str]) -> ChunkResult | list[ChunkResult]:
    """``process_chunk`` for ``multiprocessing`` (one picklable argument), its frames written to the
    spool file named in the task (plain write, no fsync: the committer reads and deletes it at once).
    A stream shard gives one result per batch of rows, each with its own spool file."""
    chunk, rules, spool = task
    if chunk.kind == "stream-shard":
        return process_stream_shard(chunk, rules, spool)
    return _spooled(process_chunk(chunk, rules), spool)


def _spooled(result: ChunkResult, spool: str) -> ChunkResult:
    with open(spool, "wb") as f:
        f.write(result.frames)
    result.frames, result.spool = b"", spool
    return result


def process_stream_shard(chunk: Chunk, rules: SourceRules, spool: str) -> list[ChunkResult]:
    """Stream one shard of a hub dataset and process it in batches of ``HF_CHUNK_ROWS`` rows: a list of
    results in row order, their frames on disk (a row group can hold gigabytes of text). A failure while
    streaming (network, a damaged file) ends the list with a result carrying the error, after the rows
    read before it."""
    results: list[ChunkResult] = []
    rows = 0
    try:
        for batch in chunk.payload.iter(batch_size=HF_CHUNK_ROWS):
            values = batch_rows(batch, rules.text_field, rules.name, f"row {rows + 1} of {chunk.label}")
            part = Chunk(chunk.index, chunk.pos, "rows", values, chunk.label, rows + 1)
            results.append(_spooled(process_chunk(part, rules), f"{spool}.{len(results)}"))
            rows += results[-1].rows
            if results[-1].error is not None:
                return results
    except Exception as e:  # noqa: BLE001 -- the source fails (recorded), the stage goes on
        message = str(e) if isinstance(e, SourceError) else (
            f"source {rules.name!r}: reading {chunk.label} failed after {rows} rows ({type(e).__name__}: {e})")
        results.append(_spooled(process_chunk(Chunk(chunk.index, chunk.pos, "rows", []), rules), f"{spool}.{len(results)}"))
        results[-1].error = message
    return results
