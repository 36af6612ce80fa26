"""Stage 9: a Hugging Face model folder that loads in plain ``transformers``, and the proof that it is our model.

``9_export_hf.py`` writes ``runs/<name>/09_export/``, a folder that ``AutoModelForCausalLM`` and
``AutoTokenizer`` read with no custom code:

- ``config.json`` (``LlamaForCausalLM``), ``generation_config.json`` (eos = <|eot|> and <|end_of_text|>,
  the sampling defaults of stage 8), ``model.safetensors`` (or shards + ``model.safetensors.index.json``);
- ``tokenizer.json`` (stage 2's file, byte for byte), ``tokenizer_config.json`` (bos/eos/pad, context
  length, the chat template of ``dante.sft.CHAT_TEMPLATE`` for an SFT checkpoint), ``special_tokens_map.json``;
- ``README.md``, a model card whose numbers are all read from the run's manifests, checkpoint metadata and
  stage 8's ``report.json``;
- ``manifest.json`` last, with the verification results (it is never uploaded).

Design choices
- One mapping table: parameter names come from ``dante.convert.HF_NAME_MAP`` and the ModelConfig ->
  LlamaConfig fields from ``dante.convert.llama_config_kwargs``; nothing here renames on its own. RoPE is
  rotate-half in Dante (``dante/rope.py``), so wq/wk are copied without permutation.
- Files are written here, not by ``save_pretrained``: transformers 5 saves ``rope_parameters``, a
  ``TokenizersBackend`` tokenizer class and a separate ``chat_template.jinja``, none of which transformers 4.x
  reads. We write the keys both read: ``rope_theta`` + ``rope_scaling`` (5.x converts them on load),
  ``torch_dtype`` + ``dtype``, ``tokenizer_class: PreTrainedTokenizerFast`` with the chat template inside
  ``tokenizer_config.json``. Verification loads the folder with the installed transformers (5.24); checked
  by hand once: transformers 4.57.1 loads the tiny pipeline's export (sharded, YaRN) and generates the same
  ids as 5.24.
- Refuse rather than write a wrong model (``llama_problems``, ``weight_problems``): ModelConfig fields the
  exporter does not know (set to a non-default value), dim not divisible by n_heads (transformers'
  LlamaConfig rejects it even with head_dim set), a rope_scaling transformers does not implement the way
  ``dante.rope`` does, parameters with no Llama counterpart (biases, extra norms), shapes a
  ``LlamaForCausalLM`` of that config would not have (e.g. per-layer FFN widths), "tied" embeddings that
  differ, and a tokenizer whose vocabulary is not the checkpoint's.
- Tied embeddings are stored once as ``model.embed_tokens.weight`` (no ``lm_head.weight``) with
  ``tie_word_embeddings: true``. Shards are cut by ``huggingface_hub.split_torch_state_dict_into_shards``.
- eos: an SFT checkpoint ends its turns with <|eot|> (stage 6 teaches exactly that), so its tokenizer eos
  is <|eot|>, as Llama 3 Instruct does, for tools that stop on ``tokenizer.eos_token``; a base model ends
  documents with <|end_of_text|>. ``generation_config.json`` lists both ids either way.
- Verification (``verify_export``, on by default; any failure raises and no manifest is written):
  logits of the native model vs the exported one on real held-out text in fp32, windows as long as the
  model's context (so a YaRN model is compared beyond its original length); greedy continuations (stage
  8's KV-cache generator vs ``generate``);
  tokenizer ids and decoding; chat-template ids vs ``dante.sft.ChatEncoder``. For a bf16/fp16 export the
  native model runs with the exported weights (rounded, then upcast to fp32), so the comparison tests the
  conversion and not the rounding; the rounding's own effect on the logits is reported separately.

Example::

    python 9_export_hf.py --config configs/tiny/export.yaml
    python 9_export_hf.py --config configs/tiny/export.yaml --push-to-hub me/dante-tiny --dry-run
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from dante import config as C
from dante.artifacts import (
    MANIFEST,
    PROGRESS,
    Stage,
    StageError,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    read_json,
    read_manifest,
    stage_dir,
    stage_done,
)
from dante.errors import UserError
from dante.tokenizer import BOS, BOS_ID, EOS, EOS_ID, EOT, EOT_ID, PAD, PAD_ID, SPECIAL_TOKENS

FORMAT_VERSION = 1

#: Checkpoint stages, newest first: "auto" exports the first one that finished.
AUTO_ORDER = ("07_sft", "05_extend", "04_pretrain")

#: Logit comparison bound: max |native - exported| <= LOGIT_RTOL * max(1, max |native logit|), in fp32.
#: Both sides run the same fp32 math with different kernels (SDPA with enable_gqa vs repeated KV heads), so
#: only rounding may differ: measured 0.0 on CPU for the tiny models of tests/test_export.py. Real mistakes
#: are orders of magnitude above the bound (tiny YaRN model, 256 tokens, bound 7e-4): rope_scaling left out
#: of config.json 0.57, rms_norm_eps 1e-6 instead of 1e-5 0.021.
LOGIT_RTOL = 1e-4

#: Prompt tokens for the greedy comparison (the start of each verification window).
PROMPT_TOKENS = 32

#: Files that are part of the Hugging Face folder (uploaded); everything else in 09_export is bookkeeping.
HF_FILE_PATTERNS = ("*.json", "*.safetensors", "README.md")
NOT_UPLOADED = (MANIFEST, PROGRESS)

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

#: Conversations always checked through the chat template (besides stage 6's local sources): a system
#: prompt, several turns, accents, code, leading/trailing whitespace that both paths must trim alike.
BUILTIN_CONVERSATIONS: list[list[dict]] = [
    [
        {"role": "system", "content": "Sei un assistente che risponde in italiano, in modo conciso."},
        {"role": "user", "content": "Qual è la capitale d'Italia?"},
        {"role": "assistant", "content": "La capitale d'Italia è Roma."},
        {"role": "user", "content": "  E quella della Francia?  "},
        {"role": "assistant", "content": "Parigi.\n"},
    ],
    [
        {"role": "user", "content": "Write a Python function that returns the square of a number."},
        {"role": "assistant", "content": "def square(x):\n    return x * x\n\nprint(square(4))  # 16"},
    ],
    [
        {"role": "user", "content": "Traduci in inglese: «Perché l'intelligenza artificiale c'è già?»"},
        {"role": "assistant", "content": "\"Why is artificial intelligence already here?\""},
    ],
]


# ---------------------------------------------------------------------------------------------------
# Config checks (before any work)
# ---------------------------------------------------------------------------------------------------


def parse_size(text: str) -> int:
    """'2GB' -> 2_000_000_000 (decimal units, like huggingface_hub; KiB/MiB/GiB are binary)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)\s*", text or "", flags=re.IGNORECASE)
    if not m:
        raise ValueError(f"{text!r} is not a size like 500MB, 2GB or 1GiB")
    number, unit = float(m.group(1)), m.group(2).upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
    return int(number * scale)


def config_problems(cfg: C.ExportStageConfig) -> list[str]:
    """Problems of the export config itself (the rest of ``validate`` for this stage)."""
    e = cfg.export
    p = []
    try:
        if parse_size(e.max_shard_size) < 1:
            p.append(f"export.max_shard_size={e.max_shard_size!r}: must be > 0")
    except ValueError as err:
        p.append(f"export.max_shard_size: {err}")
    if e.verify_tokens < 1:
        p.append(f"export.verify_tokens={e.verify_tokens}: must be >= 1")
    if e.verify_windows < 1:
        p.append(f"export.verify_windows={e.verify_windows}: must be >= 1")
    if e.verify_seq_len < 0:
        p.append(f"export.verify_seq_len={e.verify_seq_len}: must be >= 0 (0 means the model's context)")
    if e.verify and not e.heldout:
        p.append("export.heldout: empty, but verification needs real text; set e.g. "
                 "{it: data/sample/heldout/it.jsonl.gz} (or export.verify: false)")
    for lang, path in e.heldout.items():
        if not isinstance(path, str) or not Path(path).is_file():
            p.append(f"export.heldout.{lang}: file not found: {path!r}")
    if not e.license.strip():
        p.append("export.license: required (an SPDX id such as apache-2.0, shown in the model card)")
    return p


# ---------------------------------------------------------------------------------------------------
# What the Llama format can express
# ---------------------------------------------------------------------------------------------------


def llama_problems(m: C.ModelConfig) -> list[str]:
    """Why this ModelConfig cannot be written as a LlamaForCausalLM (empty when it can)."""
    import transformers.modeling_rope_utils as rope_utils

    p = list(C.validate_model(m))
    defaults = C.ModelConfig()
    for f in dataclasses.fields(C.ModelConfig):
        if f.name not in EXPRESSED_FIELDS and getattr(m, f.name) != getattr(defaults, f.name):
            p.append(f"model.{f.name}={getattr(m, f.name)!r}: the exporter does not know how Llama expresses this "
                     "option; teach dante/export.py (EXPRESSED_FIELDS) or train without it")
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
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from dante.convert import llama_config_kwargs

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
    import torch
    from safetensors import safe_open

    from dante.convert import to_hf_name

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
# Checkpoint resolution
# ---------------------------------------------------------------------------------------------------


@dataclass
class Source:
    """The checkpoint being exported (stage 8's CheckpointRef: one notion of "which checkpoint") and its config."""

    ref: Any  # dante.evaluation.loading.CheckpointRef
    model_cfg: C.ModelConfig
    meta: dict

    @property
    def path(self) -> Path:
        return self.ref.path

    @property
    def stage(self) -> str | None:
        return self.ref.stage

    @property
    def is_chat(self) -> bool:
        return self.ref.is_chat


def resolve_checkpoint(cfg: C.ExportStageConfig) -> Source:
    """The checkpoint named by export.checkpoint: 'auto' (newest finished stage), a stage name, or a path."""
    from dante.checkpoint import META
    from dante.evaluation.loading import find_checkpoints, read_model_config

    choice = cfg.export.checkpoint
    if choice == "auto":
        done = [s for s in AUTO_ORDER if stage_done(cfg.run, s)]
        if not done:
            raise StageError(
                f"no finished checkpoint stage for run {cfg.run.name!r} (looked for {', '.join(AUTO_ORDER)}).\n"
                "  HINT: run `python 4_pretrain.py --config configs/<profile>/pretrain.yaml` first, or set "
                "export.checkpoint to a checkpoint folder."
            )
        choice = done[0]
    if choice in AUTO_ORDER:
        read_manifest(cfg.run, choice)  # an unfinished stage: the error names the script to run
    (ref,), _ = find_checkpoints(cfg.run, [choice])
    return Source(ref=ref, model_cfg=read_model_config(ref.path), meta=read_json(ref.path / META))


def _tokenizer_path(cfg: C.ExportStageConfig) -> Path:
    return stage_dir(cfg.run, "02_tokenizer") / "tokenizer.json"


# ---------------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------------


def hf_config_dict(m: C.ModelConfig, eos_id: int, dtype: str) -> dict:
    """config.json for LlamaForCausalLM, readable by transformers 4.x and 5.x (see the module docstring)."""
    import transformers

    from dante.convert import llama_config_kwargs

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
    import transformers

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


def write_weights(out_dir: Path, hf_state_dict: dict, dtype: str, max_shard_size: str) -> dict:
    """model.safetensors, or model-0000k-of-0000n.safetensors + model.safetensors.index.json."""
    import torch
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save

    torch_dtype = getattr(torch, dtype)
    tensors = {k: v.detach().to("cpu", torch_dtype).contiguous() for k, v in hf_state_dict.items()}
    split = split_torch_state_dict_into_shards(tensors, max_shard_size=parse_size(max_shard_size))
    files = {}
    for filename, names in split.filename_to_tensors.items():
        # serialized in memory (one shard, <= max_shard_size), then written atomically
        atomic_write_bytes(out_dir / filename, save({n: tensors[n] for n in names}, metadata={"format": "pt"}))
        files[filename] = (out_dir / filename).stat().st_size
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    if split.is_sharded:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(split.tensor_to_filename.items()))}
        atomic_write_json(out_dir / "model.safetensors.index.json", index)
    return {"files": files, "sharded": split.is_sharded, "tensor_bytes": total, "tensors": len(tensors)}


def _added_token_entry(token) -> dict:
    return {"content": token.content, "lstrip": token.lstrip, "normalized": token.normalized,
            "rstrip": token.rstrip, "single_word": token.single_word, "special": token.special}


def write_tokenizer_files(out_dir: Path, tokenizer_path: Path, tokenizer, eos_token: str,
                          chat_template: str | None, model_max_length: int) -> None:
    """tokenizer.json (stage 2's bytes), tokenizer_config.json and special_tokens_map.json."""
    bos, pad = BOS, PAD
    atomic_write_bytes(out_dir / "tokenizer.json", tokenizer_path.read_bytes())
    added = tokenizer.get_added_tokens_decoder()
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos,
        "eos_token": eos_token,
        "pad_token": pad,
        # tokenizer(text) adds nothing: stage 3 trains on plain document ids, each followed by <|end_of_text|>
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "model_input_names": ["input_ids", "attention_mask"],
        "added_tokens_decoder": {str(i): _added_token_entry(t) for i, t in sorted(added.items())},
    }
    if chat_template is not None:
        config["chat_template"] = chat_template
    atomic_write_json(out_dir / "tokenizer_config.json", config)
    special = {name: {"content": text, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
               for name, text in (("bos_token", bos), ("eos_token", eos_token), ("pad_token", pad))}
    atomic_write_json(out_dir / "special_tokens_map.json", special)


def hf_folder_files(folder: Path) -> list[Path]:
    """The files of the Hugging Face folder (what would be uploaded), sorted."""
    out = []
    for f in sorted(folder.iterdir()):
        if f.is_file() and f.name not in NOT_UPLOADED and not f.name.startswith(".") \
                and any(f.match(p) for p in HF_FILE_PATTERNS):
            out.append(f)
    return out


# ---------------------------------------------------------------------------------------------------
# Verification
# ---------------------------------------------------------------------------------------------------


class VerificationError(StageError):
    """The export does not reproduce the native model; nothing is marked done."""


@contextlib.contextmanager
def _quiet_transformers():
    """No progress bars or 'sequence longer than model_max_length' warnings while verifying (whole documents
    are tokenized on purpose); anything wrong is caught by the comparisons themselves."""
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


@contextlib.contextmanager
def _exact_fp32():
    """Full fp32 matmuls for the comparison: on GPUs, TF32 (10-bit mantissa) would differ by ~1e-3 relative."""
    import torch

    saved = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(saved)


def verification_windows(tokenizer, texts_by_lang: dict[str, list[str]], n_windows: int, seq_len: int) -> list[list[int]]:
    """Up to n_windows windows of seq_len real tokens, taken from the languages in turn. Each language's
    documents are concatenated as text <|end_of_text|> (stage 3's stream layout), so windows cross documents."""
    per_lang = []
    for lang in sorted(texts_by_lang):
        stream: list[int] = []
        for text in texts_by_lang[lang]:
            stream += tokenizer.encode(text, add_special_tokens=False).ids + [EOS_ID]
            if len(stream) >= n_windows * seq_len:
                break
        per_lang.append([stream[i:i + seq_len] for i in range(0, len(stream) - seq_len + 1, seq_len)])
    interleaved = [w for group in itertools.zip_longest(*per_lang) for w in group if w is not None]
    return interleaved[:n_windows]


def _native_logits(model, tokens_BT):
    return model.logits(model(tokens_BT)).float()


def native_greedy(model, prompt: list[int], n_tokens: int) -> list[int]:
    """Greedy continuation with stage 8's generator (KV cache), never stopping early."""
    from dante.evaluation.generation import GREEDY, generate

    return generate(model, prompt, max_new_tokens=n_tokens, params=GREEDY, stop_ids=()).new_tokens


def hf_greedy(hf_model, prompt: list[int], n_tokens: int) -> list[int]:
    """Greedy continuation with transformers' generate: its generation_config.json defaults (sampling,
    repetition penalty, eos) replaced for the call, so exactly n_tokens argmax tokens come back."""
    import torch
    from transformers import GenerationConfig

    device = next(hf_model.parameters()).device
    saved = hf_model.generation_config
    hf_model.generation_config = GenerationConfig(
        do_sample=False, max_new_tokens=n_tokens, min_new_tokens=n_tokens, eos_token_id=None, pad_token_id=PAD_ID,
        bos_token_id=BOS_ID)
    try:
        ids = torch.tensor([prompt], device=device)
        out = hf_model.generate(ids, attention_mask=torch.ones_like(ids))
    finally:
        hf_model.generation_config = saved
    return out[0, len(prompt):].tolist()


def _greedy_tie(model, prefix: list[int], a: int, b: int, bound: float) -> float | None:
    """If tokens a and b are within the logit bound at this prefix (a numerical tie), their gap; else None."""
    import torch

    device = next(model.parameters()).device
    logits_V = _native_logits(model, torch.tensor([prefix], device=device))[0, -1]
    gap = abs(float(logits_V[a] - logits_V[b]))
    return gap if gap <= bound else None


def sft_conversations(cfg: C.ExportStageConfig, encoder, limit: int) -> list[list[dict]]:
    """Real conversations from stage 6's local sources (validated like stage 6 does), then the built-in ones."""
    from dante import sft

    convs: list[list[dict]] = []
    if stage_done(cfg.run, "06_sft_data"):
        sft_cfg = C.from_dict(C.SFTDataStageConfig, read_manifest(cfg.run, "06_sft_data")["config"])
        for src in sft_cfg.sft_data.sources:
            if src.kind != "local":
                continue  # the export never needs the network
            for row in sft.iter_source_rows(src):
                if len(convs) >= limit:
                    break
                if isinstance(row, sft.DroppedRow):
                    continue
                try:
                    messages = sft.normalize_row(row, src.format, getattr(src, "columns", None))
                    messages, _ = sft.check_conversation(messages, encoder.special_re)
                except sft.DroppedRow:
                    continue
                convs.append(messages)
    return convs + [list(c) for c in BUILTIN_CONVERSATIONS]


def _as_ids(result) -> list[int]:
    """apply_chat_template(tokenize=True) returns a list (4.x) or a BatchEncoding (5.x)."""
    if isinstance(result, dict) or hasattr(result, "keys"):
        result = result["input_ids"]
    return [int(i) for i in result]


def verify_export(cfg: C.ExportStageConfig, out_dir: Path, native_model, tokenizer, source: Source,
                  texts_by_lang: dict[str, list[str]]) -> dict:
    """Load ``out_dir`` with AutoModelForCausalLM/AutoTokenizer and compare it with the native model.

    Returns the results (for the manifest and the card); raises VerificationError listing every failure.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from dante.evaluation.loading import resolve_device

    e, m = cfg.export, source.model_cfg
    device = resolve_device(e.verify_device)
    seq_len = min(e.verify_seq_len or m.max_seq_len, m.max_seq_len)
    windows = verification_windows(tokenizer, texts_by_lang, e.verify_windows, seq_len)
    if not windows:
        raise VerificationError(f"export.heldout holds fewer than {seq_len} tokens: no window to compare; "
                                "add text or lower export.verify_seq_len")
    results: dict[str, Any] = {"device": device.type, "logit_rtol": LOGIT_RTOL}
    failures: list[str] = []
    native_model = native_model.to(device).eval()
    with _quiet_transformers(), torch.inference_mode(), _exact_fp32():
        results["dtype_rounding_max_abs_logit_change"] = _round_to_export_dtype(native_model, e.dtype, windows[0])
        try:  # load the export exactly as a user would
            hf_model = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32).to(device).eval()
            hf_tok = AutoTokenizer.from_pretrained(out_dir)
            results["generation_eos_token_id"] = GenerationConfig.from_pretrained(out_dir).eos_token_id
        except Exception as err:  # any load failure is the finding: report it, do not crash
            raise VerificationError(f"transformers cannot load the export in {out_dir}: {type(err).__name__}: {err}") from None
        results["hf_class"] = type(hf_model).__name__
        results["logits"] = _compare_logits(native_model, hf_model, windows, m, failures)
        prompts = [w[:PROMPT_TOKENS] for w in windows]
        if source.is_chat:
            from dante.sft import ChatEncoder

            prompts.append(ChatEncoder(tokenizer).encode(BUILTIN_CONVERSATIONS[0][:2], add_generation_prompt=True).ids.tolist())
        bound = LOGIT_RTOL * max(1.0, results["logits"]["max_abs_logit"])
        results["greedy"] = _compare_greedy(native_model, hf_model, prompts, e.verify_tokens, bound, failures)
        texts = [t for lang in sorted(texts_by_lang) for t in texts_by_lang[lang]]
        results["tokenizer"] = _compare_tokenizers(tokenizer, hf_tok, texts, failures)
        if source.is_chat:
            results["chat_template"] = _compare_chat_template(cfg, tokenizer, hf_tok, failures)
    if failures:
        raise VerificationError(
            f"the export in {out_dir} does not reproduce the native model ({len(failures)} problem(s)):\n"
            + "\n".join(f"  - {f}" for f in failures) + "\n  Nothing was marked done."
        )
    return results


def _round_to_export_dtype(native_model, dtype: str, window: list[int]) -> float:
    """Give the native model the exported weights (rounded to dtype, kept in fp32); return how much that
    rounding alone moves the logits on one window (reported, not bounded: it is the release's precision)."""
    import torch

    if dtype == "float32":
        return 0.0
    ids = torch.tensor([window], device=next(native_model.parameters()).device)
    before = _native_logits(native_model, ids)
    for p in native_model.parameters():
        p.data = p.data.to(getattr(torch, dtype)).float()
    return float((_native_logits(native_model, ids) - before).abs().max())


def _compare_logits(native_model, hf_model, windows: list[list[int]], m: C.ModelConfig, failures: list[str]) -> dict:
    import torch

    device = next(native_model.parameters()).device
    worst_ratio, worst, worst_bound, max_logit = -1.0, 0.0, 0.0, 0.0
    for w in windows:
        ids = torch.tensor([w], device=device)
        ours, theirs = _native_logits(native_model, ids), hf_model(input_ids=ids).logits.float()
        diff, top = float((ours - theirs).abs().max()), float(ours.abs().max())
        bound = LOGIT_RTOL * max(1.0, top)
        max_logit = max(max_logit, top)
        if diff > bound:
            failures.append(f"logits differ: max |native - exported| = {diff:.3g} > bound {bound:.3g} on a {len(w)}-token window")
        if diff / bound > worst_ratio:
            worst_ratio, worst, worst_bound = diff / bound, diff, bound
    original = (m.rope_scaling or {}).get("original_max_position_embeddings")
    return {"windows": len(windows), "tokens_per_window": len(windows[0]), "max_abs_diff": worst, "bound": worst_bound,
            "max_abs_logit": max_logit,
            "positions_beyond_original_context": max(0, len(windows[0]) - original) if original else 0}


def _compare_greedy(native_model, hf_model, prompts: list[list[int]], n_tokens: int, tie_bound: float,
                    failures: list[str]) -> dict:
    """Greedy continuations, every token compared (stopping at <|eot|> is the chat test's job). A first
    difference where both tokens are within the logit bound is a numerical tie, recorded, not a failure."""
    n_new = min(n_tokens, native_model.cfg.max_seq_len - max(len(p) for p in prompts) - 1)
    stats = {"prompts": len(prompts), "tokens": n_new, "identical": 0, "ties": []}
    for prompt in prompts:
        ours, theirs = native_greedy(native_model, prompt, n_new), hf_greedy(hf_model, prompt, n_new)
        if ours == theirs:
            stats["identical"] += 1
            continue
        k = next(i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b)
        gap = _greedy_tie(native_model, prompt + ours[:k], ours[k], theirs[k], tie_bound)
        if gap is not None:
            stats["ties"].append({"step": k, "logit_gap": gap})
        else:
            failures.append(f"greedy continuations differ at step {k}: native {ours} vs transformers {theirs}")
    return stats


def _compare_tokenizers(tokenizer, hf_tok, texts: list[str], failures: list[str]) -> dict:
    """Ids (with and without add_special_tokens) and decoding on real text. Documents containing a special
    token's text are skipped: transformers turns that text into the special id, ours never does (by design,
    see dante/tokenizer.py)."""
    specials = [t.content for t in tokenizer.get_added_tokens_decoder().values()]
    stats = {"documents": 0, "tokens": 0, "skipped_special_text": 0, "mismatches": 0}
    for text in texts:
        if any(s in text for s in specials):
            stats["skipped_special_text"] += 1
            continue
        ours = tokenizer.encode(text, add_special_tokens=False).ids
        same = (hf_tok(text, add_special_tokens=False)["input_ids"] == ours and hf_tok(text)["input_ids"] == ours
                and hf_tok.decode(ours) == tokenizer.decode(ours, skip_special_tokens=False))
        stats["documents"] += 1
        stats["tokens"] += len(ours)
        if not same:
            stats["mismatches"] += 1
            if stats["mismatches"] <= 3:
                failures.append(f"tokenizer ids or decoding differ on held-out text {text[:60]!r}...")
    for name, token_id in (("bos", BOS_ID), ("pad", PAD_ID)):
        got = getattr(hf_tok, f"{name}_token_id")
        if got != token_id:
            failures.append(f"AutoTokenizer {name}_token_id={got}, expected {token_id} ({SPECIAL_TOKENS[token_id]})")
    return stats


def _compare_chat_template(cfg: C.ExportStageConfig, tokenizer, hf_tok, failures: list[str]) -> dict:
    """apply_chat_template (the exported Jinja) vs dante.sft.ChatEncoder (the training ids), whole
    conversations and generation prompts."""
    from dante.sft import ChatEncoder

    encoder = ChatEncoder(tokenizer)
    convs = sft_conversations(cfg, encoder, cfg.export.verify_conversations)
    stats = {"conversations": len(convs), "identical": 0}
    for conv in convs:
        cases = [(conv, False)] + ([(conv[:-1], True)] if conv[-1]["role"] == "assistant" else [])
        same = True
        for messages, gen_prompt in cases:
            ours = encoder.encode(messages, add_generation_prompt=gen_prompt).ids.tolist()
            theirs = _as_ids(hf_tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=gen_prompt))
            if ours != theirs:
                same = False
                failures.append(f"chat template ids differ (add_generation_prompt={gen_prompt}) for a conversation "
                                f"starting {messages[0]['content'][:40]!r}")
        stats["identical"] += same
    return stats


# ---------------------------------------------------------------------------------------------------
# Model card (every number read from the run's files)
# ---------------------------------------------------------------------------------------------------


def _fmt(n: Any) -> str:
    if isinstance(n, bool) or n is None:
        return str(n)
    if isinstance(n, float) and n.is_integer() and abs(n) < 1e15:
        n = int(n)
    if isinstance(n, int):
        return f"{n:,}"
    if isinstance(n, float):
        return f"{n:.4g}"
    return str(n)


def _human(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:g}"


def markdown_table(header: list[str], rows: list[list[Any]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]
    return out


def _stage_manifest(cfg: C.ExportStageConfig, stage: str) -> dict | None:
    return read_manifest(cfg.run, stage) if stage_done(cfg.run, stage) else None


def _lineage(cfg: C.ExportStageConfig, source: Source) -> list[tuple[str, dict]]:
    """(stage, checkpoint meta) of the training stages behind the exported checkpoint, oldest first.

    Followed through the manifests' recorded inputs (7_sft records the stage it started from), so an SFT
    model fine-tuned from 04_pretrain does not list a 05_extend that it never saw.
    """
    from dante import checkpoint as ckpt

    chain, stage = [(source.stage, source.meta)] if source.stage else [], source.stage
    while stage is not None:
        manifest = _stage_manifest(cfg, stage) or {}
        parent = next((s for s in ("05_extend", "04_pretrain") if s in manifest.get("inputs", {}) and s != stage), None)
        if parent is None:
            break
        step_dir = ckpt.latest_checkpoint(stage_dir(cfg.run, parent) / ckpt.CHECKPOINTS)
        chain.append((parent, read_json(step_dir / ckpt.META) if step_dir else {}))
        stage = parent
    return chain[::-1]


def card_facts(cfg: C.ExportStageConfig, source: Source, tokenizer, n_params: int, verification: dict | None) -> dict:
    """Everything the model card states, gathered from manifests, checkpoint metadata and report.json."""
    from dante.model import ffn_hidden_dim_of, head_dim_of
    from dante.tokenizer import tokenizer_facts

    m = source.model_cfg
    facts: dict[str, Any] = {
        "model": {
            "parameters": n_params, "dim": m.dim, "n_layers": m.n_layers, "n_heads": m.n_heads,
            "n_kv_heads": m.n_kv_heads, "head_dim": head_dim_of(m), "ffn_hidden_dim": ffn_hidden_dim_of(m),
            "vocab_size": m.vocab_size, "max_seq_len": m.max_seq_len, "rope_theta": m.rope_theta,
            "rope_scaling": dict(m.rope_scaling), "tie_embeddings": m.tie_embeddings, "norm_eps": m.norm_eps,
        },
        "checkpoint": {"path": str(source.path), "stage": source.stage, "step": source.meta.get("step"),
                       "chat": source.is_chat},
        "dtype": cfg.export.dtype,
        "tokenizer": tokenizer_facts(tokenizer),
        "verification": verification,
    }
    corpus, shards = _stage_manifest(cfg, "01_corpus"), _stage_manifest(cfg, "03_shards")
    tokens_by_source = (shards or {}).get("counts", {}).get("by_source", {})
    facts["data"] = [
        {"source": name, "lang": src.get("lang"), "tier": src.get("tier"), "origin": src.get("origin"),
         "docs": src.get("docs"), "chars": src.get("chars"),
         "train_tokens": tokens_by_source.get(name, {}).get("train", {}).get("tokens")}
        for name, src in ((corpus or {}).get("outputs", {}).get("sources", {})).items()
    ]
    training = []
    for stage, meta in _lineage(cfg, source):
        stage_cfg = (_stage_manifest(cfg, stage) or {}).get("config") or meta.get("config") or {}
        train = stage_cfg.get("train", {})
        training.append({
            "stage": stage, "step": meta.get("step"), "tokens": meta.get("tokens_seen"), "loss": meta.get("loss"),
            "world_size": meta.get("world_size"),
            "train": {k: train[k] for k in ("seq_len", "micro_batch", "grad_accum", "lr", "min_lr", "warmup_steps",
                                             "weight_decay", "precision", "fp8", "tier_weights") if k in train},
            "extend": stage_cfg.get("extend"),
        })
    facts["training"] = training
    sft_data = _stage_manifest(cfg, "06_sft_data") if source.is_chat else None
    if sft_data:
        facts["sft_data"] = [{"name": s.get("name"), "format": s.get("format"), "lang": s.get("lang"),
                              "origin": s.get("hf_id") or s.get("path")} for s in sft_data["config"]["sft_data"]["sources"]]
    report_path = stage_dir(cfg.run, "08_eval") / "report.json"
    facts["evaluation"] = None
    if stage_done(cfg.run, "08_eval") and report_path.is_file():
        report = read_json(report_path)
        facts["evaluation"] = {
            "summary": report.get("summary", {}),
            "checkpoints": [{k: c.get(k) for k in ("label", "stage", "step", "max_seq_len")}
                            for c in report.get("checkpoints", [])],
        }
    return facts


def render_model_card(facts: dict, model_name: str, license_id: str, repo_hint: str) -> str:
    m, ck = facts["model"], facts["checkpoint"]
    langs = sorted({d["lang"] for d in facts["data"]} - {None, "code"}) or ["it", "en"]
    lines = [
        "---",
        f"license: {license_id}",
        "language:", *[f"- {lang}" for lang in langs],
        "library_name: transformers",
        "pipeline_tag: text-generation",
        "tags:", "- dante", "- llama", "- italian",
        "---", "",
        f"# {model_name}", "",
        f"A {_human(m['parameters'])}-parameter LLaMA-architecture language model trained from scratch with the Dante "
        f"pipeline on Italian, English and code. This folder is the {'instruction-tuned (SFT)' if ck['chat'] else 'base'} "
        f"checkpoint of stage `{ck['stage'] or 'external'}`, step {_fmt(ck['step'])}, in {facts['dtype']}. It loads in "
        "plain `transformers` (`LlamaForCausalLM`, no custom code).", "",
        "## Use", "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        f'model_id = "{repo_hint}"  # this folder, or its Hub id after --push-to-hub',
        "tok = AutoTokenizer.from_pretrained(model_id)",
        "model = AutoModelForCausalLM.from_pretrained(model_id)",
    ]
    if ck["chat"]:
        lines += ['ids = tok.apply_chat_template([{"role": "user", "content": "Ciao! Chi era Dante?"}],',
                  '                              add_generation_prompt=True, return_tensors="pt")',
                  "out = model.generate(ids, max_new_tokens=128)  # stops at <|eot|> (generation_config.json)",
                  "print(tok.decode(out[0, ids.shape[-1]:], skip_special_tokens=True))"]
    else:
        lines += ['ids = tok("Il futuro della tecnologia e della scienza", return_tensors="pt").input_ids',
                  "out = model.generate(ids, max_new_tokens=64)", "print(tok.decode(out[0]))"]
    lines += ["```", "", "## Architecture", ""]
    rope = m["rope_scaling"]
    rope_text = (f"RoPE θ={_fmt(m['rope_theta'])}" + (f", {rope.get('rope_type', rope.get('type'))} scaling ×{_fmt(rope.get('factor'))}"
                 f" from {_fmt(rope.get('original_max_position_embeddings'))} tokens" if rope else ""))
    lines += markdown_table(["", "value"], [
        ["parameters", m["parameters"]], ["d_model", m["dim"]], ["layers", m["n_layers"]],
        ["attention heads (query / key-value)", f"{m['n_heads']} / {m['n_kv_heads']}"], ["head dim", m["head_dim"]],
        ["SwiGLU hidden", m["ffn_hidden_dim"]], ["vocabulary", m["vocab_size"]], ["context", m["max_seq_len"]],
        ["positions", rope_text], ["norm", f"RMSNorm, eps {_fmt(m['norm_eps'])}"],
        ["tied input/output embeddings", m["tie_embeddings"]],
    ])
    tok = facts.get("tokenizer")
    if tok:
        lines += ["", f"Tokenizer: byte-level BPE, {_fmt(tok['vocab_size'])} tokens, `{tok['pretokenizer']}` pre-tokenization"
                  + (" (Italian contractions kept whole)." if tok["pretokenizer"] == "dante" else ".")]
    lines += ["", "## Training data", ""]
    data = facts["data"]
    if data:
        total = sum(d["train_tokens"] or 0 for d in data)
        rows = [[d["source"], d["lang"], d["tier"], d["origin"], d["docs"], d["chars"], d["train_tokens"],
                 f"{100 * d['train_tokens'] / total:.1f}%" if total and d["train_tokens"] else ""] for d in data]
        lines += markdown_table(["source", "language", "quality tier", "origin", "documents", "characters",
                         "training tokens", "share"], rows)
        weights = next((t["train"].get("tier_weights") for t in facts["training"] if t["stage"] == "04_pretrain"), None)
        if weights:
            lines += ["", "Pretraining samples the tiers with weights "
                      + ", ".join(f"tier {k}: {_fmt(v)}" for k, v in weights.items()) + "."]
    else:
        lines.append("The corpus manifest (stage 1) is not part of this run's files: data mix not recorded.")
    if facts.get("sft_data"):
        lines += ["", "Instruction data (stage 6):", ""]
        lines += markdown_table(["source", "format", "language", "origin"],
                        [[s["name"], s["format"], s["lang"], s["origin"]] for s in facts["sft_data"]])
    lines += ["", "## Training", ""]
    if facts["training"]:
        rows = []
        for t in facts["training"]:
            tr = t["train"]
            batch = (tr.get("micro_batch") or 0) * (tr.get("grad_accum") or 0) * (t["world_size"] or 1)
            precision = (tr["precision"] + (" + FP8" if tr.get("fp8") else "")) if tr.get("precision") else None
            rows.append([t["stage"], t["step"], t["tokens"], t["loss"], tr.get("seq_len"), batch or None,
                         tr.get("lr"), tr.get("warmup_steps"), precision])
        lines += markdown_table(["stage", "steps", "tokens seen", "last loss", "sequence length", "sequences per step",
                         "peak lr", "warmup steps", "precision"], rows)
        ext = next((t["extend"] for t in facts["training"] if t["stage"] == "05_extend" and t["extend"]), None)
        if ext:
            lines += ["", f"Context extension (stage 5): {ext.get('mode')} to {_fmt(ext.get('new_max_seq_len'))} tokens"
                      + (f", factor {_fmt(ext.get('factor'))}" if ext.get("mode") != "continued" else "") + "."]
        lines += ["", "AdamW with cosine decay to min_lr; numbers from each stage's checkpoint meta.json and manifest."]
    else:
        lines.append("No training metadata found beside the checkpoint.")
    lines += ["", "## Evaluation", ""]
    ev = facts.get("evaluation")
    if ev is None or not ev["summary"]:
        lines.append("Not evaluated: stage 8 (`8_eval.py`) has no report for this run.")
    else:
        labels = list(ev["summary"])
        info = {c["label"]: c for c in ev["checkpoints"]}

        def heading(label: str) -> str:
            c = info.get(label, {})
            this = c.get("stage") == ck["stage"] and c.get("step") == ck["step"]
            return f"{label} (step {_fmt(c.get('step'))}){' = this model' if this else ''}"

        metrics = sorted({k for s in ev["summary"].values() for k in s})
        lines += markdown_table(["metric", *[heading(lb) for lb in labels]],
                        [[k, *[ev["summary"][lb].get(k, "") for lb in labels]] for k in metrics])
        lines += ["", "From `08_eval/report.json` of this run (bpb = bits per byte, comparable across tokenizers; "
                  "ppl = perplexity per token of this tokenizer; acc = multiple-choice accuracy)."]
        if not any(c.get("stage") == ck["stage"] and c.get("step") == ck["step"] for c in ev["checkpoints"]):
            lines.append(f"This exact checkpoint ({ck['stage'] or ck['path']}, step {_fmt(ck['step'])}) was not part "
                         "of that evaluation: rerun `8_eval.py` to measure it.")
    v = facts.get("verification")
    lines += ["", "## Export verification", ""]
    if v:
        lg = v["logits"]
        lines.append(f"This folder was loaded back with `AutoModelForCausalLM`/`AutoTokenizer` and compared with the native "
                     f"Dante model in fp32 on {lg['windows']} windows of {lg['tokens_per_window']} held-out tokens: max |Δ logit| "
                     f"= {lg['max_abs_diff']:.3g} (bound {lg['bound']:.3g}); greedy continuations identical for "
                     f"{v['greedy']['identical']}/{v['greedy']['prompts']} prompts ({v['greedy']['tokens']} tokens); "
                     f"tokenizer ids identical on {v['tokenizer']['documents']} documents.")
        if "chat_template" in v:
            lines.append(f"The chat template gives the training ids on {v['chat_template']['identical']}/"
                         f"{v['chat_template']['conversations']} conversations.")
        if facts["dtype"] != "float32":
            lines.append(f"Rounding the weights to {facts['dtype']} changes the logits by at most "
                         f"{v['dtype_rounding_max_abs_logit_change']:.3g} on the first window.")
    else:
        lines.append("Not verified (export.verify was false).")
    lines += ["", "## Intended use", "",
              "Research on Italian/English language modelling and a starting point for fine-tuning. "
              + ("As an SFT model it follows the chat template in `tokenizer_config.json`; " if ck["chat"] else
                 "It is a base model: it continues text and does not follow instructions; ")
              + "it is not a product and has no safety tuning.", "",
              "## Limitations", "",
              "- Small models trained on limited data make factual errors and can produce fluent nonsense; check "
              "anything that matters.",
              "- Trained only on the sources listed above: other languages and domains are out of scope, and the "
              "style, era and biases of those texts carry over.",
              f"- Context is {_fmt(m['max_seq_len'])} tokens; longer inputs are not supported.",
              "- No safety alignment or content filtering.", "",
              "## License", "", f"{license_id} (as stated by the exporter; check the licenses of the training data above).", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------------


def _refuse_foreign_files(stage: Stage) -> None:
    """A fresh export must start in an empty folder; a resumed one owns what is there (same config)."""
    if stage.resumed:
        for f in stage.dir.iterdir():  # our own partial files of the same config: start them over
            if f.name != PROGRESS:
                shutil.rmtree(f) if f.is_dir() else f.unlink()
        return
    foreign = sorted(f.name for f in stage.dir.iterdir() if f.name != PROGRESS)
    if foreign:
        (stage.dir / PROGRESS).unlink(missing_ok=True)  # Stage.open just wrote it: do not adopt these files
        raise UserError(f"the output folder {stage.dir} is not empty ({', '.join(foreign[:6])}"
                        f"{' ...' if len(foreign) > 6 else ''}) and was not written by this export.\n"
                        "  HINT: pass --force to delete it and export again, or choose another run.name.")


def _generation_defaults(cfg: C.ExportStageConfig) -> C.GenerationConfig:
    """Stage 8's sampling settings when it ran, else the dataclass defaults (the same reference values)."""
    manifest = _stage_manifest(cfg, "08_eval")
    if manifest:
        return C.from_dict(C.EvalStageConfig, manifest["config"]).eval.generation
    return C.GenerationConfig()


def _load_heldout(cfg: C.ExportStageConfig) -> dict[str, list[str]]:
    from dante.evaluation.perplexity import load_texts

    texts = {}
    for lang, path in sorted(cfg.export.heldout.items()):
        try:
            texts[lang] = load_texts(path)
        except (OSError, ValueError) as err:
            raise UserError(f"export.heldout.{lang}: {err}") from None
    return texts


def preflight(cfg: C.ExportStageConfig) -> tuple[Source, Path, Any]:
    """Every check before the work (no weights loaded): config, checkpoint, Llama expressibility of the config
    and of the file's tensors, tokenizer (vocabulary, special ids, lineage). One error listing everything."""
    from dante.checkpoint import WEIGHTS
    from dante.evaluation.loading import resolve_device, tokenizer_problems
    from dante.tokenizer import load_tokenizer

    problems = config_problems(cfg)
    if problems:
        raise UserError("invalid export configuration:\n" + "\n".join(f"  - {p}" for p in problems))
    read_manifest(cfg.run, "02_tokenizer")
    if cfg.export.verify:
        resolve_device(cfg.export.verify_device)  # cuda asked for but absent: say so now
    source = resolve_checkpoint(cfg)
    tok_path = _tokenizer_path(cfg)
    tokenizer = load_tokenizer(tok_path)
    problems = llama_problems(source.model_cfg)
    if not problems:  # the tensors, from the file's header (a Llama config is needed to know what to expect)
        problems += weight_problems(source.path / WEIGHTS, source.model_cfg)
    problems += tokenizer_problems(source.ref, source.model_cfg, tokenizer, tok_path)
    if problems:
        raise UserError(f"cannot export {source.path} as a Hugging Face Llama model:\n"
                        + "\n".join(f"  - {p}" for p in problems))
    return source, tok_path, tokenizer


def export_stage(stage: Stage, cfg: C.ExportStageConfig) -> dict:
    """Stage 9 end to end: checks, files, verification, model card, manifest (last)."""
    from dante import checkpoint as ckpt
    from dante.convert import to_hf_state_dict

    source, tok_path, tokenizer = preflight(cfg)
    _refuse_foreign_files(stage)
    # from here on the folder holds our files: a rerun with this config resumes (redoes) the export
    stage.save_progress({"checkpoint": str(source.path), "writing": True})
    stage.require("02_tokenizer")
    if source.stage:
        stage.require(source.stage)
    stage.add_input("checkpoint", source.path / ckpt.WEIGHTS)
    stage.add_input("tokenizer", tok_path)
    texts_by_lang = _load_heldout(cfg) if cfg.export.verify else {}

    model, m, _ = ckpt.load_model(source.path)
    out = stage.dir
    print(f"[09_export] {source.path} -> {out} ({cfg.export.dtype})", flush=True)
    hf_sd = to_hf_state_dict(model.state_dict(), tie_embeddings=m.tie_embeddings)
    weights = write_weights(out, hf_sd, cfg.export.dtype, cfg.export.max_shard_size)
    n_params = sum(t.numel() for t in hf_sd.values())
    del hf_sd

    eos_token = EOT if source.is_chat else EOS
    eos_id = EOT_ID if source.is_chat else EOS_ID
    atomic_write_json(out / "config.json", hf_config_dict(m, eos_id, cfg.export.dtype))
    gen = _generation_defaults(cfg)
    stop_ids = [i for i in (tokenizer.token_to_id(t) for t in gen.stop_tokens) if i is not None]
    atomic_write_json(out / "generation_config.json", generation_config_dict(gen, eos_id, stop_ids))
    from dante.sft import CHAT_TEMPLATE

    write_tokenizer_files(out, tok_path, tokenizer, eos_token, CHAT_TEMPLATE if source.is_chat else None, m.max_seq_len)

    verification = None
    if cfg.export.verify:
        verification = verify_export(cfg, out, model, tokenizer, source, texts_by_lang)
        lg = verification["logits"]
        print(f"[09_export] verified: max |Δ logit| {lg['max_abs_diff']:.3g} <= {lg['bound']:.3g} on {lg['windows']} x "
              f"{lg['tokens_per_window']} tokens; greedy {verification['greedy']['identical']}/{verification['greedy']['prompts']} "
              f"identical; tokenizer {verification['tokenizer']['documents']} docs identical", flush=True)
    facts = card_facts(cfg, source, tokenizer, n_params, verification)
    name = cfg.export.model_name or f"Dante ({cfg.run.name})"
    atomic_write_text(out / "README.md", render_model_card(facts, name, cfg.export.license, str(out)))
    files = {f.name: f.stat().st_size for f in hf_folder_files(out)}
    return stage.finish(
        outputs={"folder": str(out), "files": files, "weights": weights},
        counts={"parameters": n_params, "files": len(files), "bytes": sum(files.values())},
        extra={"checkpoint": {"path": str(source.path), "stage": source.stage, "step": source.meta.get("step")},
               "verification": verification, "card_facts": facts},
    )


# ---------------------------------------------------------------------------------------------------
# Plan (--dry-run) and upload
# ---------------------------------------------------------------------------------------------------


def plan_lines(cfg: C.ExportStageConfig) -> list[str]:
    """What the export would write, from the checkpoint's config alone (no weights loaded)."""
    source, tok_path, _ = preflight(cfg)
    shapes = expected_hf_shapes(source.model_cfg)
    n_params = sum(math.prod(s) for s in shapes.values())
    nbytes = n_params * {"float32": 4, "bfloat16": 2, "float16": 2}[cfg.export.dtype]
    n_shards = max(1, math.ceil(nbytes / parse_size(cfg.export.max_shard_size)))
    lines = [f"checkpoint: {source.path} (stage {source.stage or 'external'}, step {source.meta.get('step')})",
             f"model: {n_params:,} parameters, {'SFT (chat template, eos <|eot|>)' if source.is_chat else 'base'}",
             f"tokenizer: {tok_path}",
             f"would write to {stage_dir(cfg.run, '09_export')}:"]
    names = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
             "special_tokens_map.json", "README.md"]
    if n_shards == 1:
        lines.append(f"  model.safetensors  ~{_human(nbytes)}B ({cfg.export.dtype})")
    else:
        lines.append(f"  model-0000k-of-{n_shards:05d}.safetensors x{n_shards} (about; ~{_human(nbytes)}B in "
                     f"{cfg.export.dtype}, shards <= {cfg.export.max_shard_size}) + model.safetensors.index.json")
    lines += [f"  {n}" for n in names]
    lines.append("verification: " + ("on (logits, greedy, tokenizer" + (", chat template)" if source.is_chat else ")")
                                     if cfg.export.verify else "off"))
    return lines


def upload_listing(folder: Path) -> tuple[list[str], int]:
    files = hf_folder_files(folder)
    total = sum(f.stat().st_size for f in files)
    return [f"  {f.name}  {f.stat().st_size:,} bytes" for f in files], total


def _hub_failure(err: Exception, repo_id: str) -> str:
    """A one-paragraph reason for a failed upload (no traceback): offline, auth, or the hub's answer."""
    names = {c.__name__ for c in type(err).__mro__}
    if names & {"ConnectError", "ConnectionError", "ConnectTimeout", "NetworkError", "TransportError", "Timeout",
                "OfflineModeIsEnabled", "TimeoutException"}:
        return (f"cannot reach the Hugging Face Hub ({type(err).__name__}: {err}). The export itself is complete; "
                f"upload it later from a machine with network access:\n  python 9_export_hf.py --config <same config> "
                f"--push-to-hub {repo_id}")
    if names & {"LocalTokenNotFoundError"}:
        return "no Hugging Face token: run `hf auth login` or set HF_TOKEN, then push again"
    status = getattr(getattr(err, "response", None), "status_code", None)
    if status in (401, 403):
        return f"the Hub refused the token for {repo_id} (HTTP {status}): check HF_TOKEN has write access to that namespace"
    return f"upload to {repo_id} failed: {type(err).__name__}: {err}"


def push_to_hub(cfg: C.ExportStageConfig, repo_id: str, private: bool = False, dry_run: bool = False) -> list[str]:
    """Upload the finished export folder (HF files only, never manifest/progress). Returns printable lines."""
    folder = stage_dir(cfg.run, "09_export")
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo_id or ""):
        raise UserError(f"--push-to-hub {repo_id!r}: expected a repository id like your-name/dante-2b")
    if not stage_done(cfg.run, "09_export"):
        if dry_run:
            return [f"would upload to {repo_id} after the export finishes:"] + plan_lines(cfg)
        raise UserError(f"{folder} holds no finished export; run this script without --push-to-hub first "
                        "(or with it: the export runs, then the upload)")
    listing, total = upload_listing(folder)
    head = f"{'would upload' if dry_run else 'uploading'} {len(listing)} files ({total:,} bytes) from {folder} to {repo_id}" \
           f"{' (private)' if private else ''}:"
    if dry_run:
        return [head] + listing
    print(f"[09_export] {head}", flush=True)
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model",
                                 allow_patterns=[f.name for f in hf_folder_files(folder)],
                                 commit_message=f"Dante export of run {cfg.run.name}")
    except Exception as err:  # network boundary: every failure becomes one clear message, no traceback
        raise UserError(_hub_failure(err, repo_id)) from None
    return [f"uploaded: {getattr(info, 'commit_url', None) or repo_id}"]
