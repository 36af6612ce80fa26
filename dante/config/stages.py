"""The nine stages by name: one table gives each stage's folder, script, config class and profile file.

Every other module names a stage through these constants (``C.PRETRAIN`` rather than ``"04_pretrain"``)
and looks its script or profile file up here, so a stage is renamed or added in one place.
``STAGES`` and ``PROFILE_FILES`` are views of ``STAGE_TABLE`` kept for the existing callers.

Example::

    from dante import config as C
    C.STAGE_BY_FOLDER[C.EXTEND].script  # "5_extend_context.py"
"""

from __future__ import annotations

from dataclasses import dataclass

from dante.config.schema import (
    CorpusStageConfig,
    EvalStageConfig,
    ExportStageConfig,
    ExtendStageConfig,
    PretrainStageConfig,
    SFTDataStageConfig,
    SFTStageConfig,
    ShardsStageConfig,
    TokenizerStageConfig,
)

# Folder names under runs/<run.name>/ (also the stage's name in manifests, messages and eval.checkpoints).
CORPUS = "01_corpus"
TOKENIZER = "02_tokenizer"
SHARDS = "03_shards"
PRETRAIN = "04_pretrain"
EXTEND = "05_extend"
SFT_DATA = "06_sft_data"
SFT = "07_sft"
EVAL = "08_eval"
EXPORT = "09_export"


@dataclass(frozen=True)
class StageSpec:
    """One row of the stage table."""

    folder: str
    """Folder under runs/<run.name>/ and the stage's name everywhere, e.g. 04_pretrain."""
    script: str
    """Numbered script that runs the stage."""
    config: type
    """Stage config dataclass the script loads."""
    profile_file: str
    """Config file name inside a profile folder (configs/<profile>/<profile_file>)."""


#: every stage in pipeline order
STAGE_TABLE: tuple[StageSpec, ...] = (
    StageSpec(CORPUS, "1_download_corpus.py", CorpusStageConfig, "corpus.yaml"),
    StageSpec(TOKENIZER, "2_train_tokenizer.py", TokenizerStageConfig, "tokenizer.yaml"),
    StageSpec(SHARDS, "3_tokenize_shards.py", ShardsStageConfig, "shards.yaml"),
    StageSpec(PRETRAIN, "4_pretrain.py", PretrainStageConfig, "pretrain.yaml"),
    StageSpec(EXTEND, "5_extend_context.py", ExtendStageConfig, "extend.yaml"),
    StageSpec(SFT_DATA, "6_build_sft.py", SFTDataStageConfig, "sft_data.yaml"),
    StageSpec(SFT, "7_sft.py", SFTStageConfig, "sft.yaml"),
    StageSpec(EVAL, "8_eval.py", EvalStageConfig, "eval.yaml"),
    StageSpec(EXPORT, "9_export_hf.py", ExportStageConfig, "export.yaml"),
)

#: stage folder name -> its row
STAGE_BY_FOLDER: dict[str, StageSpec] = {s.folder: s for s in STAGE_TABLE}

#: stage folder name -> (script, config class)
STAGES: dict[str, tuple[str, type]] = {s.folder: (s.script, s.config) for s in STAGE_TABLE}

#: config file name in a profile folder, per stage
PROFILE_FILES: dict[str, str] = {s.folder: s.profile_file for s in STAGE_TABLE}

#: stages that write model checkpoints (what stage 8 compares and stage 9 can export)
CHECKPOINT_STAGES: tuple[str, ...] = (PRETRAIN, EXTEND, SFT)

#: config keys that do not change what a stage writes (where it runs, how it logs, how many processes share the
#: work): a finished stage rerun with only these changed stays a no-op. Any other difference is refused by
#: ``Stage.open`` (the user edited something that matters and must choose --force or another run.name).
#: A key ending in ``.*`` matches every key under it; ``*.workers`` matches a ``workers`` key anywhere.
OUTPUT_NEUTRAL_KEYS: tuple[str, ...] = (
    "run.root",
    "*.workers",
    "train.log_every",
    "train.checkpoint_every",
    "train.keep_last",
    "train.assumed_tokens_per_sec",
    "train.peak_tflops",
    "train.expected_world_size",
    "eval.batch_size",  # 08_eval: scores are bit-identical at any batch size (dante/evaluation/scoring.py)
)


def is_output_neutral(key: str) -> bool:
    """True when the dotted config ``key`` is in ``OUTPUT_NEUTRAL_KEYS`` (patterns included)."""
    for pat in OUTPUT_NEUTRAL_KEYS:
        if pat.startswith("*.") and (key == pat[2:] or key.endswith(pat[1:])):
            return True
        if pat.endswith(".*") and key.startswith(pat[:-1]):
            return True
        if key == pat:
            return True
    return False
