"""Stage 7 (SFT training): no cross-conversation contamination through the SFT batch path, loss
normalization over the accumulation window, the stage end to end (checkpoints, metrics, manifest, eval
loss going down, exact resume after SIGKILL), chat-format answers that stop at <|eot|>, and bad input.

The pipeline is real and tiny: a tokenizer trained here on data/sft_sample (dante.tokenizer), stage 6 run
through 6_build_sft.py, a stage-4-like checkpoint of a small random model saved with dante.checkpoint,
and stage 7 through 7_sft.py (in this process, or as a subprocess where it must be killed).
"""

from __future__ import annotations

import json
import os
import runpy
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")
torch.set_num_threads(1)

from dante import chat_format, sft_packing  # noqa: E402
from dante import sft_data as sft  # noqa: E402
from dante.artifacts import Stage, read_json, stage_dir  # noqa: E402
from dante.backends import TorchBackend  # noqa: E402
from dante.checkpoint import CheckpointManager, latest_checkpoint, load_model  # noqa: E402
from dante.cli import run_stage  # noqa: E402
from dante.config import (  # noqa: E402
    ExtendStageConfig,
    ModelConfig,
    PretrainStageConfig,
    RunConfig,
    SFTDataStageConfig,
    SFTStageConfig,
    TrainConfig,
    load_config,
    to_dict,
    validate,
)
from dante.distributed import DistInfo, init_distributed  # noqa: E402
from dante.engine import LossModule, Trainer  # noqa: E402
from dante.evaluation.generation import GREEDY, generate  # noqa: E402
from dante.metrics import read_metrics  # noqa: E402
from dante.model import Transformer  # noqa: E402
from dante.sft_train import SFTBatches, epoch_steps  # noqa: E402
from dante.tokenizer import EOT_ID, train_tokenizer  # noqa: E402
from tests.helpers import sft_sample_texts, write_tokenizer_stage  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "data" / "sft_sample"
BLOCK = 256
SOURCES = [  # (name, file, format, lang, weight): every sample file, as in configs/tiny/sft_data.yaml
    ("it-msg", "it_messages.jsonl", "messages", "it", 1.0),
    ("it-alpaca", "it_alpaca.jsonl", "alpaca", "it", 1.5),
    ("en-sharegpt", "en_sharegpt.jsonl", "sharegpt", "en", 1.0),
    ("en-pr", "en_prompt_response.jsonl", "prompt_response", "en", 1.0),
    ("code", "code_messages.jsonl", "messages", "code", 2.0),
    ("bad", "malformed.jsonl", "messages", "it", 1.0),
]
# The stage 7 run of the end-to-end tests: 3 epochs of the whole sample (51 blocks -> 13 micro-batches
# per epoch -> 39 in all, so the 20th step is completed by one zero-weight micro-batch), on DeepSpeed ZeRO-1
# (gloo, one process) as the profiles; the other runs use the torch backend, which starts faster.
SFT_TRAIN = dict(seq_len=BLOCK, micro_batch=4, grad_accum=2, lr=3e-3, min_lr=3e-4, warmup_steps=5, weight_decay=0.0,
                 precision="fp32", backend="deepspeed", checkpoint_every=4, keep_last=2, eval_every=8, eval_batches=4,
                 log_every=1)
SFT_EPOCHS = 3
# The chat-format run: the 20 prompt/response conversations, 48 epochs at a high LR (192 steps of 2 blocks).
# Measured (greedy, 120 new tokens at most): 18 of the 20 prompts get text closed by <|eot|> with no special
# token before it (32 epochs: 17 stop but some emit <|end_of_text|> mid-answer; 20 epochs: 7 stop). The
# text itself is babble at this size: what a 64-wide model learns here is the format and where answers end.
CHAT_TRAIN = dict(SFT_TRAIN, micro_batch=2, grad_accum=1, lr=1e-2, min_lr=1e-3, eval_every=0, checkpoint_every=1000,
                  log_every=32, backend="torch")
CHAT_EPOCHS = 48
YARN = {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": BLOCK // 2}


def tiny_model_cfg(vocab_size: int, **over) -> ModelConfig:
    base = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=vocab_size, max_seq_len=BLOCK, multiple_of=32)
    return ModelConfig(**{**base, **over})


def run_script(script: str, stage: str, argv: list[str], **kw) -> int:
    """A numbered script's main through the real CLI (run_stage), in this process; returns the exit code."""
    ns = runpy.run_path(str(ROOT / script), run_name=f"{stage}_test")
    return run_stage(stage, stage, ns["main"], validate=ns.get("validate"), dry_run=ns.get("dry_run"), argv=argv,
                     resume_check=ns.get("training_resume_check"), **kw)


def write_init_checkpoint(run: RunConfig, stage: str, model_cfg: ModelConfig, seed: int = 0) -> Path:
    """A stage 4/5-like folder: a random model saved by dante.checkpoint's manager, then the manifest."""
    train = TrainConfig(seq_len=model_cfg.max_seq_len, max_steps=1)
    cfg = PretrainStageConfig(run=run, model=model_cfg, train=train) if stage == "04_pretrain" else \
        ExtendStageConfig(run=run, train=train)
    st = Stage.open(cfg, stage, force=True)
    torch.manual_seed(seed)
    model = Transformer(model_cfg)
    backend = TorchBackend(LossModule(model, 4096), TrainConfig(precision="fp32"), DistInfo(0, 1, 0, torch.device("cpu")))
    saved = CheckpointManager(st.dir, 1, backend).save(1, model_cfg, {"tokens_seen": 0, "config": to_dict(cfg)})
    st.finish(outputs={"checkpoint": str(saved)})
    return saved


def build_sft_data(run: RunConfig, sources: list[tuple]) -> None:
    lines = "".join(f"    - {{name: {n}, kind: local, path: {SAMPLE / f}, format: {fmt}, lang: {lang}, weight: {w}}}\n"
                    for n, f, fmt, lang, w in sources)
    cfg = Path(run.root) / f"{run.name}_sft_data.yaml"
    cfg.write_text(f"run: {{name: {run.name}, root: {run.root}, seed: 7}}\nsft_data:\n  block_size: {BLOCK}\n"
                   f"  overlong: truncate\n  heldout_fraction: 0.1\n  sources:\n{lines}")
    assert run_script("6_build_sft.py", "06_sft_data", ["--config", str(cfg)], format_version=sft.FORMAT_VERSION) == 0


def copy_stages(src: RunConfig, name: str, stages: tuple[str, ...]) -> RunConfig:
    """A new run folder holding copies of some complete stages of ``src`` (cheaper than rebuilding them)."""
    run = RunConfig(name=name, root=src.root)
    for st in stages:
        shutil.copytree(stage_dir(src, st), stage_dir(run, st))
    return run


def sft_config_file(run: RunConfig, epochs: int = SFT_EPOCHS, train: dict | None = None, sft_over: dict | None = None) -> Path:
    path = Path(run.root) / f"{run.name}_sft.yaml"
    path.write_text(json.dumps({"run": {"name": run.name, "root": run.root, "seed": 11},
                                "sft": {"epochs": epochs, **(sft_over or {})}, "train": train or SFT_TRAIN}))  # JSON is YAML
    return path


def curve(stage_path: Path) -> list[tuple]:
    """The loss curve without timings: (kind, step, loss, grad_norm, val_loss) per record."""
    return [(r["kind"], r["step"], r.get("loss"), r.get("grad_norm"), r.get("val_loss")) for r in read_metrics(stage_path)]


@pytest.fixture(scope="module")
def tokenizer():
    # pinned_chars=[]: pinning is slow to train and changes nothing that SFT training depends on
    return train_tokenizer(sft_sample_texts(), vocab_size=1000, n_reserved=8, min_frequency=2, pinned_chars=[])


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, tokenizer) -> RunConfig:
    """runs/t/ with 02_tokenizer, 06_sft_data (6_build_sft.py on the whole sample), a 04_pretrain model of
    context BLOCK/2 and a stage-5-like 05_extend model (YaRN x2 to BLOCK), random weights, saved by dante.checkpoint."""
    run = RunConfig(name="t", root=str(tmp_path_factory.mktemp("runs")))
    write_tokenizer_stage(run, tokenizer)
    build_sft_data(run, SOURCES)
    vocab = tokenizer.get_vocab_size()
    write_init_checkpoint(run, "04_pretrain", tiny_model_cfg(vocab, max_seq_len=BLOCK // 2))
    write_init_checkpoint(run, "05_extend", tiny_model_cfg(vocab, rope_scaling=YARN), seed=1)
    return run


@pytest.fixture(scope="module")
def sft_run(pipeline) -> dict:
    """One complete stage 7 run (7_sft.py in this process) on the pipeline; shared by the end-to-end tests."""
    t0 = time.time()
    assert run_script("7_sft.py", "07_sft", ["--config", str(sft_config_file(pipeline))]) == 0
    return {"run": pipeline, "dir": stage_dir(pipeline, "07_sft"), "seconds": time.time() - t0}


def packed_train(run: RunConfig) -> sft_packing.PackedSFT:
    return sft_packing.load_packed(stage_dir(run, "06_sft_data"), "train")


def random_model(vocab: int, seed: int = 3) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(tiny_model_cfg(vocab)).eval()


# ---------------------------------------------------------------------------------------------------
# Batches: epochs, shuffling, padding of the last step
# ---------------------------------------------------------------------------------------------------


def test_epochs_cover_every_block_once_in_a_new_order(pipeline):
    packed = packed_train(pipeline)
    n = packed.n_blocks
    data = SFTBatches(packed, micro_batch=4, grad_accum=2, epochs=3, seed=11)
    steps = epoch_steps(n, 4, 2, 3, world_size=1)
    assert steps == -(-3 * -(-n // 4) // 2)
    every_block = Counter(packed.tokens[i].tobytes() for i in range(n))  # a multiset: weight-2 copies can repeat
    seen: dict[int, list[bytes]] = {}
    for step in range(steps):
        for m in range(2):
            b = data.batch(step, m, 0, 1)
            epoch, _ = data.locate(step, m, 1)
            assert set(b) == {"tokens", "targets", "weights", "positions", "doc_ids"}
            assert b["tokens"].shape == (4, BLOCK) and b["tokens"].dtype == torch.int64
            for r in range(4):
                if (b["doc_ids"][r] >= 0).any():  # not a padding row
                    seen.setdefault(epoch, []).append(b["tokens"][r].numpy().astype(packed.tokens.dtype).tobytes())
            if epoch == 3:  # the micro-batch that completes the last step: shape-true, weight 0
                assert float(b["weights"].sum()) == 0.0
    assert sorted(seen) == [0, 1, 2, 3]
    for epoch in range(3):
        assert Counter(seen[epoch]) == every_block, epoch  # each epoch: every block exactly once
    assert seen[0] != seen[1] != seen[2]  # reshuffled per epoch (sorted within a micro-batch only)
    again = SFTBatches(packed, 4, 2, 3, seed=11)
    for step, m in [(5, 1), (0, 0), (17, 0)]:  # random access (what resume does) == the sequential stream
        for k, v in again.batch(step, m, 0, 1).items():
            assert torch.equal(v, SFTBatches(packed, 4, 2, 3, seed=11).batch(step, m, 0, 1)[k])
    other = SFTBatches(packed, 4, 2, 3, seed=12).batch(0, 0, 0, 1)["tokens"]
    assert not torch.equal(other, again.batch(0, 0, 0, 1)["tokens"])
    with pytest.raises(ValueError, match="n_blocks"):
        again.load_state_dict({**again.state_dict(), "n_blocks": n + 1})
    assert "doc_ids" not in SFTBatches(packed, 4, 2, 3, seed=11, document_mask=False).batch(0, 0, 0, 1)


# ---------------------------------------------------------------------------------------------------
# No contamination through the SFT training path
# ---------------------------------------------------------------------------------------------------


def test_packed_conversation_loss_and_logits_equal_the_conversation_alone(pipeline, tokenizer):
    """Tolerance: fp32, 2e-5 absolute on logits of magnitude ~1 and 1e-5 relative on the loss (the packed
    and the alone forward multiply matrices of other shapes, so sums run in another order; measured ~1e-6)."""
    packed = packed_train(pipeline)
    model = random_model(tokenizer.get_vocab_size())
    loss_module = LossModule(model, chunk_size=4096)
    batch = SFTBatches(packed, micro_batch=4, grad_accum=1, epochs=1, seed=11).batch(0, 0, 0, 1)
    leaky = SFTBatches(packed, micro_batch=4, grad_accum=1, epochs=1, seed=11, document_mask=False).batch(0, 0, 0, 1)
    checked = 0
    with torch.no_grad():
        logits_BTV = model.logits(model(batch["tokens"], positions_BT=batch["positions"], doc_ids_BT=batch["doc_ids"]))
        leaky_BTV = model.logits(model(leaky["tokens"], positions_BT=leaky["positions"]))
        for r in range(4):
            docs = batch["doc_ids"][r]
            for d in range(1, int(docs.max()) + 1):  # conversations after the first one of their block
                span = (docs == d).nonzero().flatten()
                a, b = int(span[0]), int(span[-1]) + 1
                tokens_T = batch["tokens"][r, a:b]
                # alone: a plain causal forward from position 0, and an independent full-logits loss
                alone_TV = model.logits(model(tokens_T[None]))[0]
                torch.testing.assert_close(logits_BTV[r, a:b], alone_TV, rtol=0, atol=2e-5)
                w_T = torch.from_numpy(np.asarray(packed_weights_of(packed, tokens_T)))[1:]
                ce_T = torch.nn.functional.cross_entropy(alone_TV[:-1], tokens_T[1:], reduction="none")
                alone_loss = float((ce_T * w_T).sum() / w_T.sum())
                mask = torch.zeros_like(batch["weights"])
                mask[r, a:b] = 1.0
                loss_sum, weight_sum = loss_module(batch["tokens"], batch["targets"], batch["weights"] * mask,
                                                   batch["positions"], batch["doc_ids"])
                assert float(weight_sum) == float(w_T.sum())  # the same answer tokens count, no more
                assert float(loss_sum / weight_sum) == pytest.approx(alone_loss, rel=1e-5)
                # the control: without the document mask the same tokens see the conversations before them
                assert (leaky_BTV[r, a:b] - alone_TV).abs().max() > 1e-3
                checked += 1
    assert checked >= 3


def packed_weights_of(packed: sft_packing.PackedSFT, tokens_T: torch.Tensor) -> np.ndarray:
    """The stage 6 weights of the conversation whose tokens are ``tokens_T`` (found in the packed arrays)."""
    needle = tokens_T.numpy()
    for row in range(packed.n_blocks):
        docs = np.asarray(packed.doc_ids[row])
        for d in np.unique(docs[docs >= 0]):
            idx = np.flatnonzero(docs == d)
            if len(idx) == len(needle) and np.array_equal(np.asarray(packed.tokens[row, idx], np.int64), needle):
                return np.asarray(packed.weights[row, idx])
    raise AssertionError("conversation not found in the packed arrays")


# ---------------------------------------------------------------------------------------------------
# Loss normalization over the accumulation window
# ---------------------------------------------------------------------------------------------------


def one_step_gradients(run: RunConfig, vocab: int, tmp: Path, micro_batch: int, grad_accum: int) -> tuple[dict, dict]:
    """The engine's step 0 on the first two blocks of an epoch; returns (step output, gradients before the update)."""
    packed = packed_train(run)
    train = TrainConfig(**{**SFT_TRAIN, "micro_batch": micro_batch, "grad_accum": grad_accum, "max_steps": 1,
                           "grad_clip": 0.0, "backend": "torch"})
    model = random_model(vocab)
    trainer = Trainer(model=model, model_cfg=model.cfg, train_cfg=train, stage_dir=tmp,
                      data=SFTBatches(packed, micro_batch, grad_accum, 1, seed=11), stage_config={}, dist=init_distributed("torch"))
    grads = {}
    real_step = trainer.backend.step

    def step_and_keep_gradients(lr):  # observe the real path: the gradients the optimizer is about to use
        grads.update({n: p.grad.detach().clone() for n, p in trainer.backend.model.named_parameters()})
        return real_step(lr)

    trainer.backend.step = step_and_keep_gradients
    return trainer.train_step(0), grads


def test_accumulated_weighted_loss_equals_one_batch_of_both(pipeline, tokenizer, tmp_path):
    vocab = tokenizer.get_vocab_size()
    out_acc, g_acc = one_step_gradients(pipeline, vocab, tmp_path / "acc", micro_batch=1, grad_accum=2)
    out_one, g_one = one_step_gradients(pipeline, vocab, tmp_path / "one", micro_batch=2, grad_accum=1)
    # independent reference: full logits, F.cross_entropy, sum(w * ce) / sum(w) over both blocks at once
    packed = packed_train(pipeline)
    blocks = np.sort(np.random.default_rng([11, 0]).permutation(packed.n_blocks)[:2])  # sft_batches' epoch-0 order
    tokens = torch.from_numpy(np.asarray(packed.tokens[blocks], np.int64))
    targets, w = sft_packing.shifted_targets(tokens.numpy(), np.asarray(packed.weights[blocks]), np.asarray(packed.doc_ids[blocks]),
                                     packed.pad_id)
    targets, w = torch.from_numpy(targets), torch.from_numpy(w)
    model = random_model(vocab)
    ce = torch.nn.functional.cross_entropy(model.logits(model(tokens, doc_ids_BT=torch.from_numpy(
        np.asarray(packed.doc_ids[blocks], np.int64)))).flatten(0, 1), targets.flatten(), reduction="none")
    ref_loss = (ce * w.flatten()).sum() / w.sum()
    ref_loss.backward(retain_graph=True)
    assert out_acc["loss"] == pytest.approx(out_one["loss"], rel=1e-6)
    assert out_acc["loss"] == pytest.approx(float(ref_loss), rel=1e-5)
    for name, p in model.named_parameters():
        torch.testing.assert_close(g_acc[name], g_one[name], rtol=1e-5, atol=1e-7, msg=name)
        torch.testing.assert_close(g_acc[name], p.grad, rtol=1e-4, atol=1e-7, msg=name)
    # the control: the blocks carry different answer weight (w0 != w1), so the mean of the two per-block means,
    # (g0 + g1) / 2, is another gradient than (w0 g0 + w1 g1) / (w0 + w1), by ~|w0 - w1| / (w0 + w1) (8% here)
    assert w[0].sum() != w[1].sum()
    per_block = [(ce.view(2, -1)[i] * w[i]).sum() / w[i].sum() for i in range(2)]
    params = list(model.parameters())
    mean_of_means = [sum(g) / 2 for g in zip(*(torch.autograd.grad(loss, params, retain_graph=True) for loss in per_block))]
    names = [n for n, _ in model.named_parameters()]
    worst = max(float((g_acc[n] - g).abs().max() / g_acc[n].abs().max()) for n, g in zip(names, mean_of_means))
    assert worst > 1e-2, worst


# ---------------------------------------------------------------------------------------------------
# The stage end to end
# ---------------------------------------------------------------------------------------------------


def test_stage7_end_to_end(sft_run, pipeline):
    d = sft_run["dir"]
    m = read_json(d / "manifest.json")
    steps = epoch_steps(packed_train(pipeline).n_blocks, 4, 2, SFT_EPOCHS, 1)
    assert m["counts"]["steps"] == steps == 20 and m["counts"]["epochs_trained"] == SFT_EPOCHS
    assert m["init"]["stage"] == "05_extend"  # auto: stage 5 is complete, so it is the starting point
    assert m["attention"] == {"document_mask": True, "kernel": "sdpa"} and m["engine"]["backend"] == "deepspeed"
    # checkpoints: keep_last 2, the init model's config (YaRN included), weights that moved
    ckpts = sorted(p.name for p in (d / "checkpoints").glob("step-*"))
    assert ckpts == ["step-0000016", "step-0000020"] and Path(m["outputs"]["checkpoint"]).name == "step-0000020"
    init_dir = latest_checkpoint(stage_dir(pipeline, "05_extend") / "checkpoints")
    assert read_json(d / "checkpoints/step-0000020/model_config.json") == read_json(init_dir / "model_config.json")
    model, model_cfg, meta = load_model(d)
    assert model_cfg.rope_scaling == YARN and meta["step"] == steps and meta["data"]["kind"] == "SFTBatches"
    init_model, _, _ = load_model(init_dir)
    assert not torch.equal(model.layers[0].attention.wq.weight, init_model.layers[0].attention.wq.weight)
    # metrics: every step, and an eval loss every 8 steps and at the end, below the init model's
    rows = read_metrics(d, "train")
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    val = read_metrics(d, "val")
    assert [r["step"] for r in val] == [8, 16, 20]
    init_loss, final_loss = m["eval"]["init_loss"], m["eval"]["final_loss"]
    assert final_loss == val[-1]["val_loss"] and init_loss > val[0]["val_loss"] > final_loss
    assert init_loss - final_loss > 0.3, (init_loss, final_loss)
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.3
    assert (d / "tensorboard").is_dir() and not (d / "progress.json").exists()
    assert sft_run["seconds"] < 120


def test_stage7_resumes_after_sigkill_on_the_same_curve(sft_run, pipeline):
    run = copy_stages(pipeline, "k", ("02_tokenizer", "05_extend", "06_sft_data"))
    config = sft_config_file(run)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(PYTHONPATH=str(ROOT), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, str(ROOT / "7_sft.py"), "--config", str(config)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    d = stage_dir(run, "07_sft")
    deadline = time.time() + 180
    while not (read_metrics(d, "train") and read_metrics(d, "train")[-1]["step"] >= 6):  # past the step-4 checkpoint
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read() if proc.poll() is not None else "timeout"
        time.sleep(0.02)
    proc.kill()
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    saved = latest_checkpoint(d / "checkpoints")
    assert not (d / "manifest.json").exists() and saved.name in ("step-0000004", "step-0000008")
    assert run_script("7_sft.py", "07_sft", ["--config", str(config)]) == 0
    m = read_json(d / "manifest.json")
    assert m["resumed_from_step"] == int(saved.name[5:]) and m["resumed"] is True
    assert curve(d) == curve(sft_run["dir"])  # bit-identical losses, grad norms and eval losses
    assert m["eval"] == read_json(sft_run["dir"] / "manifest.json")["eval"]


def test_dry_run_checks_and_plans_without_training(pipeline, capsys):
    code = run_script("7_sft.py", "07_sft", ["--config", str(sft_config_file(pipeline)), "--dry-run"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "05_extend" in out and "steps/epoch -> 20 steps" in out and "no weights loaded" in out and "FLOPs/tok" in out


# ---------------------------------------------------------------------------------------------------
# The SFT model answers in the chat format and stops at <|eot|>
# ---------------------------------------------------------------------------------------------------


def test_sft_model_answers_in_chat_format_and_stops_at_eot(pipeline, tokenizer):
    run = copy_stages(pipeline, "g", ("02_tokenizer", "05_extend"))
    build_sft_data(run, [s for s in SOURCES if s[0] == "en-pr"])
    assert run_script("7_sft.py", "07_sft", ["--config", str(sft_config_file(run, CHAT_EPOCHS, CHAT_TRAIN))]) == 0
    encoder = chat_format.ChatEncoder(tokenizer)
    prompts = [sft.normalize_row(json.loads(line), "prompt_response")[:1]
               for line in (SAMPLE / "en_prompt_response.jsonl").read_text(encoding="utf-8").splitlines()]
    special_ids = set(range(len(chat_format.SPECIAL_IDS) + 8))  # named specials + the 8 reserved ids of this tokenizer

    def answers(stage: str, prompts: list):
        model, _, _ = load_model(stage_dir(run, stage))
        model.eval()
        for messages in prompts:  # the prompt exactly as the exported chat template renders it
            ids = encoder.encode(messages, add_generation_prompt=True).ids.tolist()
            yield generate(model, ids, max_new_tokens=120, params=GREEDY, stop_ids={EOT_ID}, decode=tokenizer.decode)

    def is_answer(g) -> bool:  # some text, then <|eot|>, and no special token before it (no new turn, no EOS)
        return g.stop_reason == "stop_token" and len(g.new_tokens) >= 3 and not special_ids & set(g.new_tokens)

    before = list(answers("05_extend", prompts[:5]))
    after = list(answers("07_sft", prompts))
    assert not any(g.stop_reason == "stop_token" for g in before)  # the control: the init model never stops
    assert sum(map(is_answer, after)) >= 0.8 * len(prompts), [(g.stop_reason, g.new_tokens) for g in after]


# ---------------------------------------------------------------------------------------------------
# Bad input: clear errors, nothing marked done
# ---------------------------------------------------------------------------------------------------


def stage7_error(run: RunConfig, capsys, *extra: str, **cfg_kw) -> str:
    code = run_script("7_sft.py", "07_sft", ["--config", str(sft_config_file(run, **cfg_kw)), *extra])
    err = capsys.readouterr().err
    assert code == 2, err
    assert not (stage_dir(run, "07_sft") / "manifest.json").exists()
    return err


def test_bad_inputs_give_clear_errors(pipeline, tokenizer, tmp_path, capsys):
    everything = ("02_tokenizer", "04_pretrain", "05_extend", "06_sft_data")
    run = copy_stages(pipeline, "bad", everything)
    # train.seq_len != the packed block size
    err = stage7_error(run, capsys, "--set", "train.seq_len=128")
    assert f"train.seq_len=128 but 06_sft_data packs blocks of {BLOCK} tokens" in err
    # stage 4's context (BLOCK/2) cannot hold the blocks: refused, naming max_seq_len and the fix
    err = stage7_error(run, capsys, "--set", "sft.init_from=04_pretrain")
    assert "exceeds the context" in err and f"max_seq_len {BLOCK // 2}" in err and "5_extend_context.py" in err
    # max_steps beyond the epochs
    err = stage7_error(run, capsys, "--set", "train.max_steps=500")
    assert "train.max_steps=500 exceeds the 20 steps of sft.epochs=3" in err
    # a token budget is not an SFT setting (config validation, before any input is read)
    assert "train.token_budget" in stage7_error(run, capsys, "--set", "train.token_budget=1000")
    # tokenizer mismatch: another tokenizer.json in 02 -> the model's vocabulary and stage 6 disagree with it
    other = train_tokenizer(sft_sample_texts(), vocab_size=900, n_reserved=8, min_frequency=2, pinned_chars=[])
    other.save(str(stage_dir(run, "02_tokenizer") / "tokenizer.json"))
    err = stage7_error(run, capsys)
    assert "has vocab_size 1000 but" in err and "has 900 tokens" in err and "rebuild it with `python 6_build_sft.py --force`" in err
    # missing 06_sft_data (and, with init_from 04, a missing 04_pretrain): one error naming both scripts
    shutil.rmtree(stage_dir(run, "02_tokenizer"))
    shutil.copytree(stage_dir(pipeline, "02_tokenizer"), stage_dir(run, "02_tokenizer"))
    shutil.rmtree(stage_dir(run, "06_sft_data"))
    shutil.rmtree(stage_dir(run, "04_pretrain"))
    err = stage7_error(run, capsys, "--set", "sft.init_from=04_pretrain")
    assert "06_sft_data is missing" in err and "6_build_sft.py" in err and "04_pretrain is missing" in err and "4_pretrain.py" in err


def test_missing_or_unfinished_checkpoints_are_clear_errors(pipeline, capsys):
    run = copy_stages(pipeline, "nockpt", ("02_tokenizer", "05_extend", "06_sft_data"))
    shutil.rmtree(stage_dir(run, "05_extend") / "checkpoints")
    err = stage7_error(run, capsys)
    assert "no complete checkpoint under" in err and "05_extend" in err
    # auto with an unfinished 05_extend (folder, no manifest): an error, not a silent fall back to stage 4
    (stage_dir(run, "05_extend") / "manifest.json").unlink()
    err = stage7_error(run, capsys)
    assert "05_extend never finished" in err and "sft.init_from=04_pretrain" in err
    # auto without any stage 5 and without stage 4
    shutil.rmtree(stage_dir(run, "05_extend"))
    assert "04_pretrain is missing" in stage7_error(run, capsys)


def test_force_with_a_damaged_init_checkpoint_leaves_the_finished_stage_byte_identical(sft_run, pipeline, capsys):
    """validate verifies the init weights against meta.json's checksums before --force resets 07_sft."""
    from tests.test_engine import tree_state

    run = copy_stages(pipeline, "forced", ("02_tokenizer", "05_extend", "06_sft_data", "07_sft"))
    weights = latest_checkpoint(stage_dir(run, "05_extend") / "checkpoints") / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x01  # one bit of the last tensor: a valid safetensors file with a wrong weight
    weights.write_bytes(bytes(data))
    before = tree_state(stage_dir(run, "07_sft"))
    code = run_script("7_sft.py", "07_sft", ["--config", str(sft_config_file(run)), "--force"])
    err = capsys.readouterr().err
    assert code == 2 and "is damaged" in err and "model.safetensors: sha256" in err and "--force" in err, err
    assert tree_state(stage_dir(run, "07_sft")) == before


# ---------------------------------------------------------------------------------------------------
# Profiles
# ---------------------------------------------------------------------------------------------------


def test_profiles_load_and_match_their_stage6_blocks():
    for profile in ("tiny", "dante-2b"):
        cfg = load_config(SFTStageConfig, ROOT / "configs" / profile / "sft.yaml")
        data = load_config(SFTDataStageConfig, ROOT / "configs" / profile / "sft_data.yaml")
        assert validate(cfg) == [] and cfg.train.seq_len == data.sft_data.block_size, profile
        assert cfg.sft.document_mask and cfg.train.max_steps == 0 and cfg.run.name == data.run.name
    big = load_config(SFTStageConfig, ROOT / "configs" / "dante-2b" / "sft.yaml")
    assert big.train.seq_len == 4096 and big.train.zero_stage == 1 and big.train.backend == "deepspeed"
    assert 2 <= big.sft.epochs <= 3 and 1e-5 <= big.train.lr <= 3e-5
