"""Loading a checkpoint for evaluation: check that it belongs with the tokenizer, load the weights in eval
mode, and resolve the device and autocast dtype.

Which checkpoint, from which stage, and whether it belongs with a tokenizer are checkpoint identity and
live in ``dante.checkpoint`` (``find_checkpoints``, ``CheckpointRef``, ``tokenizer_problems``); this module
runs those checks before any weights are loaded and keeps only what evaluation adds: the device and the
autocast dtype of the forward pass.

Example::

    refs, notes = find_checkpoints(run_cfg, [C.PRETRAIN, C.EXTEND, C.SFT])   # dante.checkpoint
    loaded = load_for_eval(refs[0], tokenizer_path(run_cfg))
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dante import config as C
from dante.checkpoint import CheckpointRef, checkpoint_ref, load_model, read_model_config, tokenizer_problems
from dante.errors import UserError, raise_problems
from dante.tokenizer import load_tokenizer


@dataclass
class LoadedModel:
    ref: CheckpointRef
    model: Any
    model_cfg: C.ModelConfig
    meta: dict
    tokenizer: Any
    autocast_dtype: torch.dtype | None


def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"eval.device={spec!r} but no CUDA device is available; use 'auto' or 'cpu'")
    return torch.device(spec)


def resolve_autocast(spec: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype for the transformer body: bf16 on CUDA for 'auto', never on CPU (fp32 there)."""
    if device.type != "cuda" or spec == "float32":
        return None
    return torch.bfloat16 if spec in ("auto", "bfloat16") else torch.float16


def load_for_eval(checkpoint: str | Path | CheckpointRef, tokenizer_or_path, device: str = "auto",
                  dtype: str = "auto") -> LoadedModel:
    """Check tokenizer compatibility from the config files, then load the weights (eval mode)."""
    ref = checkpoint if isinstance(checkpoint, CheckpointRef) else checkpoint_ref(checkpoint)
    if isinstance(tokenizer_or_path, (str, Path)):
        tokenizer_path = Path(tokenizer_or_path)
        tokenizer = load_tokenizer(tokenizer_path)
    else:
        tokenizer, tokenizer_path = tokenizer_or_path, Path("<tokenizer object>")
    model_cfg = read_model_config(ref.path)
    raise_problems(UserError, "checkpoint and tokenizer do not belong together",
                   tokenizer_problems(ref, model_cfg, tokenizer, tokenizer_path))
    dev = resolve_device(device or "auto")
    model, model_cfg, meta = load_model(ref.path, device=dev)
    return LoadedModel(ref=ref, model=model.eval(), model_cfg=model_cfg, meta=meta, tokenizer=tokenizer,
                       autocast_dtype=resolve_autocast(dtype, dev))
