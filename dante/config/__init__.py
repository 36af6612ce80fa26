"""Typed configuration for every Dante stage: ``from dante import config as C`` gives the whole public API.

Each stage has one dataclass (``CorpusStageConfig``, ``TokenizerStageConfig`` ...) made of nested
section dataclasses. YAML is the saved form: a file fills the dataclass, ``--set a.b=v`` overrides one
dotted key after the file, and the result is validated as a whole; every problem (unknown key, wrong type,
invalid combination) is reported in one ``ConfigError`` naming the file and the dotted key.

The package, one home each:
- ``schema``: the dataclasses (every setting with its default and one-line doc) and shared enumerations;
- ``loader``: YAML loading, ``--set`` overrides, type checks, ``to_yaml``/``to_dict``/``from_dict``, ``describe``;
- ``checks``: the cross-field checks, one checker per stage config (``STAGE_CHECKS``) behind ``validate``;
- ``stages``: the stage table (folder, script, config class, profile file) and the folder-name constants.

Example::

    cfg = load_config(PretrainStageConfig, "configs/tiny/pretrain.yaml", ["train.lr=1e-3"])
"""

from __future__ import annotations

from dante.config.checks import (
    ROPE_SCALING_KEYS,
    STAGE_CHECKS,
    long_eval_problems,
    rope_scaling_problems,
    run_problems,
    source_problems,
    validate,
    validate_model,
    validate_train,
)
from dante.config.loader import describe, field_docs, from_dict, load_config, parse_overrides, to_dict, to_yaml
from dante.config.schema import (
    LANGS,
    BaseSourceConfig,
    CorpusConfig,
    CorpusStageConfig,
    EvalConfig,
    EvalStageConfig,
    ExportConfig,
    ExportStageConfig,
    ExtendConfig,
    ExtendStageConfig,
    GenerationConfig,
    Lang,
    LongEvalConfig,
    ModelConfig,
    PretrainStageConfig,
    ReferenceTokenizerConfig,
    RunConfig,
    SFTDataConfig,
    SFTDataStageConfig,
    SFTSourceConfig,
    SFTStageConfig,
    SFTTrainConfig,
    ShardsConfig,
    ShardsStageConfig,
    SourceConfig,
    SourceKind,
    TokenizerConfig,
    TokenizerStageConfig,
    TrainConfig,
)
from dante.config.stages import (
    CHECKPOINT_STAGES,
    CORPUS,
    EVAL,
    EXPORT,
    EXTEND,
    OUTPUT_NEUTRAL_KEYS,
    PRETRAIN,
    PROFILE_FILES,
    SFT,
    SFT_DATA,
    SHARDS,
    STAGE_BY_FOLDER,
    STAGE_TABLE,
    STAGES,
    TOKENIZER,
    StageSpec,
    is_output_neutral,
)
from dante.errors import ConfigError

__all__ = [
    # errors
    "ConfigError",
    # schema: enumerations and sections
    "LANGS", "Lang", "SourceKind",
    "RunConfig", "ModelConfig", "TrainConfig", "LongEvalConfig", "BaseSourceConfig",
    "SourceConfig", "CorpusConfig", "CorpusStageConfig",
    "ReferenceTokenizerConfig", "TokenizerConfig", "TokenizerStageConfig",
    "ShardsConfig", "ShardsStageConfig",
    "PretrainStageConfig",
    "ExtendConfig", "ExtendStageConfig",
    "SFTSourceConfig", "SFTDataConfig", "SFTDataStageConfig", "SFTTrainConfig", "SFTStageConfig",
    "GenerationConfig", "EvalConfig", "EvalStageConfig",
    "ExportConfig", "ExportStageConfig",
    # stages
    "CORPUS", "TOKENIZER", "SHARDS", "PRETRAIN", "EXTEND", "SFT_DATA", "SFT", "EVAL", "EXPORT",
    "StageSpec", "STAGE_TABLE", "STAGE_BY_FOLDER", "STAGES", "PROFILE_FILES", "CHECKPOINT_STAGES",
    "OUTPUT_NEUTRAL_KEYS", "is_output_neutral",
    # loader
    "load_config", "parse_overrides", "from_dict", "to_dict", "to_yaml", "field_docs", "describe",
    # checks
    "validate", "STAGE_CHECKS", "run_problems", "source_problems", "validate_model", "validate_train",
    "rope_scaling_problems", "ROPE_SCALING_KEYS", "long_eval_problems",
]
