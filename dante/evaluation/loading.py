"""Reading a run's model files for stages 8 and 9: the tokenizer and checkpoints, checked before use; loading
a checkpoint for evaluation in eval mode, with the device and autocast dtype resolved.

Which checkpoint, from which stage, and whether it belongs with a tokenizer are checkpoint identity and
live in ``dante.checkpoint`` (``find_checkpoints``, ``CheckpointRef``, ``tokenizer_problems``); this module
runs those checks before any weights are loaded and adds what the readers of stages 8 and 9 need:

- ``run_tokenizer``: stage 2's tokenizer.json, compared with the sha256 stage 2 recorded in its manifest
  (a few MB: milliseconds), then parsed; a damaged file is a UserError naming it and the way out.
- ``checkpoint_problems``: the checkpoint's files against the sizes and sha256 its meta.json recorded
  (``dante.checkpoint.verify_checkpoint``: a bit flip in model.safetensors is refused), and readable (a
  truncated file is named, never a JSONDecodeError or SafetensorError traceback). Stages 8 and 9 run it in
  their ``validate`` hook, before ``--force`` deletes anything.

Example::

    tok_path, tokenizer = run_tokenizer(run_cfg)
    refs, notes = find_checkpoints(run_cfg, [C.PRETRAIN, C.EXTEND, C.SFT])   # dante.checkpoint
    problems = [p for ref in refs for p in checkpoint_problems(ref)]
    loaded = load_for_eval(refs[0], tokenizer)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from dante import checkpoint as ckpt
from dante import config as C
from dante.artifacts import script_for
from dante.artifacts import tokenizer_path as run_tokenizer_path
from dante.checkpoint import CheckpointError, CheckpointRef, checkpoint_ref, load_model, tokenizer_problems
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


def run_tokenizer(run: C.RunConfig) -> tuple[Path, Any]:
    """(path, tokenizer) of stage 2's tokenizer for ``run``: the file as stage 2's manifest names it, checked
    against the sha256 recorded there (``tokenizer_path``), then loaded. StageError when stage 2 has not finished
    (``tokenizer_path``); UserError naming the file, the problem and the way out when it is damaged."""
    path = run_tokenizer_path(run)  # checks the file against the sha256 stage 2 recorded
    # Retraining is not the fix of a damaged file when checkpoints exist: a new tokenizer's ids mean other
    # strings, so the checkpoints of this run would no longer belong to it (tokenizer_problems refuses that).
    fix = (f"  HINT: restore {path} from a copy of this run; or retrain it with "
           f"`python {script_for(C.TOKENIZER)} --config configs/<profile>/{C.PROFILE_FILES[C.TOKENIZER]} --force` "
           f"and redo the stages after it (checkpoints trained with the old tokenizer do not fit a new one)")
    try:
        return path, load_tokenizer(path)
    except UserError as e:
        raise UserError(f"{e}\n{fix}") from None


def checkpoint_problems(ref: CheckpointRef, notes: list[str] | None = None) -> list[str]:
    """Why the files of ``ref``'s checkpoint cannot be read (empty when they can), without loading weights.

    ``dante.checkpoint.verify_checkpoint``: meta.json parses, and model.safetensors and model_config.json have
    the sizes and sha256 it recorded when the checkpoint was written (one read of the weights; sha256 ran at
    0.34 GiB/s on a loaded 2-core dev VM, i.e. ~25 s for a 2B model's 8 GB of fp32, less on an idle host;
    ``load_model`` checks again when it loads them, so a file changed in between is caught too). Then
    model_config.json must parse and model.safetensors' header must describe a file of its size (safetensors
    checks this when opening), which is what catches a truncated file of a checkpoint written before
    checksums were recorded; a note in ``notes`` says that it was not verified. Each problem names the file
    and the way out."""
    try:
        for note in ckpt.verify_checkpoint(ref.path, ckpt.MODEL_FILES):
            if notes is not None:
                notes.append(f"{ref.label}: {note}")
        ckpt.read_model_config(ref.path, verified=True)
    except CheckpointError as e:
        return [f"{ref.label}: " + str(e).replace("\n", "\n    ")]  # its own bullets, indented under this one
    weights = ref.path / ckpt.WEIGHTS
    try:
        with safe_open(str(weights), "pt") as f:
            f.keys()
    except (SafetensorError, OSError) as e:
        return [f"{ref.label}: {weights} is not a complete safetensors file ({_one_line(e)}); {_redo_hint(ref)}"]
    return []


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())[:200]


def _redo_hint(ref: CheckpointRef) -> str:
    """Where a damaged checkpoint comes back from: a copy, or the stage that wrote it."""
    if ref.stage is None:
        return f"HINT: restore {ref.path} from a copy, or name another checkpoint folder"
    return (f"HINT: restore {ref.path} from a copy, or redo {ref.stage} "
            f"(`python {script_for(ref.stage)} --config configs/<profile>/{C.PROFILE_FILES[ref.stage]} --force`)")


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
    model_cfg = ckpt.read_model_config(ref.path)  # checked against its recorded sha256; load_model checks the rest
    raise_problems(UserError, "checkpoint and tokenizer do not belong together",
                   tokenizer_problems(ref, model_cfg, tokenizer, tokenizer_path))
    dev = resolve_device(device or "auto")
    model, model_cfg, meta = load_model(ref.path, device=dev)
    return LoadedModel(ref=ref, model=model.eval(), model_cfg=model_cfg, meta=meta, tokenizer=tokenizer,
                       autocast_dtype=resolve_autocast(dtype, dev))
