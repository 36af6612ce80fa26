"""Stage 6's packed arrays and stage 7's view of them: best-fit packing, the binary block files, and the
micro-batches drawn from them.

Stage 6 (``dante.sft_data``) decides what the conversations are; this module decides how they lie on disk
and how training reads them, so the file format has one owner. Design choices:
- Best-fit decreasing packing over a capacity tree (``pack_best_fit``): O(n log block) and fewer blocks
  than next-fit (the manifest reports both).
- ``{split}.{tokens,weights,docs,pos}.bin``: a 64-byte header (magic, version, kind, dtype code, pad id,
  shape) then one (n_blocks, block_size) array, read back memory-mapped (``load_packed``).
- Micro-batches are a pure function of (step, micro-step, rank, world size) over per-epoch permutations
  (``epoch_order``, ``sft_batches``), so stage 7 resumes, and changes GPU count, with no loader state.

Example::

    packed = load_packed("runs/tiny/06_sft_data", "train")
    batch = sft_micro_batch(packed, epoch_order(packed.n_blocks, seed=0, epoch=0)[:4], micro_batch=4)
"""

from __future__ import annotations

import hashlib
import struct
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from dante.artifacts import atomic_path, file_sha256
from dante.errors import UserError, problems_message
from dante.tokenizer import PAD, SPECIAL_TOKENS

#: version of the packed block files (their header); bump when the layout changes
FORMAT_VERSION = 1
#: document id of padding positions (a block's conversations are 0..k-1)
PAD_DOC_ID = -1
#: the pad token's id, fixed by docs/DESIGN.md for every Dante tokenizer
PAD_ID = SPECIAL_TOKENS.index(PAD)

# Weight classes of encoded tokens (1 byte a token until the weights are written).
CLS_NONE, CLS_ASSISTANT, CLS_PROMPT = 0, 1, 2


def class_weights(user_weight: float) -> np.ndarray:
    """Lookup table weight class -> loss weight."""
    return np.array([0.0, 1.0, user_weight], dtype=np.float32)

# -- packing ------------------------------------------------------------------------------------------
class _CapacityTree:
    """Counts of open blocks per remaining capacity 0..n-1; finds the smallest capacity >= x in O(log n)."""

    def __init__(self, n: int):
        self.size = 1 << max(1, (n - 1).bit_length())
        self.tree = [0] * (2 * self.size)

    def add(self, cap: int, delta: int) -> None:
        i = cap + self.size
        while i:
            self.tree[i] += delta
            i >>= 1

    def smallest_at_least(self, x: int) -> int:
        """Smallest capacity >= x with an open block, or -1."""
        tree, i = self.tree, x + self.size
        if tree[i]:
            return x
        while i > 1:  # climb until a right sibling holds something
            if not i & 1 and tree[i + 1]:
                i += 1
                while i < self.size:  # descend to its leftmost non-empty leaf
                    i = 2 * i if tree[2 * i] else 2 * i + 1
                return i - self.size
            i >>= 1
        return -1


def pack_best_fit(lengths: np.ndarray | list[int], block_size: int) -> list[list[int]]:
    """Best-fit decreasing: items longest first, each into the open block it fills most tightly.

    Returns blocks as lists of item indices (in placement order). Deterministic: ties in length keep input
    order; among equally tight blocks the most recently touched wins. O(n log n + n log block_size).
    """
    lengths = np.asarray(lengths, np.int64)
    if len(lengths) and (lengths.max() > block_size or lengths.min() <= 0):
        raise ValueError(f"item lengths must be in 1..{block_size}, got {lengths.min()}..{lengths.max()}")
    order = np.argsort(-lengths, kind="stable")
    tree = _CapacityTree(block_size + 1)
    by_cap: list[list[int]] = [[] for _ in range(block_size + 1)]
    blocks: list[list[int]] = []
    for item in order.tolist():
        n = int(lengths[item])
        cap = tree.smallest_at_least(n)
        if cap < 0:
            b, cap = len(blocks), block_size
            blocks.append([])
        else:
            b = by_cap[cap].pop()
            tree.add(cap, -1)
        blocks[b].append(item)
        left = cap - n
        if left > 0:
            by_cap[left].append(b)
            tree.add(left, 1)
    return blocks


def next_fit_blocks(lengths: Iterable[int], block_size: int) -> int:
    """Blocks used by the naive packer (fill in arrival order, open a new block when the next one does not fit)."""
    blocks, room = 0, 0
    for n in lengths:
        if n > room:
            blocks, room = blocks + 1, block_size
        room -= n
    return blocks


# -- binary files -------------------------------------------------------------------------------------
MAGIC = b"DANTESFT"
HEADER_BYTES = 64
_HEADER = struct.Struct("<8sIIIIQQ")  # magic, version, kind, dtype code, pad id, n_blocks, block_size
ARRAY_KINDS = {"tokens": 1, "weights": 2, "docs": 3, "pos": 4}
DTYPE_CODES = {1: np.dtype("<u2"), 2: np.dtype("<u4"), 3: np.dtype("<i4"), 4: np.dtype("<f4")}
_CODE_OF = {v: k for k, v in DTYPE_CODES.items()}


def packed_dtypes(vocab_size: int, block_size: int) -> dict[str, np.dtype]:
    return {
        "tokens": np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4"),
        "weights": np.dtype("<f4"),
        "docs": np.dtype("<i4"),
        "pos": np.dtype("<u2") if block_size <= 1 << 16 else np.dtype("<i4"),
    }


def packed_path(directory: str | Path, split: str, kind: str) -> Path:
    return Path(directory) / f"{split}.{kind}.bin"


def _header(kind: str, dtype: np.dtype, pad_id: int, n_blocks: int, block_size: int) -> bytes:
    head = _HEADER.pack(MAGIC, FORMAT_VERSION, ARRAY_KINDS[kind], _CODE_OF[dtype], pad_id, n_blocks, block_size)
    return head + b"\0" * (HEADER_BYTES - len(head))


def write_packed(
    directory: str | Path, split: str, sources: Sequence, items_N3: np.ndarray, blocks: list[list[int]],
    block_size: int, vocab_size: int, user_weight: float, chunk_blocks: int = 1024,
) -> dict:
    """Write the four arrays of one split atomically, streaming ``chunk_blocks`` rows at a time.

    ``sources`` are stage 6's encoded sources (``dante.sft_data.EncodedSource``: flat ``tokens`` and weight
    ``classes`` arrays).
    ``items_N3`` rows are (source index, start, end) slices of the sources' flat arrays; ``blocks`` lists
    item indices per block, in the order the rows are written.
    """
    dtypes = packed_dtypes(vocab_size, block_size)
    lut = class_weights(user_weight)
    pad_id = PAD_ID
    files, hashes = {}, {kind: hashlib.sha256() for kind in ARRAY_KINDS}
    with ExitStack() as stack:
        for kind in ARRAY_KINDS:
            tmp = stack.enter_context(atomic_path(packed_path(directory, split, kind)))
            f = stack.enter_context(open(tmp, "wb"))
            header = _header(kind, dtypes[kind], pad_id, len(blocks), block_size)
            f.write(header)
            hashes[kind].update(header)
            files[kind] = f
        for lo in range(0, len(blocks), chunk_blocks):
            chunk = blocks[lo : lo + chunk_blocks]
            tokens_BT = np.full((len(chunk), block_size), pad_id, dtypes["tokens"])
            weights_BT = np.zeros((len(chunk), block_size), np.float32)
            docs_BT = np.full((len(chunk), block_size), PAD_DOC_ID, np.int32)
            pos_BT = np.zeros((len(chunk), block_size), dtypes["pos"])
            for r, block in enumerate(chunk):
                at = 0
                for doc, i in enumerate(block):
                    s_idx, start, end = (int(v) for v in items_N3[i])
                    src, n = sources[s_idx], end - start
                    tokens_BT[r, at : at + n] = src.tokens[start:end]
                    weights_BT[r, at : at + n] = lut[src.classes[start:end]]
                    docs_BT[r, at : at + n] = doc
                    pos_BT[r, at : at + n] = np.arange(n)
                    at += n
            for kind, arr in (("tokens", tokens_BT), ("weights", weights_BT), ("docs", docs_BT), ("pos", pos_BT)):
                data = np.ascontiguousarray(arr, dtypes[kind]).tobytes()
                files[kind].write(data)
                hashes[kind].update(data)  # hashed as written: stage 7 checks the files against it
        for f in files.values():
            f.flush()
    return {
        kind: {"path": packed_path(directory, split, kind).name, "dtype": str(dtypes[kind]),
               "shape": [len(blocks), block_size], "header_bytes": HEADER_BYTES, "sha256": hashes[kind].hexdigest()}
        for kind in ARRAY_KINDS
    }


@dataclass
class PackedSFT:
    """One split of stage 6's output, memory-mapped read-only: every array is (n_blocks, block_size)."""

    tokens: np.ndarray
    weights: np.ndarray
    doc_ids: np.ndarray
    positions: np.ndarray
    pad_id: int

    @property
    def n_blocks(self) -> int:
        return self.tokens.shape[0]

    @property
    def block_size(self) -> int:
        return self.tokens.shape[1]


def _open_array(path: Path, kind: str) -> tuple[np.ndarray, int]:
    if not path.is_file():
        raise UserError(f"{path} is missing.\n  HINT: run `python 6_build_sft.py --config configs/<profile>/sft_data.yaml`.")
    with open(path, "rb") as f:
        raw = f.read(HEADER_BYTES)
    if len(raw) < HEADER_BYTES:
        raise UserError(f"{path}: truncated header; rebuild with `python 6_build_sft.py --force`.")
    magic, version, kind_code, dtype_code, pad_id, n_blocks, block_size = _HEADER.unpack(raw[: _HEADER.size])
    if magic != MAGIC or kind_code != ARRAY_KINDS[kind] or dtype_code not in DTYPE_CODES:
        raise UserError(f"{path}: not a Dante SFT {kind} file (bad magic/kind/dtype).")
    if version != FORMAT_VERSION:
        raise UserError(f"{path}: format version {version}, this code reads {FORMAT_VERSION}; rebuild with `python 6_build_sft.py --force`.")
    dtype = DTYPE_CODES[dtype_code]
    expected = HEADER_BYTES + n_blocks * block_size * dtype.itemsize
    if path.stat().st_size != expected:
        raise UserError(f"{path}: {path.stat().st_size} bytes, header says {expected}; the file is damaged, rebuild stage 6.")
    if n_blocks == 0:
        return np.zeros((0, block_size), dtype), pad_id
    return np.memmap(path, dtype=dtype, mode="r", offset=HEADER_BYTES, shape=(n_blocks, block_size)), pad_id


def load_packed(directory: str | Path, split: str, recorded: dict | None = None) -> PackedSFT:
    """Memory-map ``{split}.{tokens,weights,docs,pos}.bin`` from a 06_sft_data folder (split: train or eval).

    ``recorded``: stage 6's manifest ``outputs[split]``; each file is checked against the sha256 recorded
    there (one read of the arrays, ~1 GB/s: SFT data is small next to pretraining shards), so a damaged
    file is refused instead of silently trained on. Manifests from before the checksums are not checked."""
    problems = []
    for kind in ARRAY_KINDS:
        want = ((recorded or {}).get(kind) or {}).get("sha256")
        path = packed_path(directory, split, kind)
        if want and path.is_file() and file_sha256(path) != want:
            problems.append(f"{path}: its sha256 differs from the one stage 6 recorded (damaged or replaced)")
    if problems:
        raise UserError(problems_message("06_sft_data cannot be trusted", problems)
                        + "\n  HINT: rebuild it with `python 6_build_sft.py --config configs/<profile>/sft_data.yaml --force`.")
    arrays, pads = {}, set()
    for kind in ARRAY_KINDS:
        arrays[kind], pad = _open_array(packed_path(directory, split, kind), kind)
        pads.add(pad)
    shapes = {a.shape for a in arrays.values()}
    if len(shapes) != 1 or len(pads) != 1:
        raise UserError(f"{directory}: the {split} arrays disagree in shape {shapes} or pad id {pads}; rebuild stage 6.")
    return PackedSFT(arrays["tokens"], arrays["weights"], arrays["docs"], arrays["pos"], pads.pop())


# -- batches for stage 7 ------------------------------------------------------------------------------
def shifted_targets(tokens_BT: np.ndarray, weights_BT: np.ndarray, docs_BT: np.ndarray, pad_id: int):
    """(targets, target weights): position t predicts token t+1 of the same conversation.

    The last token of a conversation must not predict the first of the next one: such targets (and the
    block's last column, which has no next token) get weight 0 and the pad id as a harmless index.
    """
    B, T = tokens_BT.shape
    targets_BT = np.full((B, T), pad_id, np.int64)
    target_w_BT = np.zeros((B, T), np.float32)
    same_doc = (docs_BT[:, 1:] == docs_BT[:, :-1]) & (docs_BT[:, 1:] != PAD_DOC_ID)
    targets_BT[:, :-1] = np.where(same_doc, tokens_BT[:, 1:], pad_id)
    target_w_BT[:, :-1] = np.where(same_doc, weights_BT[:, 1:], 0.0)
    return targets_BT, target_w_BT


def num_sft_batches(n_blocks: int, micro_batch: int, world_size: int = 1) -> int:
    """Micro-batches per epoch on each rank (the last one is completed with padding rows)."""
    per_rank = -(-n_blocks // world_size)
    return -(-per_rank // micro_batch)


def epoch_order(n_blocks: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """The block order of one epoch: a permutation seeded by (seed, epoch), or 0..n-1 unshuffled."""
    return np.random.default_rng([seed, epoch]).permutation(n_blocks) if shuffle else np.arange(n_blocks)


def sft_micro_batch(packed: PackedSFT, rows: np.ndarray, micro_batch: int) -> dict[str, np.ndarray]:
    """One micro-batch of the blocks ``rows`` (at most ``micro_batch``; the rest is padding, weight 0)."""
    rows = np.sort(rows)  # sorted: sequential memmap reads
    k, T = len(rows), packed.block_size
    tokens = np.full((micro_batch, T), packed.pad_id, np.int64)
    weights = np.zeros((micro_batch, T), np.float32)
    docs = np.full((micro_batch, T), PAD_DOC_ID, np.int64)
    pos = np.zeros((micro_batch, T), np.int64)
    if k:
        tokens[:k], weights[:k] = packed.tokens[rows], packed.weights[rows]
        docs[:k], pos[:k] = packed.doc_ids[rows], packed.positions[rows]
    targets, target_w = shifted_targets(tokens, weights, docs, packed.pad_id)
    return {"tokens": tokens, "targets": targets, "weights": target_w, "positions": pos, "doc_ids": docs}


def sft_batches(
    packed: PackedSFT, micro_batch: int, *, shuffle: bool = True, seed: int = 0, epoch: int = 0,
    rank: int = 0, world_size: int = 1, start: int = 0,
) -> Iterator[dict[str, np.ndarray]]:
    """Micro-batches of one epoch as numpy arrays (torch.from_numpy is zero-copy):

    tokens (B, T) int64, targets (B, T) int64, weights (B, T) float32 (weight of each target),
    positions (B, T) int64, doc_ids (B, T) int64. Blocks are permuted per (seed, epoch), dealt to ranks
    round-robin; every rank yields the same number of batches (missing rows are all-padding, weight 0).
    ``start`` skips that many batches (resume). The loss is sum(w * ce) / sum(w) over the accumulation window.
    """
    mine = epoch_order(packed.n_blocks, seed, epoch, shuffle)[rank::world_size]
    for b in range(start, num_sft_batches(packed.n_blocks, micro_batch, world_size)):
        yield sft_micro_batch(packed, mine[b * micro_batch : (b + 1) * micro_batch], micro_batch)
