"""Rotary position embeddings (RoPE) for the Dante model, with linear and YaRN context scaling.

Pure functions over tensors: ``rope_inv_freq`` turns (head_dim, theta, rope_scaling) into inverse
frequencies and an attention scaling, ``rope_table`` turns those into cos/sin tables (fp32), and
``apply_rotary`` rotates query/key heads. ``dante/model.py`` keeps the table as a non-persistent
buffer, so it is never saved in a checkpoint and is rebuilt from ``ModelConfig`` on load.

Layout (what the export needs to know): Dante uses the *rotate-half* layout of Hugging Face
transformers (GPT-NeoX style). A head vector of width D is split into halves x1 = x[:D/2] and
x2 = x[D/2:]; pair i is (x1[i], x2[i]), rotated by the angle position * inv_freq[i]. This is exactly
what ``transformers.LlamaForCausalLM`` computes (``rotate_half``), so exporting to Hugging Face is a pure
renaming: wq and wk need NO permutation. (Meta's reference code rotates adjacent pairs (2i, 2i+1), the
"interleaved" complex layout; HF's conversion script permutes wq/wk rows to go from that to this one.
We train from scratch in the HF layout, so no permutation exists anywhere in Dante.)

Scaling follows transformers' ``modeling_rope_utils`` (v5.24) to the letter, so an exported model with
the same ``rope_scaling`` dict behaves identically in transformers (tested against
``ROPE_INIT_FUNCTIONS``):

- ``default`` ({} or rope_type default): inv_freq[i] = theta^(-2i/D); attention scaling 1.
- ``linear``: inv_freq / factor (position interpolation); attention scaling 1.
- ``yarn``: per-frequency blend of interpolation (inv_freq / factor) and extrapolation (inv_freq). The
  blend is a linear ramp over frequency index between the dimensions that complete ``beta_fast`` (32)
  and ``beta_slow`` (1) rotations over ``original_max_position_embeddings``; with ``truncate`` (default
  true) the ramp ends are floored/ceiled. Attention scaling: ``attention_factor`` if given, else
  mscale(factor, mscale) / mscale(factor, mscale_all_dim) when both are set and non-zero, else
  0.1 * ln(factor) + 1. The scaling multiplies cos and sin (hence both q and k), as transformers does.

Validation of the dict lives in ``dante.config.rope_scaling_problems`` (one home; the config check and
these functions give the same messages); here it raises ``ValueError``.

Example::

    inv_freq_K, scale = rope_inv_freq(128, 500000.0, {"rope_type": "yarn", "factor": 4.0,
                                                      "original_max_position_embeddings": 2048})
    cos_LK, sin_LK = rope_table(inv_freq_K, 8192, scale)
    xq_BTHD = apply_rotary(xq_BTHD, cos_LK[:T], sin_LK[:T])
"""

from __future__ import annotations

import math

import torch

from dante.config import rope_scaling_problems


def _check(rope_scaling: dict) -> str:
    problems = rope_scaling_problems(rope_scaling)
    if problems:
        raise ValueError("invalid rope_scaling:\n" + "\n".join(f"  - {p}" for p in problems))
    return rope_scaling.get("rope_type", rope_scaling.get("type", "default")) if rope_scaling else "default"


def default_inv_freq(head_dim: int, theta: float, device: torch.device | str | None = None) -> torch.Tensor:
    """theta^(-2i/D) for i < D/2, fp32, shape (D/2,)."""
    exponents_K = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).to(torch.float32) / head_dim
    return 1.0 / (theta**exponents_K)


def yarn_attention_scaling(factor: float, attention_factor: float | None = None,
                           mscale: float | None = None, mscale_all_dim: float | None = None) -> float:
    """YaRN's cos/sin multiplier: explicit attention_factor, else the mscale ratio, else 0.1 ln(factor) + 1."""
    if attention_factor is not None:
        return float(attention_factor)

    def magnitude(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    # transformers tests truthiness, so mscale 0 means "not set"; kept for identical exports.
    if mscale and mscale_all_dim:
        return float(magnitude(factor, mscale) / magnitude(factor, mscale_all_dim))
    return magnitude(factor)


def yarn_inv_freq(head_dim: int, theta: float, factor: float, original_max_position_embeddings: int,
                  beta_fast: float = 32.0, beta_slow: float = 1.0, truncate: bool = True,
                  device: torch.device | str | None = None) -> torch.Tensor:
    """YaRN inverse frequencies (D/2,): high frequencies extrapolate, low ones interpolate, a ramp between."""

    def dim_for_rotations(n_rotations: float) -> float:
        # The (fractional) frequency index whose wavelength fits n_rotations times into the original context.
        return (head_dim * math.log(original_max_position_embeddings / (n_rotations * 2 * math.pi))) / (2 * math.log(theta))

    low, high = dim_for_rotations(beta_fast), dim_for_rotations(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # a zero-width ramp would divide by zero (same guard as transformers)

    wavelength_factors_K = theta ** (torch.arange(0, head_dim, 2, device=device).to(torch.float32) / head_dim)
    extrapolated_K = 1.0 / wavelength_factors_K
    interpolated_K = 1.0 / (factor * wavelength_factors_K)
    ramp_K = torch.clamp((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1).to(device)
    keep_K = 1 - ramp_K  # 1: keep the original frequency (extrapolate), 0: divide it by factor (interpolate)
    return interpolated_K * (1 - keep_K) + extrapolated_K * keep_K


def rope_inv_freq(head_dim: int, theta: float, rope_scaling: dict | None = None,
                  device: torch.device | str | None = None) -> tuple[torch.Tensor, float]:
    """(inv_freq (D/2,) fp32, attention_scaling) for a transformers-format rope_scaling dict ({} or None: none)."""
    rope_scaling = rope_scaling or {}
    rope_type = _check(rope_scaling)
    if head_dim <= 0 or head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim > 0, got {head_dim}")
    if rope_type == "default":
        return default_inv_freq(head_dim, theta, device), 1.0
    factor = float(rope_scaling["factor"])
    if rope_type == "linear":
        return default_inv_freq(head_dim, theta, device) / factor, 1.0
    # yarn (the only other type _check lets through); `or` defaults mirror transformers (0/None -> default)
    inv_freq_K = yarn_inv_freq(
        head_dim, theta, factor, rope_scaling["original_max_position_embeddings"],
        beta_fast=rope_scaling.get("beta_fast") or 32.0,
        beta_slow=rope_scaling.get("beta_slow") or 1.0,
        truncate=rope_scaling.get("truncate", True),
        device=device,
    )
    scaling = yarn_attention_scaling(factor, rope_scaling.get("attention_factor"),
                                     rope_scaling.get("mscale"), rope_scaling.get("mscale_all_dim"))
    return inv_freq_K, scaling


def rope_table(inv_freq_K: torch.Tensor, max_len: int, attention_scaling: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables (max_len, D/2) in fp32, already multiplied by the attention scaling.

    Angles are position (as fp32) times inv_freq, the same fp32 product transformers forms, so the tables
    equal its cos/sin exactly at every position.
    """
    positions_L = torch.arange(max_len, device=inv_freq_K.device).to(torch.float32)
    angles_LK = positions_L[:, None] * inv_freq_K.to(torch.float32)[None, :]
    return angles_LK.cos() * attention_scaling, angles_LK.sin() * attention_scaling


def apply_rotary(x_BTHD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate heads in the rotate-half layout; cos/sin are (T, D/2) or (B, T, D/2) rows of the table.

    The table is cast to x's dtype first, as transformers does, so bf16 results match an exported model.
    """
    cos_xTK = cos.to(x_BTHD.dtype).unsqueeze(-2)  # (.., T, 1, D/2): broadcast over heads
    sin_xTK = sin.to(x_BTHD.dtype).unsqueeze(-2)
    x1, x2 = x_BTHD.chunk(2, dim=-1)
    return torch.cat((x1 * cos_xTK - x2 * sin_xTK, x2 * cos_xTK + x1 * sin_xTK), dim=-1)
