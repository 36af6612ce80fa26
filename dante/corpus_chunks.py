"""Stage 1's units of parallel work: sources cut into deterministic chunks, and what a worker does with one.

A chunk is a piece of one source whose bounds depend only on the source's bytes (never on the number of
workers or on timing), so the committer in ``dante.corpus`` can apply dedup and budgets in (source,
chunk) order and get the same output for any ``corpus.workers``:

==========================  ========================================================================
source                      chunk
==========================  ========================================================================
local jsonl, txt by line    a line-aligned byte range of the (decompressed) file: from its start
                            offset, ``corpus.chunk_bytes`` bytes cut back to the last newline (a longer line
                            makes a longer chunk); .gz/.bz2/.xz/.zst files are decompressed here
local txt by paragraph/doc  one file (a single file cannot be cut: the log says so)
local parquet               one row group (a file written as one group cannot be cut: log)
hub (kind hf)               ``HF_CHUNK_ROWS`` consecutive rows of the one stream (read in the
                            committer's process; only their processing runs on the workers)
==========================  ========================================================================

``process_chunk`` (in a worker process, or inline for one worker) parses the rows, applies the non-UTF-8
policy, NFC and ``min_chars``, hashes the kept texts and encodes their output records; the result lists,
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

from dante import config as C
from dante.artifacts import stable_hash64
from dante.errors import UserError

HF_CHUNK_ROWS = 2000
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
    """'lines' (bytes of whole lines), 'text' (a whole file's text, split by sample_by), 'parquet'
    (a row group the worker reads), 'rows' (hub rows)."""
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
    blob: bytes
    """The candidates' output records (JSON lines), concatenated."""
    ends: np.ndarray
    """End offset of each candidate's record in ``blob``."""
    error: str | None = None
    """A problem at row ``rows`` (the rows before it are valid); raised if the source gets there."""
    cand_rows: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))


# ---------------------------------------------------------------------------------------------------
# Text checks shared by the worker and the readers
# ---------------------------------------------------------------------------------------------------


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
    if path.suffix.lower() in (".gz", ".bz2", ".xz", ".lzma", ".zst"):
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
    the file alone (each chunk is read from its own start, never from a carried-over remainder)."""
    start = start or {"file": 0, "offset": 0, "line": 1}
    for fi in range(start["file"], len(files)):
        path = files[fi]
        offset, line = (start["offset"], start["line"]) if fi == start["file"] else (0, 1)
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
    top = text_field.split(".")[0]
    pos = {"rows": rows, "stream_state": stream_state(ds)}
    for batch in ds.iter(batch_size=rows_per_chunk):
        if top not in batch:
            raise SourceError(f"source {src_name!r}: text field {text_field!r} not found at row {rows + 1} "
                              f"(available: {sorted(batch)}); set text_field in the source config")
        values = batch[top]
        yield Chunk(index, pos, "rows", [{top: v} for v in values], first_line=rows + 1)
        index += 1
        rows += len(values)
        pos = {"rows": rows, "stream_state": stream_state(ds)}


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


def _rows_of(chunk: Chunk, rules: SourceRules) -> Iterator[tuple[Any, str | None, str]]:
    """(row value, problem, where) per row of the chunk; a problem ends the chunk."""
    errors = "strict" if rules.non_utf8 == "error" else "replace"
    if chunk.kind == "lines":
        lines = chunk.payload.split(b"\n")
        if lines and lines[-1] == b"":
            lines.pop()
        for i, raw in enumerate(lines):
            where = f"{chunk.label} line {chunk.first_line + i}"
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
                yield None, (f"source {rules.name!r}: {chunk.label}:{chunk.first_line + i}: not a JSON record "
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
    return ChunkResult(rows=len(kinds), kinds=np.frombuffer(bytes(kinds), dtype=np.uint8), keys=np.array(keys, dtype=np.uint64),
                       chars=np.array(chars, dtype=np.int64), blob=b"".join(parts), ends=ends, error=error,
                       cand_rows=np.array(cand_rows, dtype=np.int64))


def process_task(task: tuple[Chunk, SourceRules]) -> ChunkResult:
    """``process_chunk`` for ``multiprocessing`` (one picklable argument)."""
    return process_chunk(*task)
