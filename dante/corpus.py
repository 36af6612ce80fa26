"""Stage 1: stream text sources, normalize, filter, deduplicate and write compressed document shards.
(~650 lines: the shard writer and the readers of stage 1's shards share the record format, so they stay together.)

Every source, hub or local, is read through the same code path: a ``datasets`` streaming
``IterableDataset`` (``load_dataset(hf_id, ..., streaming=True)`` for the hub, the ``json`` / ``text`` /
``parquet`` builders with ``data_files=`` for local files). Each row then goes through the same steps:

1. text extraction (``text_field``, a dotted path reaches into nested mappings such as Europarl's
   ``translation.it``; a missing field fails the source with the list of available fields);
2. the non-UTF-8 policy (``corpus.non_utf8``): undecodable bytes in local files are replaced by U+FFFD
   while reading, and any document holding U+FFFD or a lone surrogate (what decoders leave behind) is
   dropped and counted (``skip``) or fails the source (``error``);
3. Unicode NFC normalization (a decomposed "e" + U+0300 becomes the single code point "è"), so the same
   word always reaches the tokenizer as the same bytes;
4. the ``min_chars`` filter (length after NFC, surrounding whitespace not counted);
5. exact-duplicate removal over the whole stage by a 64-bit BLAKE2b of the UTF-8 text: the first
   occurrence wins, in the order sources are processed (config order in an uninterrupted run);
6. the character budget: a source stops once its kept characters reach ``char_budget`` (0: no limit).

Output: ``01_corpus/<source>/shard-NNNNN.jsonl.gz``, records ``{"text", "source", "lang", "tier"}``,
``docs_per_shard`` documents each, written atomically (gzip mtime 0: identical runs give identical bytes),
and beside each a ``shard-NNNNN.hashes`` file (the shard's dedup keys, little-endian uint64).

Resume: after every shard, ``progress.json`` records per source the completed shards, the number of rows
consumed, the stream position (``IterableDataset.state_dict()``) and the statistics. A killed run reloads
the dedup keys of the completed shards, restores the stream (``load_state_dict``, else ``skip(rows)``)
and continues from the last completed shard: the result is the same documents, in the same order, as an
uninterrupted run. A failing source (missing hub dataset, bad bytes with policy ``error``, no document
kept) records its error and the others go on; the stage then exits non-zero, names the failed sources and
writes no manifest. Rerunning (with the same config, or one where only failed or pending sources changed:
``resume_check``) retries them after the sources completed meanwhile, which then come first in the dedup
order (recorded in the manifest as ``dedup_order``).

Readers of a finished stage 1 live here too, beside the writer of the format they read: ``corpus_files``
lists its shards as ``CorpusFile`` s (with their source, language and tier), ``iter_shard_texts`` yields
the checked texts of one shard (stages 2 and 3), ``read_shard`` / ``iter_documents`` the raw records.

Memory: the dedup set holds one 64-bit key per kept document, in a Python set (its measured cost per
key, and what that means for the dante-2b corpus: docs/PERFORMANCE.md, "Facts measured while the stages
were written"). 64-bit keys collide with probability ~n^2/2^65 (4e-4 at 1.2e8 documents: expect no false
duplicate).

Example::

    python 1_download_corpus.py --config configs/tiny/corpus.yaml
    python 1_download_corpus.py --config configs/dante-2b/corpus.yaml --dry-run
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import gzip
import json
import shutil
import sys
import traceback
import unicodedata
import zlib
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from tqdm import tqdm

from dante import config as C
from dante.artifacts import Stage, atomic_path, describe_path, stable_hash64
from dante.errors import UserError, problems_message, raise_problems

FORMAT_VERSION = 1
SHARD_NAME = "shard-{:05d}.jsonl.gz"
HASHES_SUFFIX = ".hashes"
#: local format -> datasets packaged builder
BUILDERS = {"jsonl": "json", "txt": "text", "parquet": "parquet"}
REPLACEMENT_CHAR = "\ufffd"


class SourceError(UserError):
    """A problem with one source (its data or its settings); recorded, and the other sources go on."""


# ---------------------------------------------------------------------------------------------------
# Statistics and dedup
# ---------------------------------------------------------------------------------------------------


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


class DedupIndex:
    """Exact-duplicate filter over the whole stage: 64-bit BLAKE2b keys of the UTF-8 text (``stable_hash64``)."""

    def __init__(self) -> None:
        self._seen: set[int] = set()

    def __len__(self) -> int:
        return len(self._seen)

    @staticmethod
    def key(text: str) -> int:
        return stable_hash64(text)

    def add(self, key: int) -> bool:
        """True if the key is new (and remember it), False for a duplicate."""
        if key in self._seen:
            return False
        self._seen.add(key)
        return True

    def discard(self, keys: list[int]) -> None:
        self._seen.difference_update(keys)

    def load(self, path: Path) -> None:
        self._seen.update(read_hashes(path))


def write_hashes(path: Path, keys: list[int]) -> None:
    arr = array("Q", keys)
    if sys.byteorder == "big":
        arr.byteswap()  # the file format is little-endian everywhere
    with atomic_path(path) as tmp:
        tmp.write_bytes(arr.tobytes())


def read_hashes(path: Path) -> array:
    arr = array("Q")
    arr.frombytes(path.read_bytes())
    if sys.byteorder == "big":
        arr.byteswap()
    return arr


# ---------------------------------------------------------------------------------------------------
# Shards
# ---------------------------------------------------------------------------------------------------


def write_shard(path: Path, records: list[dict]) -> None:
    """One gzip JSON-lines shard, atomically; mtime 0 so identical content gives identical bytes."""
    payload = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=6, mtime=0) as gz:
            gz.write(payload)


def read_shard(path: str | Path) -> Iterator[dict]:
    """Records of one shard, in order."""
    with gzip.open(path, "rt", encoding="utf-8") as f:
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


def open_stream(src: C.SourceConfig, non_utf8: str):
    """A ``datasets`` IterableDataset for any source kind: the one code path for hub and local data."""
    with _no_torch_import():
        return _load_stream(src, non_utf8)


def _load_stream(src: C.SourceConfig, non_utf8: str):
    import datasets  # imported here: --dry-run and the config tests never pay for it

    if src.kind == "hf":
        return datasets.load_dataset(
            src.hf_id, name=src.hf_config or None, data_dir=src.hf_data_dir or None, split=src.split, streaming=True
        )
    files = [str(f) for f in resolve_local_files(src)]
    kwargs: dict[str, Any] = {}
    errors = "replace" if non_utf8 == "skip" else "strict"
    if src.format == "txt":
        kwargs = {"encoding": "utf-8", "encoding_errors": errors, "sample_by": src.sample_by}
    elif src.format == "jsonl" and non_utf8 == "skip":
        # datasets' json builder re-decodes its byte chunks (honouring encoding_errors) only when the
        # encoding is not spelled "utf-8" (packaged_modules/json/json.py, datasets 5.2); "utf_8" is the
        # same codec under its Python alias. tests/test_corpus.py checks that a bad line is skipped.
        kwargs = {"encoding": "utf_8", "encoding_errors": "replace"}
    try:
        return datasets.load_dataset(BUILDERS[src.format], data_files=files, split="train", streaming=True, **kwargs)
    except StopIteration:  # datasets 5.2's json builder, inferring a schema from a file without rows
        raise SourceError(f"source {src.name!r} kept no document: 0 read, its file(s) hold no rows ({', '.join(files)})") from None


def extract_text(row: dict, field: str, src_name: str, row_number: int) -> str | None:
    """The document text of one row (None for a null value); SourceError if the field is absent."""
    value: Any = row
    for part in field.split("."):
        if not isinstance(value, dict) or part not in value:
            available = sorted(value) if isinstance(value, dict) else type(value).__name__
            raise SourceError(
                f"source {src_name!r}: text field {field!r} not found in row {row_number} "
                f"(available: {available}); set text_field in the source config"
            )
        value = value[part]
    if value is None or isinstance(value, str):
        return value
    raise SourceError(
        f"source {src_name!r}: text field {field!r} holds {type(value).__name__}, not text (row {row_number})"
    )


def first_non_utf8_line(files: list[Path]) -> tuple[str, int] | None:
    """(file, 1-based line) of the first line that is not valid UTF-8, for error messages."""
    for f in files:
        opener = gzip.open if f.suffix == ".gz" else open
        with opener(f, "rb") as fh:
            for number, line in enumerate(fh, 1):
                try:
                    line.decode("utf-8")
                except UnicodeDecodeError:
                    return str(f), number
    return None


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
# The stage
# ---------------------------------------------------------------------------------------------------


def _fresh_source_state() -> dict:
    return {"status": "pending", "shards": [], "rows": 0, "stream_state": None, "stats": dataclasses.asdict(SourceStats())}


def _jsonable(obj: Any) -> Any:
    try:
        json.dumps(obj)
        return obj
    except (TypeError, ValueError):
        return None  # resume then falls back to skipping the recorded number of rows


def _stream_state(ds) -> Any:
    try:
        return _jsonable(ds.state_dict())
    except (AttributeError, NotImplementedError, TypeError):
        return None


class _SourceRun:
    """Processing of one source: stream -> filter -> dedup -> shards, with progress after every shard."""

    def __init__(self, stage: Stage, src: C.SourceConfig, corpus_cfg: C.CorpusConfig, state: dict,
                 dedup: DedupIndex, save_progress) -> None:
        self.stage, self.src, self.cfg, self.state = stage, src, corpus_cfg, state
        self.dedup, self.save_progress = dedup, save_progress
        self.dir = stage.dir / src.name
        self.stats = SourceStats(**state["stats"])
        self.rows = state["rows"]
        self.buffer: list[dict] = []
        self.buffer_keys: list[int] = []

    def run(self) -> None:
        src = self.src
        if not self.state["shards"] and self.dir.exists():
            shutil.rmtree(self.dir)  # leftovers of a run that never completed a shard of this source
        self.state["status"] = "running"
        budget = src.char_budget
        bar = tqdm(total=budget or None, initial=self.stats.chars, unit="char", unit_scale=True,
                   desc=f"{src.name} ({src.lang}, tier {src.tier})", mininterval=0.5, file=sys.stderr)
        try:
            try:
                ds = self._open_at_saved_position()
                for row in ds:
                    self.rows += 1
                    kept = self._take(row)
                    if kept:
                        bar.update(kept)
                        if len(self.buffer) >= self.cfg.docs_per_shard:
                            self._flush(ds)
                        if budget and self.stats.chars >= budget:
                            break
            except UnicodeDecodeError as e:
                where = first_non_utf8_line(resolve_local_files(src)) if src.kind == "local" else None
                at = f"{where[0]} line {where[1]}" if where else f"row {self.rows + 1}"
                raise SourceError(
                    f"source {src.name!r}: bytes that are not UTF-8 at {at} ({e.reason}); corpus.non_utf8 is "
                    f"'error'. Fix the file, or set corpus.non_utf8: skip to drop such documents and count them"
                ) from None
            if self.buffer:
                self._flush(ds)
        except BaseException:
            self.dedup.discard(self.buffer_keys)  # never written: must not shadow documents read later
            raise
        finally:
            bar.close()
        self.state.update(rows=self.rows, stats=dataclasses.asdict(self.stats))
        if self.stats.docs == 0:
            s = self.stats
            raise SourceError(
                f"source {src.name!r} kept no document: {s.docs_read} read, {s.dropped_filter} shorter than "
                f"min_chars={src.min_chars}, {s.dropped_dedup} duplicates, {s.dropped_non_utf8} non-UTF-8; "
                f"check path/text_field or lower min_chars"
            )
        self._remove_stale_files()
        self.state["status"] = "done"
        self.state.pop("error", None)

    def _open_at_saved_position(self):
        ds = open_stream(self.src, self.cfg.non_utf8)
        if self.state["stream_state"] is not None:
            ds.load_state_dict(self.state["stream_state"])
        elif self.rows:
            with _no_torch_import():
                ds = ds.skip(self.rows)
        return ds

    def _take(self, row: dict) -> int:
        """Classify one row; return the characters kept (0 if dropped)."""
        src, st = self.src, self.stats
        st.docs_read += 1
        text = extract_text(row, src.text_field, src.name, self.rows)
        if text and is_undecodable(text):
            if self.cfg.non_utf8 == "error":
                raise SourceError(
                    f"source {src.name!r}: row {self.rows} holds bytes that are not UTF-8 (U+FFFD or a lone "
                    f"surrogate); corpus.non_utf8 is 'error'. Fix the data, or set corpus.non_utf8: skip"
                )
            st.dropped_non_utf8 += 1
            return 0
        text = unicodedata.normalize("NFC", text or "")
        if len(text.strip()) < max(src.min_chars, 1):
            st.dropped_filter += 1
            return 0
        key = DedupIndex.key(text)
        if not self.dedup.add(key):
            st.dropped_dedup += 1
            return 0
        self.buffer.append({"text": text, "source": src.name, "lang": src.lang, "tier": src.tier})
        self.buffer_keys.append(key)
        st.docs += 1
        st.chars += len(text)
        return len(text)

    def _flush(self, ds) -> None:
        index = len(self.state["shards"])
        path = self.dir / SHARD_NAME.format(index)
        write_shard(path, self.buffer)
        write_hashes(_hashes_path(path), self.buffer_keys)
        self.state["shards"].append(path.relative_to(self.stage.dir).as_posix())
        self.state.update(rows=self.rows, stream_state=_stream_state(ds), stats=dataclasses.asdict(self.stats))
        self.save_progress()  # the shard counts only from here on
        self.buffer, self.buffer_keys = [], []

    def _remove_stale_files(self) -> None:
        """Shard files past the recorded ones (written just before a kill, then rewritten or not needed)."""
        keep = {Path(p).name for p in self.state["shards"]}
        keep |= {_hashes_path(Path(p)).name for p in self.state["shards"]}
        for f in self.dir.glob("shard-*"):
            if f.name not in keep:
                f.unlink()


def _hashes_path(shard: Path) -> Path:
    return shard.with_name(shard.name.removesuffix(".jsonl.gz") + HASHES_SUFFIX)


def resume_check(old_cfg: dict, new_cfg: dict, state: dict) -> str | None:
    """May an unfinished stage 1 continue under a changed config (``Stage.open``'s hook)?

    Yes when the stage-wide settings are unchanged and so is every source that already wrote shards:
    a failed or not-yet-started source may be corrected, added or removed (fixing a hub id must not throw
    away days of downloads). Returns None to accept, else the reason.
    """
    def rest(c: dict) -> dict:
        return {**c, "corpus": {k: v for k, v in c.get("corpus", {}).items() if k != "sources"}}

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

    dedup = DedupIndex()
    for state in sources.values():
        for rel in state["shards"]:
            dedup.load(_hashes_path(stage.dir / rel))
    if stage.resumed:
        done = [n for n, s in sources.items() if s["status"] == "done"]
        print(f"[01_corpus] resuming: {len(done)} source(s) complete, {len(dedup):,} dedup keys reloaded", flush=True)

    def save() -> None:
        stage.save_progress(progress)

    failures: dict[str, str] = {}
    for src in corpus.sources:
        state = sources.setdefault(src.name, _fresh_source_state())
        if state["status"] == "done":
            print(f"[01_corpus] {src.name}: already complete ({len(state['shards'])} shards)", flush=True)
            continue
        try:
            _SourceRun(stage, src, corpus, state, dedup, save).run()
            progress["completed_order"].append(src.name)
        except Exception as e:  # noqa: BLE001 -- any failure of one source (network, hub, data) is recorded
            message = str(e) if isinstance(e, SourceError) else f"{type(e).__name__}: {e}"
            if not _expected_failure(e):
                traceback.print_exc(file=sys.stderr)  # looks like a bug, not bad data or the network: keep the evidence
            if not state["shards"]:  # nothing written: the retry starts the source over (its data may be fixed)
                state.clear()
                state.update(_fresh_source_state())
            state["status"], state["error"] = "failed", message
            failures[src.name] = message
        save()
        _print_source_summary(src, state)

    if failures:
        raise SourceError(
            problems_message(f"{len(failures)} source(s) failed; the others' progress is kept in {stage.dir / 'progress.json'}",
                             [f"{name}: {msg}" for name, msg in failures.items()])
            + "\n  HINT: fix the cause and rerun the same command to retry only the failed sources."
        )
    return _finish(stage, cfg, progress)


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


def _finish(stage: Stage, cfg: C.CorpusStageConfig, progress: dict) -> dict:
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
            stage.inputs[f"source:{src.name}"] = {"kind": "local", "files": [describe_path(f) for f in resolve_local_files(src)]}
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
    lines = [f"stage 1 plan -> {stage_dir}  (docs_per_shard={corpus.docs_per_shard}, non_utf8={corpus.non_utf8})",
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
