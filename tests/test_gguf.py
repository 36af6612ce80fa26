"""Stage 9's GGUF files (dante/export/gguf.py): written with gguf, read back with gguf's reader, refused when
llama.cpp could not reproduce the tokenizer; and, where llama-cpp-python is importable, run in llama.cpp.

Run folders come from tests/test_export.py's builders (real stage manifests, a real trained tokenizer, a tiny
model checkpoint). The llama3-preset tokenizer is one llama.cpp's ``llama-bpe`` type reproduces; the default
``dante`` one is not.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dante.artifacts import read_json, stage_dir
from dante.errors import UserError
from dante.export import gguf as G
from dante.export.gguf_verify import llama_cpp_version
from dante.tokenizer import load_tokenizer, train_tokenizer
from tests.test_export import CHAT, SAMPLE, VOCAB, _texts, export_cfg, make_run, random_model, run_export, train_on_chat

LLAMA_CPP = llama_cpp_version()


@pytest.fixture(scope="module")
def llama3_tokenizer_file(tmp_path_factory):
    texts = _texts(SAMPLE / "it-fortunes.jsonl.gz", 400) + _texts(SAMPLE / "en-kjv.jsonl.gz", 60) \
        + _texts(SAMPLE / "code-cpython.jsonl.gz", 5)
    path = tmp_path_factory.mktemp("tok3") / "tokenizer.json"
    train_tokenizer(texts, vocab_size=VOCAB, pretokenizer="llama3", n_reserved=8).save(str(path))
    return path


@pytest.fixture(scope="module")
def dante_tokenizer_file(tmp_path_factory):
    texts = _texts(SAMPLE / "it-fortunes.jsonl.gz", 400) + _texts(SAMPLE / "en-kjv.jsonl.gz", 60)
    path = tmp_path_factory.mktemp("tokd") / "tokenizer.json"
    train_tokenizer(texts, vocab_size=VOCAB, n_reserved=8).save(str(path))
    return path


@pytest.fixture(scope="module")
def heldout_file(tmp_path_factory):
    import gzip
    import json

    # Diodati and the modern Italian of the LibreOffice help (its elisions use the ASCII apostrophe), English, code
    it = _texts(SAMPLE / "heldout" / "it.jsonl.gz", 100)
    docs = it[:2] + it[-2:] + _texts(SAMPLE / "heldout" / "en.jsonl.gz", 1) + _texts(SAMPLE / "heldout" / "code.jsonl.gz", 1)
    path = tmp_path_factory.mktemp("held") / "heldout.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": d[:3000]}) + "\n" for d in docs)
    return path


def test_gguf_export_reads_back(tmp_path, llama3_tokenizer_file, heldout_file):
    model = random_model()
    train_on_chat(model, llama3_tokenizer_file, CHAT, steps=20)  # real preferences, so top-1 comparisons mean something
    run = make_run(tmp_path, llama3_tokenizer_file, model, stage="07_sft")
    manifest = run_export(export_cfg(run, heldout_file, gguf=True, gguf_types=["f32", "f16", "q8_0"]))
    out = stage_dir(run, "09_export")
    g = manifest["gguf"]
    assert g["pre_tokenizer"] == "llama-bpe" and g["exact"] and [f["type"] for f in g["files"]] == ["f32", "f16", "q8_0"]

    f32 = G.read_gguf(out / "t-f32.gguf")
    meta, tensors = f32["metadata"], f32["tensors"]
    assert meta["general.architecture"] == "llama" and meta["tokenizer.ggml.model"] == "gpt2"
    assert meta["tokenizer.ggml.pre"] == "llama-bpe" and meta["tokenizer.ggml.tokens.count"] == VOCAB
    assert (meta["tokenizer.ggml.bos_token_id"], meta["tokenizer.ggml.eos_token_id"], meta["tokenizer.ggml.eot_token_id"],
            meta["tokenizer.ggml.padding_token_id"]) == (0, 1, 4, 5)
    assert meta["tokenizer.ggml.add_bos_token"] is False and "<|eot|>" in meta["tokenizer.chat_template"]
    assert (meta["llama.embedding_length"], meta["llama.block_count"], meta["llama.attention.head_count_kv"]) == (64, 2, 2)
    assert meta["llama.context_length"] == 128 and meta["llama.rope.dimension_count"] == 16
    assert "output.weight" not in tensors  # tied: llama.cpp reuses token_embd.weight
    assert tensors["token_embd.weight"] == ((VOCAB, 64), "F32") and tensors["blk.1.attn_k.weight"] == ((32, 64), "F32")
    assert len(tensors) == 2 + 2 * 9

    # wq rows in llama.cpp's adjacent-pair order: row 2j+h of a head is Dante's row h*D/2 + j
    import gguf

    r = gguf.GGUFReader(str(out / "t-f32.gguf"))
    attn_q = next(np.array(t.data) for t in r.tensors if t.name == "blk.0.attn_q.weight")
    wq = model.state_dict()["layers.0.attention.wq.weight"].numpy()
    d = 16
    order = [head * d + (k % 2) * (d // 2) + k // 2 for head in range(4) for k in range(d)]
    np.testing.assert_allclose(attn_q, wq[order], rtol=0, atol=0)

    q8 = G.read_gguf(out / "t-q8_0.gguf")["tensors"]
    assert q8["blk.0.ffn_down.weight"] == ((64, 192), "Q8_0") and q8["blk.0.attn_norm.weight"] == ((64,), "F32")
    assert G.read_gguf(out / "t-f16.gguf")["tensors"]["blk.0.ffn_up.weight"][1] == "F16"
    card = (out / "README.md").read_text()
    assert "llama-cli -m t-f32.gguf" in card and "PARAMETER stop <|eot|>" in card
    assert {"t-f32.gguf", "t-f16.gguf", "t-q8_0.gguf"} <= set(manifest["outputs"]["files"])

    lc = g["llama_cpp"]
    if LLAMA_CPP is None:
        assert "not importable" in lc["not_run"] and "Not checked in llama.cpp" in card
    else:  # the proof itself: llama.cpp gives our ids and our logits
        for res in lc["results"]:
            assert res["tokenizer"]["identical_to_ours"] == res["tokenizer"]["documents"] == 6
            if "bound" in res["logits"]:
                assert res["logits"]["max_abs_diff"] <= res["logits"]["bound"]
        assert lc["results"][0]["logits"]["top1_agreement"] == 1.0


def test_yarn_keys_and_what_llama_cpp_cannot_express(tmp_path, llama3_tokenizer_file, heldout_file):
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}
    run = make_run(tmp_path / "y", llama3_tokenizer_file, random_model(max_seq_len=256, rope_scaling=yarn), stage="05_extend")
    manifest = run_export(export_cfg(run, heldout_file, gguf=True, gguf_types=["f16"], verify_windows=1))
    meta = G.read_gguf(stage_dir(run, "09_export") / "t-f16.gguf")["metadata"]
    assert (meta["llama.rope.scaling.type"], meta["llama.rope.scaling.factor"], meta["llama.rope.scaling.original_context_length"]) \
        == ("yarn", 4.0, 64)
    assert "llama.rope.scaling.attn_factor" not in meta  # llama.cpp applies 0.1 ln(factor) + 1 itself
    assert "YaRN caveat" in (stage_dir(run, "09_export") / "README.md").read_text()
    if LLAMA_CPP is not None:  # positions beyond the original 64 tokens agree too
        lg = manifest["gguf"]["llama_cpp"]["results"][0]["logits"]
        assert lg["tokens_per_window"] == 256 and lg["max_abs_diff"] <= lg["bound"]

    odd = {**yarn, "beta_fast": 16.0}
    run = make_run(tmp_path / "b", llama3_tokenizer_file, random_model(max_seq_len=256, rope_scaling=odd), stage="05_extend")
    _refused(export_cfg(run, heldout_file, gguf=True), "beta_fast=16.0: llama.cpp's llama architecture reads no YaRN beta")


def _refused(cfg, match: str) -> None:
    with pytest.raises(UserError, match=match):
        run_export(cfg)
    out = stage_dir(cfg.run, "09_export")
    assert not (out / "manifest.json").exists() and not list(out.glob("*.gguf"))


def test_bad_gguf_requests_are_refused_before_any_work(tmp_path, dante_tokenizer_file, llama3_tokenizer_file, heldout_file):
    run = make_run(tmp_path / "d", dante_tokenizer_file, random_model())
    _refused(export_cfg(run, heldout_file, gguf=True), r"(?s)pre-tokenizer is 'dante'.*lookbehinds.*options: \(1\) export.gguf: false")
    assert not (stage_dir(run, "09_export") / "config.json").exists()  # refused before the Hugging Face folder too
    _refused(export_cfg(run, heldout_file, gguf=True, gguf_pre_tokenizer="llama4"), "unknown llama.cpp pre-tokenizer type 'llama4'")
    run = make_run(tmp_path / "t", llama3_tokenizer_file, random_model())
    _refused(export_cfg(run, heldout_file, gguf=True, gguf_types=["f16", "q4_k"]), "unknown GGUF type 'q4_k'")


def test_forced_pre_tokenizer_records_the_mismatch(tmp_path, dante_tokenizer_file, heldout_file):
    run = make_run(tmp_path, dante_tokenizer_file, random_model())
    manifest = run_export(export_cfg(run, heldout_file, gguf=True, gguf_types=["f16"], gguf_pre_tokenizer="qwen35"))
    g = manifest["gguf"]
    assert g["pre_tokenizer"] == "qwen35" and not g["exact"] and g["carried_type"] is None
    it = g["forced_id_mismatch"]["mix"]
    assert 0 < it["lines_differing"] < it["lines"]  # Italian elisions split differently; most lines do not change
    meta = G.read_gguf(stage_dir(run, "09_export") / "t-f16.gguf")["metadata"]
    assert meta["tokenizer.ggml.pre"] == "qwen35"
    card = (stage_dir(run, "09_export") / "README.md").read_text()
    assert "Forced pre-tokenizer" in card and f"{it['lines_differing']}/{it['lines']}" in card
    # the simulation is the definition of "what llama.cpp does" here; llama.cpp itself confirms it when present
    if LLAMA_CPP is not None:
        res = g["llama_cpp"]["results"][0]["tokenizer"]
        assert res["identical_to_expected"] == res["documents"] and res["identical_to_ours"] < res["documents"]
    tok = load_tokenizer(dante_tokenizer_file)
    assert G.llama_cpp_equivalent(tok, "qwen35").encode("e l'altro").ids != tok.encode("e l'altro").ids


def test_no_gguf_card_says_why(tmp_path, dante_tokenizer_file, heldout_file):
    run = make_run(tmp_path, dante_tokenizer_file, random_model())
    run_export(export_cfg(run, heldout_file, verify=False))
    card = (stage_dir(run, "09_export") / "README.md").read_text()
    assert "no GGUF in this folder" in card and "export.gguf_pre_tokenizer" in card
    assert read_json(stage_dir(run, "09_export") / "manifest.json")["gguf"] is None


def test_adjacent_pair_permutation_matches_rotary_math():
    """The permuted weights rotate like llama.cpp's adjacent pairs do what Dante's rotate-half does."""
    from dante.rope import apply_rotary, default_inv_freq, rope_table

    torch.manual_seed(0)
    n_heads, d, dim = 2, 8, 16
    w = torch.randn(n_heads * d, dim)
    x = torch.randn(5, dim)
    cos, sin = rope_table(default_inv_freq(d, 10000.0), 5, 1.0)
    ours = apply_rotary((x @ w.T).reshape(1, 5, n_heads, d), cos, sin)  # (B, T, H, D), rotate-half
    q = (x @ G.to_adjacent_pairs(w, n_heads).T).reshape(5, n_heads, d // 2, 2)  # (T, H, K, 2): pairs (2j, 2j+1)
    c, s = cos[:, None, :], sin[:, None, :]  # (T, 1, K)
    rot = torch.stack([q[..., 0] * c - q[..., 1] * s, q[..., 0] * s + q[..., 1] * c], -1)  # llama.cpp's NORM rope
    back = rot.transpose(-1, -2).reshape(5, n_heads, d)  # (T, H, 2, K) -> rotate-half order
    torch.testing.assert_close(back, ours[0], rtol=1e-5, atol=1e-5)


def test_tensor_names_are_llama_cpps():
    import gguf

    t = gguf.MODEL_TENSOR
    names = {t.TOKEN_EMBD: "tok_embeddings", t.OUTPUT_NORM: "norm", t.OUTPUT: "output",
             t.ATTN_Q: "layers.{i}.attention.wq", t.ATTN_K: "layers.{i}.attention.wk", t.ATTN_V: "layers.{i}.attention.wv",
             t.ATTN_OUT: "layers.{i}.attention.wo", t.FFN_GATE: "layers.{i}.feed_forward.w1",
             t.FFN_DOWN: "layers.{i}.feed_forward.w2", t.FFN_UP: "layers.{i}.feed_forward.w3",
             t.ATTN_NORM: "layers.{i}.attention_norm", t.FFN_NORM: "layers.{i}.ffn_norm"}
    expected = {dante + ".weight": gguf.TENSOR_NAMES[k].replace("{bid}", "{i}") + ".weight" for k, dante in names.items()}
    assert G.GGUF_NAME_MAP == expected
    assert set(names) <= set(gguf.MODEL_TENSORS[gguf.MODEL_ARCH.LLAMA])
