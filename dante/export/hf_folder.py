"""The files of a Hugging Face model folder: weights (safetensors, sharded or not), tokenizer files, and which files the folder holds.

What goes into config.json is ``dante/export/hf_format.py``'s business; this module writes bytes.

Design choices
- Files are written here, not by ``save_pretrained``: transformers 5 saves a ``TokenizersBackend``
  tokenizer class and a separate ``chat_template.jinja``, which transformers 4.x does not read. We write
  ``tokenizer_class: PreTrainedTokenizerFast`` with the chat template inside ``tokenizer_config.json``,
  and stage 2's ``tokenizer.json`` byte for byte.
- Shards are cut by ``huggingface_hub.split_torch_state_dict_into_shards`` (the names and size rule the Hub
  uses); each is serialized in memory and written atomically, so a crash leaves no half-written shard.
- The folder is only what ``HF_FILE_PATTERNS`` matches; ``manifest.json`` and ``progress.json`` are the
  stage's bookkeeping and are never uploaded.

Example::

    write_weights(out, to_hf_state_dict(model.state_dict(), True), "bfloat16", "2GB")
    [f.name for f in hf_folder_files(out)]  # ['config.json', ..., 'model.safetensors', ...]
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors.torch import save

from dante.artifacts import MANIFEST, PROGRESS, atomic_write_bytes, atomic_write_json
from dante.tokenizer import BOS, PAD

#: Files that are part of the Hugging Face folder (uploaded); everything else in 09_export is bookkeeping.
HF_FILE_PATTERNS = ("*.json", "*.safetensors", "*.gguf", "README.md")
NOT_UPLOADED = (MANIFEST, PROGRESS)


def parse_size(text: str) -> int:
    """'2GB' -> 2_000_000_000 (decimal units, like huggingface_hub; KiB/MiB/GiB are binary)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)\s*", text or "", flags=re.IGNORECASE)
    if not m:
        raise ValueError(f"{text!r} is not a size like 500MB, 2GB or 1GiB")
    number, unit = float(m.group(1)), m.group(2).upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
    return int(number * scale)


def write_weights(out_dir: Path, hf_state_dict: dict, dtype: str, max_shard_size: str) -> dict:
    """model.safetensors, or model-0000k-of-0000n.safetensors + model.safetensors.index.json."""
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
