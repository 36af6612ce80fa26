"""Which checkpoints stage 8 evaluates, loading them, and proving each belongs with the run's tokenizer.

``find_checkpoints`` turns ``eval.checkpoints`` entries (stage folder names such as ``04_pretrain``, or
checkpoint paths) into ``CheckpointRef`` s; a stage of this run that has not run is skipped with a note,
a path that does not exist is an error.

``tokenizer_problems`` is the "do they belong together" check, run before any weights are loaded:
- the embedding has as many rows as the tokenizer has ids (``model.vocab_size``);
- the six named specials sit at ids 0..5 (docs/DESIGN.md);
- lineage: every stage manifest records the manifest hash of its inputs (``Stage.require``). Following
  the checkpoint stage's inputs back to ``02_tokenizer`` gives the tokenizer manifest it was trained
  with; if that differs from the tokenizer being used (another run's, or stage 2 rebuilt since), the
  token ids mean different strings even when the sizes agree.

Example::

    refs, notes = find_checkpoints(run_cfg, ["04_pretrain", "05_extend", "07_sft"])
    loaded = load_for_eval(refs[0].path, "runs/tiny/02_tokenizer/tokenizer.json")
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dante import config as C
from dante.artifacts import MANIFEST, file_sha256, read_json, stage_dir, stage_done
from dante.errors import UserError

CHECKPOINT_STAGES = ("04_pretrain", "05_extend", "07_sft")


@dataclass
class CheckpointRef:
    label: str
    """Name in the report: the stage name, or the path as given."""
    path: Path
    """The step folder (checkpoints/step-NNNNNNN) that will be loaded."""
    stage: str | None
    """04_pretrain / 05_extend / 07_sft when the folder belongs to such a stage."""
    stage_dir: Path | None
    """The stage folder holding manifest.json, when known."""

    @property
    def is_chat(self) -> bool:
        return self.stage == "07_sft"


@dataclass
class LoadedModel:
    ref: CheckpointRef
    model: Any
    model_cfg: C.ModelConfig
    meta: dict
    tokenizer: Any
    autocast_dtype: torch.dtype | None


def _stage_of(path: Path) -> tuple[str | None, Path | None]:
    for parent in [path, *path.parents]:
        if parent.name in CHECKPOINT_STAGES:
            return parent.name, parent
    return None, None


def find_checkpoints(run: C.RunConfig, entries: list[str]) -> tuple[list[CheckpointRef], list[str]]:
    """Resolve eval.checkpoints entries; returns (found refs, notes about skipped stages)."""
    from dante.checkpoint import resolve_checkpoint

    refs, notes, problems = [], [], []
    for entry in entries:
        if entry in C.STAGES:
            if entry not in CHECKPOINT_STAGES:
                problems.append(f"eval.checkpoints: {entry} is not a checkpoint stage (use {', '.join(CHECKPOINT_STAGES)} or a path)")
                continue
            if not stage_done(run, entry):
                notes.append(f"{entry}: skipped, the stage has not run for run {run.name!r} "
                             f"(no {stage_dir(run, entry) / MANIFEST})")
                continue
            where = stage_dir(run, entry)
        else:
            where = Path(entry)
            if not where.exists():
                problems.append(f"eval.checkpoints: {entry} is neither a stage name ({', '.join(CHECKPOINT_STAGES)}) "
                                f"nor an existing checkpoint folder")
                continue
        try:
            step_dir = resolve_checkpoint(where)
        except UserError as e:
            problems.append(f"eval.checkpoints: {entry}: {e}")
            continue
        stage, sdir = _stage_of(step_dir.resolve())
        refs.append(CheckpointRef(label=entry, path=step_dir, stage=stage, stage_dir=sdir))
    if problems:
        raise UserError("\n".join(problems))
    return refs, notes


def read_model_config(step_dir: Path) -> C.ModelConfig:
    from dante.checkpoint import MODEL_CONFIG

    return C.from_dict(C.ModelConfig, read_json(step_dir / MODEL_CONFIG))


def recorded_tokenizer_manifest(stage_folder: Path, _depth: int = 0) -> str | None:
    """The 02_tokenizer manifest hash a stage was built from, found by walking its inputs' manifests."""
    manifest_path = stage_folder / MANIFEST
    if _depth > 8 or not manifest_path.is_file():
        return None
    inputs = read_json(manifest_path).get("inputs", {})
    direct = inputs.get("02_tokenizer", {})
    if isinstance(direct, dict) and direct.get("manifest_sha256"):
        return direct["manifest_sha256"]
    for name, info in inputs.items():
        if name in C.STAGES and isinstance(info, dict) and info.get("manifest"):
            found = recorded_tokenizer_manifest(Path(info["manifest"]).parent, _depth + 1)
            if found:
                return found
    return None


def tokenizer_problems(ref: CheckpointRef, model_cfg: C.ModelConfig, tokenizer, tokenizer_path: Path) -> list[str]:
    """Reasons why ``tokenizer`` (at tokenizer_path) is not the tokenizer the checkpoint was trained with."""
    from dante.tokenizer import SPECIAL_TOKENS

    p = []
    n = tokenizer.get_vocab_size(with_added_tokens=True)
    if n != model_cfg.vocab_size:
        p.append(f"{ref.label}: the checkpoint's embedding has model.vocab_size={model_cfg.vocab_size} rows but the "
                 f"tokenizer {tokenizer_path} has {n} ids: they do not belong together")
    wrong = [t for i, t in enumerate(SPECIAL_TOKENS) if tokenizer.token_to_id(t) != i]
    if wrong:
        p.append(f"{ref.label}: tokenizer {tokenizer_path}: special tokens {wrong} are not at the ids of docs/DESIGN.md")
    tok_manifest = tokenizer_path.parent / MANIFEST
    if ref.stage_dir is not None and tok_manifest.is_file():
        recorded = recorded_tokenizer_manifest(ref.stage_dir)
        current = file_sha256(tok_manifest)
        if recorded and recorded != current:
            p.append(f"{ref.label}: the checkpoint was trained with another tokenizer: its stage inputs record "
                     f"02_tokenizer manifest {recorded[:12]}, but {tok_manifest} is {current[:12]} (another run's "
                     f"tokenizer, or stage 2 rebuilt since)")
    if p:
        p.append("HINT: evaluate a checkpoint with the run that trained it (same run.name), or retrain from stage 3")
    return p


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
    from dante.checkpoint import load_model, resolve_checkpoint
    from dante.tokenizer import load_tokenizer

    if isinstance(checkpoint, CheckpointRef):
        ref = checkpoint
    else:
        step_dir = resolve_checkpoint(checkpoint)
        stage, sdir = _stage_of(step_dir.resolve())
        ref = CheckpointRef(label=str(checkpoint), path=step_dir, stage=stage, stage_dir=sdir)
    if isinstance(tokenizer_or_path, (str, Path)):
        tokenizer_path = Path(tokenizer_or_path)
        tokenizer = load_tokenizer(tokenizer_path)
    else:
        tokenizer, tokenizer_path = tokenizer_or_path, Path("<tokenizer object>")
    model_cfg = read_model_config(ref.path)
    problems = tokenizer_problems(ref, model_cfg, tokenizer, tokenizer_path)
    if problems:
        raise UserError("checkpoint and tokenizer do not belong together:\n" + "\n".join(f"  - {x}" for x in problems))
    dev = resolve_device(device or "auto")
    model, model_cfg, meta = load_model(ref.path, device=dev)
    return LoadedModel(ref=ref, model=model.eval(), model_cfg=model_cfg, meta=meta, tokenizer=tokenizer,
                       autocast_dtype=resolve_autocast(dtype, dev))
