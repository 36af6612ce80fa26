"""What stage 9 reads from the run folder: the checkpoint to export, its tokenizer, its training lineage, stage 8's sampling defaults and the held-out text.

One place for stage 9's view of earlier stages, so the rest of ``dante/export/`` works on plain values.
Which checkpoint is which (``CheckpointRef``, ``find_checkpoints``, ``newest_finished``, ``stage_lineage``)
is ``dante.checkpoint``'s notion, used here as it is.

Example::

    source = resolve_checkpoint(cfg)          # export.checkpoint: auto, a stage name, or a folder
    print(source.path, source.stage, source.is_chat)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dante import checkpoint as ckpt
from dante import config as C
from dante.artifacts import load_texts, read_json, read_manifest, stage_done
from dante.artifacts import tokenizer_path as run_tokenizer_path
from dante.checkpoint import (
    CHECKPOINT_STAGES,
    CheckpointRef,
    find_checkpoints,
    newest_finished,
    read_model_config,
    stage_lineage,
)
from dante.errors import UserError


@dataclass
class Source:
    """The checkpoint being exported (stage 8's CheckpointRef: one notion of "which checkpoint") and its config."""

    ref: CheckpointRef
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
    choice = cfg.export.checkpoint
    if choice == "auto":
        choice = newest_finished(cfg.run, CHECKPOINT_STAGES, setting="export.checkpoint")
    if choice in CHECKPOINT_STAGES:
        read_manifest(cfg.run, choice)  # an unfinished stage: the error names the script to run
    (ref,), _ = find_checkpoints(cfg.run, [choice], setting="export.checkpoint")
    return Source(ref=ref, model_cfg=read_model_config(ref.path), meta=read_json(ref.path / ckpt.META))


def tokenizer_path(cfg: C.ExportStageConfig) -> Path:
    """Stage 2's tokenizer file (as its manifest names it), the tokenizer every checkpoint of the run used."""
    return run_tokenizer_path(cfg.run)


def finished_manifest(cfg: C.ExportStageConfig, stage: str) -> dict | None:
    """The manifest of ``stage`` if it finished, else None (the card and the defaults do without it)."""
    return read_manifest(cfg.run, stage) if stage_done(cfg.run, stage) else None


def training_lineage(cfg: C.ExportStageConfig, source: Source) -> list[tuple[str, dict]]:
    """(stage, checkpoint meta) of the training stages behind the exported checkpoint, oldest first.

    Followed through the manifests' recorded inputs (7_sft records the stage it started from), so an SFT
    model fine-tuned from 04_pretrain does not list a 05_extend that it never saw.
    """
    if source.stage is None:
        return []
    chain = [(source.stage, source.meta)]
    for step in stage_lineage(source.ref.stage_dir or source.path.parent.parent)[1:]:
        if step.stage not in CHECKPOINT_STAGES or step.stage == source.stage:
            continue
        step_dir = ckpt.latest_checkpoint(step.folder / ckpt.CHECKPOINTS)
        chain.append((step.stage, read_json(step_dir / ckpt.META) if step_dir else {}))
    return chain[::-1]


def generation_defaults(cfg: C.ExportStageConfig) -> C.GenerationConfig:
    """Stage 8's sampling settings when it ran, else the dataclass defaults (the same reference values)."""
    manifest = finished_manifest(cfg, C.EVAL)
    if manifest:
        return C.from_dict(C.EvalStageConfig, manifest["config"]).eval.generation
    return C.GenerationConfig()


def load_heldout(cfg: C.ExportStageConfig) -> dict[str, list[str]]:
    """export.heldout's documents by language (the verification's real text); a bad file is a UserError."""
    texts = {}
    for lang, path in sorted(cfg.export.heldout.items()):
        try:
            texts[lang] = load_texts(path)
        except (OSError, ValueError) as err:
            raise UserError(f"export.heldout.{lang}: {err}") from None
    return texts
