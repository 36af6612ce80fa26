"""dante.engine + dante.checkpoint: schedule, optimizer groups, loss normalization against a plain loop,
DeepSpeed ZeRO-2 on 2 CPU ranks, exact resume after SIGTERM and SIGKILL, divergence, config refusal.

Multi-process cases run this file as a script (``python tests/test_engine.py '<json spec>'``, see
``driver_main``) so that the ranks and the killed runs are real separate processes.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")
torch.set_num_threads(1)

from dante import checkpoint as ckpt  # noqa: E402
from dante.backends import adamw_param_groups, deepspeed_config  # noqa: E402
from dante.config import ModelConfig, PretrainStageConfig, TrainConfig, to_dict  # noqa: E402
from dante.distributed import init_distributed  # noqa: E402
from dante.engine import Trainer, TrainingDiverged, lr_at  # noqa: E402
from dante.metrics import read_metrics  # noqa: E402
from dante.model import Transformer  # noqa: E402
from dante.pretrain_data import TieredMemmapDataset, ValidationWindows, row_range  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
MODEL = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, max_seq_len=64, multiple_of=32)
# zero_stage 2: these tests exercise the partitioned-gradient path (the default is ZeRO-1, covered by
# tests/test_launchers.py and tests/test_precision.py)
TRAIN = dict(seq_len=24, micro_batch=2, grad_accum=2, max_steps=6, warmup_steps=2, lr=3e-3, min_lr=3e-4,
             precision="fp32", checkpoint_every=3, keep_last=2, eval_every=3, eval_batches=2, log_every=1, zero_stage=2)


def corpus_tiers() -> dict[int, list[np.ndarray]]:
    rng = np.random.default_rng(0)
    return {1: [rng.integers(0, 97, 4000, dtype=np.uint16)], 2: [rng.integers(0, 97, 2500, dtype=np.uint16)]}


class SlowData:
    """A batch source that takes ``delay`` seconds per micro-batch, so a test can signal a run mid-way."""

    def __init__(self, inner, delay: float):
        self.inner, self.delay = inner, delay

    def batch(self, *args):
        time.sleep(self.delay)
        return self.inner.batch(*args)

    def state_dict(self):
        return self.inner.state_dict()

    def load_state_dict(self, state):
        self.inner.load_state_dict(state)


def make_trainer(stage_dir, train_over: dict | None = None, delay: float = 0.0, data=None) -> Trainer:
    train = TrainConfig(**{**TRAIN, "tier_weights": {1: 2.0, 2: 1.0}, **(train_over or {})})
    model_cfg = ModelConfig(**MODEL)
    stage_cfg = PretrainStageConfig(model=model_cfg, train=train)
    dist = init_distributed(train.backend)
    torch.manual_seed(0)
    model = Transformer(model_cfg)
    tiers = corpus_tiers()
    if data is None:
        data = TieredMemmapDataset(tiers, train.tier_weights, train.seq_len, train.micro_batch, seed=1234)
        if delay:
            data = SlowData(data, delay)
    val = ValidationWindows(tiers, train.seq_len, train.micro_batch)
    return Trainer(model=model, model_cfg=model_cfg, train_cfg=train, stage_dir=stage_dir, data=data,
                   stage_config=to_dict(stage_cfg), dist=dist, val_data=val, desc="test")


def driver_main(argv: list[str]) -> int:
    """Subprocess entry: train per a JSON spec {stage_dir, train, delay}; exit 128+signal if stopped by one."""
    spec = json.loads(argv[0])
    result = make_trainer(spec["stage_dir"], spec.get("train"), spec.get("delay", 0.0)).fit()
    return 128 + result.stopped_by_signal if result.stopped_by_signal else 0


def clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                           "MASTER_PORT")}
    env.update(PYTHONPATH=str(REPO), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", **extra)
    return env


def launch(spec: dict, **env) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(Path(__file__).resolve()), json.dumps(spec)], cwd=REPO,
                            env=clean_env(**env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for_step(stage_dir: Path, proc: subprocess.Popen, step: int, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        rows = read_metrics(stage_dir, "train")
        if rows and rows[-1]["step"] >= step:
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended before step {step}:\n{proc.stdout.read()}")
        time.sleep(0.05)
    raise AssertionError(f"step {step} not reached in {timeout} s")


def curve(stage_dir: Path) -> list[tuple]:
    return [(r["kind"], r["step"], r.get("loss"), r.get("grad_norm"), r.get("val_loss")) for r in read_metrics(stage_dir)]


# ---------------------------------------------------------------------------------------------------
# Pure functions
# ---------------------------------------------------------------------------------------------------


def test_cosine_schedule_values():
    cfg = TrainConfig(lr=3e-4, min_lr=3e-5, warmup_steps=2000, max_steps=12000)
    total = 12000
    assert lr_at(0, cfg, total) == pytest.approx(3e-4 / 2000)
    assert lr_at(999, cfg, total) == pytest.approx(3e-4 * 1000 / 2000)
    assert lr_at(1999, cfg, total) == pytest.approx(3e-4)
    assert lr_at(2000, cfg, total) == pytest.approx(3e-4)  # cosine starts at the peak
    mid = 2000 + (total - 1 - 2000) / 2
    assert lr_at(int(mid), cfg, total) == pytest.approx((3e-4 + 3e-5) / 2, rel=1e-3)
    assert lr_at(total - 1, cfg, total) == pytest.approx(3e-5)  # the floor at the last step
    assert lr_at(total + 50, cfg, total) == pytest.approx(3e-5)  # and beyond
    decay = [lr_at(s, cfg, total) for s in range(2000, total)]
    assert all(a >= b for a, b in zip(decay, decay[1:]))


def test_adamw_groups_exempt_norms_and_embeddings():
    torch.manual_seed(0)
    tied = Transformer(ModelConfig(**MODEL))
    groups, summary = adamw_param_groups(tied, weight_decay=0.1)
    names = {id(p): n for n, p in tied.named_parameters()}
    decay = sorted(names[id(p)] for p in groups[0]["params"])
    exempt = sorted(names[id(p)] for p in groups[1]["params"])
    assert groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0
    assert exempt == sorted(["tok_embeddings.weight", "norm.weight"] +
                            [f"layers.{i}.{n}.weight" for i in range(2) for n in ("attention_norm", "ffn_norm")])
    assert all(n.split(".")[-2] in ("wq", "wk", "wv", "wo", "w1", "w2", "w3") for n in decay) and len(decay) == 14
    untied = Transformer(ModelConfig(**{**MODEL, "tie_embeddings": False}))
    groups, _ = adamw_param_groups(untied, 0.1)
    assert any(p is untied.output.weight for p in groups[0]["params"])  # an untied lm_head is a projection: decays
    assert any(p is untied.tok_embeddings.weight for p in groups[1]["params"])


def test_deepspeed_config_builtin_and_file(tmp_path):
    cfg = TrainConfig(**{**TRAIN, "precision": "bf16"})
    ds = deepspeed_config(cfg, world_size=2)
    assert ds["train_batch_size"] == 2 * 2 * 2 and ds["gradient_accumulation_steps"] == 2
    assert ds["zero_optimization"]["stage"] == 2 and ds["bf16"]["enabled"] is True
    good = tmp_path / "ds.yaml"
    good.write_text("zero_optimization: {stage: 2}\ntrain_micro_batch_size_per_gpu: auto\n")
    assert deepspeed_config(TrainConfig(**{**TRAIN, "deepspeed_config": str(good)}), 1)["train_micro_batch_size_per_gpu"] == 2
    bad = tmp_path / "ds.json"
    bad.write_text(json.dumps({"train_micro_batch_size_per_gpu": 8, "optimizer": {"type": "Adam"},
                               "zero_optimization": {"stage": 1}}))
    with pytest.raises(Exception) as e:
        deepspeed_config(TrainConfig(**{**TRAIN, "deepspeed_config": str(bad)}), 1)
    text = str(e.value)
    assert "train_micro_batch_size_per_gpu=8" in text and "'optimizer' section" in text and "stage=1" in text
    shipped = REPO / "configs" / "deepspeed" / "zero2.json"
    assert deepspeed_config(TrainConfig(**{**TRAIN, "deepspeed_config": str(shipped)}), 2)["zero_optimization"]["stage"] == 2


# ---------------------------------------------------------------------------------------------------
# Loss normalization: the engine's update == a plain loop over one big weighted batch
# ---------------------------------------------------------------------------------------------------


class WeightedRows:
    """Rows by global row number with uneven per-token weights and ignored targets (SFT-like)."""

    def __init__(self, micro_batch: int, seq_len: int):
        self.micro_batch, self.seq_len = micro_batch, seq_len

    def row(self, step: int, row: int):
        rng = np.random.default_rng([step, row])
        tokens = torch.from_numpy(rng.integers(0, 97, self.seq_len + 1))
        weights = torch.from_numpy(rng.choice([0.0, 0.5, 1.0, 2.0], size=self.seq_len)).float()
        weights[: 4 * row] = 0.0  # rows carry very different total weight
        targets = tokens[1:].clone()
        targets[rng.random(self.seq_len) < 0.2] = -100
        return tokens[:-1], targets, weights

    def batch(self, step, micro_step, rank, world_size):
        rows = [self.row(step, r) for r in row_range(micro_step, rank, world_size, self.micro_batch)]
        return {"tokens": torch.stack([r[0] for r in rows]), "targets": torch.stack([r[1] for r in rows]),
                "weights": torch.stack([r[2] for r in rows])}

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def plain_loop_reference(steps: int, rows: int, lrs: list[float]) -> tuple[list[float], dict]:
    """Independent reference: full logits, F.cross_entropy, one batch of all rows, torch AdamW, clip."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**MODEL))
    src = WeightedRows(rows, TRAIN["seq_len"])
    no_decay = [p for n, p in model.named_parameters() if "norm" in n or "tok_embeddings" in n]
    decay = [p for n, p in model.named_parameters() if not ("norm" in n or "tok_embeddings" in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=lrs[0], betas=(0.9, 0.95), eps=1e-8)
    losses = []
    for step in range(steps):
        b = src.batch(step, 0, 0, 1)
        logits = model.output(model(b["tokens"])).float()
        per_token = torch.nn.functional.cross_entropy(logits.flatten(0, 1), b["targets"].flatten(), reduction="none",
                                                      ignore_index=-100)
        w = b["weights"].flatten() * (b["targets"].flatten() != -100)
        loss = (per_token * w).sum() / w.sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        for g in opt.param_groups:
            g["lr"] = lrs[step]
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("backend", ["deepspeed", "torch"])
def test_weighted_accumulation_equals_one_big_batch(tmp_path, backend):
    over = dict(micro_batch=2, grad_accum=3, max_steps=3, warmup_steps=1, eval_every=0, backend=backend)
    trainer = make_trainer(tmp_path / "acc", over, data=WeightedRows(2, TRAIN["seq_len"]))
    trainer.fit()
    lrs = [3e-3, 3e-3, 3e-4]  # warmup 1 step, then cosine from lr at step 1 to min_lr at the last step
    ref_losses, ref_weights = plain_loop_reference(3, rows=6, lrs=lrs)
    losses = [r["loss"] for r in read_metrics(tmp_path / "acc", "train")]
    assert losses == pytest.approx(ref_losses, rel=1e-5)
    weights = trainer.backend.full_state_dict()
    for name, ref in ref_weights.items():
        torch.testing.assert_close(weights[name], ref, rtol=1e-4, atol=2e-6, msg=name)


def test_activation_checkpointing_changes_memory_not_math():
    """Recomputed blocks give the same loss and gradients (fp32, CPU: bit for bit) and keep parameter names."""
    from dante.engine import LossModule
    from dante.transforms import apply_activation_checkpointing

    grads = []
    for checkpointed in (False, True):
        torch.manual_seed(0)
        model = Transformer(ModelConfig(**MODEL))
        names = [n for n, _ in model.named_parameters()]
        if checkpointed:
            apply_activation_checkpointing(model)
            assert [n for n, _ in model.named_parameters()] == names
        tokens = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(1))
        loss_sum, weight = LossModule(model, 16)(tokens[:, :-1], tokens[:, 1:])
        (loss_sum / weight).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        assert torch.equal(grads[0][name], grads[1][name]), name


def test_fp8_on_cpu_is_refused_clearly():
    from dante.errors import UserError
    from dante.transforms import apply_fp8

    with pytest.raises(UserError, match="compute capability >= 8.9"):
        apply_fp8(Transformer(ModelConfig(**MODEL)), torch.device("cpu"))


# ---------------------------------------------------------------------------------------------------
# Checkpoints: layout, load_model, refusal, divergence
# ---------------------------------------------------------------------------------------------------


def test_checkpoint_layout_and_load_model(tmp_path):
    trainer = make_trainer(tmp_path / "s", {"max_steps": 4, "checkpoint_every": 1, "keep_last": 2})
    result = trainer.fit()
    root = tmp_path / "s" / ckpt.CHECKPOINTS
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-0000003", "step-0000004"]  # keep_last 2
    assert (root / "latest").read_text().strip() == "step-0000004" == Path(result.checkpoint).name
    step_dir = root / "step-0000004"
    assert {p.name for p in step_dir.iterdir()} == {"model.safetensors", "model_config.json", "train_state", "meta.json"}
    meta = json.loads((step_dir / "meta.json").read_text())
    assert meta["step"] == 4 and meta["tokens_seen"] == 4 * 2 * 24 * 2 and meta["data"]["seed"] == 1234
    assert meta["loss"] == read_metrics(tmp_path / "s", "train")[-1]["loss"]
    from safetensors.torch import load_file

    assert "output.weight" not in load_file(str(step_dir / "model.safetensors"))  # tied: stored once
    model, model_cfg, meta2 = ckpt.load_model(tmp_path / "s")
    assert model_cfg == ModelConfig(**MODEL) and meta2 == meta and model.output.weight is model.tok_embeddings.weight
    live = trainer.backend.full_state_dict()
    for name, p in model.named_parameters():
        assert torch.equal(p, live[name]), name
    tokens = torch.randint(0, 97, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), trainer.backend.model(tokens), rtol=0, atol=0)


def test_resume_with_another_config_is_refused_naming_keys(tmp_path):
    make_trainer(tmp_path / "s", {"max_steps": 2, "checkpoint_every": 1}).fit()
    with pytest.raises(ckpt.CheckpointError) as e:
        make_trainer(tmp_path / "s", {"max_steps": 2, "checkpoint_every": 1, "lr": 1e-3, "grad_clip": 0.5}).fit()
    assert "train.lr (0.003 -> 0.001)" in str(e.value) and "train.grad_clip" in str(e.value)
    # operational keys may change: resuming with another log interval is fine
    make_trainer(tmp_path / "s", {"max_steps": 2, "checkpoint_every": 1, "log_every": 5}).fit()


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    # lr 1e30: the first update sends the weights to ~1e30, the next forward overflows to inf/nan
    trainer = make_trainer(tmp_path / "s", {"lr": 1e30, "min_lr": 1e30, "warmup_steps": 0, "checkpoint_every": 1,
                                           "grad_clip": 0.0, "eval_every": 0})
    with pytest.raises(TrainingDiverged) as e:
        trainer.fit()
    message = str(e.value)
    # the loss (or, when only the backward overflows, the gradient norm) of the 2nd update is not finite
    assert re.search(r"training diverged at step 2: (loss|gradient norm) is (nan|inf)", message), message
    assert "the last good checkpoint is" in message and "step-0000001" in message
    root = tmp_path / "s" / ckpt.CHECKPOINTS
    assert ckpt.latest_checkpoint(root).name == "step-0000001"
    assert math.isfinite(json.loads((root / "step-0000001" / "meta.json").read_text())["loss"])


# ---------------------------------------------------------------------------------------------------
# Real processes: 2 ranks, SIGTERM and SIGKILL
# ---------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_zero2_match_one_rank_with_double_accumulation(tmp_path):
    """ZeRO-2 over 2 gloo ranks with accumulation 1 == 1 rank with accumulation 2 (same rows by design).

    Tolerance 1e-5 relative: the sums run in another order (all-reduce vs accumulation in .grad), which
    moves fp32 results by a few ulps that Adam then carries along; measured max difference ~1e-7.
    """
    port = str(_free_port())
    spec = {"stage_dir": str(tmp_path / "two"), "train": {"grad_accum": 1}}
    procs = [launch(spec, RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
             for r in range(2)]
    make_trainer(tmp_path / "one", {"grad_accum": 2}).fit()
    for p in procs:
        out, _ = p.communicate(timeout=180)
        assert p.returncode == 0, out
    one, two = curve(tmp_path / "one"), curve(tmp_path / "two")
    assert [r[:2] for r in one] == [r[:2] for r in two] and len(one) == 6 + 2
    for a, b in zip(one, two):
        for x, y in zip(a[2:], b[2:]):
            assert (x is None and y is None) or x == pytest.approx(y, rel=1e-5), (a, b)
    meta = json.loads((tmp_path / "two" / "checkpoints" / "step-0000006" / "meta.json").read_text())
    assert meta["world_size"] == 2
    assert len(list((tmp_path / "two" / "checkpoints" / "step-0000006" / "train_state" / "deepspeed").glob("*optim_states.pt"))) == 2


def test_sigkill_then_sigterm_then_resume_reproduce_the_uninterrupted_curve(tmp_path):
    over = {"max_steps": 12, "checkpoint_every": 3, "eval_every": 4}
    run = tmp_path / "run"
    spec = {"stage_dir": str(run), "train": over, "delay": 0.15}

    proc = launch(spec)  # 1) SIGKILL (no chance to save) after the step-3 checkpoint
    wait_for_step(run, proc, 5)
    proc.kill()
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL

    proc = launch(spec)  # 2) resume, then SIGTERM: a checkpoint at the current step and a clean exit 128 + 15
    wait_for_step(run, proc, 8)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, out
    resumed = re.search(r"resumed from checkpoint step (\d+)", out)
    assert resumed and int(resumed.group(1)) in (3, 6) and "stop signal received" in out, out  # 6: killed late
    stopped_at = read_metrics(run, "train")[-1]["step"]
    assert ckpt.latest_checkpoint(run / "checkpoints").name == ckpt.step_dir_name(stopped_at)

    make_trainer(run, over).fit()  # 3) resume to the end (in this process), and the uninterrupted run
    make_trainer(tmp_path / "ref", over).fit()
    assert curve(run) == curve(tmp_path / "ref")  # bit-identical losses, grad norms and val losses, step by step


# ---------------------------------------------------------------------------------------------------
# The stage script: inputs checked before any work, a real short run, completion
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shard_run(tmp_path_factory):
    """A run folder with 02_tokenizer (a throwaway tokenizer) and 03_shards written by dante.shards' writer."""
    from dante.config import RunConfig
    from tests.helpers import write_pretrain_inputs

    run = RunConfig(name="p", root=str(tmp_path_factory.mktemp("runs")), seed=5)
    return run, write_pretrain_inputs(run)


def run_pretrain_script(*argv: str) -> int:
    import runpy

    saved = sys.argv
    sys.argv = ["4_pretrain.py", *argv]
    try:
        runpy.run_path(str(REPO / "4_pretrain.py"), run_name="__main__")
    except SystemExit as e:
        return e.code
    finally:
        sys.argv = saved
    return 0


def test_pretrain_script_checks_inputs_then_trains_and_finishes(shard_run, tmp_path, capsys):
    run, vocab = shard_run
    import yaml

    def write_config(name: str) -> Path:
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump({
            "run": {"name": name, "root": run.root, "seed": 5},
            "model": {**MODEL, "vocab_size": vocab, "max_seq_len": 64},
            "train": {**TRAIN, "max_steps": 4, "checkpoint_every": 2, "eval_every": 2, "tier_weights": {1: 2.0, 2: 1.0}},
        }))
        return path

    cfg = write_config(run.name)
    stage = Path(run.root) / run.name / "04_pretrain"

    code = run_pretrain_script("--config", str(cfg), "--set", "model.vocab_size=999", "--set", "model.max_seq_len=2000000",
                               "--set", "train.seq_len=1000000", "--set", "train.tier_weights={1: 1.0, 3: 1.0}")
    err = capsys.readouterr().err
    assert code == 2
    for needle in (f"model.vocab_size=999 but the tokenizer has {vocab} tokens", "tier 1: seq_len + 1 = 1000001 tokens exceed",
                   "tier 3 has weight 1.0 but no training shards"):
        assert needle in err, err
    assert not (stage / "manifest.json").exists() and not (stage / "checkpoints").exists()

    assert run_pretrain_script("--config", str(write_config("no-stages"))) == 2
    assert "python 2_train_tokenizer.py" in capsys.readouterr().err  # the first missing input names its script

    assert run_pretrain_script("--config", str(cfg), "--dry-run") == 0
    assert "tokens per optimizer step" in capsys.readouterr().out and not (stage / "checkpoints").exists()

    assert run_pretrain_script("--config", str(cfg)) == 0
    manifest = json.loads((stage / "manifest.json").read_text())
    assert manifest["counts"]["steps"] == 4 and manifest["counts"]["tokens_seen"] == 4 * 2 * 24 * 2
    assert manifest["outputs"]["checkpoint"].endswith("step-0000004") and "02_tokenizer" in manifest["inputs"]
    assert [r["step"] for r in read_metrics(stage, "val")] == [2, 4]
    assert run_pretrain_script("--config", str(cfg)) == 0
    assert "already complete" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------
# The real script as a subprocess: validation before --force, byte-identical files after kills
# ---------------------------------------------------------------------------------------------------

SLOW_PRETRAIN = """
import os, runpy, sys, time
from dante.pretrain_data import TieredMemmapDataset
original = TieredMemmapDataset.batch
def slow(self, *args):
    time.sleep(float(os.environ["DANTE_TEST_DELAY"]))
    return original(self, *args)
TieredMemmapDataset.batch = slow
sys.argv = ["4_pretrain.py"] + sys.argv[1:]
runpy.run_path("4_pretrain.py", run_name="__main__")
"""


def own_inputs(shard_run, root: Path) -> tuple[Path, Path]:
    """A copy of the module's 02_tokenizer and 03_shards under ``root`` and a stage 4 config for it."""
    import shutil

    import yaml

    run, vocab = shard_run
    for name in ("02_tokenizer", "03_shards"):
        shutil.copytree(Path(run.root) / run.name / name, root / run.name / name)
    cfg = root / "pretrain.yaml"
    cfg.write_text(yaml.safe_dump({
        "run": {"name": run.name, "root": str(root), "seed": 5},
        "model": {**MODEL, "vocab_size": vocab, "max_seq_len": 64},
        "train": {**TRAIN, "max_steps": 6, "checkpoint_every": 2, "eval_every": 2, "tier_weights": {1: 2.0, 2: 1.0}},
    }))
    return cfg, root / run.name / "04_pretrain"


def pretrain_process(*argv: str, delay: float = 0.0) -> subprocess.Popen:
    """4_pretrain.py in its own process (with ``delay`` seconds per micro-batch, so that a kill lands mid-run)."""
    args = ["-c", SLOW_PRETRAIN] if delay else [str(REPO / "4_pretrain.py")]
    return subprocess.Popen([sys.executable, *args, *argv], cwd=REPO, env=clean_env(DANTE_TEST_DELAY=str(delay)),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def tree_state(folder: Path) -> dict[str, tuple]:
    """Every entry under ``folder``: (mode, bytes) of files, mode of folders: what "unchanged" means."""
    return {p.relative_to(folder).as_posix(): (p.stat().st_mode, p.read_bytes() if p.is_file() else None)
            for p in sorted(folder.rglob("*"))}


def test_force_with_a_wrong_vocab_size_leaves_the_finished_stage_byte_identical(shard_run, tmp_path):
    cfg, stage = own_inputs(shard_run, tmp_path)
    assert run_pretrain_script("--config", str(cfg)) == 0
    before = tree_state(stage)
    proc = pretrain_process("--config", str(cfg), "--force", "--set", "model.vocab_size=999")
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2, out
    assert "model.vocab_size=999 but the tokenizer has" in out and "Traceback" not in out, out
    assert tree_state(stage) == before  # validated before --force reset anything


def _kill_at(proc: subprocess.Popen, stage: Path, step: int, extra_s: float) -> None:
    wait_for_step(stage, proc, step)
    time.sleep(extra_s)
    proc.kill()
    proc.wait(timeout=60)
    proc.stdout.close()


def test_sigkill_twice_then_resume_gives_byte_identical_checkpoint_files(shard_run, tmp_path):
    """Killed before its first checkpoint, then at a seeded random point after it (possibly mid-save), rerun
    with only train.log_every changed (allowed: it does not change the training): the final checkpoint's
    files equal an uninterrupted run's byte for byte (meta.json: but for its "saved" time, run.root and the
    logging key),
    and TensorBoard holds every step once."""
    import random as _random

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ref_cfg, reference = own_inputs(shard_run, tmp_path / "reference")  # uninterrupted, in this process
    assert run_pretrain_script("--config", str(ref_cfg)) == 0
    cfg, stage = own_inputs(shard_run, tmp_path / "killed")

    rng = _random.Random(13)
    delay = 0.15  # per micro-batch, 2 per step: each kill below lands within the step after the one it waits for
    _kill_at(pretrain_process("--config", str(cfg), delay=delay), stage, 1, rng.uniform(0, 0.1))
    assert ckpt.latest_checkpoint(stage / ckpt.CHECKPOINTS) is None  # before the first checkpoint (step 2)
    kill_step = rng.randint(3, 5)
    _kill_at(pretrain_process("--config", str(cfg), delay=delay), stage, kill_step, rng.uniform(0, 0.2))
    resumed_from = ckpt.latest_checkpoint(stage / ckpt.CHECKPOINTS)
    assert resumed_from is not None and not (stage / "manifest.json").exists()

    start = ckpt.read_meta(resumed_from)["step"]
    proc = pretrain_process("--config", str(cfg), "--set", "train.log_every=2")
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0, out
    assert "resuming unfinished run" in out and f"resumed from checkpoint step {start}" in out, out

    final = "checkpoints/step-0000006"
    ours, theirs = tree_state(stage / final), tree_state(reference / final)
    assert sorted(ours) == sorted(theirs)
    for rel in sorted(ours, key=lambda r: r.endswith(ckpt.META)):  # meta.json last: it records the others
        if rel.endswith(ckpt.META):
            a, b = (json.loads(t[rel][1]) for t in (ours, theirs))
            for m in (a, b):
                m.pop("saved")
                m["config"]["train"].pop("log_every")
                m["config"]["run"].pop("root")  # the two runs' folders
            assert a == b
        else:
            assert ours[rel] == theirs[rel], rel
    events = EventAccumulator(str(stage / "tensorboard"))
    events.Reload()
    logged = list(range(1, start + 1)) + [s for s in range(start + 1, 7) if s % 2 == 0]  # log_every 1, then 2
    assert [e.step for e in events.Scalars("train/loss")] == logged
    assert [e.step for e in events.Scalars("val/loss")] == [2, 4, 6]


if __name__ == "__main__":
    sys.exit(driver_main(sys.argv[1:]))
