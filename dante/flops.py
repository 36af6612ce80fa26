"""Model FLOPs per token, GPU peak throughput, MFU (model FLOPs utilization), per-GPU memory, and the
step plan: what a run costs, and ``preflight_report``, the --dry-run summary of it (stages 4, 5, 7).

MFU = (tokens/s x model FLOPs per token) / (number of GPUs x dense peak FLOP/s of the GPU). "Model FLOPs"
are the matmul FLOPs the model mathematically needs for one training token (forward + backward), not
what the hardware ends up doing: activation-checkpoint recomputation and FlashAttention's recomputation
of the scores in backward are NOT counted (counting them gives "hardware FLOPs utilization", HFU).

Formula (derived once here; ``training_flops_per_token`` implements it). Notation: d = model dim, L
layers, H query heads, K key/value heads, h = head dim, F = SwiGLU hidden width, V = vocab, T = sequence
length. A (m x k) @ (k x n) matmul is 2mkn FLOPs, so a linear layer costs 2 x (its weight count) per
token in forward.

    forward, per token, per layer
      projections   2 (d*H*h + 2*d*K*h + H*h*d)      wq, wk, wv, wo; GQA shrinks only wk/wv (K heads)
      SwiGLU        2 (3*d*F)                        w1, w3, w2
      QK^T and AV   2 * 2*H*h*T_att                  every QUERY head scores T_att keys, so GQA does
                                                     not reduce this term (K/V heads are shared, not
                                                     fewer dot products)
    forward, per token, once
      lm_head       2*d*V                            (the embedding lookup is not a matmul: 0 FLOPs)

    training = 3 x forward    (backward = 2 matmuls per forward matmul: grad wrt input and wrt weight;
                               for attention dS = dO V^T, dV = P^T dO, dQ = dS K, dK = dS^T Q)

    training FLOPs/token = 6 * N_matmul + 12 * L * H * h * T_att
      with N_matmul = L (d*H*h + 2*d*K*h + H*h*d + 3*d*F) + d*V   (all linear weights incl. lm_head)

T_att is the number of keys a query attends to on average. Causal attention needs (T + 1) / 2 (query t
sees t + 1 keys), and FlashAttention really skips the masked half, so the honest count used for MFU is
``causal=True``. The PaLM paper (Chowdhery et al. 2022, appendix B) and nanoGPT count the full square,
T_att = T (``causal=False``); at dante-2b, T = 2048 that convention adds 7% to the FLOPs and to the MFU.
Norms, RoPE, softmax, SiLU and the residual adds are elementwise (< 1% of the total) and not counted.
tests/test_flops.py checks the formula with causal=False against torch's FlopCounterMode on a real
forward + backward (which counts the full attention square).

Peaks: dense (no 2:4 sparsity) tensor-core throughput from NVIDIA's datasheets. The reference run divided
by the with-sparsity number, which halves the reported MFU; that mistake is why every entry below names
both figures. An unknown GPU gives MFU "n/a" unless ``train.peak_tflops`` says the peak.

Example::

    fpt = training_flops_per_token(model_cfg, seq_len=2048)
    peak = detect_peak(fp8=False)            # None on CPU or an unknown GPU
    print(mfu(tokens_per_sec=34_000, flops_per_token=fpt, peak=peak))
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dante.config import ModelConfig, TrainConfig
from dante.metrics import format_duration
from dante.model import Transformer, ffn_hidden_dim_of, head_dim_of


@dataclass(frozen=True)
class FlopsBreakdown:
    """Training FLOPs per token, by term (see the module docstring for the formula)."""

    linear_params: int
    """N_matmul: weights of every linear layer, lm_head included (tied or not: it is a matmul either way)."""
    dense: float
    """6 * N_matmul."""
    attention: float
    """12 * L * H * h * T_att."""

    @property
    def total(self) -> float:
        return self.dense + self.attention


def matmul_params(cfg: ModelConfig) -> int:
    """N_matmul: weights that take part in a matmul per token (all linears and lm_head, not the embedding)."""
    d, h, F = cfg.dim, head_dim_of(cfg), ffn_hidden_dim_of(cfg)
    per_layer = d * cfg.n_heads * h + 2 * d * cfg.n_kv_heads * h + cfg.n_heads * h * d + 3 * d * F
    return cfg.n_layers * per_layer + d * cfg.vocab_size


def flops_breakdown(cfg: ModelConfig, seq_len: int, causal: bool = True) -> FlopsBreakdown:
    n = matmul_params(cfg)
    keys_per_query = (seq_len + 1) / 2 if causal else seq_len
    attention = 12 * cfg.n_layers * cfg.n_heads * head_dim_of(cfg) * keys_per_query
    return FlopsBreakdown(linear_params=n, dense=6.0 * n, attention=float(attention))


def training_flops_per_token(cfg: ModelConfig, seq_len: int, causal: bool = True) -> float:
    """Model FLOPs (forward + backward) per trained token; ``causal`` counts only the unmasked half."""
    return flops_breakdown(cfg, seq_len, causal).total


# ---------------------------------------------------------------------------------------------------
# Peak throughput per GPU: dense tensor-core TFLOP/s (bf16, fp8), from NVIDIA's datasheets.
# Each comment gives the datasheet figure WITH sparsity (what the datasheet prints first, marked *);
# the dense value is half of it. fp8 None: the GPU has no fp8 tensor cores.
# Matching is by substring of torch.cuda.get_device_name(), first match wins, so the more specific
# names (H100 NVL, H100 PCIe) come before the generic one.
# ---------------------------------------------------------------------------------------------------

GPU_PEAKS_TFLOPS: list[tuple[str, str, float, float | None]] = [
    # (substring of the device name, label, dense bf16, dense fp8)
    ("GB200", "B200 (GB200, 1200 W)", 2500.0, 5000.0),   # GB200 datasheet per GPU: BF16 5 PF*, FP8 10 PF*
    ("B200", "B200 (HGX, 1000 W)", 2250.0, 4500.0),      # HGX B200 datasheet per GPU: BF16 4.5 PF*, FP8 9 PF*
    ("H200 NVL", "H200 NVL", 835.5, 1670.5),             # H200 datasheet, NVL: BF16 1,671*, FP8 3,341*
    ("H200", "H200 SXM", 989.4, 1978.9),                 # H200 datasheet, SXM: BF16 1,979*, FP8 3,958*
    ("H100 NVL", "H100 NVL", 835.5, 1670.5),             # H100 datasheet, NVL: BF16 1,671*, FP8 3,341*
    ("H100 PCIe", "H100 PCIe", 756.5, 1513.0),           # H100 datasheet, PCIe: BF16 1,513*, FP8 3,026*
    ("H100", "H100 SXM", 989.4, 1978.9),                 # H100 datasheet, SXM ("H100 80GB HBM3"): BF16 1,979*, FP8 3,958*
    ("A100", "A100 (40/80 GB, SXM/PCIe)", 312.0, None),  # A100 datasheet: BF16 312 (624*); no FP8
    ("L40S", "L40S", 362.05, 733.0),                     # L40S datasheet: BF16 362.05 (733*), FP8 733 (1,466*)
    ("RTX 5090", "GeForce RTX 5090", 209.5, 419.0),      # RTX Blackwell whitepaper, FP32 accumulate: FP16 419*, FP8 838*
    ("RTX 4090", "GeForce RTX 4090", 165.2, 330.3),      # Ada whitepaper, FP32 accumulate: FP16 330.4*, FP8 660.6*
]
# GeForce cards run fp16/bf16 tensor math with FP32 accumulation (what training uses) at half the FP16-
# accumulate rate; the marketing "AI TOPS" are FP4 with sparsity and say nothing about training.


@dataclass(frozen=True)
class Peak:
    label: str
    tflops: float
    """Dense peak TFLOP/s for the precision in use."""
    source: str
    """'table' or 'config' (train.peak_tflops)."""


def peak_for_device(device_name: str, fp8: bool) -> Peak | None:
    """Dense peak for a device name (torch.cuda.get_device_name); None if unknown or no fp8 units."""
    for pattern, label, bf16, fp8_peak in GPU_PEAKS_TFLOPS:
        if pattern.lower() in device_name.lower():
            value = fp8_peak if fp8 else bf16
            if value is None:
                return None
            return Peak(f"{label} {'fp8' if fp8 else 'bf16'}", value, "table")
    return None


def detect_peak(fp8: bool, override_tflops: float = 0.0) -> Peak | None:
    """Peak of the current CUDA device (None on CPU or for a GPU missing from the table)."""
    if override_tflops > 0:
        return Peak("train.peak_tflops", override_tflops, "config")
    if not torch.cuda.is_available():
        return None
    return peak_for_device(torch.cuda.get_device_name(), fp8)


def mfu(tokens_per_sec: float, flops_per_token: float, peak: Peak | None, n_gpus: int = 1) -> float | None:
    """Model FLOPs utilization in [0, 1] (None without a known peak)."""
    if peak is None or tokens_per_sec <= 0:
        return None
    return tokens_per_sec * flops_per_token / (n_gpus * peak.tflops * 1e12)


def training_peaks(fp8: bool, override_tflops: float = 0.0, device_name: str | None = None) -> dict[str, Peak | None]:
    """The peaks a training run reports MFU against, keyed by the metrics.jsonl field.

    ``mfu`` is always against the dense bf16 peak, so runs with and without FP8 compare on one scale (an
    FP8 run that only matches bf16 throughput shows the same MFU, not half of it); with ``fp8`` also
    ``mfu_fp8``, against the dense fp8 peak: how much of the fp8 units the run uses. ``train.peak_tflops``
    overrides the bf16 peak only (fp8 stays from the table). ``device_name`` defaults to the current CUDA
    device (no peak on CPU).
    """
    if device_name is None and torch.cuda.is_available():
        device_name = torch.cuda.get_device_name()
    bf16 = Peak("train.peak_tflops", override_tflops, "config") if override_tflops > 0 else \
        peak_for_device(device_name, fp8=False) if device_name else None
    peaks = {"mfu": bf16}
    if fp8:
        peaks["mfu_fp8"] = peak_for_device(device_name, fp8=True) if device_name else None
    return peaks


def mfu_fields(tokens_per_sec: float, flops_per_token: float, peaks: dict[str, Peak | None],
               n_gpus: int = 1) -> dict[str, float | None]:
    """``{"mfu": ..., ["mfu_fp8": ...]}`` for one step, from ``training_peaks``."""
    return {key: mfu(tokens_per_sec, flops_per_token, peak, n_gpus) for key, peak in peaks.items()}


# ---------------------------------------------------------------------------------------------------
# Memory per GPU (the --dry-run estimate)
# ---------------------------------------------------------------------------------------------------


def activation_bytes_per_token_layer(cfg: ModelConfig, act_bytes: int, compiled: bool) -> float:
    """Bytes one transformer block keeps for backward, per token (no activation checkpointing).

    Counted from what autograd saves in dante/model.py (a = bytes per activation element, D dim,
    H/K query/kv heads, h head dim, F SwiGLU width):
      eager     2 RMSNorms: fp32 copy of the input (4D) + normed output before and after the gain (2aD),
                q, k, v after RoPE + attention output + its contiguous copy for wo: a(3Hh + 2Kh),
                softmax log-sum-exp 4H, SwiGLU w1 out, w3 out, silu(w1 out), product: 4aF
      compiled  inductor fuses the elementwise ops and recomputes them in backward from their inputs:
                2 norms keep their input and output (2 x 2aD) and rstd, the attention part is the same,
                SwiGLU keeps w1 out, w3 out and the product (3aF)
    FlashAttention keeps no T x T matrix, so nothing here grows with sequence length beyond T itself.
    """
    d, H, K, h, F = cfg.dim, cfg.n_heads, cfg.n_kv_heads, head_dim_of(cfg), ffn_hidden_dim_of(cfg)
    a = act_bytes
    attention = a * (3 * H * h + 2 * K * h) + 4 * H
    if compiled:
        return 4 * a * d + 8 + attention + 3 * a * F
    return 2 * (4 * d + 2 * a * d) + attention + 4 * a * F


def estimate_memory(model_cfg: ModelConfig, cfg, world_size: int, zero_stage: int | None = None) -> dict:
    """Per-GPU memory in bytes, by part, for a TrainConfig ``cfg`` on ``world_size`` ranks (``zero_stage``
    overrides train.zero_stage, so that --dry-run can show ZeRO-1 and ZeRO-2 side by side).

    Model states (N parameters, W ranks), for the built-in DeepSpeed config (fp32 gradient accumulation and
    reduction, dante.backends._DS_DEFAULT):
      deepspeed bf16 ZeRO-1  DeepSpeed's BF16_Optimizer: weights 2N (bf16, full); an fp32 gradient buffer
                             4N (full: it is all-reduced once per optimizer step), each bf16 .grad freed by a
                             hook as soon as it is added; the all-reduce flattens up to 5e8 fp32 elements
                             (DeepSpeed's MEMORY_OPT_ALLREDUCE_SIZE); fp32 masters 4N/W, Adam moments 8N/W
      deepspeed bf16 ZeRO-2  weights 2N; bf16 .grad until it is copied into the reduce bucket, a bucket of
                             2e8 bf16 elements + its fp32 copy for the reduction; the reduced fp32 partition
                             4N/W (accumulated over micro-steps), fp32 masters 4N/W, Adam 8N/W
      deepspeed bf16 ZeRO-0  refused by the engine (DeepSpeed has no fp32 accumulation without ZeRO)
      deepspeed fp32         weights 4N; gradients 4N (4N/W with ZeRO-2) + 2 reduce buckets; fp32 partition
                             copy 4N/W (ZeRO >= 1); Adam 8N/W
      torch                  weights 4N, gradients 4N, Adam 8N (fp32), bf16 autocast weight copies 2N
    Activations: ``activation_bytes_per_token_layer`` x tokens per micro-batch x layers; with activation
    checkpointing only each block's input (aD per token) stays, plus one block recomputed in backward.
    Backward transient: about two blocks' activations (their gradients). Loss (dante/loss.py): the
    gradient w.r.t. the hidden states (aD per token), the fp32 lm_head gradient accumulator (4VD) and two
    fp32 chunk x V logit buffers. Plus ~1.5 GiB of CUDA context and cuBLAS/NCCL workspaces (typical).
    Expect +-15%: the allocator's fragmentation and inductor's recompute choices move it.
    """
    with torch.device("meta"):
        n = sum(p.numel() for p in Transformer(model_cfg).parameters())
    W = world_size
    stage = cfg.zero_stage if zero_stage is None else zero_stage
    bf16 = cfg.precision == "bf16"
    a = 2 if bf16 else 4
    parts: dict[str, float] = {}
    if cfg.backend == "deepspeed":
        shard = W if stage >= 1 else 1
        if bf16:
            parts["weights (bf16, full copy)"] = 2 * n
            if stage >= 2:
                parts["bf16 gradients in flight: reduce bucket + its fp32 copy"] = (2 + 4) * min(n, 200_000_000)
                parts[f"fp32 gradient partition, accumulated (1/{W})"] = 4 * n / W
            else:
                parts["fp32 gradient buffer, accumulated (full)"] = 4 * n
                if W > 1:
                    parts["all-reduce flat copy (fp32, <= 5e8 elements)"] = 4 * min(n, 500_000_000)
            parts[f"fp32 master weights (1/{shard})"] = 4 * n / shard
        else:
            grad_shard = W if stage >= 2 else 1
            bucket = 2 * 200_000_000 * a if W > 1 else 0
            parts["weights (fp32, full copy)"] = 4 * n
            parts[f"gradients (fp32, 1/{grad_shard}) + reduce buckets"] = 4 * n / grad_shard + bucket
            parts[f"fp32 partition copy (1/{shard})"] = 4 * n / shard
        parts[f"Adam moments (fp32, 1/{shard})"] = 8 * n / shard
    else:
        parts["weights (fp32)"] = 4 * n
        parts["gradients (fp32)"] = 4 * n
        parts["Adam moments (fp32)"] = 8 * n
        if bf16:
            parts["bf16 autocast weight copies"] = 2 * n
    tokens = cfg.micro_batch * cfg.seq_len
    per_layer = activation_bytes_per_token_layer(model_cfg, a, cfg.compile) * tokens
    no_ac = per_layer * model_cfg.n_layers
    with_ac = a * model_cfg.dim * tokens * model_cfg.n_layers + per_layer
    chunk = min(cfg.loss_chunk_size, tokens)
    parts["backward transient (~2 blocks)"] = 2 * per_layer
    parts["loss: hidden grad + lm_head grad + 2 logit chunks"] = (a * model_cfg.dim * tokens + 4 * model_cfg.vocab_size
                                                                  * model_cfg.dim + 2 * 4 * chunk * model_cfg.vocab_size)
    parts["CUDA context + workspaces (typical)"] = 1.5 * 2**30
    fixed = sum(parts.values())
    activations = with_ac if cfg.activation_checkpointing else no_ac
    label = "with activation checkpointing" if cfg.activation_checkpointing else "no activation checkpointing"
    parts = {**parts, f"activations ({label}, {'compiled' if cfg.compile else 'eager'})": activations}
    return {"parts": parts, "total": fixed + activations, "total_no_ac": fixed + no_ac, "total_ac": fixed + with_ac,
            "params": n}


# ---------------------------------------------------------------------------------------------------
# The step plan and the preflight report (--dry-run)
# ---------------------------------------------------------------------------------------------------


def tokens_per_step(cfg: TrainConfig, world_size: int) -> int:
    return cfg.micro_batch * cfg.seq_len * cfg.grad_accum * world_size


def planned_steps(cfg: TrainConfig, world_size: int) -> int:
    """train.max_steps, or the steps that reach train.token_budget (rounded up)."""
    if cfg.max_steps > 0:
        return cfg.max_steps
    return -(-cfg.token_budget // tokens_per_step(cfg, world_size))


def preflight_report(model_cfg: ModelConfig, train_cfg: TrainConfig, world_size: int | None = None) -> str:
    """Parameters, FLOPs, step plan, per-GPU memory under ZeRO and ETA: what to know before renting GPUs."""
    world = world_size or train_cfg.expected_world_size
    with torch.device("meta"):
        n_params = sum(p.numel() for p in Transformer(model_cfg).parameters())
    causal = flops_breakdown(model_cfg, train_cfg.seq_len, causal=True)
    full = flops_breakdown(model_cfg, train_cfg.seq_len, causal=False)
    per_step = tokens_per_step(train_cfg, world)
    steps = planned_steps(train_cfg, world)
    tokens = steps * per_step
    lines = [
        f"model      {n_params:,} parameters ({n_params / 1e9:.3f} B); matmul weights incl. lm_head "
        f"{causal.linear_params:,}",
        f"FLOPs/tok  {causal.total / 1e9:.2f} GFLOP for training (6N {causal.dense / 1e9:.2f} + causal attention "
        f"{causal.attention / 1e9:.2f}); full-square convention {full.total / 1e9:.2f}",
        f"batch      {train_cfg.micro_batch} x {train_cfg.seq_len} tokens x accumulation {train_cfg.grad_accum} x "
        f"{world} rank(s) = {per_step:,} tokens per optimizer step",
        f"steps      {steps:,} ({'train.max_steps' if train_cfg.max_steps else 'to reach train.token_budget'}) "
        f"= {tokens / 1e9:.3f} B tokens; warmup {train_cfg.warmup_steps:,}",
    ]
    mem = estimate_memory(model_cfg, train_cfg, world)
    zero = f"ZeRO-{train_cfg.zero_stage} " if train_cfg.backend == "deepspeed" else ""
    lines.append(f"memory     per GPU, {train_cfg.backend} {zero}{train_cfg.precision}, {world} rank(s); an estimate "
                 "(dante/flops.py estimate_memory, +-15%):")
    for key, value in mem["parts"].items():
        lines.append(f"             {key:<58} {value / 2**30:7.2f} GiB")
    lines.append(f"           = {'total':<58} {mem['total'] / 2**30:7.2f} GiB")
    if train_cfg.backend == "deepspeed":
        by_stage = {z: estimate_memory(model_cfg, train_cfg, world, zero_stage=z)["total"] / 2**30 for z in (1, 2)}
        lines.append(f"ZeRO       on {world} GPU(s): ZeRO-1 {by_stage[1]:.2f} GiB (gradients reduced once per optimizer "
                     f"step), ZeRO-2 {by_stage[2]:.2f} GiB (reduced on each of the {train_cfg.grad_accum} micro-steps); "
                     f"train.zero_stage={train_cfg.zero_stage}")
    by_world = []
    for w in sorted({1, 2, 8, world}):
        m = estimate_memory(model_cfg, train_cfg, w)
        by_world.append(f"{w} GPU{'s' if w > 1 else ' '}: {m['total_no_ac'] / 2**30:5.1f} GiB without / "
                        f"{m['total_ac'] / 2**30:5.1f} GiB with activation checkpointing")
    lines.append("           by GPU count (same micro-batch): " + ("\n" + " " * 44).join(by_world))
    rate = train_cfg.assumed_tokens_per_sec * world
    lines.append(f"ETA        {format_duration(tokens / rate)} at train.assumed_tokens_per_sec="
                 f"{train_cfg.assumed_tokens_per_sec:,.0f} per GPU x {world}")
    utils = []
    for device in ("NVIDIA H100 80GB HBM3", "NVIDIA H100 PCIe", "NVIDIA A100-SXM4-80GB"):
        peak = peak_for_device(device, train_cfg.fp8)
        util = mfu(train_cfg.assumed_tokens_per_sec, causal.total, peak)
        if util is not None:
            note = ": impossible, the assumed throughput exceeds this GPU's peak" if util > 1 else ""
            utils.append(f"{100 * util:.1f}% on {peak.label} ({peak.tflops:,.1f} TFLOP/s dense){note}")
    lines.append("MFU        at that throughput: " + "; ".join(utils))
    return "\n".join(lines)
