"""Stage 3: documents -> token shards; the binary shard format, its writer, memmap reader and verifier.
(~600 lines: the format, its writer, its reader and its verifier are one contract, kept in one file.)

Format (version 1), one pair of files per shard, named ``t<tier>-<split>-<nnnnn>.{bin,idx}``:

``.bin`` — a 128-byte little-endian header, then ``n_tokens`` ids of ``dtype``::

    magic b"DANTESHD" | version u32 | header_bytes u32 | itemsize u32 | vocab_size u32 | n_tokens u64
    | n_doc_starts u64 | tokens_crc32 u32 | index_crc32 u32 | tier u32 | split u32 (0 train, 1 val)
    | shard_index u32 | eos_id u32 | tokenizer_sha256[:16] | zero padding

``.idx`` — a 32-byte header (magic b"DANTEIDX", version u32, pad u32, n_doc_starts u64, n_tokens u64)
then ``n_doc_starts`` uint64 offsets (into this shard) where a document begins.

Design choices
- Shards are exactly ``shard_tokens`` long (the last of each tier/split is shorter): each (tier, split)
  is ONE token stream, doc ids followed by ``<|end_of_text|>``, cut into fixed windows. A document may
  continue into the next shard, so offset 0 is a document start only if listed in the index; every
  document still ends with EOS, so the boundary is never lost.
- Two CRC-32s in the header (tokens, index) let ``verify_stage`` find any corrupted byte, and tie each
  ``.idx`` to its ``.bin``; a truncated file fails the size check. Nothing time- or host-dependent goes
  into a shard, so a rerun writes byte-identical files.
- The manifest also records a CRC-32 per 8 MiB chunk of every file (``outputs.checksums``), computed from
  the bytes in memory as they are written. Readers (``open_split``: stages 4 and 5) check headers and sizes
  at every open and the chunk CRCs plus the id range once per file version, remembered in
  ``verified/<shard>.json`` keyed by (size, mtime_ns, checksums hash): the first open costs one read of the
  shards (CRC-32 ~840 MB/s here), later ones a stat per file. Damage is a UserError naming the file, the
  region and ``--verify`` / ``--force``.
- Inputs are checked before anything on disk changes (``validate_stage``, run_stage's ``validate``): a
  refused ``--force`` keeps the finished stage. One process per stage folder (the stage lock).
- The encoder: ``tiktoken`` built from the same tokenizer.json (``dante.fast_encode``), several times
  faster per core, used only after its ids equal ``tokenizers``' on this run's documents
  (``choose_encoder``); otherwise ``tokenizers``, with the reason logged and recorded (manifest ``encoder``).
- Train/validation split per document, by a keyed hash of its text (``stable_unit``): deterministic,
  independent of order and worker count; stage 1 deduplicates, so equal texts cannot straddle splits.
- Parallelism and resume in two phases. (A) worker processes tokenize whole stage-1 shards (one input
  file = one task, ``encode_batch``) into ``.work/<input>.<split>.{tok,len}.npy`` plus a ``.done.json``
  marker written last; finished inputs are never redone. (B) the main process walks the inputs in order
  and cuts each stream into shards as soon as enough consecutive inputs are done; after each shard it
  records the stream's cursor in progress.json and deletes work files behind every cursor. A kill at
  any point reruns at most one shard per stream and the unfinished inputs, and — since every byte is a
  function of the inputs — gives identical shards.

Example::

    python 3_tokenize_shards.py --config configs/tiny/shards.yaml
    python 3_tokenize_shards.py --config configs/tiny/shards.yaml --verify
    reader = ShardReader("runs/tiny/03_shards/t1-train-00000.bin"); reader.tokens[:10]
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import shutil
import struct
import time
import zlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Iterator

import numpy as np

from dante import config as C
from dante.artifacts import (
    Stage,
    atomic_path,
    atomic_write_json,
    file_sha256,
    load_texts,
    read_json,
    read_manifest,
    stable_unit,
    stage_dir,
    tokenizer_path,
)
from dante.corpus import READABLE_FORMATS as CORPUS_READABLE
from dante.corpus import CorpusFile, corpus_files, iter_shard_texts
from dante.errors import StageError, UserError, problems_message
from dante.fast_encode import Unreproducible, build_tiktoken, encode_plain, prove_equal, token_byte_lengths
from dante.tokenizer import EOS_ID, load_tokenizer

FORMAT_VERSION = 1
BIN_MAGIC = b"DANTESHD"
IDX_MAGIC = b"DANTEIDX"
HEADER_BYTES = 128
IDX_HEADER_BYTES = 32
SPLITS = ("train", "val")
DTYPES = {"uint16": np.uint16, "uint32": np.uint32}
_BIN_FIELDS = struct.Struct("<8sIIIIQQIIIIII16s")
_IDX_FIELDS = struct.Struct("<8sIIQQ")
WORK_DIR = ".work"


class ShardError(StageError, UserError):
    """A shard file that is missing, truncated or corrupt (the message names the file). Both a StageError
    (stage 3 rebuilds it) and a UserError (the readers of stages 4, 5 report it as bad input)."""


#: Stage 3 records a CRC-32 per CHUNK_BYTES of every shard file in its manifest (``outputs.checksums``).
#: 8 MiB: ~25 checksums for a 200 MB shard (a few KB of manifest for the 90B-token reference), small
#: enough that a damaged region is located to 8 MiB, large enough that the per-call overhead is nil.
#: zlib.crc32 ran at ~840 MB/s here (shared 2-core machine), so a full check reads at disk speed.
CHUNK_BYTES = 8 << 20
VERIFIED_DIR = "verified"
FIX_HINT = ("HINT: `python 3_tokenize_shards.py --config <your shards.yaml> --verify` lists every damaged file; "
            "`python 3_tokenize_shards.py --config <your shards.yaml> --force` rebuilds the shards.")


# ---------------------------------------------------------------------------------------------------
# The binary format
# ---------------------------------------------------------------------------------------------------


@dataclass
class ShardHeader:
    itemsize: int
    vocab_size: int
    n_tokens: int
    n_doc_starts: int
    tokens_crc32: int
    index_crc32: int
    tier: int
    split: str
    shard_index: int
    eos_id: int
    tokenizer_sha16: bytes
    version: int = FORMAT_VERSION

    @property
    def dtype(self):
        return {2: np.uint16, 4: np.uint32}[self.itemsize]

    def pack(self) -> bytes:
        raw = _BIN_FIELDS.pack(
            BIN_MAGIC, self.version, HEADER_BYTES, self.itemsize, self.vocab_size, self.n_tokens,
            self.n_doc_starts, self.tokens_crc32, self.index_crc32, self.tier, SPLITS.index(self.split),
            self.shard_index, self.eos_id, self.tokenizer_sha16,
        )
        return raw + b"\x00" * (HEADER_BYTES - len(raw))

    @classmethod
    def unpack(cls, raw: bytes, path: Path) -> "ShardHeader":
        if len(raw) < HEADER_BYTES:
            raise ShardError(f"{path}: truncated header ({len(raw)} of {HEADER_BYTES} bytes)")
        magic, version, hbytes, itemsize, vocab, n_tok, n_docs, tcrc, icrc, tier, split, idx, eos, sha = (
            _BIN_FIELDS.unpack_from(raw)
        )
        if magic != BIN_MAGIC:
            raise ShardError(f"{path}: not a Dante shard (magic {magic!r}, expected {BIN_MAGIC!r})")
        if version != FORMAT_VERSION:
            raise ShardError(f"{path}: shard format version {version}, this code reads {FORMAT_VERSION}; rerun 3_tokenize_shards.py --force")
        if hbytes != HEADER_BYTES or itemsize not in (2, 4) or split > 1:
            raise ShardError(f"{path}: corrupt header (header_bytes={hbytes}, itemsize={itemsize}, split={split})")
        return cls(itemsize, vocab, n_tok, n_docs, tcrc, icrc, tier, SPLITS[split], idx, eos, sha, version)


def shard_name(tier: int, split: str, index: int) -> str:
    return f"t{tier}-{split}-{index:05d}.bin"


def chunk_crc32s(buffers: list, chunk_bytes: int = CHUNK_BYTES) -> list[int]:
    """CRC-32 of every ``chunk_bytes`` of the concatenation of ``buffers`` (the last chunk may be shorter)."""
    crcs, crc, filled = [], 0, 0
    for buf in buffers:
        view = memoryview(buf).cast("B")
        pos = 0
        while pos < len(view):
            take = min(chunk_bytes - filled, len(view) - pos)
            crc = zlib.crc32(view[pos:pos + take], crc)
            filled += take
            pos += take
            if filled == chunk_bytes:
                crcs.append(crc)
                crc, filled = 0, 0
    if filled or not crcs:
        crcs.append(crc)
    return crcs


def file_chunk_crc32s(path: Path, chunk_bytes: int = CHUNK_BYTES) -> list[int]:
    """``chunk_crc32s`` of a file, read one chunk at a time."""
    crcs = []
    with open(path, "rb") as f:
        while True:
            chunk = f.read(chunk_bytes)
            if not chunk:
                break
            crcs.append(zlib.crc32(chunk))
    return crcs or [0]


def write_shard(path: Path, tokens: np.ndarray, doc_starts: np.ndarray, header: ShardHeader) -> dict:
    """Write ``.idx`` then ``.bin``, each atomically (the .bin's CRC of the index ties the pair).

    Returns {file name: {"bytes", "crc32": per-chunk CRCs}} of both files, computed from the bytes in
    memory (no second read): what stage 3's manifest records for the readers."""
    doc_starts = np.ascontiguousarray(doc_starts, dtype="<u8")
    tokens = np.ascontiguousarray(tokens, dtype=np.dtype(header.dtype).newbyteorder("<"))
    header.n_tokens, header.n_doc_starts = int(tokens.size), int(doc_starts.size)
    header.tokens_crc32, header.index_crc32 = zlib.crc32(tokens.data), zlib.crc32(doc_starts.data)
    idx_head = _IDX_FIELDS.pack(IDX_MAGIC, FORMAT_VERSION, 0, doc_starts.size, tokens.size)
    with atomic_path(path.with_suffix(".idx")) as tmp:
        with open(tmp, "wb") as f:
            f.write(idx_head)
            f.write(doc_starts.data)
    head = header.pack()
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(head)
            f.write(tokens.data)
    return {
        path.name: {"bytes": len(head) + tokens.nbytes, "crc32": chunk_crc32s([head, tokens.data])},
        path.with_suffix(".idx").name: {"bytes": len(idx_head) + doc_starts.nbytes,
                                        "crc32": chunk_crc32s([idx_head, doc_starts.data])},
    }


class ShardReader:
    """Memory-mapped view of one shard: ``.tokens`` (np.memmap), ``.doc_starts``, ``.header``.

    Opening checks magic, version and file sizes (a truncated file raises ShardError naming it);
    ``check_crc()`` reads every byte and compares the checksums.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise ShardError(f"{self.path}: shard file missing")
        with open(self.path, "rb") as f:
            self.header = ShardHeader.unpack(f.read(HEADER_BYTES), self.path)
        expect = HEADER_BYTES + self.header.n_tokens * self.header.itemsize
        size = self.path.stat().st_size
        if size != expect:
            raise ShardError(f"{self.path}: size {size} bytes, header says {expect} ({'truncated' if size < expect else 'trailing bytes'})")
        self.idx_path = self.path.with_suffix(".idx")
        if not self.idx_path.is_file():
            raise ShardError(f"{self.idx_path}: document index missing")
        with open(self.idx_path, "rb") as f:
            magic, version, _, n_docs, n_tok = _IDX_FIELDS.unpack_from(f.read(IDX_HEADER_BYTES).ljust(IDX_HEADER_BYTES, b"\0"))
        if magic != IDX_MAGIC or version != FORMAT_VERSION or n_docs != self.header.n_doc_starts or n_tok != self.header.n_tokens:
            raise ShardError(f"{self.idx_path}: index header does not match {self.path.name} (corrupt or from another shard)")
        if self.idx_path.stat().st_size != IDX_HEADER_BYTES + 8 * n_docs:
            raise ShardError(f"{self.idx_path}: size does not match its {n_docs} document offsets (truncated)")
        self._tokens = None

    @property
    def n_tokens(self) -> int:
        return self.header.n_tokens

    @property
    def tokens(self) -> np.memmap:
        if self._tokens is None:
            dt = np.dtype(self.header.dtype).newbyteorder("<")
            self._tokens = np.memmap(self.path, dtype=dt, mode="r", offset=HEADER_BYTES, shape=(self.header.n_tokens,))
        return self._tokens

    @property
    def doc_starts(self) -> np.ndarray:
        return np.fromfile(self.idx_path, dtype="<u8", offset=IDX_HEADER_BYTES, count=self.header.n_doc_starts)

    def complete_documents(self) -> Iterator[tuple[int, int]]:
        """(start, end) of documents wholly inside this shard; ``end`` is just past their EOS."""
        starts = self.doc_starts
        for i, s in enumerate(starts):
            if i + 1 < len(starts):
                yield int(s), int(starts[i + 1])
            else:  # the last one is complete iff an EOS ends it inside the shard
                tail = np.flatnonzero(self.tokens[int(s):] == self.header.eos_id)
                if tail.size:
                    yield int(s), int(s) + int(tail[0]) + 1

    def check_crc(self) -> None:
        if zlib.crc32(np.ascontiguousarray(self.tokens).data) != self.header.tokens_crc32:
            raise ShardError(f"{self.path}: token checksum mismatch (corrupt data)")
        if zlib.crc32(np.ascontiguousarray(self.doc_starts).data) != self.header.index_crc32:
            raise ShardError(f"{self.idx_path}: document index checksum mismatch (corrupt, or not this shard's index)")


def list_shards(shards_dir: str | Path, split: str) -> dict[int, list[Path]]:
    """{tier: [shard .bin paths in order]} for ``split`` ('train' or 'val'), from 03_shards' manifest."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    d = Path(shards_dir)
    manifest = d / "manifest.json"
    try:
        listed = _shards_manifest(d)["outputs"]["shards"][split]
    except (KeyError, TypeError):
        raise ShardError(f"{manifest} lists no {split} shards under outputs.shards. "
                         f"HINT: rerun `python 3_tokenize_shards.py --force`.") from None
    return {int(tier): [d / n for n in names] for tier, names in sorted(listed.items(), key=lambda kv: int(kv[0]))}


def _shards_manifest(shards_dir: Path) -> dict:
    manifest = shards_dir / "manifest.json"
    if not manifest.is_file():
        raise StageError(f"{shards_dir} has no manifest.json. HINT: run `python 3_tokenize_shards.py --config ...` first.")
    try:
        return read_json(manifest)
    except (ValueError, OSError, UnicodeDecodeError) as e:
        raise ShardError(f"{manifest} is unreadable ({e}). HINT: rerun `python 3_tokenize_shards.py --force`.") from None


def _verify_chunks(path: Path, recorded: dict) -> None:
    """Compare a file's size and per-chunk CRCs with what stage 3 recorded; ShardError naming the region."""
    size = path.stat().st_size
    if size != recorded["bytes"]:
        raise ShardError(f"{path}: {size} bytes, stage 3 wrote {recorded['bytes']} "
                         f"({'truncated' if size < recorded['bytes'] else 'trailing bytes'})")
    got = file_chunk_crc32s(path)
    for i, (a, b) in enumerate(zip(got, recorded["crc32"])):
        if a != b:
            raise ShardError(f"{path}: checksum mismatch in bytes {i * CHUNK_BYTES:,}..{min(size, (i + 1) * CHUNK_BYTES):,} "
                             f"(chunk {i + 1} of {len(got)}): the file is damaged")


def verify_once(reader: ShardReader, recorded: dict | None, vocab_limit: int, shards_dir: Path) -> int:
    """Prove a shard intact once; later opens cost a stat and a small JSON read. Returns its largest id.

    The full check reads every byte: the per-chunk CRCs stage 3 recorded in its manifest (or, for shards
    written without them, the two whole-file CRCs of the header) and the largest token id. Its result is
    kept in ``<03_shards>/verified/<name>.json``, keyed by both files' (size, mtime_ns) and a hash of the
    recorded checksums: any rewrite of a file, or a rebuilt stage 3, changes the key and the next open
    checks again. Damage that changes neither size nor mtime (bit rot on the medium) after the first
    check is not seen by later opens: ``3_tokenize_shards.py --verify`` reads everything again.
    Cost of the first open: one read of the shards at ~840 MB/s (zlib.crc32, measured) or disk speed.
    """
    path, idx = reader.path, reader.idx_path
    bin_st, idx_st = path.stat(), idx.stat()
    key = {"bin": [bin_st.st_size, bin_st.st_mtime_ns], "idx": [idx_st.st_size, idx_st.st_mtime_ns],
           "checksums": hashlib.sha256(json.dumps(recorded, sort_keys=True).encode()).hexdigest()[:32]
           if recorded else "header-crc32"}
    marker = shards_dir / VERIFIED_DIR / f"{path.name}.json"
    try:
        saved = read_json(marker)
        if saved.get("key") == key:
            max_id = int(saved["max_id"])
            _check_ids(path, max_id, vocab_limit)
            return max_id
    except (OSError, ValueError, KeyError, TypeError):
        pass  # no marker, or an unreadable one: check fully
    if recorded:
        _verify_chunks(path, recorded["bin"])
        _verify_chunks(idx, recorded["idx"])
    else:
        reader.check_crc()
    max_id = int(reader.tokens.max()) if reader.n_tokens else -1
    _check_ids(path, max_id, vocab_limit)
    try:
        atomic_write_json(marker, {"key": key, "max_id": max_id})
    except OSError:
        pass  # read-only storage: every open checks fully (correct, only slower)
    return max_id


def _check_ids(path: Path, max_id: int, vocab_limit: int) -> None:
    if max_id >= vocab_limit:
        raise ShardError(f"{path}: holds token id {max_id}, not below the vocabulary size {vocab_limit} "
                         f"(damaged ids, shards of another tokenizer, or a model.vocab_size smaller than the tokenizer's)")


def open_split(shards_dir: str | Path, split: str, vocab_size: int | None = None) -> dict[int, list[ShardReader]]:
    """{tier: [ShardReader]} of one split, every shard checked: header, sizes, checksums (``verify_once``)
    and ids below ``vocab_size`` (the model's, from the caller; else the tokenizer's, from the manifest).

    All damaged shards are reported in one ShardError (a UserError) naming each file, its problem and the
    commands that fix it. This is what the training stages read shards through.
    """
    d = Path(shards_dir)
    manifest = _shards_manifest(d)
    out = manifest.get("outputs") or {}
    sums = (out.get("checksums") or {}).get("files", {})
    tok_vocab = out.get("vocab_size")
    paths = list_shards(d, split)
    readers: dict[int, list[ShardReader]] = {}
    problems = []
    for tier, ps in paths.items():
        for p in ps:
            try:
                r = ShardReader(p)
                limit = min([v for v in (vocab_size, tok_vocab, r.header.vocab_size) if v] or [1 << 32])
                recorded = {"bin": sums[p.name], "idx": sums[p.with_suffix(".idx").name]} if p.name in sums else None
                verify_once(r, recorded, limit, d)
                readers.setdefault(tier, []).append(r)
            except ShardError as e:
                problems.append(str(e))
    if problems:
        msg = problems_message(f"{len(problems)} damaged or unusable {split} shard(s) in {d}", problems)
        if vocab_size and tok_vocab and vocab_size < tok_vocab:
            msg += (f"\n  note: model.vocab_size={vocab_size} is smaller than the tokenizer's {tok_vocab} ids: "
                    f"if the shards are intact, set model.vocab_size={tok_vocab}.")
        raise ShardError(msg + "\n  " + FIX_HINT)
    return readers


# ---------------------------------------------------------------------------------------------------
# Phase A: tokenize one stage-1 file (runs in worker processes)
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EncodeSettings:
    tokenizer_path: str
    dtype: str
    eos_id: int
    seed: int
    val_fraction: float
    batch_docs: int
    work_dir: str
    encoder: str = "tokenizers"  # or "tiktoken": only after ``choose_encoder`` proved it equal


_WORKER_TOKENIZER = {}
_WORKER_TIKTOKEN = {}


def _tokenizer_for(path: str):
    if path not in _WORKER_TOKENIZER:
        _WORKER_TOKENIZER[path] = load_tokenizer(path)  # plain_text: "<|eot|>" in a document stays text
    return _WORKER_TOKENIZER[path]


def _tiktoken_for(path: str):
    """(encoding, byte length per id); built once per process (forked workers inherit the parent's)."""
    if path not in _WORKER_TIKTOKEN:
        enc = build_tiktoken(path)
        _WORKER_TIKTOKEN[path] = (enc, token_byte_lengths(enc, _tokenizer_for(path).get_vocab_size()))
    return _WORKER_TIKTOKEN[path]


def work_paths(work_dir: str | Path, index: int, split: str) -> tuple[Path, Path]:
    base = Path(work_dir) / f"{index:05d}.{split}"
    return base.with_name(base.name + ".tok.npy"), base.with_name(base.name + ".len.npy")


def done_marker(work_dir: str | Path, index: int) -> Path:
    return Path(work_dir) / f"{index:05d}.done.json"


def encode_corpus_file(cf: CorpusFile, st: EncodeSettings) -> dict:
    """Tokenize one stage-1 shard into per-split work files; return its stats (also saved as marker)."""
    tok = _tokenizer_for(st.tokenizer_path)
    dtype = DTYPES[st.dtype]
    parts = {s: {"tokens": [], "lens": [], "docs": 0, "chars": 0, "bytes": 0} for s in SPLITS}
    batch: list[tuple[str, str]] = []

    fallback_docs = 0

    def encode(texts: list[str]) -> list:
        nonlocal fallback_docs
        if st.encoder != "tiktoken":
            return [e.ids for e in tok.encode_batch_fast(texts, add_special_tokens=False)]
        enc, byte_len = _tiktoken_for(st.tokenizer_path)
        out = []
        for text in texts:
            ids = encode_plain(enc, text)
            # a regex gap drops text silently in tiktoken: the ids must cover every byte of the document
            if int(byte_len[ids].sum()) != len(text.encode("utf-8")):
                ids = tok.encode(text, add_special_tokens=False).ids
                fallback_docs += 1
            out.append(ids)
        return out

    def flush():
        encoded = encode([t for _, t in batch])
        for (split, text), enc_ids in zip(batch, encoded):
            p = parts[split]
            ids = np.asarray(enc_ids, dtype=dtype)
            p["tokens"].append(ids)
            p["tokens"].append(np.asarray([st.eos_id], dtype=dtype))
            p["lens"].append(ids.size + 1)
            p["docs"] += 1
            p["chars"] += len(text)
            p["bytes"] += len(text.encode("utf-8"))
        batch.clear()

    for _, text in iter_shard_texts(cf.path):
        split = "val" if stable_unit(st.seed, "split", text) < st.val_fraction else "train"
        batch.append((split, text))
        if len(batch) >= st.batch_docs:
            flush()
    if batch:
        flush()
    stats = {"index": cf.index, "source": cf.source, "lang": cf.lang, "tier": cf.tier, "fallback_docs": fallback_docs}
    for split, p in parts.items():
        tokens = np.concatenate(p["tokens"]) if p["tokens"] else np.zeros(0, dtype=dtype)
        tok_path, len_path = work_paths(st.work_dir, cf.index, split)
        for path, arr in ((tok_path, tokens), (len_path, np.asarray(p["lens"], dtype=np.uint64))):
            with atomic_path(path) as tmp:
                with open(tmp, "wb") as f:
                    np.save(f, arr)
        stats[split] = {"docs": p["docs"], "chars": p["chars"], "bytes": p["bytes"], "tokens": int(tokens.size)}
    atomic_write_json(done_marker(st.work_dir, cf.index), stats)  # LAST: the input is done
    return stats


def _pool_task(args: tuple[CorpusFile, EncodeSettings]) -> dict:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # parallel across processes, not inside each
    return encode_corpus_file(*args)


# ---------------------------------------------------------------------------------------------------
# Phase B: cut streams into shards (main process)
# ---------------------------------------------------------------------------------------------------


@dataclass
class StreamState:
    """Where the (tier, split) stream stands: shards written, and the first unwritten token."""

    tier: int
    split: str
    shards: int = 0
    cursor_input: int = 0  # position (in this stream's list of inputs) of the first unwritten token
    cursor_token: int = 0  # offset into that input's tokens
    names: list[str] = field(default_factory=list)
    checksums: dict = field(default_factory=dict)  # file name -> {"bytes", "crc32"} (write_shard's result)

    @property
    def key(self) -> str:
        return f"t{self.tier}-{self.split}"


class ShardAssembler:
    """Cuts each (tier, split) stream into ``shard_tokens`` shards from the phase-A work files."""

    def __init__(self, out_dir: Path, files: list[CorpusFile], shard_tokens: int, header_base: dict, state: dict):
        self.out_dir, self.shard_tokens, self.header_base = out_dir, shard_tokens, header_base
        self.work = out_dir / WORK_DIR
        self.inputs: dict[str, list[int]] = {}  # stream key -> input indices of that tier, in order
        for cf in files:
            for split in SPLITS:
                self.inputs.setdefault(f"t{cf.tier}-{split}", []).append(cf.index)
        self.streams: dict[str, StreamState] = {}
        for key in self.inputs:
            tier, split = key[1:].split("-")
            saved = state.get(key)
            self.streams[key] = StreamState(**saved) if saved else StreamState(int(tier), split)
        self.counts: dict[int, dict[str, int]] = {}  # done input -> tokens per split
        # per stream: first input position not yet counted, and tokens available from the cursor to it
        self._frontier = {k: s.cursor_input for k, s in self.streams.items()}
        self._pending = {k: -s.cursor_token for k, s in self.streams.items()}

    def state(self) -> dict:
        return {k: dict(vars(s), names=list(s.names), checksums=dict(s.checksums)) for k, s in self.streams.items()}

    def mark_done(self, index: int, stats: dict) -> None:
        self.counts[index] = {split: int(stats[split]["tokens"]) for split in SPLITS}
        for key, s in self.streams.items():  # extend each frontier over consecutive done inputs
            order = self.inputs[key]
            while self._frontier[key] < len(order) and order[self._frontier[key]] in self.counts:
                self._pending[key] += self.counts[order[self._frontier[key]]][s.split]
                self._frontier[key] += 1

    def advance(self, final: bool, on_shard: Callable[[], None]) -> None:
        """Write every shard that the done inputs complete (and, if final, each stream's remainder)."""
        for key, s in self.streams.items():
            while self._pending[key] >= self.shard_tokens or (final and self._pending[key] > 0):
                n = min(self._pending[key], self.shard_tokens)
                self._write_next(s, n)
                self._pending[key] -= n
                on_shard()
                self._collect(s)

    def _write_next(self, s: StreamState, n: int) -> None:
        order = self.inputs[s.key]
        tokens = np.empty(n, dtype=DTYPES[self.header_base["dtype"]])
        starts: list[np.ndarray] = []
        filled, pos, offset = 0, s.cursor_input, s.cursor_token
        while filled < n:
            size = self.counts[order[pos]][s.split]
            if offset >= size:  # input used up, or without documents of this split
                pos, offset = pos + 1, 0
                continue
            tok_path, len_path = work_paths(self.work, order[pos], s.split)
            src = np.load(tok_path, mmap_mode="r")
            doc_bounds = np.concatenate([[0], np.cumsum(np.load(len_path).astype(np.int64))[:-1]])
            take = min(n - filled, size - offset)
            tokens[filled:filled + take] = src[offset:offset + take]
            in_range = doc_bounds[(doc_bounds >= offset) & (doc_bounds < offset + take)]
            starts.append((in_range - offset + filled).astype(np.uint64))
            filled += take
            offset += take
        if offset >= self.counts[order[pos]][s.split]:
            pos, offset = pos + 1, 0
        name = shard_name(s.tier, s.split, s.shards)
        header = ShardHeader(
            itemsize=np.dtype(DTYPES[self.header_base["dtype"]]).itemsize, vocab_size=self.header_base["vocab_size"],
            n_tokens=n, n_doc_starts=0, tokens_crc32=0, index_crc32=0, tier=s.tier, split=s.split,
            shard_index=s.shards, eos_id=self.header_base["eos_id"], tokenizer_sha16=self.header_base["tokenizer_sha16"],
        )
        s.checksums.update(write_shard(self.out_dir / name, tokens,
                                       np.concatenate(starts) if starts else np.zeros(0, np.uint64), header))
        s.shards += 1
        s.cursor_input, s.cursor_token = pos, offset
        s.names.append(name)

    def _collect(self, s: StreamState) -> None:
        """Delete this stream's work files that lie wholly behind its cursor (stats markers stay)."""
        for pos in range(s.cursor_input):
            for p in work_paths(self.work, self.inputs[s.key][pos], s.split):
                p.unlink(missing_ok=True)

    def remove_stale_files(self) -> None:
        """After a kill: shards past a stream's recorded count may be early copies (they are redone),
        and temp files of interrupted atomic writes are garbage."""
        for s in self.streams.values():
            for p in self.out_dir.glob(f"t{s.tier}-{s.split}-*.bin"):
                if int(p.stem.rsplit("-", 1)[1]) >= s.shards:
                    p.unlink()
                    p.with_suffix(".idx").unlink(missing_ok=True)
        for folder in (self.out_dir, self.work):
            for tmp in folder.glob(".*.tmp"):
                tmp.unlink()


def tokenize_corpus(
    files: list[CorpusFile],
    settings: EncodeSettings,
    out_dir: Path,
    shard_tokens: int,
    header_base: dict,
    workers: int,
    state: dict,
    save_state: Callable[[dict], None],
    log: Callable[[str], None] = print,
) -> dict:
    """Phase A in a process pool + phase B as inputs complete. Returns the final stream states."""
    work = out_dir / WORK_DIR
    work.mkdir(parents=True, exist_ok=True)
    asm = ShardAssembler(out_dir, files, shard_tokens, header_base, state)
    asm.remove_stale_files()
    for cf in files:
        if done_marker(work, cf.index).is_file():
            asm.mark_done(cf.index, read_json(done_marker(work, cf.index)))
    todo = [cf for cf in files if cf.index not in asm.counts]
    if asm.counts:
        log(f"resuming: {len(asm.counts)} of {len(files)} inputs already tokenized")

    def on_shard():
        save_state(asm.state())

    asm.advance(final=False, on_shard=on_shard)
    tasks = [(cf, settings) for cf in todo]
    if workers <= 1 or len(tasks) <= 1:
        results = (_pool_task(t) for t in tasks)
        pool = None
    else:
        ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        pool = ctx.Pool(min(workers, len(tasks)))
        results = pool.imap(_pool_task, tasks, chunksize=1)  # in order: shards are cut in input order
    try:
        for i, stats in enumerate(results, 1):
            asm.mark_done(stats["index"], stats)
            asm.advance(final=False, on_shard=on_shard)
            if i % max(1, len(tasks) // 10) == 0 or i == len(tasks):
                log(f"tokenized {i}/{len(tasks)} inputs")
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    asm.advance(final=True, on_shard=on_shard)
    return asm.state()


def collect_stats(files: list[CorpusFile], work_dir: Path) -> dict:
    """Docs/chars/bytes/tokens per split, by tier, language and source, from the phase-A markers."""
    out: dict = {"total": {}, "by_tier": {}, "by_lang": {}, "by_source": {}, "fallback_docs": 0}

    def add(group: dict, split: str, st: dict):
        g = group.setdefault(split, {"docs": 0, "chars": 0, "bytes": 0, "tokens": 0})
        for k in g:
            g[k] += st[k]

    for cf in files:
        m = read_json(done_marker(work_dir, cf.index))
        out["fallback_docs"] += int(m.get("fallback_docs", 0))
        for split in SPLITS:
            add(out["total"], split, m[split])
            add(out["by_tier"].setdefault(str(cf.tier), {}), split, m[split])
            add(out["by_lang"].setdefault(cf.lang, {}), split, m[split])
            add(out["by_source"].setdefault(cf.source, {}), split, m[split])
    return out


# ---------------------------------------------------------------------------------------------------
# Verification
# ---------------------------------------------------------------------------------------------------


def verify_shards(shards_dir: Path, manifest: dict, tokenizer, samples_per_shard: int, seed: int = 0) -> list[str]:
    """Problems found (each naming a file): headers, sizes, checksums, ids < vocab, round trips."""
    problems: list[str] = []
    out = manifest["outputs"]
    expected = {name for split in SPLITS for names in out["shards"][split].values() for name in names}
    on_disk = {p.name for p in shards_dir.glob("t*-*-*.bin")}
    for extra in sorted(on_disk - expected):
        problems.append(f"{shards_dir / extra}: not listed in manifest.json (stray file)")
    for name in sorted(expected):
        path = shards_dir / name
        try:
            r = ShardReader(path)
            sums = (out.get("checksums") or {}).get("files", {})
            if name in sums:  # the per-chunk CRCs the readers trust, then the header's whole-file ones
                _verify_chunks(path, sums[name])
                _verify_chunks(r.idx_path, sums[r.idx_path.name])
            r.check_crc()
            h = r.header
            if h.vocab_size != out["vocab_size"] or h.eos_id != out["eos_id"] or np.dtype(h.dtype).name != out["dtype"]:
                raise ShardError(f"{path}: header vocab/eos/dtype differ from manifest.json")
            if h.n_tokens and int(r.tokens.max()) >= h.vocab_size:
                raise ShardError(f"{path}: holds token id {int(r.tokens.max())} >= vocab_size {h.vocab_size}")
            starts = r.doc_starts
            if starts.size and (np.any(np.diff(starts.astype(np.int64)) <= 0) or starts[-1] >= h.n_tokens):
                raise ShardError(f"{r.idx_path}: document offsets not increasing or out of range")
            docs = list(r.complete_documents())
            rng = np.random.default_rng([seed, h.tier, h.shard_index, SPLITS.index(h.split)])
            for j in rng.permutation(len(docs))[:samples_per_shard]:
                s, e = docs[j]
                ids = r.tokens[s:e - 1].tolist()
                if r.tokens[e - 1] != h.eos_id:
                    raise ShardError(f"{path}: document at token {s} does not end with <|end_of_text|>")
                again = tokenizer.encode(tokenizer.decode(ids, skip_special_tokens=False), add_special_tokens=False).ids
                if again != ids:
                    raise ShardError(f"{path}: document at token {s} does not survive decode/encode (corrupt ids)")
        except ShardError as e:
            problems.append(str(e))
    return problems


def check_dtype_fits(vocab_size: int, dtype: str, tokenizer_path: Path) -> None:
    limit = np.iinfo(DTYPES[dtype]).max + 1
    if vocab_size > limit:
        raise UserError(
            f"tokenizer {tokenizer_path} has {vocab_size} ids (max id {vocab_size - 1}), which do not fit "
            f"shards.dtype={dtype} (ids up to {limit - 1}). HINT: set shards.dtype=uint32, or retrain the "
            f"tokenizer with tokenizer.vocab_size <= {limit}."
        )


def tokenizer_sha16(path: Path) -> bytes:
    return bytes.fromhex(file_sha256(path))[:16]


# ---------------------------------------------------------------------------------------------------
# The stage (3_tokenize_shards.py parses the command line and prints)
# ---------------------------------------------------------------------------------------------------


@dataclass
class ShardsPlan:
    """What ``validate_stage`` checked, for ``tokenize_stage``: the inputs, read-only."""

    files: list[CorpusFile]
    tokenizer_path: Path
    tokenizer_sha256: str
    vocab_size: int
    workers: int


def validate_stage(stage: Stage, cfg: C.ShardsStageConfig, args=None) -> ShardsPlan:
    """Every read-only check of stage 3's inputs, before anything on disk is touched (``run_stage``'s
    ``validate`` hook, so a refused ``--force`` keeps the finished 03_shards): the 01_corpus and
    02_tokenizer manifests, the stage-1 files they list, the tokenizer file against its recorded sha256,
    its size against ``shards.dtype``, and an unfinished run made with another tokenizer. One UserError
    lists every problem."""
    s, problems = cfg.shards, []
    files, tok_path, sha, vocab_size = [], None, "", 0
    try:
        corpus = stage.require(C.CORPUS)
        if corpus.get("format_version") not in CORPUS_READABLE:  # version 1 (gzip shards) still reads
            raise StageError(f"01_corpus has format version {corpus.get('format_version')}; this code reads "
                             f"versions {', '.join(map(str, CORPUS_READABLE))}. HINT: rerun "
                             f"`python 1_download_corpus.py --force` to rebuild it.")
        files = corpus_files(stage_dir(cfg.run, C.CORPUS), corpus)
    except (StageError, UserError) as e:
        problems.append(str(e))
    try:
        stage.require(C.TOKENIZER)
        tok_path = tokenizer_path(cfg.run)
        vocab_size = load_tokenizer(tok_path).get_vocab_size(with_added_tokens=True)
        check_dtype_fits(vocab_size, s.dtype, tok_path)
        sha = file_sha256(tok_path)  # tokenizer_path checked it against stage 2's manifest
        stage.add_input("tokenizer", tok_path)
    except (StageError, UserError) as e:
        problems.append(str(e))
    progress = stage.dir / "progress.json"
    if sha and not getattr(args, "force", False) and progress.is_file():
        try:
            recorded = (read_json(progress).get("state") or {}).get("tokenizer_sha256", sha)
        except (ValueError, OSError):
            recorded = sha  # Stage.open reports an unreadable progress.json with its own fix
        if recorded != sha:  # resuming with another tokenizer would mix two encodings
            problems.append(f"{stage.dir} holds an unfinished run made with another tokenizer. "
                            f"HINT: add --force to start over.")
    if problems:
        raise UserError(problems_message("stage 3 cannot start", problems))
    return ShardsPlan(files, tok_path, sha, vocab_size, s.workers or len(os.sched_getaffinity(0)))


#: Characters the encoder proof encodes with both encoders, shared equally by the held-out files and every
#: stage-1 source. The proof is a fixed cost paid by every stage-3 run: on the tiny profile (6.4M chars,
#: 2141 documents, no cap) it took 6.8 s of an 8.8 s run (cProfile: 5.5 s of it ``tokenizers``' one-thread
#: batch encode), i.e. the fast path only paid off on large inputs; 1M characters cost ~1 s and still reach
#: every source, language and tier of the run.
PROOF_CHARS = 1_000_000


def proof_texts(cfg: C.ShardsStageConfig, files: list[CorpusFile], n_docs: int,
                max_chars: int = PROOF_CHARS) -> list[tuple[str, str]]:
    """(where, text) for ``choose_encoder``: the held-out files stage 2 was configured with, then stage-1
    documents from every source (its first files, in order, so every language and source of this run is
    represented). At most ``n_docs`` documents and ``max_chars`` characters, split equally between the
    held-out part and each source; a document longer than what is left of its share is cut there (both
    encoders see the same string, so the comparison stays exact)."""
    by_source: dict[str, list[CorpusFile]] = {}
    for cf in files:
        by_source.setdefault(cf.source, []).append(cf)
    share_chars = max(1, max_chars // (len(by_source) + 1))
    share_docs = max(1, -(-n_docs // (len(by_source) + 1)))

    def take(items: Iterator[tuple[str, str]]) -> list[tuple[str, str]]:
        got, used = [], 0
        for where, text in items:
            if used >= share_chars or len(got) >= share_docs:
                break
            text = text[:share_chars - used]
            got.append((where, text))
            used += len(text)
        return got

    try:
        heldout = (read_manifest(cfg.run, C.TOKENIZER).get("config") or {}).get("tokenizer", {}).get("heldout") or {}
    except StageError:
        heldout = {}

    def heldout_docs() -> Iterator[tuple[str, str]]:
        for _, path in sorted(heldout.items()):
            try:
                texts = load_texts(path) if Path(path).is_file() else []
            except (ValueError, OSError):
                texts = []  # stage 2 reported its own held-out problems; here they are only extra evidence
            yield from ((f"held-out {path} document {i}", t) for i, t in enumerate(texts))

    def source_docs(cfs: list[CorpusFile]) -> Iterator[tuple[str, str]]:
        for cf in cfs:
            yield from ((f"{cf.path} line {line_no}", text) for line_no, text in iter_shard_texts(cf.path))

    out = take(heldout_docs())
    for _, cfs in sorted(by_source.items()):
        out += take(source_docs(cfs))
    return out


def choose_encoder(cfg: C.ShardsStageConfig, tok_path: Path, files: list[CorpusFile],
                   log: Callable[[str], None] = print) -> dict:
    """Which encoder stage 3 uses, and why (recorded in the manifest as ``encoder``).

    ``shards.encoder=auto``: tiktoken when ``build_tiktoken`` can express the tokenizer AND its ids equal
    ``tokenizers``' on every ``proof_texts`` document; otherwise ``tokenizers``, with the reason logged.
    ``tiktoken`` demands the fast path (UserError with the reason when it is refused); ``tokenizers``
    skips it."""
    s = cfg.shards
    info: dict = {"requested": s.encoder, "used": "tokenizers"}
    if s.encoder == "tokenizers":
        info["reason"] = "shards.encoder=tokenizers"
        log("encoder: tokenizers (shards.encoder=tokenizers)")
        return info
    start = time.time()
    try:
        enc = _tiktoken_for(str(tok_path))[0]
    except Unreproducible as e:
        reason = f"tiktoken cannot reproduce {tok_path}: {e}"
    else:
        texts = proof_texts(cfg, files, s.encoder_check_docs)
        info |= {"checked_docs": len(texts), "checked_chars": sum(len(t) for _, t in texts)}
        problem = prove_equal(enc, _tokenizer_for(str(tok_path)), texts) if texts else "no document to check"
        reason = problem and f"tiktoken's ids differ from tokenizers' on this run's documents: {problem}"
    check_seconds = round(time.time() - start, 2)  # logged, not recorded: the manifest holds no timing here
    if not reason:
        import tiktoken

        info |= {"used": "tiktoken", "tiktoken": tiktoken.__version__,
                 "reason": f"ids equal to tokenizers' on all {info['checked_docs']} check documents "
                           f"({info['checked_chars']:,} characters)"}
        log(f"encoder: tiktoken ({info['reason']}, {check_seconds} s)")
        return info
    if s.encoder == "tiktoken":
        raise UserError(f"shards.encoder=tiktoken, but {reason}.\n  HINT: --set shards.encoder=auto uses tokenizers "
                        f"instead (same ids, slower).")
    info["reason"] = reason
    log(f"encoder: tokenizers; the tiktoken path is off because {reason}")
    return info


def tokenize_stage(stage: Stage, cfg: C.ShardsStageConfig, log: Callable[[str], None] = print) -> dict:
    """Run stage 3 into ``stage.dir`` (opened): tokenize (resuming), write the manifest (returned).
    The inputs are ``stage.plan`` (``validate_stage``'s result), checked again here when absent."""
    s = cfg.shards
    plan: ShardsPlan = stage.plan or validate_stage(stage, cfg)
    files, tok_path, sha, vocab_size, workers = (plan.files, plan.tokenizer_path, plan.tokenizer_sha256,
                                                 plan.vocab_size, plan.workers)
    settings = EncodeSettings(str(tok_path), s.dtype, EOS_ID, cfg.run.seed, s.val_fraction, s.batch_docs,
                              str(stage.dir / WORK_DIR))
    header = {"dtype": s.dtype, "vocab_size": vocab_size, "eos_id": EOS_ID, "tokenizer_sha16": tokenizer_sha16(tok_path)}
    log(f"{len(files)} input files, {workers} worker(s), {s.shard_tokens:,} tokens per shard")
    progress = stage.load_progress()
    encoder = progress.get("encoder")
    if encoder:  # a resumed run keeps the encoder it started with: one run, one encoding path
        log(f"encoder: {encoder['used']} (chosen when this run started: {encoder['reason']})")
    else:
        encoder = choose_encoder(cfg, tok_path, files, log)
    settings = replace(settings, encoder=encoder["used"])
    stage.save_progress({"tokenizer_sha256": sha, "encoder": encoder, "streams": progress.get("streams", {})})
    start = time.time()
    streams = tokenize_corpus(
        files, settings, stage.dir, s.shard_tokens, header, workers, progress.get("streams", {}),
        lambda state: stage.save_progress({"tokenizer_sha256": sha, "encoder": encoder, "streams": state}), log=log,
    )
    seconds = time.time() - start
    stats = collect_stats(files, stage.dir / WORK_DIR)
    encoder = dict(encoder, fallback_docs=stats.pop("fallback_docs"))
    if encoder["fallback_docs"]:
        log(f"warning: {encoder['fallback_docs']} document(s) re-encoded with tokenizers (tiktoken's ids missed bytes)")
    shutil.rmtree(stage.dir / WORK_DIR)  # after the stats: only shards and the manifest remain
    shards: dict[str, dict] = {split: {} for split in SPLITS}
    checksums: dict[str, dict] = {}
    for st in streams.values():
        if st["names"]:
            shards[st["split"]][str(st["tier"])] = st["names"]
        checksums.update(st["checksums"])
    total = stats["total"]
    if s.val_fraction > 0 and not total.get("val", {}).get("tokens"):
        log(f"warning: no document fell in the validation split (val_fraction={s.val_fraction})")
    n_bytes = sum(v["bytes"] for v in total.values())
    n_tokens = sum(v["tokens"] for v in total.values())
    log(f"{n_tokens:,} tokens in {sum(len(v) for sp in shards.values() for v in sp.values())} shards, "
        f"{seconds:.1f} s ({n_bytes / 1e6 / seconds:.2f} MB/s, {n_tokens / seconds:,.0f} tokens/s this run)")
    return stage.finish(
        outputs={"format": "dante-shards", "shard_format_version": FORMAT_VERSION, "dtype": s.dtype,
                 "vocab_size": vocab_size, "eos_id": EOS_ID, "shard_tokens": s.shard_tokens, "shards": shards,
                 "checksums": {"algorithm": "crc32", "chunk_bytes": CHUNK_BYTES,
                               "files": dict(sorted(checksums.items()))}},
        counts=stats,
        extra={"encoder": encoder,
               "throughput": {"seconds": round(seconds, 2), "workers": workers, "resumed": stage.resumed,
                              "tokens_per_second": round(n_tokens / max(seconds, 1e-9))}},
    )


def tokenize_run(cfg: C.ShardsStageConfig, force: bool = False, log: Callable[[str], None] = print) -> dict:
    """Stage 3 as one call, for benchmarks (``bench/``): the script's order (validate, then open with the
    lock and ``force``'s reset, then tokenize). Returns the manifest: ``throughput`` (seconds, workers,
    tokens_per_second), ``encoder`` (used, reason), ``counts``. StageAlreadyDone when finished and not
    ``force``. The CLI equivalent: ``3_tokenize_shards.py --config ... --set shards.encoder=tokenizers
    --set shards.workers=1 --force``."""
    planned = Stage.prepare(cfg, C.SHARDS)
    planned.check_not_finished(force)
    planned.plan = validate_stage(planned, cfg, SimpleNamespace(force=force))
    stage = Stage.open(cfg, C.SHARDS, force=force, prepared=planned)
    return tokenize_stage(stage, cfg, log)


def verify_stage(cfg: C.ShardsStageConfig) -> int:
    """``--verify``: check a finished 03_shards (nothing is reopened or written); returns the shard count,
    or raises one UserError listing every bad file."""
    manifest = read_manifest(cfg.run, C.SHARDS)
    tok = load_tokenizer(tokenizer_path(cfg.run))
    problems = verify_shards(stage_dir(cfg.run, C.SHARDS), manifest, tok, cfg.shards.verify_samples, cfg.run.seed)
    n = sum(len(v) for sp in manifest["outputs"]["shards"].values() for v in sp.values())
    if problems:
        raise UserError(problems_message(f"{len(problems)} problem(s) in {n} shard(s)", problems)
                        + "\n  HINT: rerun `python 3_tokenize_shards.py --force` to rebuild them.")
    return n
