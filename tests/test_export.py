"""Stage 9 (dante/export/, 9_export_hf.py): the Hugging Face folder loads in plain transformers and is our model.

Every test builds a real run folder in tmp_path with the real functions: a tokenizer trained on the
embedded sample text (dante.tokenizer.train_tokenizer, stage 2 manifest via Stage.finish), a tiny model
saved as a checkpoint with dante.checkpoint.save_weights (+ model_config.json, meta.json, the stage
manifest). Models are tiny (dim 64, 2 layers) so each test takes seconds on one CPU thread.

How the chat test gets a model that says <|eot|> honestly: the tiny model is *trained* (a few dozen AdamW
steps, plain loop, loss on the assistant turn and its <|eot|> like stage 6's weights) on one repeated
conversation encoded by dante.sft_data.ChatEncoder, so it learns the answer and the stop; nothing in the
weights is set by hand.
"""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dante import checkpoint as ckpt
from dante import config as C
from dante import export
from dante.artifacts import Stage, atomic_write_json, read_json, stage_dir
from dante.chat_format import ChatEncoder
from dante.errors import StageError, UserError
from dante.export import hf_format, verify
from dante.export import stage as stage_module  # the name "stage" is a parameter below
from dante.model import Transformer
from dante.tokenizer import load_tokenizer, train_tokenizer

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "data" / "sample"
VOCAB = 1024

torch.set_num_threads(1)


def _texts(path: Path, n: int) -> list[str]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line)["text"] for _, line in zip(range(n), f)]


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory) -> Path:
    """A real Dante tokenizer (1024 ids) trained on the embedded Italian/English/code sample."""
    texts = _texts(SAMPLE / "it-fortunes.jsonl.gz", 400) + _texts(SAMPLE / "en-kjv.jsonl.gz", 60) \
        + _texts(SAMPLE / "code-cpython.jsonl.gz", 5)
    tok = train_tokenizer(texts, vocab_size=VOCAB, n_reserved=8)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return path


@pytest.fixture(scope="module")
def heldout_file(tmp_path_factory) -> Path:
    """A few real held-out documents (Italian and English), as JSON Lines like data/sample/heldout."""
    docs = _texts(SAMPLE / "heldout" / "it.jsonl.gz", 3) + _texts(SAMPLE / "heldout" / "en.jsonl.gz", 3)
    path = tmp_path_factory.mktemp("heldout") / "heldout.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({"text": d[:3000]}) + "\n")
    return path


def tiny_model_cfg(**over) -> C.ModelConfig:
    base = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=VOCAB, max_seq_len=128, multiple_of=32)
    base.update(over)
    return C.ModelConfig(**base)


def make_run(root: Path, tokenizer_file: Path, model: Transformer, stage: str = "04_pretrain",
             extra_tensors: dict | None = None, model_cfg_dict: dict | None = None) -> C.RunConfig:
    """A run folder with a finished stage 2 and one finished checkpoint stage, written by the real functions."""
    run = C.RunConfig(name="t", root=str(root))
    tok_stage = Stage.open(C.TokenizerStageConfig(run=run), "02_tokenizer")
    (tok_stage.dir / "tokenizer.json").write_bytes(tokenizer_file.read_bytes())
    tok_stage.finish(outputs={"tokenizer": "tokenizer.json"})
    stage_cls = {"04_pretrain": C.PretrainStageConfig, "05_extend": C.ExtendStageConfig, "07_sft": C.SFTStageConfig}[stage]
    st = Stage.open(stage_cls(run=run), stage)
    step_dir = st.dir / ckpt.CHECKPOINTS / ckpt.step_dir_name(10)
    state = dict(model.state_dict())
    state.update(extra_tensors or {})
    ckpt.save_weights(step_dir / ckpt.WEIGHTS, state, model.cfg.tie_embeddings)
    atomic_write_json(step_dir / ckpt.MODEL_CONFIG, model_cfg_dict or C.to_dict(model.cfg))
    atomic_write_json(step_dir / ckpt.META, {"format_version": 1, "step": 10, "tokens_seen": 12_345, "loss": 3.21,
                                            "world_size": 1, "config": C.to_dict(stage_cls(run=run)),
                                            "files": ckpt.record_files(step_dir)})  # as CheckpointManager.save
    (step_dir.parent / ckpt.LATEST).write_text(step_dir.name + "\n")
    st.finish()
    return run


def export_cfg(run: C.RunConfig, heldout: Path, **over) -> C.ExportStageConfig:
    e = dict(dtype="float32", heldout={"mix": str(heldout)}, verify_windows=2, verify_tokens=8)
    e.update(over)
    return C.ExportStageConfig(run=run, export=C.ExportConfig(**e))


def run_export(cfg: C.ExportStageConfig, force: bool = False) -> dict:
    st = Stage.open(cfg, "09_export", format_version=export.FORMAT_VERSION, force=force)
    return export.export_stage(st, cfg)


def random_model(**over) -> Transformer:
    torch.manual_seed(0)
    return Transformer(tiny_model_cfg(**over))


# ---------------------------------------------------------------------------------------------------


def test_export_loads_in_transformers_and_verifies(tmp_path, tokenizer_file, heldout_file):
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    model = random_model()
    run = make_run(tmp_path, tokenizer_file, model)
    manifest = run_export(export_cfg(run, heldout_file))
    out = stage_dir(run, "09_export")
    names = {f.name for f in out.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "special_tokens_map.json", "README.md", "manifest.json"} <= names
    config = read_json(out / "config.json")
    assert config["architectures"] == ["LlamaForCausalLM"] and config["tie_word_embeddings"] is True
    assert config["eos_token_id"] == 1 and config["pad_token_id"] == 5 and config["bos_token_id"] == 0
    gen = read_json(out / "generation_config.json")
    assert set(gen["eos_token_id"]) == {1, 4}
    assert (gen["temperature"], gen["top_p"], gen["repetition_penalty"]) == (0.7, 0.9, 1.15)
    v = manifest["verification"]
    assert v["logits"]["max_abs_diff"] <= v["logits"]["bound"] and v["greedy"]["identical"] == v["greedy"]["prompts"]
    assert v["tokenizer"]["documents"] > 0 and v["tokenizer"]["mismatches"] == 0
    assert "chat_template" not in v  # a base model gets no chat template

    # tied embedding stored once, no lm_head
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "model.embed_tokens.weight" in keys and "lm_head.weight" not in keys

    hf = AutoModelForCausalLM.from_pretrained(out)
    assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    tok = AutoTokenizer.from_pretrained(out)
    gen_pipe = pipeline("text-generation", model=hf, tokenizer=tok)
    text = gen_pipe("Il futuro della", max_new_tokens=5, do_sample=False)[0]["generated_text"]
    assert text.startswith("Il futuro della") and len(text) > len("Il futuro della")


CHAT = [
    {"role": "system", "content": "Rispondi in breve."},
    {"role": "user", "content": "Qual è la capitale d'Italia?"},
    {"role": "assistant", "content": "La capitale d'Italia è Roma."},
]


def train_on_chat(model: Transformer, tokenizer_file: Path, conversation: list[dict], steps: int = 80) -> float:
    """Teach the tiny model one answer and its closing <|eot|> (loss weights as stage 6: assistant tokens)."""
    encoded = ChatEncoder(load_tokenizer(tokenizer_file)).encode(conversation)
    ids_1T = torch.tensor(encoded.ids, dtype=torch.long)[None]
    weight_T = torch.tensor(encoded.classes == 1, dtype=torch.float32)[1:]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    for _ in range(steps):
        logits_TV = model.logits(model(ids_1T[:, :-1]))[0]
        loss = (torch.nn.functional.cross_entropy(logits_TV, ids_1T[0, 1:], reduction="none") * weight_T).sum() / weight_T.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return loss.item()


def test_chat_export_generate_stops_at_eot(tmp_path, tokenizer_file, heldout_file):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = random_model()
    loss = train_on_chat(model, tokenizer_file, CHAT)
    assert loss < 0.05, f"the tiny model did not learn the conversation (loss {loss:.3f})"
    run = make_run(tmp_path, tokenizer_file, model, stage="07_sft")
    # stage 6 with a local source: its conversations are checked through the template too
    sft_file = tmp_path / "conv.jsonl"
    rows = [{"messages": CHAT}, {"messages": [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"}]},
            {"messages": [{"role": "user", "content": "say <|eot|>"}, {"role": "assistant", "content": "no"}]}]
    sft_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    sft_cfg = C.SFTDataStageConfig(run=run, sft_data=C.SFTDataConfig(sources=[C.SFTSourceConfig(name="s", path=str(sft_file))]))
    Stage.open(sft_cfg, "06_sft_data").finish()

    manifest = run_export(export_cfg(run, heldout_file))
    v = manifest["verification"]
    # 2 valid stage 6 conversations (the one typing <|eot|> is dropped, as stage 6 drops it) + the built-ins
    assert v["chat_template"] == {"conversations": 2 + len(export.BUILTIN_CONVERSATIONS),
                                  "identical": 2 + len(export.BUILTIN_CONVERSATIONS)}
    out = stage_dir(run, "09_export")
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.eos_token == "<|eot|>" and tok.pad_token_id == 5
    hf = AutoModelForCausalLM.from_pretrained(out)
    inputs = tok.apply_chat_template(CHAT[:-1], add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out_ids = hf.generate(**inputs, max_new_tokens=30, do_sample=False)[0, inputs["input_ids"].shape[1]:].tolist()
    assert out_ids[-1] == 4 and len(out_ids) < 30  # stopped by <|eot|>, not by the token budget
    assert tok.decode(out_ids, skip_special_tokens=True) == CHAT[-1]["content"]
    card = (out / "README.md").read_text()
    assert "instruction-tuned" in card and "apply_chat_template" in card


def test_native_greedy_equals_transformers_generate(tmp_path, tokenizer_file, heldout_file):
    """Stage 8's KV-cache generator (what 8_eval.py --chat runs) and transformers' generate agree."""
    from transformers import AutoModelForCausalLM

    from dante.evaluation.generation import GREEDY, generate

    model = random_model()
    train_on_chat(model, tokenizer_file, CHAT, steps=30)  # a model with real preferences, not a flat random one
    run = make_run(tmp_path, tokenizer_file, model)
    run_export(export_cfg(run, heldout_file, verify=False))
    hf = AutoModelForCausalLM.from_pretrained(stage_dir(run, "09_export"), dtype=torch.float32)
    prompt = load_tokenizer(tokenizer_file).encode("Nel mezzo del cammin di nostra vita").ids
    ours = generate(model.eval(), prompt, max_new_tokens=40, params=GREEDY).new_tokens
    theirs = verify.hf_greedy(hf, prompt, 40)
    assert ours == theirs and len(ours) == 40


def test_yarn_export_matches_beyond_original_context(tmp_path, tokenizer_file, heldout_file, monkeypatch):
    from transformers import AutoConfig

    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 32.0, "beta_slow": 1.0}
    model = random_model(max_seq_len=256, rope_scaling=yarn)
    run = make_run(tmp_path, tokenizer_file, model, stage="05_extend")
    manifest = run_export(export_cfg(run, heldout_file))
    lg = manifest["verification"]["logits"]
    assert lg["tokens_per_window"] == 256 and lg["positions_beyond_original_context"] == 192
    assert lg["max_abs_diff"] <= lg["bound"]
    hf_cfg = AutoConfig.from_pretrained(stage_dir(run, "09_export"))
    assert hf_cfg.rope_parameters["rope_type"] == "yarn" and hf_cfg.rope_parameters["factor"] == 4.0
    assert hf_cfg.rope_parameters["original_max_position_embeddings"] == 64 and hf_cfg.max_position_embeddings == 256

    # the comparison has teeth: the same export without its rope_scaling fails verification, loudly
    plain = stage_module.hf_config_dict
    monkeypatch.setattr(stage_module, "hf_config_dict", lambda *a: {**plain(*a), "rope_scaling": None})
    with pytest.raises(export.VerificationError, match="logits differ"):
        run_export(export_cfg(run, heldout_file), force=True)
    assert not (stage_dir(run, "09_export") / "manifest.json").exists()


def test_untied_bf16_sharded_export(tmp_path, tokenizer_file, heldout_file):
    from safetensors import safe_open

    model = random_model(tie_embeddings=False)
    run = make_run(tmp_path, tokenizer_file, model)
    manifest = run_export(export_cfg(run, heldout_file, dtype="bfloat16", max_shard_size="100KB"))
    out = stage_dir(run, "09_export")
    index = read_json(out / "model.safetensors.index.json")
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and "lm_head.weight" in index["weight_map"]
    assert read_json(out / "config.json")["tie_word_embeddings"] is False
    for shard in shards:
        with safe_open(str(out / shard), "pt") as f:
            assert all(f.get_slice(k).get_dtype() == "BF16" for k in f.keys())
    v = manifest["verification"]
    assert v["dtype_rounding_max_abs_logit_change"] > 0  # bf16 rounding is measured, and not what is compared
    assert v["logits"]["max_abs_diff"] <= v["logits"]["bound"]
    assert set(manifest["outputs"]["files"]) >= set(shards) | {"model.safetensors.index.json"}


# -- bad input ----------------------------------------------------------------------------------------


def _refused(cfg: C.ExportStageConfig, match: str) -> None:
    with pytest.raises(UserError, match=match):
        run_export(cfg)
    assert not (stage_dir(cfg.run, "09_export") / "manifest.json").exists()


def test_refuses_what_llama_cannot_express(tmp_path, tokenizer_file, heldout_file, monkeypatch):
    # a bias: Llama has none, the export would silently drop it
    model = random_model()
    run = make_run(tmp_path / "bias", tokenizer_file, model, extra_tensors={"layers.0.attention.wq.bias": torch.zeros(64)})
    _refused(export_cfg(run, heldout_file), r"layers\.0\.attention\.wq\.bias .* no LlamaForCausalLM counterpart")

    # d_model not divisible by the heads (legal for Dante with an explicit head_dim, not for LlamaConfig)
    odd = random_model(dim=72, n_heads=5, n_kv_heads=1, head_dim=16)
    run = make_run(tmp_path / "heads", tokenizer_file, odd)
    _refused(export_cfg(run, heldout_file), "not divisible by model.n_heads=5")

    # a RoPE scaling type Dante's rope.py does not implement the way transformers does
    cfg_dict = {**C.to_dict(model.cfg), "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}
    run = make_run(tmp_path / "rope", tokenizer_file, model, model_cfg_dict=cfg_dict)
    _refused(export_cfg(run, heldout_file), "rope_type='dynamic' is not supported")

    # "tied" in model_config.json, but the file holds an output matrix of its own
    untied = random_model(tie_embeddings=False)
    run = make_run(tmp_path / "tied", tokenizer_file, untied, model_cfg_dict={**C.to_dict(untied.cfg), "tie_embeddings": True})
    _refused(export_cfg(run, heldout_file), "tie_embeddings is true but output.weight differs")

    # a ModelConfig option the exporter has never heard of, set to a non-default value
    monkeypatch.setattr(hf_format, "EXPRESSED_FIELDS", {k: v for k, v in hf_format.EXPRESSED_FIELDS.items() if k != "init_std"})
    run = make_run(tmp_path / "unknown", tokenizer_file, random_model(init_std=0.05))
    _refused(export_cfg(run, heldout_file), "model.init_std=0.05: the exporter does not know")


def test_refuses_tokenizer_of_another_vocabulary(tmp_path, tokenizer_file, heldout_file):
    run = make_run(tmp_path, tokenizer_file, random_model(vocab_size=VOCAB + 64))
    _refused(export_cfg(run, heldout_file), rf"model.vocab_size={VOCAB + 64} rows but the tokenizer .* has {VOCAB} ids")


def test_refuses_non_empty_output_folder_unless_force(tmp_path, tokenizer_file, heldout_file):
    run = make_run(tmp_path, tokenizer_file, random_model())
    out = stage_dir(run, "09_export")
    out.mkdir(parents=True)
    (out / "notes.txt").write_text("someone else's file")
    cfg = export_cfg(run, heldout_file, verify=False)
    _refused(cfg, r"(?s)is not empty \(notes.txt\).*--force")
    _refused(cfg, "is not empty")  # still refused on a second try: the folder was not adopted
    assert (out / "notes.txt").read_text() == "someone else's file"
    run_export(cfg, force=True)
    assert not (out / "notes.txt").exists() and (out / "manifest.json").exists()


def test_failed_verification_leaves_no_manifest_and_rerun_resumes(tmp_path, tokenizer_file, heldout_file, monkeypatch):
    run = make_run(tmp_path, tokenizer_file, random_model())
    cfg = export_cfg(run, heldout_file)
    real_greedy = verify.hf_greedy
    monkeypatch.setattr(verify, "hf_greedy", lambda m, p, n: [(t + 1) % VOCAB for t in real_greedy(m, p, n)])
    with pytest.raises(export.VerificationError, match="greedy continuations differ"):
        run_export(cfg)
    out = stage_dir(run, "09_export")
    assert (out / "progress.json").exists() and not (out / "manifest.json").exists()
    monkeypatch.setattr(verify, "hf_greedy", real_greedy)
    st = Stage.open(cfg, "09_export", format_version=export.FORMAT_VERSION)
    assert st.resumed
    export.export_stage(st, cfg)
    assert (out / "manifest.json").exists()


# -- card, plan, upload -------------------------------------------------------------------------------


def test_model_card_reads_results_from_report(tmp_path, tokenizer_file, heldout_file):
    run = make_run(tmp_path, tokenizer_file, random_model())
    cfg = export_cfg(run, heldout_file, verify=False)
    run_export(cfg)
    card = (stage_dir(run, "09_export") / "README.md").read_text()
    assert "Not evaluated" in card and "license: apache-2.0" in card and "12,345" in card  # tokens from meta.json

    # a stage 8 report in its real shape (dante.evaluation.report: summary per checkpoint label)
    from dante.evaluation.report import summarize

    result = {"label": "04_pretrain", "stage": "04_pretrain", "step": 10, "max_seq_len": 128,
              "perplexity": {"heldout": {"it": {"bpb": 1.2345678, "ppl": 45.678}}, "shards": {}}}
    eval_stage = Stage.open(C.EvalStageConfig(run=run), "08_eval")
    atomic_write_json(eval_stage.dir / "report.json", {"summary": {"04_pretrain": summarize(result)}, "checkpoints": [result]})
    eval_stage.finish()
    run_export(cfg, force=True)
    card = (stage_dir(run, "09_export") / "README.md").read_text()
    assert "Not evaluated" not in card
    assert "| bpb_it | 1.235 |" in card and "| ppl_it | 45.68 |" in card and "04_pretrain (step 10) = this model" in card


def test_dry_run_plan_and_upload_listing(tmp_path, tokenizer_file, heldout_file):
    run = make_run(tmp_path, tokenizer_file, random_model())
    cfg = export_cfg(run, heldout_file, verify=False, dtype="bfloat16", max_shard_size="100KB")
    plan = "\n".join(export.plan_lines(cfg))
    assert "model-0000k-of-00004.safetensors" in plan and "config.json" in plan
    listed = "\n".join(export.push_to_hub(cfg, "me/dante-tiny", dry_run=True))
    assert "after the export finishes" in listed
    run_export(cfg)
    listed = export.push_to_hub(cfg, "me/dante-tiny", dry_run=True)
    out = stage_dir(run, "09_export")
    expected = {f.name for f in out.iterdir()} - {"manifest.json"}
    assert {line.split()[0] for line in listed[1:]} == expected
    assert all(line.split()[1].replace(",", "").isdigit() for line in listed[1:])  # sizes in bytes
    with pytest.raises(UserError, match="repository id like"):
        export.push_to_hub(cfg, "not a repo", dry_run=True)


def test_cli_push_offline_is_one_clear_error(tmp_path, tokenizer_file, heldout_file):
    """The real script and the real huggingface_hub client against an endpoint that refuses connections."""
    import yaml

    run = make_run(tmp_path, tokenizer_file, random_model())
    cfg = export_cfg(run, heldout_file, verify=False)
    run_export(cfg)
    cfg_file = tmp_path / "export.yaml"
    cfg_file.write_text(yaml.safe_dump(C.to_dict(cfg)))
    env = {"PATH": "/usr/bin:/bin", "HF_ENDPOINT": "http://127.0.0.1:9", "HF_TOKEN": "hf_test_not_a_token",
           "HOME": str(tmp_path), "DS_ACCELERATOR": "cpu"}
    script = [sys.executable, str(REPO / "9_export_hf.py"), "--config", str(cfg_file), "--push-to-hub", "me/dante-tiny"]
    dry = subprocess.run(script + ["--dry-run"], capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert dry.returncode == 0 and "would upload" in dry.stdout and "model.safetensors" in dry.stdout
    push = subprocess.run(script, capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert push.returncode == 2, push.stderr
    assert "cannot reach the Hugging Face Hub" in push.stderr and "Traceback" not in push.stderr


# -- reliability (issue 13): checks before --force, damaged inputs named, deterministic bytes -----------------


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: max(1, path.stat().st_size // 2)])


def flip_byte(path: Path) -> None:
    """One byte in the middle of the file inverted: the file still parses (a weight changed), only its
    checksum can tell."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_force_with_a_bad_input_leaves_the_finished_export_byte_identical(tmp_path, tokenizer_file, heldout_file):
    """The real script: a finished 09_export, then ``--force`` with the checkpoint stage gone and with a
    bit-flipped model.safetensors (its sha256 in meta.json no longer matches). Each exits 2 with a message
    naming what to do, and not one byte of the finished export changed (the checks run in ``validate``,
    before --force resets the folder)."""
    import yaml

    run = make_run(tmp_path, tokenizer_file, random_model())
    cfg = export_cfg(run, heldout_file, verify=False)
    cfg_file = tmp_path / "export.yaml"
    cfg_file.write_text(yaml.safe_dump(C.to_dict(cfg)))
    run_export(cfg)
    out = stage_dir(run, "09_export")
    before = folder_bytes(out)
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "DS_ACCELERATOR": "cpu"}

    def force():
        r = subprocess.run([sys.executable, str(REPO / "9_export_hf.py"), "--config", str(cfg_file), "--force"],
                           capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert folder_bytes(out) == before
        return r.stderr

    pretrain = stage_dir(run, "04_pretrain")
    pretrain.rename(tmp_path / "moved")
    err = force()
    assert "04_pretrain is missing" in err and "python 4_pretrain.py" in err
    (tmp_path / "moved").rename(pretrain)
    weights = pretrain / ckpt.CHECKPOINTS / ckpt.step_dir_name(10) / ckpt.WEIGHTS
    flip_byte(weights)
    err = force()
    assert f"checkpoint {weights.parent} is damaged" in err and "model.safetensors: sha256" in err, err
    assert "HINT: restore" in err


@pytest.mark.parametrize("damaged, checksums", [(ckpt.META, True), (ckpt.MODEL_CONFIG, True), (ckpt.WEIGHTS, True),
                                                (ckpt.MODEL_CONFIG, False), (ckpt.WEIGHTS, False), ("tokenizer.json", True)])
def test_a_truncated_input_is_named_with_its_fix(tmp_path, tokenizer_file, heldout_file, damaged, checksums):
    """Truncated: refused with the file and a fix, by its recorded size, or (a checkpoint written before
    checksums were recorded) because it no longer parses; never a JSONDecodeError or SafetensorError."""
    run = make_run(tmp_path, tokenizer_file, random_model())
    step_dir = stage_dir(run, "04_pretrain") / ckpt.CHECKPOINTS / ckpt.step_dir_name(10)
    if not checksums:
        meta = read_json(step_dir / ckpt.META)
        del meta["files"]
        atomic_write_json(step_dir / ckpt.META, meta)
    folder = stage_dir(run, "02_tokenizer") if damaged == "tokenizer.json" else step_dir
    truncate(folder / damaged)
    with pytest.raises(UserError) as err:
        export.preflight(export_cfg(run, heldout_file))
    message = str(err.value)
    assert str(folder) in message and damaged in message and "HINT: restore" in message, message


def test_a_bad_export_checkpoint_is_named_as_the_user_set_it(tmp_path, tokenizer_file, heldout_file):
    run = make_run(tmp_path, tokenizer_file, random_model())
    for bad in (str(tmp_path / "nope"), "08_eval", "05_extend"):
        with pytest.raises((UserError, StageError)) as err:
            export.preflight(export_cfg(run, heldout_file, checkpoint=bad))
        message = str(err.value)
        assert "export.checkpoint" in message or "5_extend_context.py" in message, message
        assert "eval.checkpoints" not in message


def test_sft_sources_and_eval_report_are_checked_before_the_work(tmp_path, tokenizer_file, heldout_file):
    """What the verification and the card read later (stage 6's local conversations, stage 8's report.json)
    is checked in preflight, so a missing or damaged file is refused before --force deletes anything."""
    run = make_run(tmp_path, tokenizer_file, random_model(), stage="07_sft")
    gone = tmp_path / "gone.jsonl"
    source = C.SFTSourceConfig(name="chat", kind="local", path=str(gone))
    Stage.open(C.SFTDataStageConfig(run=run, sft_data=C.SFTDataConfig(sources=[source])), "06_sft_data").finish()
    eval_stage = Stage.open(C.EvalStageConfig(run=run), "08_eval")
    (eval_stage.dir / "report.json").write_text('{"summary": {')
    eval_stage.finish()
    with pytest.raises(UserError) as err:
        export.preflight(export_cfg(run, heldout_file))
    message = str(err.value)
    assert f"sft_data.sources[0] (chat): no file matches {str(gone)!r}" in message
    assert "report.json is unreadable" in message and "8_eval.py" in message
    with pytest.raises(UserError) as err:  # without the verification stage 6's files are not read
        export.preflight(export_cfg(run, heldout_file, verify=False))
    assert "sft_data" not in str(err.value) and "report.json" in str(err.value)


def test_the_same_run_exports_byte_identical_files(tmp_path, tokenizer_file, heldout_file):
    """Sharded bf16 safetensors, index, config, tokenizer files, card and a GGUF: the same bytes on a second
    export; the manifest differs only in its timing fields."""
    run = make_run(tmp_path, tokenizer_file, random_model())
    cfg = export_cfg(run, heldout_file, verify=False, dtype="bfloat16", max_shard_size="200KB", gguf=True,
                     gguf_types=["f16"], gguf_pre_tokenizer="llama-bpe")
    out = stage_dir(run, "09_export")
    run_export(cfg)
    first = folder_bytes(out)
    run_export(cfg, force=True)
    second = folder_bytes(out)
    assert first.keys() == second.keys() and "model-00002-of-00002.safetensors" in first and "t-f16.gguf" in first
    # the manifest's timing fields have a resolution of one second: equal when both runs fit in one
    assert [name for name in first if first[name] != second[name]] in ([], ["manifest.json"])
    timing = ("started", "finished")
    m1, m2 = ({k: v for k, v in json.loads(m["manifest.json"]).items() if k not in timing} for m in (first, second))
    assert m1 == m2


def test_profile_configs_are_valid(monkeypatch):
    monkeypatch.chdir(REPO)  # the profiles name files relative to the repository root
    for profile in ("tiny", "dante-2b"):
        cfg = C.load_config(C.ExportStageConfig, REPO / "configs" / profile / "export.yaml")
        assert export.config_problems(cfg) == []


def test_a_chat_prompt_longer_than_the_context_is_skipped_not_a_traceback(tmp_path, tokenizer_file, heldout_file):
    """A 64-position chat model: the built-in chat prompt does not fit, so greedy verification skips it
    (and says so) instead of raising the KV cache's ValueError."""
    run = make_run(tmp_path, tokenizer_file, random_model(max_seq_len=64), stage="07_sft")
    Stage.open(C.SFTDataStageConfig(run=run), "06_sft_data").finish()
    manifest = run_export(export_cfg(run, heldout_file, verify_seq_len=64))
    greedy = manifest["verification"]["greedy"]
    assert greedy["skipped_longer_than_context"] >= 1 and greedy["prompts"] >= 1
    assert greedy["identical"] + len(greedy["ties"]) == greedy["prompts"]
