"""What stage 9 reads from the run folder: the checkpoint to export, its tokenizer, its training lineage, stage 8's sampling defaults and the held-out text.

One place for stage 9's view of earlier stages, so the rest of ``dante/export/`` works on plain values.
Which checkpoint is which (``CheckpointRef``, ``find_checkpoints``, ``read_model_config``) is stage 8's
notion, used here as it is; ``training_lineage`` is the export's own walk over the manifests (the model
card's training table), kept here until checkpoint lineage has one home.

Example::

    source = resolve_checkpoint(cfg)          # export.checkpoint: auto, a stage name, or a folder
    print(source.path, source.stage, source.is_chat)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dante import checkpoint as ckpt
from dante import config as C
from dante.artifacts import read_json, read_manifest, stage_dir, stage_done
from dante.errors import StageError, UserError
from dante.evaluation.loading import CheckpointRef, find_checkpoints, read_model_config
from dante.evaluation.perplexity import load_texts

#: Checkpoint stages, newest first: "auto" exports the first one that finished.
AUTO_ORDER = ("07_sft", "05_extend", "04_pretrain")


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
    return Source(ref=ref, model_cfg=read_model_config(ref.path), meta=read_json(ref.path / ckpt.META))


def tokenizer_path(cfg: C.ExportStageConfig) -> Path:
    """Stage 2's tokenizer.json, the tokenizer every checkpoint of the run was trained with."""
    return stage_dir(cfg.run, "02_tokenizer") / "tokenizer.json"


def finished_manifest(cfg: C.ExportStageConfig, stage: str) -> dict | None:
    """The manifest of ``stage`` if it finished, else None (the card and the defaults do without it)."""
    return read_manifest(cfg.run, stage) if stage_done(cfg.run, stage) else None


def training_lineage(cfg: C.ExportStageConfig, source: Source) -> list[tuple[str, dict]]:
    """(stage, checkpoint meta) of the training stages behind the exported checkpoint, oldest first.

    Followed through the manifests' recorded inputs (7_sft records the stage it started from), so an SFT
    model fine-tuned from 04_pretrain does not list a 05_extend that it never saw.
    """
    chain, stage = [(source.stage, source.meta)] if source.stage else [], source.stage
    while stage is not None:
        manifest = finished_manifest(cfg, stage) or {}
        parent = next((s for s in ("05_extend", "04_pretrain") if s in manifest.get("inputs", {}) and s != stage), None)
        if parent is None:
            break
        step_dir = ckpt.latest_checkpoint(stage_dir(cfg.run, parent) / ckpt.CHECKPOINTS)
        chain.append((parent, read_json(step_dir / ckpt.META) if step_dir else {}))
        stage = parent
    return chain[::-1]


def generation_defaults(cfg: C.ExportStageConfig) -> C.GenerationConfig:
    """Stage 8's sampling settings when it ran, else the dataclass defaults (the same reference values)."""
    manifest = finished_manifest(cfg, "08_eval")
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
