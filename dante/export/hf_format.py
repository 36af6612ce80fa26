"""The Hugging Face ``LlamaForCausalLM`` form of a Dante model: the one name table, config.json, and what Llama cannot say.

Stage 9 (``dante/export/stage.py``) writes Hugging Face folders with it; the model tests and the CPU
bench load our weights into ``transformers`` with it.

Design choices
- One mapping table: parameter names Dante (Meta-LLaMA) -> Hugging Face are ``HF_NAME_MAP``, the
  ModelConfig -> LlamaConfig fields ``llama_config_kwargs``; nothing else renames. Only names change:
  Dante's RoPE uses the rotate-half layout that transformers uses (see ``dante/rope.py``), so wq/wk need
  no permutation, and every tensor keeps its shape. With tied embeddings ``output.weight`` is the
  embedding matrix: it is not written, and the config says ``tie_word_embeddings: true``.
- config.json is built here, not by ``save_pretrained``: transformers 5 saves ``rope_parameters``, which
  transformers 4.x does not read. We write the keys both read: ``rope_theta`` + ``rope_scaling`` (5.x
  converts them on load), ``torch_dtype`` + ``dtype``.
- Refuse rather than write a wrong model (``llama_problems``, ``weight_problems``): ModelConfig fields the
  exporter does not know (set to a non-default value), dim not divisible by n_heads (transformers'
  LlamaConfig rejects it even with head_dim set), a rope_scaling transformers does not implement the way
  ``dante.rope`` does, parameters with no Llama counterpart (biases, extra norms), shapes a
  ``LlamaForCausalLM`` of that config would not have (e.g. per-layer FFN widths), "tied" embeddings that
  differ.
- ``transformers`` is imported inside the functions that use it: importing it costs about 1 s and its
  Llama classes about 5 s more (measured on CPU), which the name table's users and ``--help`` do not need.

Example::

    hf_sd = to_hf_state_dict(model.state_dict(), tie_embeddings=cfg.tie_embeddings)
    hf_model = LlamaForCausalLM(LlamaConfig(**llama_config_kwargs(cfg)))
    hf_model.load_state_dict(hf_sd, strict=not cfg.tie_embeddings)
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from safetensors import safe_open

from dante import config as C
from dante.model import ffn_hidden_dim_of, head_dim_of
from dante.tokenizer import BOS_ID, EOS_ID, EOT_ID, PAD_ID

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
    raise KeyError(f"no {direction} name for {name!r}; dante.export.hf_format.HF_NAME_MAP lists every known name")


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


def llama_config_kwargs(cfg: C.ModelConfig) -> dict[str, Any]:
    """Keyword arguments for ``transformers.LlamaConfig`` (v5 names) describing the same model.

    transformers requires dim % n_heads == 0 even when head_dim is explicit; validate before export.
    """
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


#: ModelConfig field -> the config.json key that expresses it. A field missing here is unknown to the
#: exporter: a non-default value of it is refused (it could change the math in a way Llama cannot say).
EXPRESSED_FIELDS = {
    "dim": "hidden_size",
    "n_layers": "num_hidden_layers",
    "n_heads": "num_attention_heads",
    "n_kv_heads": "num_key_value_heads",
    "head_dim": "head_dim",
    "vocab_size": "vocab_size",
    "ffn_hidden_dim": "intermediate_size",
    "ffn_dim_multiplier": "intermediate_size",
    "multiple_of": "intermediate_size",
    "norm_eps": "rms_norm_eps",
    "rope_theta": "rope_theta",
    "max_seq_len": "max_position_embeddings",
    "rope_scaling": "rope_scaling",
    "tie_embeddings": "tie_word_embeddings",
    "init_std": "initializer_range",
}


# ---------------------------------------------------------------------------------------------------
# What the Llama format can express
# ---------------------------------------------------------------------------------------------------


def llama_problems(m: C.ModelConfig) -> list[str]:
    """Why this ModelConfig cannot be written as a LlamaForCausalLM (empty when it can)."""
    import transformers.modeling_rope_utils as rope_utils  # heavy: see the module docstring

    p = list(C.validate_model(m))
    defaults = C.ModelConfig()
    for f in dataclasses.fields(C.ModelConfig):
        if f.name not in EXPRESSED_FIELDS and getattr(m, f.name) != getattr(defaults, f.name):
            p.append(f"model.{f.name}={getattr(m, f.name)!r}: the exporter does not know how Llama expresses this "
                     "option; teach dante/export/hf_format.py (EXPRESSED_FIELDS) or train without it")
    if m.head_dim and m.n_heads > 0 and m.dim % m.n_heads:  # (head_dim 0: validate_model reports it)
        p.append(f"model.dim={m.dim} is not divisible by model.n_heads={m.n_heads}: transformers' LlamaConfig "
                 "rejects that even with head_dim set, so no Llama config describes this model")
    if m.rope_scaling:
        p += C.rope_scaling_problems(m.rope_scaling, "model.rope_scaling", m.max_seq_len)
        rope_type = m.rope_scaling.get("rope_type", m.rope_scaling.get("type"))
        if rope_type not in ("default", None) and rope_type not in rope_utils.ROPE_INIT_FUNCTIONS:
            p.append(f"model.rope_scaling.rope_type={rope_type!r} is unknown to the installed transformers")
    return sorted(set(p), key=p.index)


def expected_hf_shapes(m: C.ModelConfig) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of the files for this config, from a LlamaForCausalLM on the meta device."""
    from transformers import LlamaConfig, LlamaForCausalLM  # heavy: see the module docstring

    with torch.device("meta"):
        reference = LlamaForCausalLM(LlamaConfig(**llama_config_kwargs(m)))
    shapes = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    if m.tie_embeddings:
        shapes.pop("lm_head.weight", None)
    return shapes


def weight_problems(weights_file: Path, m: C.ModelConfig) -> list[str]:
    """Tensors of the checkpoint file that a LlamaForCausalLM of this config would not hold, or would hold
    with another shape. Reads the safetensors header only (and the two embedding matrices when a "tied"
    checkpoint stores both). The reference is transformers itself (``expected_hf_shapes``)."""
    p = []
    expected = expected_hf_shapes(m)
    seen = set()
    with safe_open(str(weights_file), "pt") as f:
        names = list(f.keys())
        for name in names:
            shape = tuple(f.get_slice(name).get_shape())
            if name == "output.weight" and m.tie_embeddings:
                if "tok_embeddings.weight" not in names or not torch.equal(f.get_tensor(name), f.get_tensor("tok_embeddings.weight")):
                    p.append("model.tie_embeddings is true but output.weight differs from tok_embeddings.weight: "
                             "the checkpoint is not tied, and a tied export would change the model")
                continue
            try:
                hf_name = to_hf_name(name)
            except KeyError:
                p.append(f"parameter {name} {shape} has no LlamaForCausalLM counterpart "
                         "(Llama has no biases or extra norms): the export would drop it")
                continue
            seen.add(hf_name)
            if hf_name not in expected:
                p.append(f"parameter {name} -> {hf_name} does not exist in a LlamaForCausalLM with {m.n_layers} layers")
            elif shape != expected[hf_name]:
                p.append(f"parameter {name} has shape {shape}, but the Llama config says {hf_name} is "
                         f"{expected[hf_name]} (e.g. a per-layer FFN width Llama cannot express)")
    for hf_name in sorted(set(expected) - seen):
        p.append(f"the checkpoint has no tensor for {hf_name}: it would be left randomly initialized")
    return p


# ---------------------------------------------------------------------------------------------------
# config.json and generation_config.json
# ---------------------------------------------------------------------------------------------------


def hf_config_dict(m: C.ModelConfig, eos_id: int, dtype: str) -> dict:
    """config.json for LlamaForCausalLM, readable by transformers 4.x and 5.x (see the module docstring)."""
    # Evidence for "4.x reads it": checked by hand once, transformers 4.57.1 loads the tiny pipeline's export
    # (sharded, YaRN) and generates the same ids as 5.24. The tests load it with the installed version.
    import transformers  # heavy: see the module docstring

    kwargs = llama_config_kwargs(m)
    rope = dict(kwargs.pop("rope_parameters"))
    rope_theta = rope.pop("rope_theta")
    rope_type = rope.pop("rope_type")
    rope_scaling = None
    if rope_type != "default":
        # both spellings of the type: 4.x before 4.45 reads "type", later versions "rope_type"
        rope_scaling = {"rope_type": rope_type, "type": rope_type, **rope}
        for key in ("factor", "attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim"):
            if key in rope_scaling:
                rope_scaling[key] = float(rope_scaling[key])  # transformers warns on an int attention_factor
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        **kwargs,
        "rope_theta": float(rope_theta),
        "rope_scaling": rope_scaling,
        "attention_dropout": 0.0,
        "pretraining_tp": 1,
        "use_cache": True,
        "bos_token_id": BOS_ID,
        "eos_token_id": eos_id,
        "pad_token_id": PAD_ID,
        "torch_dtype": dtype,
        "dtype": dtype,
        "transformers_version": transformers.__version__,
    }


def generation_config_dict(gen: C.GenerationConfig, eos_id: int, extra_stop_ids: Iterable[int] = ()) -> dict:
    """generation_config.json: the stop ids (eos first, then <|eot|>, <|end_of_text|> and stage 8's
    stop_tokens) and stage 8's sampling defaults.

    top_k is written even when 0: transformers' own default is 50, which would silently differ from the
    sampling the model was evaluated with (0 = no top-k filter in both).
    """
    import transformers  # heavy: see the module docstring

    eos_ids = list(dict.fromkeys([eos_id, EOT_ID, EOS_ID, *extra_stop_ids]))
    sampling = gen.temperature > 0
    out = {
        "bos_token_id": BOS_ID,
        "eos_token_id": eos_ids,
        "pad_token_id": PAD_ID,
        "do_sample": sampling,
        "max_new_tokens": gen.max_new_tokens,
        "repetition_penalty": gen.repetition_penalty,
    }
    if sampling:
        out.update(temperature=gen.temperature, top_p=gen.top_p, top_k=gen.top_k)
    out["transformers_version"] = transformers.__version__
    return out
