"""Cross-field checks of the stage configs: invalid combinations that a type alone cannot rule out.

One checker function per stage config, found through the table ``STAGE_CHECKS`` ({config class:
checker}); ``validate`` runs the checks every stage shares (``run``) and then the stage's own checker.
A table rather than a ``check()`` method on each dataclass: the schema stays pure data that reads like
the reference of the settings, checks that need several sections (train.seq_len against model.max_seq_len)
live beside each other, and helpers that other modules call without a whole stage config
(``rope_scaling_problems`` for dante.rope, ``long_eval_problems`` for stage 8) have one home.
Every function returns a list of problems (empty when fine); the loader raises them all as one ConfigError.

Example::

    problems = validate(cfg)  # [] or ["train.seq_len=4096 exceeds model.max_seq_len=2048", ...]
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

from dante.config.schema import (
    LANGS,
    BaseSourceConfig,
    CorpusStageConfig,
    EvalStageConfig,
    ExportStageConfig,
    ExtendStageConfig,
    LongEvalConfig,
    ModelConfig,
    PretrainStageConfig,
    RunConfig,
    SFTDataStageConfig,
    SFTStageConfig,
    ShardsStageConfig,
    TokenizerStageConfig,
    TrainConfig,
)
from dante.config.stages import CORPUS

# ---------------------------------------------------------------------------------------------------
# Sections shared by several stages
# ---------------------------------------------------------------------------------------------------


def run_problems(run: RunConfig) -> list[str]:
    if not run.name or "/" in run.name or run.name.startswith("."):
        return [f"run.name={run.name!r}: must be a plain folder name"]
    return []


def validate_model(m: ModelConfig, prefix: str = "model") -> list[str]:
    p = []
    for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "max_seq_len"):
        if getattr(m, name) <= 0:
            p.append(f"{prefix}.{name}: must be > 0, got {getattr(m, name)}")
    if p:
        return p
    if m.head_dim == 0 and m.dim % m.n_heads:
        p.append(f"{prefix}.dim={m.dim} is not divisible by {prefix}.n_heads={m.n_heads}; set head_dim or change one")
    if m.n_heads % m.n_kv_heads:
        p.append(f"{prefix}.n_heads={m.n_heads} is not a multiple of {prefix}.n_kv_heads={m.n_kv_heads}")
    hd = m.head_dim or (m.dim // m.n_heads)
    if hd % 2:
        p.append(f"{prefix}: head dim {hd} must be even for RoPE")
    if m.rope_theta <= 0:
        p.append(f"{prefix}.rope_theta must be > 0")
    if m.head_dim < 0 or m.ffn_hidden_dim < 0:
        p.append(f"{prefix}.head_dim and {prefix}.ffn_hidden_dim must be >= 0 (0 means derived)")
    if m.multiple_of <= 0 or m.ffn_dim_multiplier <= 0:
        p.append(f"{prefix}.multiple_of and {prefix}.ffn_dim_multiplier must be > 0")
    if m.norm_eps <= 0 or m.init_std <= 0:
        p.append(f"{prefix}.norm_eps and {prefix}.init_std must be > 0")
    if m.rope_scaling:
        p += rope_scaling_problems(m.rope_scaling, f"{prefix}.rope_scaling", m.max_seq_len)
    return p


#: rope_scaling keys per rope_type: (required, optional), with transformers' names and meaning.
ROPE_SCALING_KEYS: dict[str, tuple[set, set]] = {
    "default": (set(), set()),
    "linear": ({"factor"}, set()),
    "yarn": (
        {"factor", "original_max_position_embeddings"},
        {"attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "truncate"},
    ),
}


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def rope_scaling_problems(rs: Any, prefix: str = "model.rope_scaling", max_seq_len: int | None = None) -> list[str]:
    """Problems of a transformers-format rope_scaling dict ({} means no scaling); dante.rope raises on them."""
    if not isinstance(rs, dict):
        return [f"{prefix}: must be a mapping like {{rope_type: yarn, factor: 4, original_max_position_embeddings: 2048}}"]
    if not rs:
        return []
    rt = rs.get("rope_type", rs.get("type"))
    if "type" in rs and "rope_type" in rs and rs["type"] != rs["rope_type"]:
        return [f"{prefix}: 'type' ({rs['type']!r}) and 'rope_type' ({rs['rope_type']!r}) disagree; keep only rope_type"]
    if rt not in ROPE_SCALING_KEYS:
        return [f"{prefix}.rope_type={rt!r} is not supported; use one of {', '.join(ROPE_SCALING_KEYS)} "
                "(transformers' names; {} means no scaling)"]
    required, optional = ROPE_SCALING_KEYS[rt]
    keys = set(rs) - {"rope_type", "type"}
    p = []
    if "rope_theta" in keys:
        p.append(f"{prefix}.rope_theta: set model.rope_theta instead (the base frequency is not a scaling key)")
        keys.discard("rope_theta")
    if keys - required - optional:
        allowed = ", ".join(sorted(required | optional)) or "none"
        p.append(f"{prefix}: unknown key(s) {sorted(keys - required - optional)} for rope_type {rt}; allowed: {allowed}")
    if required - keys:
        p.append(f"{prefix}: rope_type {rt} needs {sorted(required - keys)}")
    if "factor" in rs and (not _is_number(rs["factor"]) or rs["factor"] <= 1):
        p.append(f"{prefix}.factor must be a number > 1 (new context / original context), got {rs['factor']!r}")
    if "original_max_position_embeddings" in rs:
        orig = rs["original_max_position_embeddings"]
        if not isinstance(orig, int) or isinstance(orig, bool) or orig <= 0:
            p.append(f"{prefix}.original_max_position_embeddings must be an integer > 0 (the pretraining length), got {orig!r}")
        elif max_seq_len is not None and max_seq_len <= orig:
            p.append(f"model.max_seq_len={max_seq_len} must exceed {prefix}.original_max_position_embeddings={orig} "
                     "(the scaled model's context is longer than the pretraining one)")
    for k in ("attention_factor", "beta_fast", "beta_slow"):
        if k in rs and (not _is_number(rs[k]) or rs[k] <= 0):
            p.append(f"{prefix}.{k} must be a number > 0, got {rs[k]!r}")
    for k in ("mscale", "mscale_all_dim"):
        if k in rs and not _is_number(rs[k]):
            p.append(f"{prefix}.{k} must be a number, got {rs[k]!r}")
    if all(_is_number(rs.get(k)) for k in ("beta_fast", "beta_slow")) and rs["beta_fast"] <= rs["beta_slow"]:
        p.append(f"{prefix}: beta_fast={rs['beta_fast']} must be greater than beta_slow={rs['beta_slow']}")
    if "truncate" in rs and not isinstance(rs["truncate"], bool):
        p.append(f"{prefix}.truncate must be true or false, got {rs['truncate']!r}")
    return p


def validate_train(t: TrainConfig, prefix: str = "train") -> list[str]:
    p = []
    for name in ("seq_len", "micro_batch", "grad_accum", "loss_chunk_size", "keep_last", "log_every"):
        if getattr(t, name) <= 0:
            p.append(f"{prefix}.{name}: must be > 0, got {getattr(t, name)}")
    if t.max_steps <= 0 and t.token_budget <= 0:
        p.append(f"{prefix}: set max_steps or token_budget (both are 0)")
    if t.max_steps < 0 or t.token_budget < 0 or t.warmup_steps < 0:
        p.append(f"{prefix}: max_steps, token_budget and warmup_steps must be >= 0")
    if t.lr <= 0 or t.min_lr < 0 or t.min_lr > t.lr:
        p.append(f"{prefix}: need 0 <= min_lr <= lr and lr > 0 (lr={t.lr}, min_lr={t.min_lr})")
    if not (0 <= t.beta1 < 1 and 0 <= t.beta2 < 1):
        p.append(f"{prefix}: betas must be in [0, 1)")
    if t.grad_clip < 0:
        p.append(f"{prefix}.grad_clip must be >= 0")
    if t.zero_stage not in (0, 1, 2):
        # ZeRO-3 partitions parameters between module forwards; the chunked loss reads output.weight
        # directly, outside any module forward, so it would see an empty shard.
        p.append(f"{prefix}.zero_stage must be 0, 1 or 2 (ZeRO-3 is not supported), got {t.zero_stage}")
    if t.expected_world_size <= 0:
        p.append(f"{prefix}.expected_world_size must be > 0")
    elif t.backend == "torch" and t.expected_world_size > 1:
        p.append(f"{prefix}.backend=torch runs one process; use backend deepspeed for expected_world_size="
                 f"{t.expected_world_size}")
    if t.peak_tflops < 0 or t.assumed_tokens_per_sec <= 0:
        p.append(f"{prefix}: peak_tflops must be >= 0 and assumed_tokens_per_sec > 0")
    if t.eval_every < 0 or t.eval_batches <= 0:
        p.append(f"{prefix}: eval_every must be >= 0 (0 disables) and eval_batches > 0")
    if t.fp8 and t.precision != "bf16":
        p.append(f"{prefix}.fp8 needs precision bf16 (float8 matmuls run inside a bf16 model), got {t.precision}")
    if t.checkpoint_every <= 0:
        p.append(f"{prefix}.checkpoint_every must be > 0")
    if not t.tier_weights or any(
        (not isinstance(k, int) or not isinstance(v, (int, float)) or v < 0) for k, v in t.tier_weights.items()
    ):
        p.append(f"{prefix}.tier_weights must map tier integers to weights >= 0, got {t.tier_weights!r}")
    elif sum(t.tier_weights.values()) <= 0:
        p.append(f"{prefix}.tier_weights: at least one weight must be > 0")
    if t.compile_mode != "default" and not t.compile:
        p.append(f"{prefix}.compile_mode={t.compile_mode!r} has no effect with compile: false")
    if t.compile_mode in ("reduce-overhead", "max-autotune"):  # dante.transforms.apply_compile says why
        p.append(f"{prefix}.compile_mode={t.compile_mode!r} is refused until validated on a GPU; use 'default'")
    return p


def long_eval_problems(le: LongEvalConfig, prefix: str, min_trials: int = 0) -> list[str]:
    """Checks of a LongEvalConfig shared by stage 5 (min_trials 1) and stage 8 (trials 0 skips passkey)."""
    p = []
    if any(n <= 0 for n in le.lengths):
        p.append(f"{prefix}.lengths={le.lengths}: every length must be > 0")
    if le.trials < min_trials:
        p.append(f"{prefix}.trials={le.trials}: must be >= {min_trials}")
    if le.bucket_size <= 0 or le.max_docs <= 0 or le.distractors < 1:
        p.append(f"{prefix}: need bucket_size > 0, max_docs > 0 and distractors >= 1")
    if any(not 0 <= d <= 1 for d in le.depths):
        p.append(f"{prefix}.depths={le.depths}: each must be in [0, 1]")
    return p


def source_problems(s: BaseSourceConfig, key: str, seen: set[str], names_folder: str = "") -> list[str]:
    """Checks of the fields every source shares (stage 1 corpus and stage 6 SFT sources): a unique,
    non-empty name, and hf_id for kind hf or path for kind local. ``seen`` collects the names of the sources
    before this one (a duplicate is reported at its second use); ``names_folder``, when the name also names
    a sub-folder of that stage folder, requires a plain folder name."""
    p = []
    if not s.name:
        p.append(f"{key}.name: required")
    elif names_folder and ("/" in s.name or "\\" in s.name or s.name.startswith(".")):
        p.append(f"{key}.name={s.name!r}: must be a plain folder name (it names {names_folder}/<name>/)")
    elif s.name in seen:
        p.append(f"{key}.name: duplicate source name {s.name!r}")
    seen.add(s.name)
    if s.kind == "hf" and not s.hf_id:
        p.append(f"{key}.hf_id: required for kind hf")
    if s.kind == "local" and not s.path:
        p.append(f"{key}.path: required for kind local")
    return p


def _lang_paths_ok(paths: dict) -> bool:
    """A held-out mapping {it: path, ...}: language tags to non-empty path strings."""
    return all(k in LANGS for k in paths) and all(isinstance(v, str) and v for v in paths.values())


# ---------------------------------------------------------------------------------------------------
# One checker per stage config
# ---------------------------------------------------------------------------------------------------


def check_corpus_stage(cfg: CorpusStageConfig) -> list[str]:
    p: list[str] = []
    c = cfg.corpus
    if not c.sources:
        p.append("corpus.sources: empty; declare at least one source")
    seen: set[str] = set()
    for i, s in enumerate(c.sources):
        key = f"corpus.sources[{i}]"
        p += source_problems(s, key, seen, names_folder=CORPUS)
        if s.tier not in (1, 2, 3):
            p.append(f"{key}.tier: must be 1, 2 or 3, got {s.tier}")
        if s.min_chars < 0:
            p.append(f"{key}.min_chars: must be >= 0")
        if s.char_budget < 0:
            p.append(f"{key}.char_budget: must be >= 0 (0 means unlimited)")
        if not s.text_field or any(not part for part in s.text_field.split(".")):
            p.append(f"{key}.text_field={s.text_field!r}: must name a field (dotted path allowed, e.g. translation.it)")
    if c.docs_per_shard <= 0:
        p.append("corpus.docs_per_shard: must be > 0")
    if c.chunk_bytes < 1024:
        p.append(f"corpus.chunk_bytes={c.chunk_bytes}: must be >= 1024 (default {4 << 20})")
    cores = os.cpu_count() or 1
    if c.workers < 0 or c.workers > 2 * cores:
        p.append(f"corpus.workers={c.workers}: must be 0 (all {cores} cores) or 1..{2 * cores} (at most twice the "
                 f"cores of this machine); e.g. --set corpus.workers={cores}")
    return p


def check_tokenizer_stage(cfg: TokenizerStageConfig) -> list[str]:
    p: list[str] = []
    t = cfg.tokenizer
    if t.vocab_size < 512:
        p.append(f"tokenizer.vocab_size={t.vocab_size}: too small (need > 256 bytes + specials)")
    mix = t.language_mix
    if not mix or any(k not in LANGS for k in mix):
        p.append(f"tokenizer.language_mix: keys must be among {', '.join(LANGS)}; got {list(mix)}")
    elif any(not isinstance(v, (int, float)) or v < 0 for v in mix.values()) or sum(mix.values()) <= 0:
        p.append("tokenizer.language_mix: shares must be >= 0 and not all 0")
    if t.sample_chars <= 0:
        p.append("tokenizer.sample_chars: must be > 0")
    if t.min_frequency < 1:
        p.append(f"tokenizer.min_frequency={t.min_frequency}: must be >= 1 (a merge needs a pair seen at least once)")
    if t.n_reserved < 0:
        p.append(f"tokenizer.n_reserved={t.n_reserved}: must be >= 0")
    if not _lang_paths_ok(t.heldout):
        p.append(f"tokenizer.heldout: must map language tags ({', '.join(LANGS)}) to file paths, got {t.heldout!r}")
    return p


def check_shards_stage(cfg: ShardsStageConfig) -> list[str]:
    p: list[str] = []
    s = cfg.shards
    if s.shard_tokens <= 0:
        p.append("shards.shard_tokens: must be > 0")
    if not (0 <= s.val_fraction < 1):
        p.append("shards.val_fraction: must be in [0, 1)")
    if s.workers < 0 or s.batch_docs <= 0:
        p.append("shards.workers must be >= 0 and shards.batch_docs > 0")
    if s.encoder_check_docs <= 0:
        p.append("shards.encoder_check_docs: must be > 0 (the tiktoken path is used only after this many documents agree)")
    return p


def check_pretrain_stage(cfg: PretrainStageConfig) -> list[str]:
    p = validate_model(cfg.model) + validate_train(cfg.train)
    if cfg.train.seq_len > cfg.model.max_seq_len:
        p.append(f"train.seq_len={cfg.train.seq_len} exceeds model.max_seq_len={cfg.model.max_seq_len}")
    return p


def check_extend_stage(cfg: ExtendStageConfig) -> list[str]:
    p = validate_train(cfg.train)
    e, le = cfg.extend, cfg.long_eval
    # The lengths known only from the stage 4 checkpoint are checked by dante.extend.extension_problems.
    if e.factor <= 1:
        p.append(f"extend.factor={e.factor}: must be > 1 (the new context is factor x the stage 4 training "
                 "length; stage 5 only lengthens the context)")
    if e.new_max_seq_len < 0:
        p.append(f"extend.new_max_seq_len={e.new_max_seq_len}: must be > 0, or 0 for factor x the stage 4 length")
    if e.new_max_seq_len and cfg.train.seq_len > e.new_max_seq_len:
        p.append(f"train.seq_len={cfg.train.seq_len} exceeds extend.new_max_seq_len={e.new_max_seq_len}")
    if e.mode == "yarn" and not 0 < e.beta_slow < e.beta_fast:
        p.append(f"extend: need 0 < beta_slow < beta_fast (got beta_slow={e.beta_slow}, beta_fast={e.beta_fast})")
    if not _lang_paths_ok(e.heldout):
        p.append(f"extend.heldout: must map it/en/code to file paths, got {e.heldout!r}")
    # stage 5 always measures passkey retrieval and perplexity by position, before and after
    p += long_eval_problems(le, "long_eval", min_trials=1)
    if not le.lengths:
        p.append("long_eval.lengths: list at least one length > 0 (the longest is used for perplexity by position)")
    elif e.new_max_seq_len and max(le.lengths) > e.new_max_seq_len:
        p.append(f"long_eval.lengths={le.lengths}: longer than extend.new_max_seq_len={e.new_max_seq_len}")
    return p


def check_sft_data_stage(cfg: SFTDataStageConfig) -> list[str]:
    p: list[str] = []
    s = cfg.sft_data
    if not s.sources:
        p.append("sft_data.sources: empty; declare at least one source")
    if s.block_size <= 0:
        p.append("sft_data.block_size: must be > 0")
    if not (0 <= s.user_weight <= 1):
        p.append(f"sft_data.user_weight={s.user_weight}: must be in [0, 1]")
    if not (0 <= s.heldout_fraction < 1):
        p.append("sft_data.heldout_fraction: must be in [0, 1)")
    seen: set[str] = set()
    for i, src in enumerate(s.sources):
        key = f"sft_data.sources[{i}]"
        p += source_problems(src, key, seen)
        if src.weight <= 0:
            p.append(f"{key}.weight={src.weight}: must be > 0 (remove the source to leave it out)")
        if src.max_rows < 0:
            p.append(f"{key}.max_rows: must be >= 0 (0 means all rows)")
        if any(not isinstance(k, str) or not isinstance(v, str) or not v for k, v in src.columns.items()):
            p.append(f"{key}.columns: must map field names to non-empty column names, got {src.columns!r}")
    return p


def check_sft_stage(cfg: SFTStageConfig) -> list[str]:
    # SFT length is sft.epochs over the packed blocks: train.max_steps 0 means all of them (7_sft.py
    # derives the steps), > 0 stops earlier; a token budget has no meaning here.
    p = validate_train(dataclasses.replace(cfg.train, max_steps=cfg.train.max_steps or 1))
    if cfg.train.token_budget:
        p.append(f"train.token_budget={cfg.train.token_budget}: SFT runs sft.epochs over the packed blocks "
                 "(train.max_steps > 0 may stop it earlier); set train.token_budget: 0")
    if cfg.sft.epochs <= 0:
        p.append("sft.epochs: must be > 0")
    return p


def check_eval_stage(cfg: EvalStageConfig) -> list[str]:
    # Stage 8's own checks need its sampling rules and the special tokens (dante.evaluation, dante.tokenizer,
    # which config may not import), so they are dante.evaluation.stage.config_problems, run by make_plan.
    return []


def check_export_stage(cfg: ExportStageConfig) -> list[str]:
    # Stage 9's own checks parse sizes and read the checkpoint's model (dante.export.config_problems, run
    # when the stage starts), so none run here.
    return []


#: config class -> its cross-field checker
STAGE_CHECKS: dict[type, Callable[[Any], list[str]]] = {
    CorpusStageConfig: check_corpus_stage,
    TokenizerStageConfig: check_tokenizer_stage,
    ShardsStageConfig: check_shards_stage,
    PretrainStageConfig: check_pretrain_stage,
    ExtendStageConfig: check_extend_stage,
    SFTDataStageConfig: check_sft_data_stage,
    SFTStageConfig: check_sft_stage,
    EvalStageConfig: check_eval_stage,
    ExportStageConfig: check_export_stage,
}


def validate(cfg: Any) -> list[str]:
    """Cross-field checks for a whole stage config: the shared run checks, then the stage's checker
    (looked up along the class's MRO, so a subclass of a stage config is checked as that stage)."""
    p: list[str] = []
    run = getattr(cfg, "run", None)
    if run is not None:
        p += run_problems(run)
    check = next((STAGE_CHECKS[k] for k in type(cfg).__mro__ if k in STAGE_CHECKS), None)
    if check is not None:
        p += check(cfg)
    return p
