"""The settings of every Dante stage: one dataclass per stage made of nested section dataclasses.

Every field has a default and a one-line docstring (the string literal right under it, which
``--help-config`` prints and a test requires). The classes hold data only: loading them from YAML is
``dante.config.loader``, their cross-field checks are ``dante.config.checks``, and which class belongs to
which stage is ``dante.config.stages``.

Fields shared by several stages are written once: ``RunConfig``, ``ModelConfig``, ``TrainConfig`` and
``LongEvalConfig`` are sections reused by several stage configs, and ``BaseSourceConfig`` holds what a
corpus source (stage 1) and an SFT source (stage 6) have in common.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, field
from typing import Literal

# ---------------------------------------------------------------------------------------------------
# Enumerations used by several sections (a Literal type lists the allowed values; the loader checks them)
# ---------------------------------------------------------------------------------------------------

#: language tags of documents, sources, held-out files and the tokenizer's language mix
Lang = Literal["it", "en", "code"]
LANGS: tuple[str, ...] = typing.get_args(Lang)

#: where a dataset source is read from: the Hugging Face hub, or local files
SourceKind = Literal["hf", "local"]


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
    """Path of a DeepSpeed JSON/YAML config; '' uses the built-in one (fp32 gradient accumulation and reduction)."""
    zero_stage: int = 1
    """ZeRO stage: 1 reduces gradients once per optimizer step, 2 on every micro-step (docs/PERFORMANCE.md)."""
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
    """GPUs (ranks) the run is planned for: stages 4, 5, 7 refuse another launcher world size; --dry-run plans with it."""
    backend: Literal["deepspeed", "torch"] = "deepspeed"
    """DeepSpeed ZeRO (1..N ranks), or plain torch AdamW in one process (needs no DeepSpeed)."""
    peak_tflops: float = 0.0
    """Dense peak TFLOP/s per GPU for MFU; 0 looks the GPU up in dante/flops.py (CPU: MFU n/a)."""


# ---------------------------------------------------------------------------------------------------
# Dataset sources (stage 1 corpus, stage 6 SFT)
# ---------------------------------------------------------------------------------------------------


@dataclass
class BaseSourceConfig:
    """Where a dataset comes from and what it is called: the fields a stage 1 corpus source and a stage 6
    SFT source share (checked by ``dante.config.checks.source_problems``)."""

    name: str = ""
    """Unique source name (stage 1 also names its folder 01_corpus/<name>/ with it)."""
    kind: SourceKind = "local"
    """'hf' streams a hub dataset with `datasets`; 'local' reads local files (stage 1 through the same datasets code path, stage 6 as JSON Lines)."""
    hf_id: str = ""
    """Hub dataset id (kind hf)."""
    hf_config: str = ""
    """Hub dataset config / subset name (kind hf); '' for the default."""
    split: str = "train"
    """Dataset split (kind hf; local files are one 'train' split)."""
    path: str = ""
    """Local file or glob (kind local), relative to the working directory; stage 6 reads .jsonl or .jsonl.gz."""
    lang: Lang = "it"
    """Language tag of every document of this source (stage 6 reports token shares per tag)."""


# ---------------------------------------------------------------------------------------------------
# Stage 1: corpus
# ---------------------------------------------------------------------------------------------------


@dataclass
class SourceConfig(BaseSourceConfig):
    hf_data_dir: str = ""
    """Sub-folder of the hub repository to read (kind hf), e.g. 'python' for bigcode/starcoderdata; '' for all."""
    format: Literal["jsonl", "txt", "parquet"] = "jsonl"
    """Local file format (kind local); compressed files (.gz, ...) are read transparently by datasets."""
    sample_by: Literal["line", "paragraph", "document"] = "line"
    """Document unit of a txt source: one line, one blank-line-separated paragraph, or one whole file."""
    text_field: str = "text"
    """Field holding the document text; a dotted path reaches into a mapping (e.g. translation.it)."""
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
    workers: int = 0
    """Processes that parse, normalize, filter, hash and compress chunks of the sources; 0 = all cores, 1 = everything in the stage's own process. Outputs do not depend on it."""
    chunk_bytes: int = 4 << 20
    """Bytes of a local jsonl/txt file per unit of parallel work (cut at a line end). The documents and their order do not depend on it; the shard bytes (zstd frames are cut per chunk) and resume positions do."""


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
    encoder: Literal["auto", "tiktoken", "tokenizers"] = "auto"
    """auto: tiktoken (several times faster per core) when proven to give tokenizers' ids on this run's documents, else tokenizers; tiktoken: require it."""
    encoder_check_docs: int = 3000
    """Documents (held-out, then an even sample of every source) on which tiktoken must equal tokenizers."""


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
class SFTSourceConfig(BaseSourceConfig):
    format: Literal["messages", "sharegpt", "alpaca", "prompt_response"] = "messages"
    """Row format: OpenAI messages, ShareGPT conversations, Alpaca instruction/input/output, prompt/response."""
    columns: dict = field(default_factory=dict)
    """Field renames, format name -> dataset column, e.g. {prompt: inputs, response: targets}; {} for none."""
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
