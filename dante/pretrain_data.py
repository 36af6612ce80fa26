"""Training data for the engine: random windows over tiered token shards (stage 4 and 5).

``TieredMemmapDataset`` serves micro-batches of ``seq_len + 1`` token windows (inputs = window[:-1],
targets = window[1:]) from the stage 3 shards ``t<tier>-train-<n>.bin``; ``ValidationWindows`` serves the
fixed validation windows from ``t<tier>-val-<n>.bin``. Both satisfy the engine's batch-source protocol
(``dante.engine.BatchSource``): ``batch(step, micro_step, rank, world_size) -> {"tokens", "targets"}``.

Design choices
- Counter-based randomness. Row ``r`` of optimizer step ``s`` is a pure function of (seed, s, r): its
  random numbers come from a Philox generator with key (seed, 0) and counter (0, r, s, 0). Philox is a
  keyed bijection of its 256-bit counter (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3",
  2011) and numpy increments only the first counter word as it draws, so the ~3 blocks a row uses,
  (k, r, s, 0) for k < 3, belong to that row alone: no two rows, steps or ranks ever share random
  numbers, and nothing has to be carried between steps. Resume is therefore exact by construction: a
  run restarted at step s draws what the uninterrupted run drew at step s.
- Rows are numbered across the whole optimizer step, not per rank: rank ``k`` at micro-step ``m`` of a
  world of ``W`` ranks takes rows ``(m * W + k) * B ... + B - 1``. Ranks therefore never overlap (they
  take disjoint row numbers, hence disjoint Philox counters, hence independent draws), and the global
  batch of a step is the same set of windows however it is split: 1 rank x 2 accumulation steps and
  2 ranks x 1 draw the same rows, which is what makes the multi-rank test compare equal. As with any
  sampler with replacement, two independent windows can still land on overlapping text by chance
  (probability ~ 2 * seq_len / tier_tokens per pair; ~5e-8 for a 90B-token corpus).
- Tier by weight, then a window uniform over the tier's valid start positions. That picks a shard
  with probability proportional to its number of windows (~ its length), NOT uniformly per shard:
  stage 3 cuts each tier into equal shards except the last, and a uniform shard choice would show the
  tokens of a short tail shard many times more often than the others (a 1M-token tail next to 100M
  shards: 100x). Proportional choice makes every token of a tier equally likely. Shards shorter than
  ``seq_len + 1`` cannot hold a window and are skipped (counted in ``summary()``).
- Windows cross document boundaries (EOS/BOS are in the stream), the usual pretraining practice.
- What is read is verified (``dante.shards.open_split``): headers and sizes at every open; stage 3's
  per-chunk CRCs and the id range once per file version, remembered in ``03_shards/verified/`` (the first
  open reads the shards once, ~840 MB/s of CRC-32 here; later opens cost a stat per file); and every served
  batch's ids below ``vocab_size`` (one max per batch). A damaged shard is a UserError naming the file and
  ``3_tokenize_shards.py --verify`` / ``--force``, never a silent run or an IndexError in the embedding.

Example::

    data = TieredMemmapDataset.from_stage_dir("runs/tiny/03_shards", {1: 3, 2: 2, 3: 1}, seq_len=256,
                                              micro_batch=8, seed=1234)
    batch = data.batch(step=0, micro_step=0, rank=0, world_size=1)   # tokens/targets (8, 256) int64
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Mapping, Sequence

import numpy as np
import torch

from dante.errors import problems_message
from dante.shards import FIX_HINT, ShardError, open_split

_MASK64 = (1 << 64) - 1


class DataError(ValueError):
    """The shards cannot serve the configured windows (missing tier, too short, changed since a checkpoint)."""

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__(self.problems[0] if len(self.problems) == 1 else
                         problems_message("training data cannot serve the configured windows", self.problems))


def row_range(micro_step: int, rank: int, world_size: int, micro_batch: int) -> range:
    """Row numbers (within an optimizer step) that ``rank`` trains on at ``micro_step``."""
    first = (micro_step * world_size + rank) * micro_batch
    return range(first, first + micro_batch)


def _windows_to_batch(windows: list[np.ndarray], vocab_size: int | None = None,
                      sources: list[str] | None = None) -> dict[str, torch.Tensor]:
    stacked = np.stack(windows)
    if vocab_size is not None and stacked.size and int(stacked.max()) >= vocab_size:
        # a shard damaged after its verified-once marker (bit rot): refuse the batch, not an IndexError
        # (or a device-side assert) in the embedding. One max over B x T ids: ~microseconds.
        bad = [n for w, n in zip(windows, sources or [""] * len(windows)) if int(np.max(w)) >= vocab_size]
        raise ShardError(f"{', '.join(sorted(set(bad)))}: a window holds token id {int(stacked.max())} >= vocab size "
                         f"{vocab_size} (the shard changed since it was verified). {FIX_HINT}")
    rows_BT1 = torch.from_numpy(stacked.astype(np.int64))
    return {"tokens": rows_BT1[:, :-1].contiguous(), "targets": rows_BT1[:, 1:].contiguous()}


def _shards_of(stage_dir: str | Path, split: str, vocab_size: int | None
               ) -> tuple[dict[int, list[np.ndarray]], dict[int, list[str]], int]:
    """{tier: [token arrays]}, {tier: [file names]} of one split of a stage 3 folder, and the id limit.

    Every shard is checked on the way (``dante.shards.open_split``): headers and sizes at each open, the
    per-chunk checksums and the id range once per file version (a marker in ``03_shards/verified/``),
    so a damaged shard or ids >= ``vocab_size`` stop the stage with a UserError naming the file."""
    readers = open_split(stage_dir, split, vocab_size)
    arrays = {tier: [r.tokens for r in rs] for tier, rs in readers.items()}
    names = {tier: [r.path.name for r in rs] for tier, rs in readers.items()}
    limits = [r.header.vocab_size for rs in readers.values() for r in rs if r.header.vocab_size]
    return arrays, names, min([vocab_size] if vocab_size else limits or [1 << 32])


class TieredMemmapDataset:
    """Random (seq_len + 1)-token windows: tier by weight, window uniform within the tier."""

    def __init__(self, tiers: Mapping[int, Sequence[np.ndarray]], tier_weights: Mapping[int, float], seq_len: int,
                 micro_batch: int, seed: int, shard_names: Mapping[int, Sequence[str]] | None = None,
                 vocab_size: int | None = None):
        self.seq_len, self.micro_batch, self.seed = seq_len, micro_batch, seed
        self.vocab_size = vocab_size  # every served id is checked below it (None: not checked)
        self.window = seq_len + 1
        problems = []
        active = sorted(t for t, w in tier_weights.items() if w > 0)
        if not active:
            problems.append("every tier weight is 0: give at least one tier a weight > 0")
        self._tiers: list[tuple[int, list[np.ndarray], np.ndarray]] = []
        self._names: list[list[str]] = []  # per tier slot: the usable shards' names (for error messages)
        self.skipped_short: dict[int, int] = {}
        self._layout: dict[str, list[list]] = {}
        for tier in active:
            arrays = list(tiers.get(tier, []))
            names = list((shard_names or {}).get(tier, [f"t{tier}-shard{i}" for i in range(len(arrays))]))
            if not arrays:
                problems.append(f"tier {tier} has weight {tier_weights[tier]} but no training shards "
                                f"(set train.tier_weights.{tier}=0 or add tier-{tier} sources to the corpus)")
                continue
            usable = [a for a in arrays if len(a) >= self.window]
            usable_names = [n for a, n in zip(arrays, names) if len(a) >= self.window]
            self.skipped_short[tier] = len(arrays) - len(usable)
            if not usable:
                longest = max(len(a) for a in arrays)
                problems.append(f"tier {tier}: seq_len + 1 = {self.window} tokens exceed its longest shard "
                                f"({longest} tokens); lower train.seq_len or give the tier more text")
                continue
            starts = np.array([len(a) - self.window + 1 for a in usable], dtype=np.int64)
            self._tiers.append((tier, usable, np.cumsum(starts)))
            self._names.append(usable_names)
            self._layout[str(tier)] = [[n, int(len(a))] for n, a in zip(names, arrays)]
        if problems:
            raise DataError(problems)
        weights = np.array([float(tier_weights[t]) for t, _, _ in self._tiers])
        self._tier_cdf = np.cumsum(weights / weights.sum())
        self._tier_cdf[-1] = 1.0  # guard against rounding: u < 1 always picks a tier
        self.tier_weights = {t: float(tier_weights[t]) for t, _, _ in self._tiers}

    @classmethod
    def from_stage_dir(cls, stage_dir: str | Path, tier_weights: Mapping[int, float], seq_len: int, micro_batch: int,
                       seed: int, vocab_size: int | None = None) -> "TieredMemmapDataset":
        """The train shards of a stage 3 folder, verified (``_shards_of``); ``vocab_size``: the model's
        (``model.vocab_size``), else the tokenizer's from the manifest."""
        arrays, names, limit = _shards_of(stage_dir, "train", vocab_size)
        return cls(arrays, tier_weights, seq_len, micro_batch, seed, shard_names=names, vocab_size=limit)

    # -- sampling -----------------------------------------------------------------------------------
    def _draw(self, step: int, row: int) -> tuple[int, int, int]:
        """(tier slot, shard index, offset) of row ``row`` of optimizer step ``step``: a pure function."""
        bits = np.random.Philox(key=[self.seed & _MASK64, 0], counter=[0, row, step, 0])
        rng = np.random.Generator(bits)
        slot = int(np.searchsorted(self._tier_cdf, rng.random(), side="right"))
        cum_starts = self._tiers[slot][2]
        position = int(rng.integers(0, int(cum_starts[-1])))
        shard = int(np.searchsorted(cum_starts, position, side="right"))
        offset = position - (int(cum_starts[shard - 1]) if shard else 0)
        return slot, shard, offset

    def window_at(self, step: int, row: int) -> tuple[int, int, int]:
        """(tier, shard index among the tier's usable shards, offset) of a row: for tests and debugging."""
        slot, shard, offset = self._draw(step, row)
        return self._tiers[slot][0], shard, offset

    def batch(self, step: int, micro_step: int, rank: int, world_size: int) -> dict[str, torch.Tensor]:
        """The micro-batch ``rank`` trains on at (step, micro_step): tokens and targets, (B, seq_len) int64."""
        windows, sources = [], []
        for row in row_range(micro_step, rank, world_size, self.micro_batch):
            slot, shard, offset = self._draw(step, row)
            windows.append(np.asarray(self._tiers[slot][1][shard][offset:offset + self.window]))
            sources.append(self._names[slot][shard])
        return _windows_to_batch(windows, self.vocab_size, sources)

    # -- facts and resume ---------------------------------------------------------------------------
    def summary(self) -> dict:
        return {
            "tiers": {t: {"weight": self.tier_weights[t], "shards": len(s), "tokens": int(sum(len(a) for a in s)),
                          "windows": int(c[-1]), "skipped_short_shards": self.skipped_short.get(t, 0)}
                      for t, s, c in self._tiers},
            "seq_len": self.seq_len,
        }

    def state_dict(self) -> dict:
        """What determines the sample stream; the position in it is the trainer's step."""
        return {"kind": "TieredMemmapDataset", "seed": self.seed, "seq_len": self.seq_len,
                "micro_batch": self.micro_batch, "tier_weights": {str(k): v for k, v in self.tier_weights.items()},
                "layout": self._layout}

    def load_state_dict(self, state: dict) -> None:
        """Refuse to resume if anything that determines the windows changed (resume would not be exact)."""
        mine = self.state_dict()
        differing = [k for k in mine if k != "micro_batch" and state.get(k) != mine[k]]
        if differing:
            raise DataError(f"the training data differ from the checkpoint's in {', '.join(differing)}; "
                            "resuming would not continue the same sample stream. Restore the shards/config, "
                            "or start over with --force")


class ValidationWindows:
    """Fixed validation windows: consecutive (seq_len + 1)-token windows, stride seq_len, over all val shards.

    The windows of a pass are taken at evenly spaced indices across the concatenation of tiers (so every
    tier is represented in proportion to its validation tokens) and dealt round-robin to ranks.
    """

    def __init__(self, tiers: Mapping[int, Sequence[np.ndarray]], seq_len: int, micro_batch: int,
                 vocab_size: int | None = None):
        self.seq_len, self.micro_batch, self.window = seq_len, micro_batch, seq_len + 1
        self.vocab_size = vocab_size
        self._index: list[tuple[np.ndarray, int]] = []
        for tier in sorted(tiers):
            for tokens in tiers[tier]:
                for offset in range(0, len(tokens) - self.window + 1, seq_len):
                    self._index.append((tokens, offset))

    @classmethod
    def from_stage_dir(cls, stage_dir: str | Path, seq_len: int, micro_batch: int,
                       vocab_size: int | None = None) -> "ValidationWindows":
        """The val shards of a stage 3 folder, verified as ``TieredMemmapDataset.from_stage_dir``'s."""
        arrays, _, limit = _shards_of(stage_dir, "val", vocab_size)
        return cls(arrays, seq_len, micro_batch, vocab_size=limit)

    def __len__(self) -> int:
        return len(self._index)

    def batches(self, rank: int, world_size: int, max_batches: int) -> Iterator[dict[str, torch.Tensor]]:
        """``rank``'s share of ``max_batches`` micro-batches of windows in total over all ranks.

        The windows chosen depend only on ``max_batches`` and the shards, never on the world size, so a
        validation loss means the same thing on 1 GPU and on 16.
        """
        total = min(max_batches * self.micro_batch, len(self._index))
        total -= total % world_size  # every rank the same count, so the collective ops line up
        if total == 0:
            return
        chosen = np.linspace(0, len(self._index) - 1, total).round().astype(np.int64)
        mine = chosen[rank::world_size]
        for begin in range(0, len(mine), self.micro_batch):
            picks = mine[begin:begin + self.micro_batch]
            yield _windows_to_batch([np.asarray(t[o:o + self.window]) for t, o in (self._index[i] for i in picks)],
                                    self.vocab_size)
