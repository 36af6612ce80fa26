"""Checkpoint integrity and deterministic bytes (issue 13): checksums recorded in meta.json and verified
before any read, damaged files reported as CheckpointError naming the file and the fix, sorted safetensors
headers, RNG states as plain tensors restored exactly, and checkpoint files that are byte-identical
between two saves of the same state."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")
torch.set_num_threads(1)

from dante import checkpoint as ckpt  # noqa: E402
from tests.test_engine import make_trainer  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A stage folder with two complete checkpoints (steps 1 and 2) of the test engine's tiny model."""
    stage = tmp_path_factory.mktemp("ck") / "s"
    make_trainer(stage, {"max_steps": 2, "checkpoint_every": 1, "eval_every": 0}).fit()
    return stage


def copy_stage(trained: Path, tmp_path: Path) -> Path:
    import shutil

    dest = tmp_path / "s"
    shutil.copytree(trained, dest)
    return dest


def final_step(stage: Path) -> Path:
    return stage / ckpt.CHECKPOINTS / "step-0000002"


def test_meta_records_size_and_sha256_of_every_file(trained):
    step_dir = final_step(trained)
    files = json.loads((step_dir / ckpt.META).read_text())["files"]
    on_disk = sorted(p.relative_to(step_dir).as_posix() for p in step_dir.rglob("*") if p.is_file() and p.name != ckpt.META)
    assert sorted(files) == on_disk and {"model.safetensors", "model_config.json", "train_state/rng-rank0.safetensors"} <= set(files)
    assert any(name.startswith("train_state/deepspeed/") for name in files)
    from dante.artifacts import file_sha256

    for name, rec in files.items():
        assert rec == {"bytes": (step_dir / name).stat().st_size, "sha256": file_sha256(step_dir / name)}, name
    assert ckpt.verify_checkpoint(step_dir) == []
    mode = (step_dir / ckpt.WEIGHTS).stat().st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o666 & ~umask  # as every other artifact, not mkstemp's 0600


def _flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x10
    path.write_bytes(bytes(data))


def test_bit_flipped_weights_are_refused_naming_file_and_fix(trained, tmp_path):
    stage = copy_stage(trained, tmp_path)
    weights = final_step(stage) / ckpt.WEIGHTS
    _flip_byte(weights, weights.stat().st_size - 5)  # inside a tensor: safetensors itself would load it silently
    with pytest.raises(ckpt.CheckpointError) as e:
        ckpt.load_model(stage)
    msg = str(e.value)
    assert f"checkpoint {final_step(stage)} is damaged" in msg and "model.safetensors: sha256" in msg
    assert "HINT:" in msg and "--force" in msg
    ckpt.read_model_config(final_step(stage))  # the config file itself is fine and still readable


def test_truncated_weights_and_config_are_refused_not_raw_errors(trained, tmp_path):
    stage = copy_stage(trained, tmp_path)
    weights = final_step(stage) / ckpt.WEIGHTS
    weights.write_bytes(weights.read_bytes()[:100])
    (final_step(stage) / ckpt.MODEL_CONFIG).write_text('{"dim": 3')
    with pytest.raises(ckpt.CheckpointError) as e:
        ckpt.load_model(stage)
    msg = str(e.value)
    assert "model.safetensors: 100 bytes" in msg and "truncated" in msg and "model_config.json:" in msg
    with pytest.raises(ckpt.CheckpointError, match="model_config.json: .* bytes"):
        ckpt.read_model_config(final_step(stage))


@pytest.mark.parametrize("damage", ["truncated", "garbled", "not an object"])
def test_damaged_meta_json_is_a_checkpoint_error(trained, tmp_path, damage):
    stage = copy_stage(trained, tmp_path)
    meta = final_step(stage) / ckpt.META
    text = meta.read_text()
    meta.write_text({"truncated": text[: len(text) // 2], "garbled": "\x00\x01" + text, "not an object": "[1, 2]"}[damage])
    for read in (lambda: ckpt.load_model(stage), lambda: ckpt.read_meta(final_step(stage)),
                 lambda: ckpt.read_model_config(final_step(stage))):
        with pytest.raises(ckpt.CheckpointError) as e:
            read()
        assert f"{meta} is damaged" in str(e.value) and "HINT:" in str(e.value)


def test_resume_verifies_train_state_and_names_the_way_back(trained, tmp_path):
    stage = copy_stage(trained, tmp_path)
    optim = next((final_step(stage) / "train_state").rglob("*optim_states.pt"))
    _flip_byte(optim, optim.stat().st_size // 2)
    with pytest.raises(ckpt.CheckpointError) as e:
        make_trainer(stage, {"max_steps": 2, "checkpoint_every": 1, "eval_every": 0})
    assert "optim_states.pt: sha256" in str(e.value) and "delete the folder" in str(e.value)
    import shutil

    shutil.rmtree(final_step(stage))  # the documented way back: resume from the checkpoint before it
    trainer = make_trainer(stage, {"max_steps": 2, "checkpoint_every": 1, "eval_every": 0})
    assert trainer.resume_plan.step_dir.name == "step-0000001"


def test_checkpoint_without_checksums_loads_with_a_note(trained, tmp_path, capsys):
    stage = copy_stage(trained, tmp_path)
    meta_path = final_step(stage) / ckpt.META
    meta = json.loads(meta_path.read_text())
    del meta["files"]  # as written before checksums existed
    meta_path.write_text(json.dumps(meta))
    model, _, loaded = ckpt.load_model(stage)
    assert loaded["step"] == 2 and "records no checksums" in capsys.readouterr().err
    weights = final_step(stage) / ckpt.WEIGHTS
    weights.write_bytes(weights.read_bytes()[:100])  # unverifiable, but a truncated file is still no raw error
    with pytest.raises(ckpt.CheckpointError, match="model.safetensors is unreadable"):
        ckpt.load_model(stage)


# ---------------------------------------------------------------------------------------------------
# Deterministic bytes
# ---------------------------------------------------------------------------------------------------

_SAVE_SCRIPT = """
import sys, torch
from pathlib import Path
from dante.checkpoint import save_weights
torch.manual_seed(0)
save_weights(Path(sys.argv[1]), {n: torch.randn(3, 4) for n in ("b.weight", "a.weight", "output.weight")}, False)
"""


def test_safetensors_header_is_sorted_and_identical_across_processes(tmp_path):
    paths = [tmp_path / f"w{i}.safetensors" for i in range(3)]
    for p in paths:  # separate processes: the writer's hash map order is seeded per process
        subprocess.run([sys.executable, "-c", _SAVE_SCRIPT, str(p)], cwd=REPO, check=True,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    data = [p.read_bytes() for p in paths]
    assert data[0] == data[1] == data[2]
    n = int.from_bytes(data[0][:8], "little")
    header = json.loads(data[0][8:8 + n])
    assert list(header)[0] == "__metadata__" and list(header["__metadata__"]) == sorted(header["__metadata__"])
    from safetensors.torch import load_file

    torch.manual_seed(0)
    expected = {n: torch.randn(3, 4) for n in ("b.weight", "a.weight", "output.weight")}
    got = load_file(str(paths[0]))
    assert all(torch.equal(got[k], v) for k, v in expected.items())


def test_rng_states_are_plain_tensors_restored_exactly(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    random.gauss(0, 1)  # a cached gaussian: part of Python's state too
    np.random.standard_normal()
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    ckpt.save_rng(a)
    ckpt.save_rng(b)
    assert a.read_bytes() == b.read_bytes() and b"tmp" not in a.read_bytes()
    draws = (random.random(), random.gauss(0, 1), np.random.standard_normal(), np.random.rand(), torch.rand(3))
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    ckpt.load_rng(a)
    again = (random.random(), random.gauss(0, 1), np.random.standard_normal(), np.random.rand(), torch.rand(3))
    assert draws[:4] == again[:4] and torch.equal(draws[4], again[4])


def test_torch_objects_save_to_the_same_bytes(tmp_path):
    state = {"state": {0: {"exp_avg": torch.arange(6.0)}}, "param_groups": [{"lr": 0.1, "params": [0]}]}
    ckpt.save_torch_object(tmp_path / "x.pt", state)
    first = (tmp_path / "x.pt").read_bytes()
    ckpt.save_torch_object(tmp_path / "x.pt", state)
    assert (tmp_path / "x.pt").read_bytes() == first and b".tmp" not in first
    assert torch.equal(torch.load(tmp_path / "x.pt")["state"][0]["exp_avg"], torch.arange(6.0))


def test_two_saves_of_one_state_give_identical_checkpoint_files(tmp_path):
    """The same training twice (fresh processes' worth of state: a new trainer each) writes the same bytes."""
    for name in ("a", "b"):
        make_trainer(tmp_path / name, {"max_steps": 1, "checkpoint_every": 1, "eval_every": 0}).fit()
    one, two = (tmp_path / n / ckpt.CHECKPOINTS / "step-0000001" for n in ("a", "b"))
    files = sorted(p.relative_to(one) for p in one.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(two) for p in two.rglob("*") if p.is_file())
    for rel in files:
        if rel.name == ckpt.META:
            m1, m2 = (json.loads((d / rel).read_text()) for d in (one, two))
            m1.pop("saved"), m2.pop("saved")
            assert m1 == m2
        else:
            assert (one / rel).read_bytes() == (two / rel).read_bytes(), rel
