"""Stage 9's GGUF files: a Dante checkpoint for llama.cpp and Ollama, written with ``gguf`` (llama.cpp's own writer).

What a GGUF holds and how Dante fills it (``llama`` architecture, one file per ``export.gguf_types``):

- Hyperparameters under ``llama.*``: context length, widths, heads, RMSNorm eps, RoPE base and dimension
  count, key/value head width; YaRN as ``llama.rope.scaling.{type,factor,original_context_length}``.
  llama.cpp's ``llama`` architecture reads no YaRN beta keys (it uses beta_fast 32, beta_slow 1) and
  multiplies cos/sin by 0.1 ln(factor) + 1 itself, so a non-default beta, ``truncate: false`` or an mscale
  pair is refused, and an explicit ``attention_factor`` A is written as ``rope.scaling.attn_factor`` =
  A / (0.1 ln(factor) + 1) (llama-context.cpp cancels its own factor that way).
- Tensors under llama.cpp's names (``GGUF_NAME_MAP``, checked against ``gguf.TENSOR_NAMES``). wq and wk are
  permuted from Dante's rotate-half layout to the adjacent-pair layout of llama.cpp's ``llama`` RoPE
  (``to_adjacent_pairs``, the inverse of the permutation Hugging Face's Llama conversion applies). With tied
  embeddings ``output.weight`` is not written: llama.cpp then uses ``token_embd.weight`` for the output
  (``TENSOR_DUPLICATED`` in src/models/llama.cpp).
- Weight types: f32, f16, bf16 (2-D weights; norms stay f32, as llama.cpp's converter does), q8_0 (2-D
  weights whose rows are a multiple of 32 values; others f16).
- The tokenizer: ``tokenizer.ggml.model = gpt2`` (byte-level BPE), tokens, merges, token types (specials
  and reserved ids CONTROL, so text never produces them), bos <|begin_of_text|>, eos <|end_of_text|>, eot
  <|eot|> (both end generation in llama.cpp), pad <|pad|>, no added BOS/EOS (stage 3's documents start
  without BOS), the chat template for an SFT checkpoint. ``tokenizer.ggml.pre`` names the llama.cpp
  pre-tokenizer type (``dante.pretokenizers.LLAMA_CPP_TYPES``): llama.cpp splits text with its own regex
  list for that name, never with the tokenizer.json's. So a type is named only when it reproduces the
  tokenizer exactly, unless ``export.gguf_pre_tokenizer`` forces one; then ``id_mismatch`` measures the
  cost on held-out text with ``llama_cpp_equivalent`` (our vocabulary split by that type's list).

Example::

    problems = gguf_problems(cfg.export, model_cfg, tokenizer)
    info = write_gguf(out / "dante-f16.gguf", model.state_dict(), model_cfg, tokenizer, "f16", "llama-bpe", None, "Dante")
    summary = read_gguf(out / "dante-f16.gguf")
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from tokenizers import Regex, Tokenizer, pre_tokenizers

from dante import config as C
from dante.artifacts import atomic_path
from dante.model import ffn_hidden_dim_of, head_dim_of
from dante.pretokenizers import LLAMA_CPP_TYPES
from dante.tokenizer import BOS_ID, EOS_ID, EOT_ID, PAD_ID, all_special_tokens, tokenizer_facts

#: export.gguf_types value -> (gguf.GGMLQuantizationType of 2-D weights, gguf.LlamaFileType), by member name
GGUF_TYPES: dict[str, tuple[str, str]] = {
    "f32": ("F32", "ALL_F32"),
    "f16": ("F16", "MOSTLY_F16"),
    "bf16": ("BF16", "MOSTLY_BF16"),
    "q8_0": ("Q8_0", "MOSTLY_Q8_0"),
}

#: Dante name -> GGUF name ("{i}" is the layer index): llama.cpp's tensor names for the llama architecture
#: (tests/test_gguf.py checks them against gguf.TENSOR_NAMES).
GGUF_NAME_MAP: dict[str, str] = {
    "tok_embeddings.weight": "token_embd.weight",
    "norm.weight": "output_norm.weight",
    "output.weight": "output.weight",
    "layers.{i}.attention.wq.weight": "blk.{i}.attn_q.weight",
    "layers.{i}.attention.wk.weight": "blk.{i}.attn_k.weight",
    "layers.{i}.attention.wv.weight": "blk.{i}.attn_v.weight",
    "layers.{i}.attention.wo.weight": "blk.{i}.attn_output.weight",
    "layers.{i}.feed_forward.w1.weight": "blk.{i}.ffn_gate.weight",
    "layers.{i}.feed_forward.w2.weight": "blk.{i}.ffn_down.weight",
    "layers.{i}.feed_forward.w3.weight": "blk.{i}.ffn_up.weight",
    "layers.{i}.attention_norm.weight": "blk.{i}.attn_norm.weight",
    "layers.{i}.ffn_norm.weight": "blk.{i}.ffn_norm.weight",
}
_RULES = [(re.compile("^" + re.escape(k).replace(r"\{i\}", r"(\d+)") + "$"), v) for k, v in GGUF_NAME_MAP.items()]

#: Q8_0 quantizes blocks of 32 consecutive values of a row (ggml's QK8_0).
Q8_0_BLOCK = 32


def _gguf():
    """The ``gguf`` package, imported where a file is written or read: it takes 0.36 s to import (measured) and
    only export.gguf needs it, so stage 9's checks, the model card and --help do without it."""
    import gguf

    return gguf


def gguf_name(name: str) -> str:
    for pattern, target in _RULES:
        m = pattern.match(name)
        if m:
            return target.replace("{i}", m.group(1)) if m.groups() else target
    raise KeyError(f"no GGUF name for {name!r}; dante.export.gguf.GGUF_NAME_MAP lists every known name")


def to_adjacent_pairs(w_OI: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of a query/key projection from rotate-half pairs (j, j + D/2) to adjacent pairs (2j, 2j + 1).

    (n_heads * D, in) -> same shape; within each head, new row 2j + h is old row h * D/2 + j.
    """
    out_dim, in_dim = w_OI.shape
    d = out_dim // n_heads
    return w_OI.reshape(n_heads, 2, d // 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


# ---------------------------------------------------------------------------------------------------
# What a GGUF can carry
# ---------------------------------------------------------------------------------------------------


def carried_pre_type(tokenizer: Tokenizer) -> str | None:
    """The llama.cpp type that splits and merges exactly as this tokenizer does, or None."""
    return tokenizer_facts(tokenizer)["llama_cpp_pre"]


def refusal_lines(facts: dict) -> list[str]:
    """Why no GGUF for this tokenizer, and the options (stage 9's error, the model card's note)."""
    kind = facts["pretokenizer"]
    exact = sorted(t for t in LLAMA_CPP_TYPES if t != "default")
    return [
        f"the tokenizer's pre-tokenizer is {kind!r}, which no llama.cpp pre-tokenizer type reproduces: a GGUF names "
        "its type from llama.cpp's fixed list (tokenizer.ggml.pre) and llama.cpp splits text with its own regexes for "
        "that name" + (", and its regex engine cannot run the Dante regex (lookbehinds, inline (?i:), a literal ’ "
                      "beside \\p{L})" if kind.startswith("dante") else ""),
        "options: (1) export.gguf: false (the Hugging Face folder runs in transformers, vLLM and lm-eval); "
        "(2) train stage 2 with a preset llama.cpp carries (tokenizer.pretokenizer: llama3, qwen2, gpt2 or minerva; "
        "stage 2's A/B report has a GGUF column) and retrain the model on it; (3) export.gguf_pre_tokenizer: NAME "
        f"({', '.join(exact)}) forces a type: the GGUF then tokenizes part of the text differently from training, "
        "and the measured id mismatch on export.heldout goes into the manifest and the model card",
    ]


def rope_problems(m: C.ModelConfig) -> list[str]:
    """RoPE settings llama.cpp's llama architecture would not reproduce."""
    rs = m.rope_scaling or {}
    kind = rs.get("rope_type", rs.get("type", "default"))
    p = []
    if kind not in ("default", "linear", "yarn"):
        p.append(f"model.rope_scaling.rope_type={kind!r}: llama.cpp's llama architecture has no such scaling")
    if kind == "yarn":
        for key, default in (("beta_fast", 32.0), ("beta_slow", 1.0)):
            if rs.get(key) is not None and float(rs[key]) != default:
                p.append(f"model.rope_scaling.{key}={rs[key]}: llama.cpp's llama architecture reads no YaRN beta key "
                         f"and always uses {key} {default:g}")
        if rs.get("truncate") is False:
            p.append("model.rope_scaling.truncate=false: llama.cpp always floors/ceils the YaRN ramp ends")
        if rs.get("mscale") or rs.get("mscale_all_dim"):
            p.append("model.rope_scaling.mscale/mscale_all_dim: llama.cpp's llama architecture does not implement them")
    if head_dim_of(m) % 2:
        p.append(f"head_dim={head_dim_of(m)} is odd: RoPE pairs need an even head width")
    return p


def gguf_problems(e: C.ExportConfig, m: C.ModelConfig, tokenizer: Tokenizer) -> list[str]:
    """Everything that would stop a faithful GGUF, before any weight is read (empty when export.gguf is off)."""
    if not e.gguf:
        return []
    p = list(gguf_config_problems(e))
    facts = tokenizer_facts(tokenizer)
    if not e.gguf_pre_tokenizer and facts["llama_cpp_pre"] is None:
        p += [f"export.gguf: {line}" for line in refusal_lines(facts)]
    return p + rope_problems(m)


def gguf_config_problems(e: C.ExportConfig) -> list[str]:
    """export.gguf_types and export.gguf_pre_tokenizer values that do not exist."""
    p = []
    if not e.gguf_types and e.gguf:
        p.append(f"export.gguf_types: empty; list one or more of {', '.join(GGUF_TYPES)}")
    for t in e.gguf_types:
        if t not in GGUF_TYPES:
            p.append(f"export.gguf_types: unknown GGUF type {t!r}; choose from {', '.join(GGUF_TYPES)}")
    if len(set(e.gguf_types)) != len(e.gguf_types):
        p.append(f"export.gguf_types: {e.gguf_types} lists a type twice")
    if e.gguf_pre_tokenizer and e.gguf_pre_tokenizer not in LLAMA_CPP_TYPES:
        p.append(f"export.gguf_pre_tokenizer: unknown llama.cpp pre-tokenizer type {e.gguf_pre_tokenizer!r}; "
                 f"choose from {', '.join(LLAMA_CPP_TYPES)} (the lists dante/pretokenizers.py transcribes)")
    return p


# ---------------------------------------------------------------------------------------------------
# A forced type: what llama.cpp would do with this vocabulary, and what that costs
# ---------------------------------------------------------------------------------------------------


def llama_cpp_equivalent(tokenizer: Tokenizer, pre_type: str) -> Tokenizer:
    """Our vocabulary and merges, split by llama.cpp's regex list for ``pre_type`` (and its ignore_merges):
    the ids a GGUF naming that type gives. (tests/test_pretokenizers.py shows the lists split like llama.cpp.)"""
    t = LLAMA_CPP_TYPES[pre_type]
    state = json.loads(tokenizer.to_str())
    state["model"]["ignore_merges"] = t.ignore_merges
    other = Tokenizer.from_str(json.dumps(state))
    other.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(p), behavior="isolated", invert=False) for p in t.patterns]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])
    other.encode_special_tokens = True
    return other


def id_mismatch(ours: Tokenizer, theirs: Tokenizer, texts_by_lang: dict[str, list[str]]) -> dict:
    """Per language: non-empty held-out lines whose ids differ, and the token counts of both."""
    out = {}
    for lang, texts in sorted(texts_by_lang.items()):
        lines = [ln for t in texts for ln in t.splitlines() if ln.strip()]
        a = [e.ids for e in ours.encode_batch(lines, add_special_tokens=False)]
        b = [e.ids for e in theirs.encode_batch(lines, add_special_tokens=False)]
        differ = sum(x != y for x, y in zip(a, b))
        out[lang] = {"lines": len(lines), "lines_differing": differ, "line_mismatch_rate": differ / max(len(lines), 1),
                     "tokens": sum(map(len, a)), "tokens_as_gguf": sum(map(len, b))}
    return out


# ---------------------------------------------------------------------------------------------------
# Writing and reading
# ---------------------------------------------------------------------------------------------------


def _tokenizer_arrays(tokenizer: Tokenizer, n_reserved: int) -> tuple[list[str], list[int], list[str]]:
    """Tokens by id, their GGUF types, merges as "left right" strings."""
    gguf = _gguf()
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    tokens = [""] * len(vocab)
    for text, i in vocab.items():
        tokens[i] = text
    n_special = len(all_special_tokens(n_reserved))
    types = [int(gguf.TokenType.CONTROL if i < n_special else gguf.TokenType.NORMAL) for i in range(len(tokens))]
    merges = json.loads(tokenizer.to_str())["model"]["merges"]
    merges = [" ".join(m) if isinstance(m, list) else m for m in merges]
    return tokens, types, merges


def _tensor_data(name: str, t: torch.Tensor, gtype: str):
    """(data, gguf.GGMLQuantizationType) of one tensor in the file's type (norms and other 1-D tensors stay f32)."""
    gguf = _gguf()
    x = t.detach().to("cpu", torch.float32).contiguous()
    if x.ndim == 1 or gtype == "f32":
        return x.numpy(), gguf.GGMLQuantizationType.F32
    qtype = gguf.GGMLQuantizationType[GGUF_TYPES[gtype][0]]
    if qtype == gguf.GGMLQuantizationType.Q8_0 and x.shape[-1] % Q8_0_BLOCK:
        qtype = gguf.GGMLQuantizationType.F16  # a row that is not whole Q8_0 blocks (llama.cpp's converter does the same)
    if qtype == gguf.GGMLQuantizationType.F16:
        return x.numpy().astype(np.float16), qtype
    return gguf.quants.quantize(x.numpy(), qtype), qtype


def write_gguf(path: Path, state_dict: Mapping[str, torch.Tensor], m: C.ModelConfig, tokenizer: Tokenizer,
               gtype: str, pre_type: str, chat_template: str | None, model_name: str) -> dict:
    """One GGUF file (written atomically); returns its size and tensor types for the manifest."""
    gguf = _gguf()
    facts = tokenizer_facts(tokenizer)
    w = gguf.GGUFWriter(None, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    w.add_name(model_name)
    w.add_file_type(int(gguf.LlamaFileType[GGUF_TYPES[gtype][1]]))
    if gtype == "q8_0":
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    hd = head_dim_of(m)
    w.add_vocab_size(m.vocab_size)
    w.add_context_length(m.max_seq_len)
    w.add_embedding_length(m.dim)
    w.add_block_count(m.n_layers)
    w.add_feed_forward_length(ffn_hidden_dim_of(m))
    w.add_head_count(m.n_heads)
    w.add_head_count_kv(m.n_kv_heads)
    w.add_key_length(hd)
    w.add_value_length(hd)
    w.add_layer_norm_rms_eps(m.norm_eps)
    w.add_rope_freq_base(float(m.rope_theta))
    w.add_rope_dimension_count(hd)
    rs = m.rope_scaling or {}
    kind = rs.get("rope_type", rs.get("type", "default"))
    if kind == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rs["factor"]))
    elif kind == "yarn":
        factor = float(rs["factor"])
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(factor)
        w.add_rope_scaling_orig_ctx_len(int(rs["original_max_position_embeddings"]))
        if rs.get("attention_factor") is not None:  # see the module docstring
            w.add_rope_scaling_attn_factors(float(rs["attention_factor"]) / (0.1 * math.log(factor) + 1.0))

    tokens, types, merges = _tokenizer_arrays(tokenizer, facts["n_reserved"])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre_type)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(BOS_ID)
    w.add_eos_token_id(EOS_ID)
    w.add_eot_token_id(EOT_ID)
    w.add_pad_token_id(PAD_ID)
    w.add_add_bos_token(False)
    w.add_add_eos_token(False)
    if chat_template:
        w.add_chat_template(chat_template)

    kinds: dict[str, int] = {}
    for name, t in state_dict.items():
        if name == "output.weight" and m.tie_embeddings:
            continue  # llama.cpp reuses token_embd.weight (module docstring)
        if name.endswith((".attention.wq.weight", ".attention.wk.weight")):
            t = to_adjacent_pairs(t, m.n_heads if ".wq." in name else m.n_kv_heads)
        data, qtype = _tensor_data(name, t, gtype)
        w.add_tensor(gguf_name(name), data, raw_dtype=qtype)
        kinds[qtype.name] = kinds.get(qtype.name, 0) + 1
    with atomic_path(path) as tmp:
        w.write_header_to_file(path=Path(tmp))
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return {"file": path.name, "bytes": path.stat().st_size, "type": gtype, "pre_tokenizer": pre_type, "tensor_types": kinds}


def read_gguf(path: Path) -> dict[str, Any]:
    """What a GGUF says about itself, read back with gguf's reader: metadata values and tensors (name ->
    (shape in PyTorch order, type)). The tests and the manifest use it."""
    r = _gguf().GGUFReader(str(path))
    meta: dict[str, Any] = {}
    for key, field in r.fields.items():
        if key.startswith("GGUF.") or key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type"):
            if key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type"):
                meta[key + ".count"] = len(field.data)
            continue
        meta[key] = field.contents()
    tensors = {t.name: (tuple(int(d) for d in reversed(t.shape)), t.tensor_type.name) for t in r.tensors}
    return {"metadata": meta, "tensors": tensors}
