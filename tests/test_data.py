"""dante.pretrain_data: the tiered window sampler (determinism, resume, rank disjointness, proportions) and val windows."""

import numpy as np
import pytest
import torch

from dante.errors import UserError
from dante.pretrain_data import DataError, TieredMemmapDataset, ValidationWindows, row_range


def make_tiers(seed=0):
    """Token arrays whose values encode (tier, shard, position) so a window tells where it came from."""
    tiers = {}
    for tier, lengths in {1: [3000, 2000], 2: [1500], 3: [800, 40]}.items():
        tiers[tier] = [((tier * 10 + i) * 4000 + np.arange(n)).astype(np.int64) for i, n in enumerate(lengths)]
    return tiers


def decode(value: int) -> tuple[int, int, int]:
    tier_shard, position = divmod(int(value), 4000)
    return tier_shard // 10, tier_shard % 10, position


def dataset(seed=1234, seq_len=16, micro_batch=4, weights=None, tiers=None):
    return TieredMemmapDataset(tiers or make_tiers(), weights or {1: 3.0, 2: 2.0, 3: 1.0}, seq_len, micro_batch, seed)


def test_windows_are_contiguous_slices_and_targets_are_shifted():
    ds = dataset()
    b = ds.batch(step=3, micro_step=1, rank=0, world_size=2)
    assert b["tokens"].shape == b["targets"].shape == (4, 16) and b["tokens"].dtype == torch.int64
    assert torch.equal(b["tokens"][:, 1:], b["targets"][:, :-1])
    for row in range(4):
        window = torch.cat([b["tokens"][row], b["targets"][row, -1:]])
        assert torch.equal(window - window[0], torch.arange(17))  # one contiguous run of one shard
        tier, shard, start = decode(window[0])
        assert ds.window_at(3, row_range(1, 0, 2, 4)[row]) == (tier, shard, start)


def test_deterministic_and_seed_dependent():
    a, b = dataset(seed=7), dataset(seed=7)
    for step in (0, 5, 123456):
        assert torch.equal(a.batch(step, 0, 0, 1)["tokens"], b.batch(step, 0, 0, 1)["tokens"])
    assert not torch.equal(a.batch(0, 0, 0, 1)["tokens"], dataset(seed=8).batch(0, 0, 0, 1)["tokens"])
    assert not torch.equal(a.batch(0, 0, 0, 1)["tokens"], a.batch(1, 0, 0, 1)["tokens"])


def test_resume_is_a_pure_function_of_the_step():
    """A fresh sampler (a resumed process) asked for step s returns what the running one returned at s."""
    running = dataset()
    seen = [running.batch(step, m, 0, 1)["tokens"] for step in range(6) for m in range(2)]
    resumed = dataset()
    resumed.load_state_dict(running.state_dict())
    again = [resumed.batch(step, m, 0, 1)["tokens"] for step in range(3, 6) for m in range(2)]
    assert all(torch.equal(x, y) for x, y in zip(seen[6:], again))


def test_changed_shards_or_seed_refuse_resume():
    state = dataset().state_dict()
    tiers = make_tiers()
    tiers[2] = [tiers[2][0][:-10]]
    with pytest.raises(DataError, match="layout"):
        dataset(tiers=tiers).load_state_dict(state)
    with pytest.raises(DataError, match="seed"):
        dataset(seed=99).load_state_dict(state)


def test_ranks_are_disjoint_and_the_global_batch_does_not_depend_on_the_split():
    """2 ranks x 1 micro-step draw exactly the rows that 1 rank x 2 micro-steps draws, none shared."""
    ds = dataset()
    for step in range(4):
        one_rank = [ds.batch(step, m, 0, 1)["tokens"] for m in range(2)]
        two_ranks = [ds.batch(step, 0, r, 2)["tokens"] for r in range(2)]
        assert torch.equal(torch.cat(one_rank), torch.cat(two_ranks))
        rows = [set(row_range(m, r, 2, 4)) for m in range(3) for r in range(2)]
        assert sum(len(x) for x in rows) == len(set().union(*rows))  # row numbers, hence Philox counters, disjoint
        starts_rank0 = {tuple(x.tolist()) for x in two_ranks[0]}
        assert not starts_rank0 & {tuple(x.tolist()) for x in two_ranks[1]}


def test_tier_and_shard_proportions():
    """Tier frequencies follow the 3:2:1 weights; within a tier a shard is picked by its window count."""
    ds = dataset(seq_len=16)
    draws = [ds.window_at(step, row) for step in range(1500) for row in range(4)]
    n = len(draws)
    tiers = np.array([t for t, _, _ in draws])
    for tier, share in {1: 3 / 6, 2: 2 / 6, 3: 1 / 6}.items():
        observed = (tiers == tier).mean()
        assert abs(observed - share) < 4 * np.sqrt(share * (1 - share) / n), (tier, observed, share)
    tier1_shards = np.array([s for t, s, _ in draws if t == 1])
    expected0 = (3000 - 16) / ((3000 - 16) + (2000 - 16))
    assert abs((tier1_shards == 0).mean() - expected0) < 4 * np.sqrt(expected0 * (1 - expected0) / len(tier1_shards))
    offsets = np.array([o for t, s, o in draws if t == 2])
    assert offsets.min() >= 0 and offsets.max() <= 1500 - 17
    assert abs(offsets.mean() - (1500 - 17) / 2) < 60  # uniform offset: mean mid-range (sd of mean ~ 11)


def test_short_shards_are_skipped_and_impossible_configs_are_errors():
    ds = dataset(seq_len=64)  # tier 3 shard 1 (40 tokens) cannot hold 65 tokens
    assert ds.summary()["tiers"][3]["skipped_short_shards"] == 1
    with pytest.raises(DataError, match=r"tier 3: seq_len \+ 1 = 1001 tokens exceed its longest shard \(800"):
        dataset(seq_len=1000)
    with pytest.raises(DataError, match="tier 4 has weight 1.0 but no training shards"):
        dataset(weights={1: 1.0, 4: 1.0})
    with pytest.raises(DataError, match="every tier weight is 0"):
        dataset(weights={1: 0.0})
    only_tier1 = dataset(weights={1: 1.0, 2: 0.0, 3: 0.0})
    assert {only_tier1.window_at(s, 0)[0] for s in range(50)} == {1}


def test_validation_windows_fixed_disjoint_and_cover_tiers():
    tiers = make_tiers()
    val = ValidationWindows(tiers, seq_len=16, micro_batch=4)
    per_rank = [list(val.batches(rank, 2, max_batches=6)) for rank in range(2)]
    assert [len(x) for x in per_rank] == [3, 3]
    firsts = [int(b["tokens"][i, 0]) for batches in per_rank for b in batches for i in range(4)]
    assert len(set(firsts)) == len(firsts)  # no window evaluated twice
    assert {decode(v)[0] for v in firsts} == {1, 2, 3}  # evenly spaced picks reach every tier
    again = list(ValidationWindows(tiers, seq_len=16, micro_batch=4).batches(0, 2, max_batches=6))
    assert all(torch.equal(a["tokens"], b["tokens"]) for a, b in zip(per_rank[0], again))
    one_rank = torch.cat([b["tokens"] for b in val.batches(0, 1, max_batches=6)])
    two_ranks = torch.cat([b["tokens"] for batches in per_rank for b in batches])
    assert sorted(map(tuple, one_rank.tolist())) == sorted(map(tuple, two_ranks.tolist()))  # same set at any world size
    for b in per_rank[0]:
        assert torch.equal(b["tokens"][:, 1:], b["targets"][:, :-1])
        assert all(decode(v)[2] % 16 == 0 for v in b["tokens"][:, 0])  # stride seq_len from each shard start


def test_a_served_id_beyond_the_vocabulary_is_a_user_error_naming_the_shard():
    """Ids are checked per batch too: a shard damaged after its verified-once marker cannot reach the embedding."""
    tiers = {1: [np.arange(200, dtype=np.uint16)], 2: [np.arange(200, dtype=np.uint16)]}
    tiers[2][0][50:] = 9000
    ds = TieredMemmapDataset(tiers, {1: 1.0, 2: 1.0}, 16, 4, 0, shard_names={1: ["a.bin"], 2: ["b.bin"]}, vocab_size=8192)
    with pytest.raises(UserError, match=r"b\.bin: a window holds token id 9000 >= vocab size 8192.*--verify"):
        for step in range(50):
            ds.batch(step, 0, 0, 1)
    val = ValidationWindows({2: tiers[2]}, seq_len=16, micro_batch=4, vocab_size=8192)
    with pytest.raises(UserError, match="token id 9000"):
        list(val.batches(0, 1, max_batches=4))
    assert ValidationWindows({1: tiers[1]}, seq_len=16, micro_batch=4, vocab_size=8192).batches(0, 1, 2)  # fine
