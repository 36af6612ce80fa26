"""Resuming on another number of ranks: the global batch rule (dante.checkpoint.resume_grad_accum), the
world-size invariant data order of stages 4/5 and 7, and stage 4 for real: 2 ranks -> 1 rank -> 2 ranks
through torchrun and ``python 4_pretrain.py``, stopped by SIGTERM, against an uninterrupted 2-rank run.

The runs are real processes of the stage script; what each rank trained on is read from the engine's
data trace (DANTE_DATA_TRACE, dante.engine.TracedBatches): a hash per window, per step and rank.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

os.environ.setdefault("DS_ACCELERATOR", "cpu")
torch.set_num_threads(1)

from dante import checkpoint as ckpt  # noqa: E402
from dante.config import RunConfig  # noqa: E402
from dante.metrics import read_metrics  # noqa: E402
from dante.pretrain_data import TieredMemmapDataset  # noqa: E402
from dante.sft_packing import PackedSFT  # noqa: E402
from dante.sft_train import SFTBatches, epoch_steps  # noqa: E402
from tests.helpers import write_pretrain_inputs  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
MODEL = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64, multiple_of=32)
# global batch: 2 sequences x accumulation 1 x 2 ranks = 4 (on 1 rank: accumulation 2)
TRAIN = dict(seq_len=24, micro_batch=2, grad_accum=1, max_steps=12, warmup_steps=2, lr=3e-3, min_lr=3e-4,
             precision="fp32", checkpoint_every=100, keep_last=2, eval_every=4, eval_batches=2, log_every=1,
             expected_world_size=2, tier_weights={1: 2.0, 2: 1.0})


# ---------------------------------------------------------------------------------------------------
# The rule: micro_batch x grad_accum x ranks stays the checkpoint's
# ---------------------------------------------------------------------------------------------------


def meta_of(micro_batch: int, grad_accum: int, world_size: int, configured: int | None = None) -> dict:
    return {"world_size": world_size, "batch": {"micro_batch": micro_batch, "grad_accum": grad_accum},
            "config": {"train": {"micro_batch": micro_batch, "grad_accum": configured or grad_accum}}}


def test_grad_accum_keeps_the_global_batch_or_refuses_with_the_numbers():
    where = Path("ckpt")
    meta = meta_of(4, 2, 2)  # 16 sequences per step
    assert ckpt.resume_grad_accum(meta, 4, 2, 2, where) == (2, None)
    accum, note = ckpt.resume_grad_accum(meta, 4, 2, 1, where)  # configured 2, adjusted on 1 rank
    assert accum == 4 and "grad_accum 2 -> 4" in note and "16 sequences" in note
    assert ckpt.resume_grad_accum(meta, 4, 4, 1, where)[0] == 4  # the user set the adjusted value himself
    assert ckpt.resume_grad_accum(meta, 4, 2, 4, where)[0] == 1
    # a run resumed on 1 rank saved accumulation 4 under a config that still says 2: back to 2 ranks is 2
    accum, note = ckpt.resume_grad_accum(meta_of(4, 4, 1, configured=2), 4, 2, 2, where)
    assert accum == 2 and "grad_accum 4 -> 2" in note
    with pytest.raises(ckpt.CheckpointError) as e:  # 16 / (4 x 3): not whole micro-batches
        ckpt.resume_grad_accum(meta, 4, 2, 3, where)
    text = str(e.value)
    assert "on 3 rank(s)" in text and "global batch of 16 sequences per step (4 micro-batch x 2 accumulation x 2 " \
        "rank(s))" in text and "launch 1, 2, 4 rank(s)" in text and "--force" in text
    with pytest.raises(ckpt.CheckpointError) as e:  # another accumulation than the one that keeps it
        ckpt.resume_grad_accum(meta, 4, 3, 1, where)
    text = str(e.value)
    assert "= 12 sequences per step" in text and "16 sequences" in text and "set train.grad_accum=4" in text
    # checkpoints written before the batch record: the config's grad_accum was the one trained with
    legacy = {"world_size": 2, "config": {"train": {"micro_batch": 4, "grad_accum": 2}}}
    assert ckpt.saved_batch(legacy) == (4, 2, 2) and ckpt.resume_grad_accum(legacy, 4, 2, 1, where)[0] == 4


def test_stage_resume_check_allows_exactly_a_batch_keeping_grad_accum(tmp_path, monkeypatch):
    step_dir = tmp_path / "checkpoints" / "step-0000003"
    step_dir.mkdir(parents=True)
    (step_dir / ckpt.META).write_text(json.dumps(meta_of(2, 1, 2)))
    old = {"train": {"micro_batch": 2, "grad_accum": 1, "log_every": 1}}
    state = {"step": 3, "checkpoint": str(step_dir)}
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert ckpt.training_resume_check(old, {"train": {**old["train"], "grad_accum": 2}}, state) is None
    reason = ckpt.training_resume_check(old, {"train": {**old["train"], "grad_accum": 3}}, state)
    assert "6 sequences per step" in reason and "global batch of 4 sequences" in reason
    monkeypatch.setenv("WORLD_SIZE", "2")  # 2 ranks: accumulation 2 would double the batch
    assert "8 sequences per step" in ckpt.training_resume_check(old, {"train": {**old["train"], "grad_accum": 2}}, state)
    assert "train.lr" in ckpt.training_resume_check(old, {"train": {**old["train"], "lr": 1.0}}, state)


# ---------------------------------------------------------------------------------------------------
# The data order does not depend on how the global batch is split
# ---------------------------------------------------------------------------------------------------


def rows_of_step(source, step: int, world_size: int, grad_accum: int) -> Counter:
    """The multiset of rows (as bytes) that all ranks together train on at ``step``."""
    rows = Counter()
    for rank in range(world_size):
        for m in range(grad_accum):
            b = source.batch(step, m, rank, world_size)
            for r in range(b["tokens"].shape[0]):
                rows[b["tokens"][r].numpy().tobytes() + b["targets"][r].numpy().tobytes() +
                     (b["weights"][r].numpy().tobytes() if "weights" in b else b"")] += 1
    return rows


def test_pretraining_windows_are_the_same_on_2_ranks_and_1_rank_with_double_accumulation():
    rng = np.random.default_rng(0)
    tiers = {1: [rng.integers(0, 97, 4000, dtype=np.uint16)], 2: [rng.integers(0, 97, 2500, dtype=np.uint16)]}
    data = TieredMemmapDataset(tiers, {1: 2.0, 2: 1.0}, seq_len=24, micro_batch=2, seed=1234)
    for step in range(4):
        two = rows_of_step(data, step, 2, 3)
        assert two == rows_of_step(data, step, 1, 6) == rows_of_step(data, step, 3, 2)
        assert sum(two.values()) == 12
    assert rows_of_step(data, 0, 1, 6) != rows_of_step(data, 1, 1, 6)


def packed_blocks(n: int, block: int = 8) -> PackedSFT:
    """n blocks whose tokens name the block (block i holds tokens i+1), each one conversation, all weighted."""
    tokens = np.repeat(np.arange(1, n + 1, dtype=np.int64)[:, None], block, axis=1)
    docs = np.zeros((n, block), np.int64)
    positions = np.tile(np.arange(block, dtype=np.int64), (n, 1))
    return PackedSFT(tokens, np.ones((n, block), np.float32), docs, positions, pad_id=0)


def test_sft_blocks_are_the_same_on_2_ranks_and_1_rank_with_double_accumulation():
    # 9 blocks, micro-batch 2: epochs end inside a micro-batch and inside a step. Dealing the blocks of an
    # epoch round-robin to ranks padded each epoch to a multiple of micro_batch x ranks (12 rows on 2 ranks,
    # 10 on 1): from the second step on, 2 ranks trained on other blocks than 1 rank.
    packed, epochs = packed_blocks(9), 3
    one = SFTBatches(packed, micro_batch=2, grad_accum=4, epochs=epochs, seed=5)
    two = SFTBatches(packed, micro_batch=2, grad_accum=2, epochs=epochs, seed=5)
    steps = epoch_steps(9, 2, 4, epochs, world_size=1)
    assert steps == epoch_steps(9, 2, 2, epochs, world_size=2) == 4  # 15 micro-batches, 4 per step
    seen = Counter()
    for step in range(steps):
        rows = rows_of_step(one, step, 1, 4)
        assert rows == rows_of_step(two, step, 2, 2), step
        for key, count in rows.items():
            block = int(np.frombuffer(key[:8], np.int64)[0])
            weighted = np.frombuffer(key[-8 * 4:], np.float32).sum() > 0  # the weights of the row's targets
            if block != packed.pad_id and weighted:
                seen[block] += count
    assert seen == Counter({b: epochs for b in range(1, 10)})  # every block once per epoch, padding weightless


# ---------------------------------------------------------------------------------------------------
# Stage 4 for real: 2 ranks -> 1 rank -> 2 ranks
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    run = RunConfig(name="base", root=str(tmp_path_factory.mktemp("runs")), seed=5)
    return run, write_pretrain_inputs(run)


def write_config(inputs, tmp_path: Path, name: str, **train) -> Path:
    """A stage 4 config over a copy of the shared 02/03 stages in a run folder of its own."""
    import shutil

    base, vocab = inputs
    for st in ("02_tokenizer", "03_shards"):
        shutil.copytree(Path(base.root) / base.name / st, Path(base.root) / name / st)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"run": {"name": name, "root": base.root, "seed": 5},
                                    "model": {**MODEL, "vocab_size": vocab}, "train": {**TRAIN, **train}}))
    return path


def launch(config: Path, ranks: int, trace: Path, *extra: str) -> subprocess.Popen:
    """4_pretrain.py on ``ranks`` processes: torchrun for several, plain python for one."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                           "MASTER_PORT")}
    env.update(PYTHONPATH=str(REPO), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", DANTE_DATA_TRACE=str(trace))
    runner = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks)] \
        if ranks > 1 else [sys.executable]
    # the launch plans for its own rank count, as README says a user resuming on another count does
    plan = ["--set", f"train.expected_world_size={ranks}"]
    return subprocess.Popen([*runner, str(REPO / "4_pretrain.py"), "--config", str(config), *plan, *extra], cwd=REPO,
                            env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def stop_after(stage: Path, proc: subprocess.Popen, step: int, timeout: float = 240) -> str:
    """SIGTERM once metrics.jsonl shows ``step``; the output of the run, which must exit 128 + 15."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        rows = read_metrics(stage, "train")
        if rows and rows[-1]["step"] >= step:
            break
        if proc.poll() is not None:
            raise AssertionError(f"run ended before step {step}:\n{proc.stdout.read()}")
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)  # torchrun passes it on to every rank, as a cluster's preemption does
    out, _ = proc.communicate(timeout=180)
    assert "stop signal received" in out and "Rerun the same command to resume" in out, out
    # python exits 128 + 15 itself; torchrun, signalled, stops its ranks (they save first) and exits 1
    assert proc.returncode == 128 + signal.SIGTERM or (proc.returncode == 1 and "got signal: 15" in out), out
    return out


def trained_rows(trace: Path, first: int, last: int) -> dict[int, Counter]:
    """{step: multiset of row hashes} of steps first..last-1 (0-based) from the trace files of one run."""
    out: dict[int, Counter] = {}
    for f in trace.glob("*.jsonl"):
        for line in f.read_text().splitlines():
            r = json.loads(line)
            if first <= r["step"] < last:  # a prefetching loader may have asked for a step it never trained
                out.setdefault(r["step"], Counter()).update(r["rows"])
    return out


def test_two_ranks_then_one_then_two_continue_the_uninterrupted_run(inputs, tmp_path):
    """Tolerance: 1e-5 relative on losses, gradient norms and val losses (fp32, CPU). The 1-rank segment adds
    the two micro-batch gradients in .grad where 2 ranks add them in the all-reduce; with two addends the
    sum is the same either way, so this run measures 0.0 (bit-identical, ~95 s on 2 busy cores). More
    ranks or micro-batches sum in other orders (a few ulps, carried along by Adam): hence the margin."""
    t0 = time.time()
    ref_cfg, cut_cfg = write_config(inputs, tmp_path, "ref"), write_config(inputs, tmp_path, "cut")
    root = Path(inputs[0].root)
    ref_stage, cut_stage = root / "ref" / "04_pretrain", root / "cut" / "04_pretrain"
    traces = [tmp_path / f"trace-{i}" for i in range(4)]
    ref = launch(ref_cfg, 2, traces[0])  # the uninterrupted run, alongside the first segment

    stop_after(cut_stage, launch(cut_cfg, 2, traces[1]), 3)  # 1) 2 ranks, SIGTERM after step 3
    k1 = ckpt.read_json(ckpt.latest_checkpoint(cut_stage / "checkpoints") / ckpt.META)["step"]
    assert 3 <= k1 < 9, k1

    out = stop_after(cut_stage, launch(cut_cfg, 1, traces[2]), k1 + 2)  # 2) 1 rank
    assert f"resumed from checkpoint step {k1}" in out and "resuming on 1 rank(s), the checkpoint's run had 2: " \
        "grad_accum 1 -> 2 keeps the global batch of 4 sequences per step" in out, out
    k2_dir = ckpt.latest_checkpoint(cut_stage / "checkpoints")
    meta2 = ckpt.read_json(k2_dir / ckpt.META)
    k2 = meta2["step"]
    assert k1 < k2 < 12 and meta2["batch"] == {"micro_batch": 2, "grad_accum": 2, "world_size": 1, "global_batch": 4}
    assert (cut_stage / "checkpoints" / f"step-{k1:07d}" / "train_state" / "universal").is_dir()  # re-partitioned

    # bad input: an accumulation that changes the global batch (3 x 2 x 1 = 6, not 4): refused, nothing done
    progress = (cut_stage / "progress.json").read_text()
    bad = launch(cut_cfg, 1, traces[3], "--set", "train.grad_accum=3")
    out, _ = bad.communicate(timeout=120)
    assert bad.returncode == 2, out
    assert "train.grad_accum=3 x 1 rank(s) = 6 sequences per step" in out and "global batch of 4 sequences" in out \
        and "set train.grad_accum=2" in out, out
    assert ckpt.latest_checkpoint(cut_stage / "checkpoints") == k2_dir and not (cut_stage / "manifest.json").exists()
    assert (cut_stage / "progress.json").read_text() == progress

    final = launch(cut_cfg, 2, traces[3])  # 3) 2 ranks again, to the end
    out, _ = final.communicate(timeout=240)
    assert final.returncode == 0, out
    assert f"resumed from checkpoint step {k2}" in out and "grad_accum 2 -> 1" in out, out
    out, _ = ref.communicate(timeout=240)
    assert ref.returncode == 0, out

    manifest = json.loads((cut_stage / "manifest.json").read_text())
    assert manifest["counts"]["steps"] == 12 and manifest["counts"]["tokens_seen"] == 12 * 4 * 24
    assert manifest["training"]["batch"] == {"micro_batch": 2, "grad_accum": 1, "global_batch": 4}
    assert [(r["step"], r["from_world_size"], r["to_world_size"], r["grad_accum"], r["optimizer_state"])
            for r in manifest["training"]["reshards"]] == [(k1, 2, 1, 2, "universal"), (k2, 1, 2, 1, "universal")]

    curve = [(r["kind"], r["step"], r.get("loss"), r.get("grad_norm"), r.get("val_loss")) for r in read_metrics(cut_stage)]
    want = [(r["kind"], r["step"], r.get("loss"), r.get("grad_norm"), r.get("val_loss")) for r in read_metrics(ref_stage)]
    assert [r[:2] for r in curve] == [r[:2] for r in want] and len(want) == 12 + 3
    worst = 0.0
    for a, b in zip(curve, want):
        for x, y in zip(a[2:], b[2:]):
            assert (x is None) == (y is None), (a, b)
            if x is not None:
                assert x == pytest.approx(y, rel=1e-5), (a, b)
                worst = max(worst, abs(x - y) / abs(y))
    print(f"max relative difference {worst:.2e}; {time.time() - t0:.1f} s")

    # the same windows, step by step: the resumed run's three segments == the uninterrupted run
    consumed = {**trained_rows(traces[1], 0, k1), **trained_rows(traces[2], k1, k2), **trained_rows(traces[3], k2, 12)}
    reference = trained_rows(traces[0], 0, 12)
    assert sorted(consumed) == sorted(reference) == list(range(12))
    for step in range(12):
        assert sum(reference[step].values()) == 4 and consumed[step] == reference[step], step


def test_a_global_batch_that_does_not_split_over_the_new_ranks_is_refused(inputs, tmp_path):
    """1 rank x micro-batch 1 x accumulation 3 = 3 sequences per step cannot run on 2 ranks."""
    cfg = write_config(inputs, tmp_path, "odd", micro_batch=1, grad_accum=3, expected_world_size=1)
    stage = Path(inputs[0].root) / "odd" / "04_pretrain"
    stop_after(stage, launch(cfg, 1, tmp_path / "trace-a"), 1)
    latest = ckpt.latest_checkpoint(stage / "checkpoints")
    progress = (stage / "progress.json").read_text()
    proc = launch(cfg, 2, tmp_path / "trace-b")
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode != 0, out
    assert "on 2 rank(s): its global batch of 3 sequences per step (1 micro-batch x 3 accumulation x 1 rank(s)) " \
        "does not split into whole micro-batches of 1 on 2 ranks" in out and "launch 1, 3 rank(s)" in out, out
    assert ckpt.latest_checkpoint(stage / "checkpoints") == latest and not (stage / "manifest.json").exists()
    # what was done is untouched (Stage.open records the launch's accepted config, expected_world_size 2,
    # before the engine finds that the batch cannot split; the next launch compares against it the same way)
    assert json.loads((stage / "progress.json").read_text())["state"] == json.loads(progress)["state"]
    assert not (latest / "train_state" / "universal").exists()  # refused before any conversion
