"""The one name table between Dante (Meta-LLaMA names) and Hugging Face ``LlamaForCausalLM``.

Stage 9 (``dante/export.py``) writes Hugging Face folders with it; the model tests load our weights
into ``transformers`` with it. Only names change: Dante's RoPE uses the rotate-half layout that
transformers uses (see ``dante/rope.py``), so wq/wk need no permutation, and every tensor keeps its
shape. With tied embeddings ``output.weight`` is the embedding matrix: it is not written, and the
config says ``tie_word_embeddings: true``.

Example::

    hf_sd = to_hf_state_dict(model.state_dict(), tie_embeddings=cfg.tie_embeddings)
    hf_model = LlamaForCausalLM(LlamaConfig(**llama_config_kwargs(cfg)))
    hf_model.load_state_dict(hf_sd, strict=not cfg.tie_embeddings)
"""

from __future__ import annotations

import re
from typing import Any, Mapping

from dante.config import ModelConfig

#: Dante name -> Hugging Face name; "{i}" is the layer index.
HF_NAME_MAP: dict[str, str] = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "layers.{i}.attention.wq.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "layers.{i}.attention.wk.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "layers.{i}.attention.wv.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "layers.{i}.attention.wo.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "layers.{i}.feed_forward.w1.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "layers.{i}.feed_forward.w2.weight": "model.layers.{i}.mlp.down_proj.weight",
    "layers.{i}.feed_forward.w3.weight": "model.layers.{i}.mlp.up_proj.weight",
    "layers.{i}.attention_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "layers.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
}


def _compile(table: Mapping[str, str]) -> list[tuple[re.Pattern, str]]:
    return [(re.compile("^" + re.escape(src).replace(r"\{i\}", r"(\d+)") + "$"), dst) for src, dst in table.items()]


_TO_HF = _compile(HF_NAME_MAP)
_FROM_HF = _compile({v: k for k, v in HF_NAME_MAP.items()})


def _rename(name: str, rules: list[tuple[re.Pattern, str]], direction: str) -> str:
    for pattern, target in rules:
        m = pattern.match(name)
        if m:
            return target.replace("{i}", m.group(1)) if m.groups() else target
    raise KeyError(f"no {direction} name for {name!r}; dante.convert.HF_NAME_MAP lists every known name")


def to_hf_name(name: str) -> str:
    return _rename(name, _TO_HF, "Hugging Face")


def from_hf_name(name: str) -> str:
    return _rename(name, _FROM_HF, "Dante")


def to_hf_state_dict(state_dict: Mapping[str, Any], tie_embeddings: bool) -> dict[str, Any]:
    """Rename a Dante state dict to Hugging Face names; with tied embeddings lm_head is left out."""
    return {to_hf_name(k): v for k, v in state_dict.items() if not (tie_embeddings and k == "output.weight")}


def from_hf_state_dict(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Rename a Hugging Face Llama state dict to Dante names (rotary buffers, if any, are dropped)."""
    return {from_hf_name(k): v for k, v in state_dict.items() if not k.endswith("rotary_emb.inv_freq")}


def llama_config_kwargs(cfg: ModelConfig) -> dict[str, Any]:
    """Keyword arguments for ``transformers.LlamaConfig`` (v5 names) describing the same model.

    transformers requires dim % n_heads == 0 even when head_dim is explicit; validate before export.
    """
    from dante.model import ffn_hidden_dim_of, head_dim_of  # local: keep this module importable without torch

    scaling = {k: v for k, v in cfg.rope_scaling.items() if k not in ("type", "rope_type")}
    rope_type = cfg.rope_scaling.get("rope_type", cfg.rope_scaling.get("type", "default"))
    rope_parameters = {"rope_type": rope_type, **scaling, "rope_theta": cfg.rope_theta}
    return {
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "intermediate_size": ffn_hidden_dim_of(cfg),
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": head_dim_of(cfg),
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "initializer_range": cfg.init_std,
        "tie_word_embeddings": cfg.tie_embeddings,
        "rope_parameters": rope_parameters,
        "attention_bias": False,
        "mlp_bias": False,
    }
