"""Typed configuration for every Dante stage.

Each stage has one dataclass (``CorpusStageConfig``, ``TokenizerStageConfig`` ...) made of nested
section dataclasses. Every field has a default and a one-line docstring (the string literal right under
it, which ``--help-config`` prints). YAML is the saved form: a file fills the dataclass, ``--set a.b=v``
overrides one dotted key after the file, and the result is validated as a whole.

Design choices
- One error for all problems: unknown keys, wrong types and invalid combinations are collected and
  raised together as ``ConfigError``, each line naming the file and the dotted key (litgpt's
  ``validate_args`` style). Nothing is taken from file names.
- Types are checked strictly (a YAML ``"3"`` is not an int); ints are accepted where a float is asked.
- ``--set`` values are parsed as YAML scalars/flow collections, then type-checked like file values.

Example::

    cfg = load_config(PretrainStageConfig, "configs/tiny/pretrain.yaml", ["train.lr=1e-3"])
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import re
import textwrap
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from dante.errors import ConfigError

# ---------------------------------------------------------------------------------------------------
# Sections shared by several stages
# ---------------------------------------------------------------------------------------------------


@dataclass
class RunConfig:
    name: str = "tiny"
    """Run name: every artifact goes under <root>/<name>/."""
    root: str = "runs"
    """Folder that holds all runs (relative paths are relative to the working directory)."""
    seed: int = 1234
    """Master seed: every random choice of the stage derives from it."""


@dataclass
class ModelConfig:
    dim: int = 256
    """Model width d_model."""
    n_layers: int = 4
    """Number of transformer blocks."""
    n_heads: int = 4
    """Query heads."""
    n_kv_heads: int = 2
    """Key/value heads (grouped-query attention); must divide n_heads."""
    head_dim: int = 0
    """Per-head width; 0 means dim // n_heads."""
    vocab_size: int = 8192
    """Embedding rows; must equal the tokenizer's vocabulary size."""
    ffn_hidden_dim: int = 0
    """SwiGLU hidden width; 0 means LLaMA's rule: int(ffn_dim_multiplier * int(8/3 * dim)) rounded up to multiple_of (dim 2560 -> 6912)."""
    ffn_dim_multiplier: float = 1.0
    """Multiplier on the 8/3*dim SwiGLU width (used only when ffn_hidden_dim is 0)."""
    multiple_of: int = 256
    """SwiGLU hidden width is rounded up to a multiple of this (used only when ffn_hidden_dim is 0)."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    rope_theta: float = 10000.0
    """RoPE base frequency."""
    max_seq_len: int = 512
    """Longest sequence the model is trained / evaluated at (after any context extension)."""
    rope_scaling: dict = field(default_factory=dict)
    """RoPE scaling in transformers' format, e.g. {rope_type: yarn, factor: 4, original_max_position_embeddings: 2048}; {} for none."""
    tie_embeddings: bool = True
    """Share the input embedding and the output projection (lm_head)."""
    init_std: float = 0.02
    """Std of the normal init; output projections of each block are scaled by 1/sqrt(2*n_layers)."""


@dataclass
class TrainConfig:
    seq_len: int = 256
    """Training sequence length (tokens per row)."""
    micro_batch: int = 4
    """Rows per forward/backward on one rank."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step on one rank."""
    max_steps: int = 0
    """Optimizer steps; 0 means derive from token_budget."""
    token_budget: int = 0
    """Tokens to train on (used when max_steps is 0)."""
    lr: float = 3e-4
    """Peak learning rate."""
    min_lr: float = 3e-5
    """Floor of the cosine schedule."""
    warmup_steps: int = 2000
    """Linear warmup steps from 0 to lr."""
    weight_decay: float = 0.1
    """AdamW weight decay (norms, biases and embeddings are exempt)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    eps: float = 1e-8
    """AdamW epsilon."""
    grad_clip: float = 1.0
    """Global gradient-norm clip; 0 disables."""
    precision: Literal["bf16", "fp32"] = "bf16"
    """Training precision of activations (master weights stay fp32)."""
    compile: bool = False
    """Wrap the model in torch.compile."""
    compile_mode: Literal["default", "reduce-overhead", "max-autotune"] = "default"
    """torch.compile mode."""
    fp8: bool = False
    """Convert linears (except lm_head) to torchao float8 training."""
    activation_checkpointing: bool = False
    """Recompute each block in backward to save activation memory."""
    loss_chunk_size: int = 4096
    """Tokens per chunk of the chunked cross-entropy (never materialize full fp32 logits)."""
    tier_weights: dict = field(default_factory=lambda: {1: 3.0, 2: 2.0, 3: 1.0})
    """Sampling weight per quality tier (reference 3:2:1)."""
    deepspeed_config: str = ""
    """Path of a DeepSpeed JSON/YAML config; '' uses the built-in ZeRO-2 config."""
    zero_stage: int = 2
    """ZeRO stage for the built-in DeepSpeed config."""
    checkpoint_every: int = 1000
    """Save a checkpoint every N optimizer steps (and on SIGTERM/SIGINT)."""
    keep_last: int = 3
    """Checkpoints to keep."""
    eval_every: int = 500
    """Validation loss every N optimizer steps; 0 disables."""
    eval_batches: int = 8
    """Validation micro-batches per pass, in total over all ranks (the same windows at any world size)."""
    log_every: int = 10
    """Metrics line every N steps."""
    assumed_tokens_per_sec: float = 30000.0
    """Throughput per GPU used by --dry-run to estimate the ETA."""
    expected_world_size: int = 1
    """GPUs (ranks) the run is planned for: --dry-run sizes steps, memory and ETA with it."""
    backend: Literal["deepspeed", "torch"] = "deepspeed"
    """DeepSpeed ZeRO (1..N ranks), or plain torch AdamW in one process (needs no DeepSpeed)."""
    peak_tflops: float = 0.0
    """Dense peak TFLOP/s per GPU for MFU; 0 looks the GPU up in dante/flops.py (CPU: MFU n/a)."""


# ---------------------------------------------------------------------------------------------------
# Stage 1: corpus
# ---------------------------------------------------------------------------------------------------


@dataclass
class SourceConfig:
    name: str = ""
    """Unique source name (folder name under 01_corpus/)."""
    kind: Literal["hf", "local"] = "local"
    """'hf' streams a hub dataset; 'local' reads files through the same datasets code path."""
    hf_id: str = ""
    """Hub dataset id (kind hf)."""
    hf_config: str = ""
    """Hub dataset config / subset name (kind hf); '' for the default."""
    hf_data_dir: str = ""
    """Sub-folder of the hub repository to read (kind hf), e.g. 'python' for bigcode/starcoderdata; '' for all."""
    split: str = "train"
    """Dataset split (kind hf; local files are one 'train' split)."""
    path: str = ""
    """Local file or glob (kind local); relative to the working directory."""
    format: Literal["jsonl", "txt", "parquet"] = "jsonl"
    """Local file format (kind local); compressed files (.gz, ...) are read transparently by datasets."""
    sample_by: Literal["line", "paragraph", "document"] = "line"
    """Document unit of a txt source: one line, one blank-line-separated paragraph, or one whole file."""
    text_field: str = "text"
    """Field holding the document text; a dotted path reaches into a mapping (e.g. translation.it)."""
    lang: Literal["it", "en", "code"] = "it"
    """Language tag of every document of this source."""
    tier: int = 1
    """Quality tier 1 (best) to 3."""
    min_chars: int = 100
    """Drop documents shorter than this after normalization (reference: 100 text, 20 code)."""
    char_budget: int = 0
    """Stop after this many kept characters; 0 means no limit."""


@dataclass
class CorpusConfig:
    sources: list[SourceConfig] = field(default_factory=list)
    """Sources to download, filter, deduplicate and shard."""
    docs_per_shard: int = 10000
    """Documents per compressed output shard."""
    non_utf8: Literal["skip", "error"] = "skip"
    """Undecodable bytes (or U+FFFD left by an upstream decoder) in a document: 'skip' drops and counts it, 'error' fails the source."""


@dataclass
class CorpusStageConfig:
    run: RunConfig = field(default_factory=RunConfig)
    """Run identity."""
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    """Stage 1 settings."""


# ---------------------------------------------------------------------------------------------------
# Stage 2: tokenizer
# ---------------------------------------------------------------------------------------------------


@dataclass
class ReferenceTokenizerConfig:
    name: str = ""
    """Label in the fertility report."""
    kind: Literal["hf_json", "gpt2_bpe", "sentencepiece", "tiktoken"] = "hf_json"
    """File kind: tokenizer.json, GPT-2 vocab+merges, SentencePiece model, or tiktoken ranks."""
    path: str = ""
    """Main file (tokenizer.json, encoder.json, .model, or tiktoken ranks)."""
    merges_path: str = ""
    """vocab.bpe (gpt2_bpe only)."""
    optional: bool = False
    """Skip this reference with a note in the report when its files are missing (fetch-only files)."""


@dataclass
class TokenizerConfig:
    vocab_size: int = 8192
    """Total vocabulary including special and reserved tokens."""
    pretokenizer: Literal["dante", "dante-elision", "llama3", "qwen2", "gpt2", "minerva"] = "dante"
    """Pre-tokenizer preset (dante/pretokenizers.py); llama3, qwen2, gpt2, minerva are llama.cpp's own."""
    digits: Literal["preset", "single", "group3"] = "preset"
    """Digit split: the preset's own, one digit per piece, or groups of up to 3."""
    accents: Literal["preset", "pinned", "learned"] = "preset"
    """Latin-1 letters pinned to one token each (dante presets) or learned like any byte pair."""
    ab_presets: list[str] = field(default_factory=list)
    """Extra pre-tokenizers for the A/B report, trained on the same sample and vocab (e.g. dante-elision, llama3+digits1)."""
    language_mix: dict = field(default_factory=lambda: {"it": 0.42, "en": 0.36, "code": 0.22})
    """Character share per language in the training sample."""
    sample_chars: int = 2_000_000
    """Characters in the training sample."""
    min_frequency: int = 2
    """Minimum pair frequency for a merge."""
    n_reserved: int = 248
    """Reserved special-token ids after the named ones."""
    heldout: dict = field(default_factory=dict)
    """Held-out text per language for the fertility report: {it: path, en: path, code: path}."""
    baseline: bool = True
    """Also train the A/B baseline (same sample and vocab, GPT-2/Llama-3-style regex)."""
    baseline_pretokenizer: Literal["dante", "dante-elision", "llama3", "qwen2", "gpt2", "minerva"] = "llama3"
    """Regex of the A/B baseline (contractions split, no pinned letters)."""
    references: list[ReferenceTokenizerConfig] = field(default_factory=list)
    """Reference tokenizers for the fertility report."""


@dataclass
class TokenizerStageConfig:
    run: RunConfig = field(default_factory=RunConfig)
    """Run identity."""
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    """Stage 2 settings."""


# ---------------------------------------------------------------------------------------------------
# Stage 3: shards
# ---------------------------------------------------------------------------------------------------


@dataclass
class ShardsConfig:
    shard_tokens: int = 100_000_000
    """Tokens per shard file."""
    val_fraction: float = 0.005
    """Fraction of each source's documents held out for validation (deterministic by hash)."""
    workers: int = 0
    """Encoding processes; 0 means all cores."""
    batch_docs: int = 256
    """Documents per encode_batch call."""
    verify_samples: int = 16
    """Documents round-tripped per shard by --verify."""
    dtype: Literal["uint16", "uint32"] = "uint16"
    """Token id type in the shards; uint16 needs a tokenizer with at most 65,536 ids."""


@dataclass
class ShardsStageConfig:
    run: RunConfig = field(default_factory=RunConfig)
    """Run identity."""
    shards: ShardsConfig = field(default_factory=ShardsConfig)
    """Stage 3 settings."""


# ---------------------------------------------------------------------------------------------------
# Stages 4, 5, 7: training
# ---------------------------------------------------------------------------------------------------


@dataclass
class PretrainStageConfig:
    run: RunConfig = field(default_factory=RunConfig)
    """Run identity."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Architecture."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimization and engine settings."""


@dataclass
class LongEvalConfig:
    lengths: list[int] = field(default_factory=lambda: [256, 512])
    """Context lengths for passkey retrieval."""
    depths: list[float] = field(default_factory=lambda: [0.1, 0.5, 0.9])
    """Relative depths at which the passkey is hidden."""
    trials: int = 4
    """Passkey trials per (length, depth)."""
    bucket_size: int = 128
    """Width of the position buckets for perplexity by position."""
    max_docs: int = 8
    """Long held-out sequences used for perplexity by position."""
    distractors: int = 4
    """Wrong 5-digit keys ranked against the true one (passkey by log-likelihood; chance = 1/(distractors+1))."""


@dataclass
class ExtendConfig:
    mode: Literal["yarn", "linear", "continued"] = "yarn"
    """RoPE of the extended model: 'yarn' or 'linear' scaling (transformers' rope_type), or 'continued' (plain RoPE, only longer sequences: the A/B baseline)."""
    factor: float = 2.0
    """Context multiplier (> 1): new length / the sequence length stage 4 trained at; also the rope_scaling factor."""
    new_max_seq_len: int = 0
    """Target context in tokens; 0 means factor x the stage 4 training length (when set, it must equal that product)."""
    beta_fast: float = 32.0
    """YaRN beta_fast: frequencies with more rotations than this over the original context are kept (transformers' default)."""
    beta_slow: float = 1.0
    """YaRN beta_slow: frequencies with fewer rotations than this are fully interpolated (transformers' default)."""
    heldout: dict = field(default_factory=dict)
    """Held-out text per language for the long-context evaluation, {it: path, ...} (JSON Lines, text field); {} uses stage 3's validation shards."""


@dataclass
class ExtendStageConfig:
    run: RunConfig = field(default_factory=RunConfig)
    """Run identity."""
    extend: ExtendConfig = field(default_factory=ExtendConfig)
    """Context-extension settings."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Fine-tuning settings at the new length."""
    long_eval: LongEvalConfig = field(default_factory=LongEvalConfig)
    """Long-context evaluation before and after."""


# ---------------------------------------------------------------------------------------------------
# Stage 6 / 7: SFT
# ---------------------------------------------------------------------------------------------------


@dataclass
class SFTSourceConfig:
    name: str = ""
    """Unique source name."""
    kind: Literal["hf", "local"] = "local"
    """'hf' streams a hub dataset with `datasets`; 'local' reads JSONL lines; both feed the same normalizers."""
    hf_id: str = ""
    """Hub dataset id (kind hf)."""
    hf_config: str = ""
    """Hub dataset config name; '' for the default."""
    split: str = "train"
    """Split (kind hf)."""
    path: str = ""
    """Local JSONL file or glob, .jsonl or .jsonl.gz (kind local)."""
    format: Literal["messages", "sharegpt", "alpaca", "prompt_response"] = "messages"
    """Row format: OpenAI messages, ShareGPT conversations, Alpaca instruction/input/output, prompt/response."""
    columns: dict = field(default_factory=dict)
    """Field renames, format name -> dataset column, e.g. {prompt: inputs, response: targets}; {} for none."""
    lang: Literal["it", "en", "code"] = "it"
    """Language tag (token shares in the manifest are reported per tag)."""
    weight: float = 1.0
    """Copies per training conversation: 2.0 repeats each twice, 0.5 keeps a deterministic half (eval is never weighted)."""
    max_rows: int = 0
    """Rows to read at most; 0 means all."""


@dataclass
class SFTDataConfig:
    sources: list[SFTSourceConfig] = field(default_factory=list)
    """Conversation sources."""
    block_size: int = 4096
    """Tokens per packed block (stage 7 trains at this length)."""
    user_weight: float = 0.0
    """Loss weight in [0, 1] of user/system content and their <|eot|> (assistant content and <|eot|> weigh 1)."""
    overlong: Literal["truncate", "drop"] = "drop"
    """Longer than block_size: 'drop' (counted), or 'truncate' to whole turns ending with an answer (else mid-answer; counted)."""
    heldout_fraction: float = 0.02
    """Fraction of conversations (chosen by content hash) kept out of training for stage 7's eval loss."""
    system_prompt: str = ""
    """Default system prompt added when a conversation has none; '' adds none."""


@dataclass
class SFTDataStageConfig:
    run: RunConfig = field(default_factory=RunConfig)
    """Run identity."""
    sft_data: SFTDataConfig = field(default_factory=SFTDataConfig)
    """Stage 6 settings."""


@dataclass
class SFTTrainConfig:
    epochs: int = 1
    """Passes over the packed SFT blocks, reshuffled each epoch; train.max_steps 0 trains them all, > 0 stops earlier."""
    init_from: Literal["auto", "05_extend", "04_pretrain"] = "auto"
    """Checkpoint to start from: auto takes stage 5 when complete, else stage 4 (an unfinished 05_extend is an error)."""
    document_mask: bool = True
    """Restrict attention to each conversation (turn off only to measure the contamination)."""


@dataclass
class SFTStageConfig:
    run: RunConfig = field(default_factory=RunConfig)
    """Run identity."""
    sft: SFTTrainConfig = field(default_factory=SFTTrainConfig)
    """SFT-specific settings."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimization and engine settings."""


# ---------------------------------------------------------------------------------------------------
# Stage 8 / 9
# ---------------------------------------------------------------------------------------------------


@dataclass
class GenerationConfig:
    prompts: list[str] = field(default_factory=lambda: ["Il futuro della tecnologia e della scienza"])
    """Prompts for sampling."""
    max_new_tokens: int = 64
    """Tokens to generate per prompt."""
    temperature: float = 0.7
    """Sampling temperature; 0 is greedy."""
    top_p: float = 0.9
    """Nucleus sampling threshold."""
    top_k: int = 0
    """Top-k filter; 0 disables."""
    repetition_penalty: float = 1.15
    """CTRL-style repetition penalty; 1 disables."""
    stop_tokens: list[str] = field(default_factory=lambda: ["<|end_of_text|>", "<|eot|>"])
    """Special tokens that end a sample (not included in the output)."""
    chat_prompts: list[str] = field(default_factory=lambda: ["Spiegami in due frasi che cos'è la fotosintesi."])
    """User messages answered by SFT checkpoints (07_sft), rendered with the chat template."""


@dataclass
class EvalConfig:
    checkpoints: list[str] = field(default_factory=lambda: ["04_pretrain", "05_extend", "07_sft"])
    """Stage folders (or checkpoint paths) to compare; absent stages are skipped with a note."""
    heldout: dict = field(default_factory=dict)
    """Raw held-out text per language: {it: path, en: path, code: path}."""
    shards: bool = True
    """Also score stage 3's validation shards per tier (when 03_shards exists)."""
    stride: int = 0
    """Sliding-window stride for perplexity, in tokens; 0 means half the model's context."""
    tasks: list[str] = field(default_factory=list)
    """lm-eval task names or local task files."""
    task_include_paths: list[str] = field(default_factory=list)
    """Folders of extra lm-eval task YAMLs (e.g. a clone of SapienzaNLP/ita-bench's tasks/)."""
    num_fewshot: int = -1
    """Few-shot examples per task; -1 keeps each task's own default."""
    task_limit: int = 0
    """Examples per task; 0 means all (a limit is for smoke tests only: scores are then not comparable)."""
    batch_size: int = 8
    """Scoring batch size (scores do not depend on it)."""
    max_eval_tokens: int = 200_000
    """Token cap per perplexity set."""
    device: str = "auto"
    """Device: auto (cuda when available), cpu, cuda, cuda:1 ..."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Compute dtype of the transformer body on CUDA (auto = bf16); CPU always runs fp32; log-softmax is fp32."""
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    """Sampling settings."""
    long_eval: LongEvalConfig = field(default_factory=LongEvalConfig)
    """Long-context metrics."""


@dataclass
class EvalStageConfig:
    run: RunConfig = field(default_factory=RunConfig)
    """Run identity."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Stage 8 settings."""


@dataclass
class ExportConfig:
    checkpoint: str = "auto"
    """Stage folder (07_sft, 05_extend, 04_pretrain) or checkpoint path to export; auto takes the latest finished of 07, 05, 04."""
    dtype: Literal["bfloat16", "float32", "float16"] = "bfloat16"
    """Weight dtype in model.safetensors."""
    max_shard_size: str = "2GB"
    """Shard safetensors above this size (e.g. 500MB, 2GB, 1GiB)."""
    verify: bool = True
    """Load the export in transformers and compare with the native model."""
    verify_tokens: int = 16
    """Greedy tokens compared in verification."""
    heldout: dict = field(default_factory=dict)
    """Real held-out text for verification, per language: {it: path, en: path, code: path} (JSON Lines with a text field)."""
    verify_windows: int = 4
    """Windows of held-out text whose logits are compared (each also gives a greedy prompt)."""
    verify_seq_len: int = 0
    """Tokens per verification window; 0 means the model's max_seq_len (covers YaRN positions)."""
    verify_conversations: int = 8
    """Stage 6 conversations (local sources) compared through the chat template, besides the built-in ones."""
    verify_device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where verification runs (fp32, TF32 off); auto takes CUDA when available."""
    model_name: str = ""
    """Title of the model card; '' means "Dante (<run.name>)"."""
    license: str = "apache-2.0"
    """License named in the model card."""
    gguf: bool = False
    """Also write GGUF files for llama.cpp / Ollama (refused for a pre-tokenizer llama.cpp cannot run)."""
    gguf_types: list[str] = field(default_factory=lambda: ["f16", "q8_0"])
    """GGUF weight types, one file each: f32, f16, bf16, q8_0."""
    gguf_pre_tokenizer: str = ""
    """Force this llama.cpp pre-tokenizer type (e.g. qwen35); the id mismatch on held-out text is measured and recorded."""


@dataclass
class ExportStageConfig:
    run: RunConfig = field(default_factory=RunConfig)
    """Run identity."""
    export: ExportConfig = field(default_factory=ExportConfig)
    """Stage 9 settings."""


# ---------------------------------------------------------------------------------------------------
# Machinery: YAML -> dataclass with strict type checks, dotted overrides, documentation
# ---------------------------------------------------------------------------------------------------


class _YamlLoader(yaml.SafeLoader):
    """SafeLoader that reads ``1e-4`` as a float, as YAML 1.2 does. PyYAML follows YAML 1.1, whose float
    pattern needs a dot (``1.0e-4``), so ``lr: 1e-4`` or ``--set train.lr=1e-4`` would load as a string."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_YamlLoader)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _check_value(tp: Any, value: Any, key: str, problems: list[str]) -> Any:
    """Convert/check ``value`` against annotation ``tp``; append problems naming ``key``."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            problems.append(f"{key}: expected a mapping for section {tp.__name__}, got {type(value).__name__}")
            return tp()
        return _build(tp, value, key, problems)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            problems.append(f"{key}: {value!r} is not one of {list(allowed)}")
        return value
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _check_value(args[0], value, key, problems)
    if origin is list:
        (inner,) = typing.get_args(tp) or (Any,)
        if not isinstance(value, list):
            problems.append(f"{key}: expected a list, got {type(value).__name__} {value!r}")
            return []
        return [_check_value(inner, v, f"{key}[{i}]", problems) for i, v in enumerate(value)]
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            problems.append(f"{key}: expected a mapping, got {type(value).__name__} {value!r}")
            return {}
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            problems.append(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            problems.append(f"{key}: expected an integer, got {type(value).__name__} {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            problems.append(f"{key}: expected a number, got {type(value).__name__} {value!r}")
            return value
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            problems.append(f"{key}: expected a string, got {type(value).__name__} {value!r}")
        return value
    raise TypeError(f"unsupported config annotation {tp!r} at {key}")  # a bug in this file, not user input


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _build(cls: type, data: dict, prefix: str, problems: list[str]) -> Any:
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in names:
            problems.append(f"{key}: unknown key (known: {', '.join(sorted(names))})")
            continue
        kwargs[k] = _check_value(hints[k], v, key, problems)
    return cls(**kwargs)


def _set_dotted(data: dict, cls: type, dotted: str, raw: str, problems: list[str]) -> None:
    """Apply one ``a.b.c=value`` override onto the raw YAML dict (validated later with the rest)."""
    parts = dotted.split(".")
    node, node_cls = data, cls
    for i, part in enumerate(parts):
        key = ".".join(parts[: i + 1])
        if node_cls is None or not dataclasses.is_dataclass(node_cls):
            # inside a free-form dict field: just descend
            if i == len(parts) - 1:
                node[part] = _yaml_load(raw) if raw != "" else ""
            else:
                node = node.setdefault(part, {})
            continue
        names = {f.name: f for f in dataclasses.fields(node_cls)}
        if part not in names:
            problems.append(f"--set {dotted}: unknown key {key!r} (known: {', '.join(sorted(names))})")
            return
        tp = _hints(node_cls)[part]
        if i == len(parts) - 1:
            value = _yaml_load(raw) if raw != "" else ""
            if tp is str and not isinstance(value, str):
                value = raw  # `--set run.name=2024` means the string "2024"
            node[part] = value
            return
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
        node_cls = tp if dataclasses.is_dataclass(tp) else None


def parse_overrides(cls: type, data: dict, overrides: list[str], problems: list[str]) -> dict:
    for item in overrides:
        if "=" not in item:
            problems.append(f"--set {item!r}: expected key=value, e.g. --set train.lr=1e-4")
            continue
        k, v = item.split("=", 1)
        _set_dotted(data, cls, k.strip(), v.strip(), problems)
    return data


def load_config(cls: type, path: str | Path | None = None, overrides: list[str] | None = None):
    """Fill ``cls`` from a YAML file and dotted overrides; validate; raise one ConfigError."""
    problems: list[str] = []
    source = str(path) if path else "<defaults>"
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError([f"config file not found: {p} (pass --config configs/<profile>/<stage>.yaml)"], source)
        try:
            loaded = _yaml_load(p.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            raise ConfigError([f"YAML syntax error: {e}"], source) from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError([f"top level must be a mapping, got {type(loaded).__name__}"], source)
        data = loaded
    data = parse_overrides(cls, data, list(overrides or []), problems)
    cfg = _build(cls, data, "", problems)
    try:
        problems.extend(validate(cfg))
    except (TypeError, ValueError, AttributeError):
        pass  # a field of the wrong type is already reported above; cross-checks on it are moot
    if problems:
        raise ConfigError(problems, source)
    return cfg


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True)


def from_dict(cls: type, data: dict):
    """Rebuild a config from its saved dict (e.g. a manifest or checkpoint); strict like load_config."""
    problems: list[str] = []
    cfg = _build(cls, data, "", problems)
    if problems:
        raise ConfigError(problems, "<saved config>")
    return cfg


def field_docs(cls: type) -> dict[str, str]:
    """Docstrings of a dataclass's fields (the string literal under each field)."""
    try:
        src = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    body = ast.parse(src).body[0].body
    docs = {}
    for a, b in zip(body, body[1:]):
        if isinstance(a, ast.AnnAssign) and isinstance(a.target, ast.Name):
            if isinstance(b, ast.Expr) and isinstance(getattr(b, "value", None), ast.Constant):
                docs[a.target.id] = str(b.value.value)
    return docs


def describe(cls: type, prefix: str = "") -> list[str]:
    """One line per leaf key: dotted name, type, default, doc (for --help-config)."""
    lines = []
    docs = field_docs(cls)
    hints = _hints(cls)
    defaults = cls()
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            lines.append(f"{key}:  ({docs.get(f.name, '')})")
            lines.extend(describe(tp, key + "."))
        else:
            lines.append(f"  {key} = {getattr(defaults, f.name)!r}  [{_type_name(tp)}]  {docs.get(f.name, '')}")
    return lines


# ---------------------------------------------------------------------------------------------------
# Cross-field validation (invalid combinations). Each returns a list of problems.
# ---------------------------------------------------------------------------------------------------


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


def validate(cfg: Any) -> list[str]:
    """Cross-field checks for a whole stage config."""
    p: list[str] = []
    run = getattr(cfg, "run", None)
    if run is not None:
        if not run.name or "/" in run.name or run.name.startswith("."):
            p.append(f"run.name={run.name!r}: must be a plain folder name")
    if isinstance(cfg, CorpusStageConfig):
        c = cfg.corpus
        if not c.sources:
            p.append("corpus.sources: empty; declare at least one source")
        seen = set()
        for i, s in enumerate(c.sources):
            key = f"corpus.sources[{i}]"
            if not s.name:
                p.append(f"{key}.name: required")
            elif "/" in s.name or "\\" in s.name or s.name.startswith("."):
                p.append(f"{key}.name={s.name!r}: must be a plain folder name (it names 01_corpus/<name>/)")
            elif s.name in seen:
                p.append(f"{key}.name: duplicate source name {s.name!r}")
            seen.add(s.name)
            if s.kind == "hf" and not s.hf_id:
                p.append(f"{key}.hf_id: required for kind hf")
            if s.kind == "local" and not s.path:
                p.append(f"{key}.path: required for kind local")
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
    if isinstance(cfg, TokenizerStageConfig):
        t = cfg.tokenizer
        if t.vocab_size < 512:
            p.append(f"tokenizer.vocab_size={t.vocab_size}: too small (need > 256 bytes + specials)")
        mix = t.language_mix
        if not mix or any(k not in ("it", "en", "code") for k in mix):
            p.append(f"tokenizer.language_mix: keys must be among it, en, code; got {list(mix)}")
        elif any(not isinstance(v, (int, float)) or v < 0 for v in mix.values()) or sum(mix.values()) <= 0:
            p.append("tokenizer.language_mix: shares must be >= 0 and not all 0")
        if t.sample_chars <= 0:
            p.append("tokenizer.sample_chars: must be > 0")
    if isinstance(cfg, ShardsStageConfig):
        s = cfg.shards
        if s.shard_tokens <= 0:
            p.append("shards.shard_tokens: must be > 0")
        if not (0 <= s.val_fraction < 1):
            p.append("shards.val_fraction: must be in [0, 1)")
        if s.workers < 0 or s.batch_docs <= 0:
            p.append("shards.workers must be >= 0 and shards.batch_docs > 0")
    if isinstance(cfg, PretrainStageConfig):
        p += validate_model(cfg.model)
        p += validate_train(cfg.train)
        if cfg.train.seq_len > cfg.model.max_seq_len:
            p.append(f"train.seq_len={cfg.train.seq_len} exceeds model.max_seq_len={cfg.model.max_seq_len}")
    if isinstance(cfg, ExtendStageConfig):
        p += validate_train(cfg.train)
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
        if any(k not in ("it", "en", "code") for k in e.heldout) or not all(isinstance(v, str) and v for v in e.heldout.values()):
            p.append(f"extend.heldout: must map it/en/code to file paths, got {e.heldout!r}")
        # stage 5 always measures passkey retrieval and perplexity by position, before and after
        p += long_eval_problems(le, "long_eval", min_trials=1)
        if not le.lengths:
            p.append("long_eval.lengths: list at least one length > 0 (the longest is used for perplexity by position)")
        elif e.new_max_seq_len and max(le.lengths) > e.new_max_seq_len:
            p.append(f"long_eval.lengths={le.lengths}: longer than extend.new_max_seq_len={e.new_max_seq_len}")
    if isinstance(cfg, SFTDataStageConfig):
        s = cfg.sft_data
        if not s.sources:
            p.append("sft_data.sources: empty; declare at least one source")
        if s.block_size <= 0:
            p.append("sft_data.block_size: must be > 0")
        if not (0 <= s.user_weight <= 1):
            p.append(f"sft_data.user_weight={s.user_weight}: must be in [0, 1]")
        if not (0 <= s.heldout_fraction < 1):
            p.append("sft_data.heldout_fraction: must be in [0, 1)")
        names = [x.name for x in s.sources]
        if len(set(names)) != len(names) or not all(names):
            p.append("sft_data.sources: every source needs a unique, non-empty name")
        for i, src in enumerate(s.sources):
            key = f"sft_data.sources[{i}]"
            if src.kind == "hf" and not src.hf_id:
                p.append(f"{key}.hf_id: required for kind hf")
            if src.kind == "local" and not src.path:
                p.append(f"{key}.path: required for kind local")
            if src.weight <= 0:
                p.append(f"{key}.weight={src.weight}: must be > 0 (remove the source to leave it out)")
            if src.max_rows < 0:
                p.append(f"{key}.max_rows: must be >= 0 (0 means all rows)")
            if any(not isinstance(k, str) or not isinstance(v, str) or not v for k, v in src.columns.items()):
                p.append(f"{key}.columns: must map field names to non-empty column names, got {src.columns!r}")
    if isinstance(cfg, SFTStageConfig):
        # SFT length is sft.epochs over the packed blocks: train.max_steps 0 means all of them (7_sft.py
        # derives the steps), > 0 stops earlier; a token budget has no meaning here.
        p += validate_train(dataclasses.replace(cfg.train, max_steps=cfg.train.max_steps or 1))
        if cfg.train.token_budget:
            p.append(f"train.token_budget={cfg.train.token_budget}: SFT runs sft.epochs over the packed blocks "
                     "(train.max_steps > 0 may stop it earlier); set train.token_budget: 0")
        if cfg.sft.epochs <= 0:
            p.append("sft.epochs: must be > 0")
    return p


#: stage folder name -> (script, config class)
STAGES: dict[str, tuple[str, type]] = {
    "01_corpus": ("1_download_corpus.py", CorpusStageConfig),
    "02_tokenizer": ("2_train_tokenizer.py", TokenizerStageConfig),
    "03_shards": ("3_tokenize_shards.py", ShardsStageConfig),
    "04_pretrain": ("4_pretrain.py", PretrainStageConfig),
    "05_extend": ("5_extend_context.py", ExtendStageConfig),
    "06_sft_data": ("6_build_sft.py", SFTDataStageConfig),
    "07_sft": ("7_sft.py", SFTStageConfig),
    "08_eval": ("8_eval.py", EvalStageConfig),
    "09_export": ("9_export_hf.py", ExportStageConfig),
}

#: config file name in a profile folder, per stage
PROFILE_FILES: dict[str, str] = {
    "01_corpus": "corpus.yaml",
    "02_tokenizer": "tokenizer.yaml",
    "03_shards": "shards.yaml",
    "04_pretrain": "pretrain.yaml",
    "05_extend": "extend.yaml",
    "06_sft_data": "sft_data.yaml",
    "07_sft": "sft.yaml",
    "08_eval": "eval.yaml",
    "09_export": "export.yaml",
}

__all__ = [n for n in dir() if not n.startswith("_")] + ["Optional"]
