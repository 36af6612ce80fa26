"""Stage 5 (context extension): the extended config is what transformers expects, the stage end to end
(weights from stage 4, fresh optimizer, scaling in every checkpoint, long-context report before and after),
exact resume after SIGKILL, and the bad inputs of the issue.

The pipeline is real and tiny: a tokenizer trained here (dante.tokenizer), stage 3 shards written with
dante.shards' writer from the embedded sample text, stage 4 trained for a few steps by the real engine
(dante.engine.Trainer, which saves through dante.checkpoint), and stage 5 through 5_extend_context.py (in
this process, or as a subprocess where it must be killed).
"""

from __future__ import annotations

import logging
import math
import os
import runpy
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

os.environ.setdefault("DS_ACCELERATOR", "cpu")
torch.set_num_threads(1)

from dante import config as C  # noqa: E402
from dante.artifacts import Stage, load_texts, read_json, stage_dir  # noqa: E402
from dante.checkpoint import CHECKPOINTS, load_model  # noqa: E402
from dante.cli import run_stage  # noqa: E402
from dante.distributed import init_distributed  # noqa: E402
from dante.engine import Trainer  # noqa: E402
from dante.errors import UserError  # noqa: E402
from dante.export.hf_format import llama_config_kwargs  # noqa: E402
from dante.extend import extended_model_config, extension_problems, load_weights_as, long_rows, trained_length  # noqa: E402
from dante.metrics import read_metrics  # noqa: E402
from dante.model import Transformer  # noqa: E402
from dante.pretrain_data import TieredMemmapDataset  # noqa: E402
from dante.tokenizer import train_tokenizer  # noqa: E402
from tests.helpers import write_text_shards, write_tokenizer_stage  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "data" / "sample"
ORIGINAL, NEW = 128, 256  # stage 4 length -> stage 5 length (factor 2, as the tiny profile)
MODEL = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=ORIGINAL, multiple_of=32)
PRETRAIN = dict(seq_len=ORIGINAL, micro_batch=4, max_steps=40, lr=3e-3, min_lr=3e-4, warmup_steps=5, precision="fp32",
                backend="torch", checkpoint_every=40, eval_every=0, log_every=10, tier_weights={1: 1.0, 2: 1.0})
EXTEND_TRAIN = dict(seq_len=NEW, micro_batch=2, grad_accum=2, max_steps=12, lr=1e-3, min_lr=1e-3, warmup_steps=2,
                    weight_decay=0.0, precision="fp32", backend="torch", checkpoint_every=4, keep_last=2, eval_every=4,
                    eval_batches=2, log_every=1, tier_weights={1: 1.0, 2: 1.0})
LONG_EVAL = dict(lengths=[192, NEW], depths=[0.5], trials=2, bucket_size=32, max_docs=2, distractors=3)


# ---------------------------------------------------------------------------------------------------
# The config transformers must accept
# ---------------------------------------------------------------------------------------------------


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def hf_config_with_warnings(cfg: C.ModelConfig):
    """transformers.LlamaConfig built from the Dante config by the exporter's mapping, and its warnings."""
    from transformers import LlamaConfig

    handler, hf_logger = _Records(), logging.getLogger("transformers")  # it does not propagate to root
    hf_logger.addHandler(handler)
    try:
        return LlamaConfig(**llama_config_kwargs(cfg)), handler.messages
    finally:
        hf_logger.removeHandler(handler)


@pytest.mark.parametrize("mode,factor,original,head_dim", [("yarn", 4.0, 2048, 128), ("yarn", 2.0, 256, 32),
                                                           ("linear", 4.0, 2048, 64)])
def test_extended_config_is_what_transformers_expects(mode, factor, original, head_dim):
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    base = C.ModelConfig(dim=head_dim * 2, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=64, max_seq_len=original,
                         rope_theta=500000.0)
    new = extended_model_config(base, C.ExtendConfig(mode=mode, factor=factor), original)
    assert new.max_seq_len == int(factor * original)
    assert C.to_dict(new) == {**C.to_dict(base), "max_seq_len": new.max_seq_len, "rope_scaling": new.rope_scaling}
    expected = {"rope_type": mode, "factor": factor}
    if mode == "yarn":
        expected.update(original_max_position_embeddings=original, beta_fast=32.0, beta_slow=1.0)
    assert new.rope_scaling == expected
    hf, warnings = hf_config_with_warnings(new)
    assert warnings == []  # no unknown key, and factor == max_position_embeddings / original
    assert {k: hf.rope_parameters[k] for k in expected} == expected
    # the same cos/sin as transformers' rotary embedding, beyond the original context too
    model = Transformer(new)
    positions = torch.tensor([[0, 1, original - 1, original, original + 17, new.max_seq_len - 1]])
    cos_hf, sin_hf = LlamaRotaryEmbedding(hf)(torch.zeros(1, dtype=torch.float32), positions)
    half = head_dim // 2
    torch.testing.assert_close(model.rope_cos[positions[0]], cos_hf[0, :, :half], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(model.rope_sin[positions[0]], sin_hf[0, :, :half], rtol=1e-6, atol=1e-6)


def test_a_length_that_disagrees_with_the_factor_is_what_transformers_warns_about():
    """The control for the test above: the case extension_problems refuses does warn in transformers."""
    base = C.ModelConfig(dim=64, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=64, max_seq_len=256)
    ok = extended_model_config(base, C.ExtendConfig(mode="yarn", factor=2.0), 256)
    _, warnings = hf_config_with_warnings(C.ModelConfig(**{**C.to_dict(ok), "max_seq_len": 768}))
    assert any("does not match" in w for w in warnings), warnings
    problems = extension_problems(base, C.ExtendConfig(mode="yarn", factor=2.0, new_max_seq_len=768), 256)
    assert len(problems) == 1 and "disagrees with extend.factor=2.0" in problems[0] and "768" in problems[0]


@pytest.mark.parametrize("extend,needle", [
    (dict(factor=1.0), "extend.factor=1.0: must be > 1"),
    (dict(factor=0.5, mode="linear"), "extend.factor=0.5: must be > 1"),
    (dict(factor=2.0, new_max_seq_len=256), "must exceed the stage 4 training length 256"),
    (dict(factor=2.0, new_max_seq_len=200), "must exceed the stage 4 training length 256"),
    (dict(factor=1.3), "not a whole number of tokens"),
])
def test_bad_extensions_are_named(extend, needle):
    base = C.ModelConfig(dim=64, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=64, max_seq_len=256)
    with pytest.raises(UserError, match="cannot extend the context") as info:
        extended_model_config(base, C.ExtendConfig(**extend), 256)
    assert needle in str(info.value)
    scaled = C.ModelConfig(**{**C.to_dict(base), "rope_scaling": {"rope_type": "linear", "factor": 2.0}, "max_seq_len": 512})
    assert "already has rope_scaling" in extension_problems(scaled, C.ExtendConfig(), 256)[0]


def test_long_rows_take_whole_long_documents_first_then_concatenate():
    docs = [np.arange(1000, 1005), np.arange(2000, 2300), np.arange(3000, 3020), np.arange(4000, 4400)]
    rows, whole = long_rows(docs, 100, 3, bos_id=0, eos_id=1)
    assert whole == 2 and len(rows) == 2  # the two short ones (27 tokens with separators) fill no row
    assert rows[0] == [0] + list(range(4000, 4099)) and rows[1] == [0] + list(range(2000, 2099))
    many = docs + [np.arange(5000 + 100 * i, 5000 + 100 * i + 60) for i in range(4)]
    rows, whole = long_rows(many, 100, 3, bos_id=0, eos_id=1)
    assert whole == 2 and len(rows) == 3 and all(len(r) == 100 for r in rows)
    assert rows[2][:62] == [0] + list(range(5000, 5060)) + [1]  # longest short documents first, BOS/EOS between


def test_original_length_is_the_length_stage4_trained_at():
    base = C.ModelConfig(max_seq_len=512)
    assert trained_length(base, {"config": {"train": {"seq_len": 256}}}) == 256  # YaRN's "seen" context
    assert trained_length(base, {}) == 512  # not recorded: the model's context
    new = extended_model_config(base, C.ExtendConfig(factor=2.0), 256)
    assert new.max_seq_len == 512 and new.rope_scaling["original_max_position_embeddings"] == 256


def test_config_refuses_unknown_scaling_and_bad_values():
    with pytest.raises(C.ConfigError) as info:
        C.load_config(C.ExtendStageConfig, None, ["extend.mode=ntk", "extend.factor=1", "extend.new_max_seq_len=128",
                                                  "train.seq_len=256", "train.max_steps=1", "long_eval.lengths=[512]"])
    text = str(info.value)
    for needle in ("extend.mode: 'ntk' is not one of ['yarn', 'linear', 'continued']", "extend.factor=1.0: must be > 1",
                   "train.seq_len=256 exceeds extend.new_max_seq_len=128", "long_eval.lengths=[512]: longer than"):
        assert needle in text, text
    with pytest.raises(C.ConfigError, match="beta_slow < beta_fast"):
        C.load_config(C.ExtendStageConfig, None, ["extend.beta_fast=1", "extend.beta_slow=2", "train.max_steps=1"])


# ---------------------------------------------------------------------------------------------------
# The tiny pipeline: 02_tokenizer, 03_shards, 04_pretrain made by the real writers and engine
# ---------------------------------------------------------------------------------------------------


def write_shard_stage(run: C.RunConfig, tokenizer) -> None:
    """03_shards with dante.shards' writer: tier 1 = Italian sample, tier 2 = code, val = held-out text."""
    st = Stage.open(C.ShardsStageConfig(run=run), "03_shards", force=True)
    st.require("02_tokenizer")
    tok_path = stage_dir(run, "02_tokenizer") / "tokenizer.json"
    streams = {(1, "train"): load_texts(SAMPLE / "it-diodati.jsonl.gz")[:40],
               (2, "train"): load_texts(SAMPLE / "code-cpython.jsonl.gz")[:6],
               (1, "val"): load_texts(SAMPLE / "heldout" / "it.jsonl.gz")[:20] + load_texts(SAMPLE / "heldout" / "code.jsonl.gz")[:3]}
    write_text_shards(st, tokenizer, tok_path, streams)


def write_pretrain_stage(run: C.RunConfig, vocab_size: int) -> None:
    """04_pretrain trained for a few steps by the real engine (checkpoints via dante.checkpoint)."""
    cfg = C.PretrainStageConfig(run=run, model=C.ModelConfig(vocab_size=vocab_size, **MODEL), train=C.TrainConfig(**PRETRAIN))
    st = Stage.open(cfg, "04_pretrain", force=True)
    st.require("02_tokenizer")
    st.require("03_shards")
    t = cfg.train
    data = TieredMemmapDataset.from_stage_dir(stage_dir(run, "03_shards"), t.tier_weights, t.seq_len, t.micro_batch,
                                              run.seed)
    torch.manual_seed(run.seed)
    result = Trainer(model=Transformer(cfg.model), model_cfg=cfg.model, train_cfg=t, stage_dir=st.dir, data=data,
                     stage_config=C.to_dict(cfg), dist=init_distributed("torch"), desc="04_pretrain").fit()
    st.finish(outputs={"checkpoint": result.checkpoint})


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    texts = load_texts(SAMPLE / "heldout" / "it.jsonl.gz") + load_texts(SAMPLE / "heldout" / "code.jsonl.gz")
    tokenizer = train_tokenizer(texts, vocab_size=800, n_reserved=8, pinned_chars=[])
    root = tmp_path_factory.mktemp("runs")
    run = C.RunConfig(name="t", root=str(root / "a"), seed=7)
    write_tokenizer_stage(run, tokenizer)
    write_shard_stage(run, tokenizer)
    write_pretrain_stage(run, tokenizer.get_vocab_size())
    return {"run": run, "root": root, "tokenizer": tokenizer}


def copy_run(pipeline, root_name: str, without=("05_extend",)) -> C.RunConfig:
    """A copy of the pipeline's run folder under another run.root (run.root never changes the math)."""
    src = C.RunConfig(**{**C.to_dict(pipeline["run"])})
    dst = C.RunConfig(name=src.name, root=str(pipeline["root"] / root_name), seed=src.seed)
    shutil.copytree(Path(src.root) / src.name, Path(dst.root) / dst.name,
                    ignore=lambda d, names: [n for n in names if n in without])
    return dst


def extend_config(run: C.RunConfig, path: Path, extend: dict | None = None, long_eval: dict | None = None,
                  **train_over) -> Path:
    data = {"run": C.to_dict(run), "extend": {"mode": "yarn", "factor": 2.0, **(extend or {})},
            "train": {**EXTEND_TRAIN, **train_over}, "long_eval": {**LONG_EVAL, **(long_eval or {})}}
    path.write_text(yaml.safe_dump(data))
    return path


def run_extend(argv: list[str]) -> int:
    """5_extend_context.py's main through the real CLI (run_stage), in this process; returns the exit code."""
    ns = runpy.run_path(str(ROOT / "5_extend_context.py"), run_name="extend_test")
    return run_stage("05_extend", "stage 5", ns["main"], validate=ns["validate"], dry_run=ns["dry_run"],
                     resume_check=ns["training_resume_check"], argv=argv)


def curve(stage_path: Path) -> list[tuple]:
    return [(r["kind"], r["step"], r.get("loss"), r.get("grad_norm"), r.get("val_loss")) for r in read_metrics(stage_path)]


@pytest.fixture(scope="module")
def extended(pipeline):
    """One complete yarn stage 5 run (shared by the end-to-end and resume tests)."""
    run = copy_run(pipeline, "yarn")
    cfg = extend_config(run, pipeline["root"] / "yarn.yaml")
    t0 = time.time()
    assert run_extend(["--config", str(cfg)]) == 0
    return {"run": run, "config": cfg, "seconds": time.time() - t0}


# ---------------------------------------------------------------------------------------------------
# End to end
# ---------------------------------------------------------------------------------------------------


def test_stage5_end_to_end_report_checkpoints_and_fresh_training(extended, pipeline):
    run = extended["run"]
    out = stage_dir(run, "05_extend")
    manifest = read_json(out / "manifest.json")
    assert manifest["stage"] == "05_extend" and {"02_tokenizer", "03_shards", "04_pretrain"} <= set(manifest["inputs"])
    # every checkpoint carries the extension in its model config
    steps = sorted((out / CHECKPOINTS).glob("step-*"))
    assert [p.name for p in steps] == ["step-0000008", "step-0000012"]
    for step in steps:
        mc = read_json(step / "model_config.json")
        assert mc["max_seq_len"] == NEW and mc["rope_scaling"] == {
            "rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": ORIGINAL, "beta_fast": 32.0,
            "beta_slow": 1.0}
    model, model_cfg, meta = load_model(out)
    assert meta["step"] == 12 and meta["tokens_seen"] == 12 * 2 * 2 * NEW

    # fresh schedule: warmup from step 1 of stage 5; weights from stage 4: the first loss is the stage 4
    # model's loss under the new scaling on stage 5's first batch (a plain forward as the reference)
    train = read_metrics(out, "train")
    assert [r["step"] for r in train] == list(range(1, 13))
    assert train[0]["lr"] == pytest.approx(1e-3 / 2) and train[1]["lr"] == pytest.approx(1e-3)
    base = load_model(stage_dir(run, "04_pretrain"))[0]
    ref_model = load_weights_as(stage_dir(run, "04_pretrain") / CHECKPOINTS / "step-0000040", model_cfg)
    assert torch.equal(ref_model.tok_embeddings.weight, base.tok_embeddings.weight)
    data = TieredMemmapDataset.from_stage_dir(stage_dir(run, "03_shards"), {1: 1.0, 2: 1.0}, NEW, 2, run.seed)
    with torch.no_grad():
        losses = [F.cross_entropy(ref_model.logits(ref_model(b["tokens"])).flatten(0, 1), b["targets"].flatten(),
                                  reduction="sum") for b in (data.batch(0, m, 0, 1) for m in range(2))]
    assert train[0]["loss"] == pytest.approx(float(sum(losses)) / (2 * 2 * NEW), rel=1e-5)
    assert train[-1]["loss"] < train[0]["loss"]

    # the report: perplexity by position and passkey accuracy, before and after
    report = read_json(out / "long_context.json")
    assert [e["key"] for e in report["evaluations"]] == ["stage4", "stage4_scaled", "after"]
    assert report["original_length"] == ORIGINAL and report["new_length"] == NEW and report["mode"] == "yarn"
    for e in report["evaluations"]:
        pos = e["long_context"]["position"]
        assert pos["length"] == NEW and pos["bucket_start"] == list(range(0, NEW, 32)) and pos["sequences"] == 2
        assert all(math.isfinite(x) and x > 0 for x in pos["ppl"])
        pk = e["long_context"]["passkey"]
        assert {(c["length"], c["depth"]) for c in pk["cells"]} == {(192, 0.5), (NEW, 0.5)}
        assert 0 <= pk["rank_accuracy"] <= 1 and pk["candidates"] == 4
        assert set(e["summary"]) == {"ppl_within_original", "ppl_beyond_original"}
    assert report["evaluations"][0]["rope_scaling"] == {} and report["evaluations"][2]["rope_scaling"]["rope_type"] == "yarn"
    md = (out / "long_context.md").read_text()
    assert "Perplexity by position" in md and "Passkey retrieval" in md and "stage 4, original RoPE" in md
    assert (out / "long_context.png").stat().st_size > 1000
    assert not (out / "progress.json").exists()
    # a finished stage is a no-op
    assert run_extend(["--config", str(extended["config"])]) == 0


@pytest.mark.parametrize("mode,expected", [("continued", {}), ("linear", {"rope_type": "linear", "factor": 2.0})])
def test_other_modes_store_their_scaling(pipeline, mode, expected):
    run = copy_run(pipeline, mode)
    heldout = {"en": str(SAMPLE / "heldout" / "en.jsonl.gz")}  # evaluation text from files instead of shards
    cfg = extend_config(run, pipeline["root"] / f"{mode}.yaml", {"mode": mode, "heldout": heldout}, max_steps=2,
                        eval_every=0)
    assert run_extend(["--config", str(cfg)]) == 0
    out = stage_dir(run, "05_extend")
    mc = read_json(out / CHECKPOINTS / "step-0000002" / "model_config.json")
    assert mc["max_seq_len"] == NEW and mc["rope_scaling"] == expected
    report = read_json(out / "long_context.json")
    assert [e["key"] for e in report["evaluations"]] == (
        ["stage4", "after"] if mode == "continued" else ["stage4", "stage4_scaled", "after"])
    assert report["eval_source"] == f"held-out files en={heldout['en']}"


# ---------------------------------------------------------------------------------------------------
# Resume after SIGKILL
# ---------------------------------------------------------------------------------------------------

# Runs the real script as __main__ with every training micro-batch slowed down, so that the test can kill
# it between two checkpoints.
SLOW_DRIVER = """
import runpy, sys, time
from dante.pretrain_data import TieredMemmapDataset
original = TieredMemmapDataset.batch
def slow(self, *args):
    time.sleep(0.15)
    return original(self, *args)
TieredMemmapDataset.batch = slow
sys.argv = ["5_extend_context.py"] + sys.argv[1:]
runpy.run_path("5_extend_context.py", run_name="__main__")
"""


def test_sigkill_then_rerun_continues_the_same_loss_curve(extended, pipeline):
    run = copy_run(pipeline, "killed")
    cfg = extend_config(run, pipeline["root"] / "killed.yaml")
    env = {**{k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                               "MASTER_PORT")},
           "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    proc = subprocess.Popen([sys.executable, "-c", SLOW_DRIVER, "--config", str(cfg)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = stage_dir(run, "05_extend")
    deadline = time.time() + 120
    try:
        while time.time() < deadline:  # past the step-4 checkpoint, before the step-8 one
            rows = read_metrics(out, "train")
            if rows and rows[-1]["step"] >= 5:
                break
            assert proc.poll() is None, proc.stdout.read()
            time.sleep(0.02)
        else:
            raise AssertionError("stage 5 did not reach step 5 in time")
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
        proc.stdout.close()
    assert not (out / "manifest.json").exists() and (out / CHECKPOINTS / "step-0000004" / "meta.json").exists()
    assert not (out / CHECKPOINTS / "step-0000008").exists()
    assert run_extend(["--config", str(cfg)]) == 0
    assert read_json(out / "manifest.json")["resumed"] is True
    assert curve(out) == curve(stage_dir(extended["run"], "05_extend"))
    ours, reference = read_json(out / "long_context.json"), read_json(stage_dir(extended["run"], "05_extend") / "long_context.json")
    assert [e["long_context"] for e in ours["evaluations"]] == [e["long_context"] for e in reference["evaluations"]]
    assert ours["training"]["resumed_from"] == 4


# ---------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------


def test_bad_input_gives_clear_errors_and_marks_nothing_done(pipeline, capsys):
    run = copy_run(pipeline, "bad")
    out = stage_dir(run, "05_extend")
    cases = [
        ({"factor": 1.0}, "extend.factor=1.0: must be > 1"),
        ({"factor": 2.0, "new_max_seq_len": ORIGINAL}, f"must exceed the stage 4 training length {ORIGINAL}"),
        ({"factor": 2.0, "new_max_seq_len": 384}, "disagrees with extend.factor=2.0"),
        ({"mode": "dynamic"}, "extend.mode: 'dynamic' is not one of ['yarn', 'linear', 'continued']"),
        ({"heldout": {"it": "nowhere.jsonl"}}, "extend.heldout.it: nowhere.jsonl not found"),
    ]
    for i, (extend, needle) in enumerate(cases):
        cfg = extend_config(run, pipeline["root"] / f"bad{i}.yaml", extend, {"lengths": [ORIGINAL]}, seq_len=ORIGINAL)
        assert run_extend(["--config", str(cfg)]) == 2
        err = capsys.readouterr().err
        assert needle in err, err
        assert not (out / "manifest.json").exists() and not (out / CHECKPOINTS).exists()
    # long_eval lengths the passkey prompt cannot fit
    cfg = extend_config(run, pipeline["root"] / "bad_len.yaml", long_eval={"lengths": [24]})
    assert run_extend(["--config", str(cfg)]) == 2
    assert "passkey length 24 is too short" in capsys.readouterr().err

    # missing stage 4, then a stage 4 whose checkpoints are gone
    cfg = extend_config(run, pipeline["root"] / "good.yaml")
    pretrain = stage_dir(run, "04_pretrain")
    shutil.move(pretrain / "manifest.json", pretrain / "manifest.moved")
    assert run_extend(["--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "04_pretrain is missing" in err and "4_pretrain.py" in err
    shutil.move(pretrain / "manifest.moved", pretrain / "manifest.json")
    shutil.rmtree(pretrain / CHECKPOINTS)
    assert run_extend(["--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "04_pretrain has no usable checkpoint" in err and "no complete checkpoint" in err
    assert not (out / "manifest.json").exists() and not (out / CHECKPOINTS).exists()


def test_force_with_a_bad_new_max_seq_len_leaves_the_finished_stage_byte_identical(extended, pipeline):
    """The real script as a subprocess: --force validates extend.* and the inputs before resetting 05_extend."""
    from tests.test_engine import tree_state

    run = copy_run(pipeline, "forced", without=())
    shutil.copytree(stage_dir(extended["run"], "05_extend"), stage_dir(run, "05_extend"))
    cfg = extend_config(run, pipeline["root"] / "forced.yaml")
    out = stage_dir(run, "05_extend")
    before = tree_state(out)
    env = {**{k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                               "MASTER_PORT")},
           "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    proc = subprocess.run([sys.executable, str(ROOT / "5_extend_context.py"), "--config", str(cfg), "--force",
                           "--set", "extend.new_max_seq_len=1024"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "disagrees with extend.factor=2.0" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert tree_state(out) == before


def test_dry_run_checks_and_plans_without_weights(pipeline, capsys):
    run = copy_run(pipeline, "dry")
    cfg = extend_config(run, pipeline["root"] / "dry.yaml")
    assert run_extend(["--config", str(cfg), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert f"max_seq_len {ORIGINAL} -> {NEW}" in text and "'rope_type': 'yarn'" in text and "dry run: all checks passed" in text
    assert not stage_dir(run, "05_extend").exists()
