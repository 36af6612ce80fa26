"""What stage 9 reads from the run folder: the checkpoint to export, its tokenizer, its training lineage, stage 8's sampling defaults and the held-out text.

One place for stage 9's view of earlier stages, so the rest of ``dante/export/`` works on plain values.
Which checkpoint is which (``CheckpointRef``, ``find_checkpoints``, ``newest_finished``, ``stage_lineage``)
is ``dante.checkpoint``'s notion, used here as it is. Every file is checked as it is read
(``dante.evaluation.loading``: the tokenizer against stage 2's recorded sha256, the checkpoint's files
against the sizes and sha256 its meta.json recorded), so a damaged input is a UserError naming the file and
the fix; ``preflight`` reads them all before ``--force`` touches 09_export.

Example::

    source = resolve_checkpoint(cfg)          # export.checkpoint: auto, a stage name, or a folder
    print(source.path, source.stage, source.is_chat)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dante import checkpoint as ckpt
from dante import config as C
from dante import sft_data as sft
from dante.artifacts import load_texts, read_manifest, stage_done
from dante.checkpoint import (
    CHECKPOINT_STAGES,
    CheckpointRef,
    find_checkpoints,
    newest_finished,
    read_model_config,
    stage_lineage,
)
from dante.errors import ConfigError, StageError, UserError, raise_problems
from dante.evaluation.loading import checkpoint_problems


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
    raise_problems(UserError, f"export.checkpoint={cfg.export.checkpoint!r}: the checkpoint cannot be read",
                   checkpoint_problems(ref))
    return Source(ref=ref, model_cfg=read_model_config(ref.path, verified=True), meta=ckpt.read_meta(ref.path))


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
        chain.append((step.stage, ckpt.read_meta(step_dir) if step_dir else {}))
    return chain[::-1]


def sft_source_problems(cfg: C.ExportStageConfig, source: Source) -> list[str]:
    """What keeps the chat-template check of an SFT export from reading stage 6's local sources (their real
    conversations are compared besides the built-in ones): its manifest's config, and files that are gone."""
    if not (source.is_chat and cfg.export.verify and stage_done(cfg.run, C.SFT_DATA)):
        return []
    fix = ("HINT: restore the files (relative paths start at the working directory: run stage 9 where stage 6 "
           "ran), or --set export.verify=false to skip the whole verification (not recommended)")
    try:
        sources = C.from_dict(C.SFTDataStageConfig, read_manifest(cfg.run, C.SFT_DATA)["config"]).sft_data.sources
    except (StageError, ConfigError, KeyError, TypeError) as e:
        return [f"06_sft_data: its manifest cannot give the sources of the chat-template check ({e}); {fix}"]
    missing = []
    for i, src in enumerate(sources):
        files = sft.local_files(src.path) if src.kind == "local" else []
        if src.kind == "local" and (not files or not all(f.is_file() for f in files)):
            missing.append(f"06_sft_data: sft_data.sources[{i}] ({src.name}): no file matches {src.path!r}, which "
                           f"the chat-template check reads; {fix}")
    return missing


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
