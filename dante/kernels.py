"""Which attention kernel training runs, decided in one place (stages 4, 5 and 7 through the engine).

``choose_attention(device_type, document_mask, gqa, compiled)`` returns an ``AttentionChoice`` (kernel
name and the reason, both logged and written to the stage manifest); ``apply_attention_choice`` sets
the model's plain attributes that make ``dante/model.py`` run it (model.py only executes the choice and
compiles nothing).

Kernels
  causal          no document mask: ``scaled_dot_product_attention(is_causal=True, enable_gqa=True)``,
                  the flash / cuDNN kernels on CUDA; GQA shares K/V heads without copying them.
  sdpa            SDPA with a dense boolean (B, 1, T, T) causal-and-same-document mask.
  sdpa-repeat-kv  the same, with K/V heads repeated to n_heads first.
  flex            FlexAttention with a BlockMask (fully masked blocks are skipped), traced into the
                  per-block torch.compile graph.
  flex-compiled   FlexAttention compiled on its own, for eager blocks.

Design choices (the evidence)
- On CUDA a dense mask never meets GQA: flash takes no mask, and the memory-efficient and cuDNN kernels
  do not take GQA broadcast, so SDPA falls back to the unfused math kernel, which materializes
  B x H x T x T scores (for Dante-2B at micro-batch 4, seq 4096: 4 x 20 x 4096^2 x 2 bytes = 2.7 GB per
  layer, kept for backward). A document mask on CUDA therefore uses FlexAttention; without FlexAttention
  in the torch build, K/V heads are repeated so the memory-efficient kernel takes the mask.
- Eager FlexAttention is an unfused reference that materializes every score (PyTorch warns so), so with
  eager blocks ``flex_attention`` itself is compiled ("flex-compiled").
- The BlockMask is built by ``torch.compile(create_block_mask)`` (what torch 2.13 itself suggests when its
  ``_compile=True`` flag is used; eager, it evaluates the mask function on the full T x T grid). It runs
  once per forward, outside the compiled blocks, and does not recompile per batch: on CPU, ten calls with
  new document ids and new mask closures gave one graph to a graph-counting backend, and the same block
  masks as eager.
- Off CUDA, SDPA with the dense mask: torch 2.13 FlexAttention has no backward on CPU or MPS
  ("FlexAttention does not support backward on CPU", also under torch.compile with the aot_eager
  backend, measured), and the dense mask is O(B x T^2) booleans, fine at CPU sizes.
  ``model.doc_attention = "flex"`` still runs forward-only FlexAttention on CPU (tests compare it with SDPA).

Example::

    choice = choose_attention("cuda", document_mask=True, gqa=True, compiled=False)
    apply_attention_choice(model, choice)      # choice.kernel == "flex-compiled"
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass

import torch

try:  # FlexAttention exists from torch 2.5
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
except ImportError:  # pragma: no cover - depends on the torch build
    create_block_mask = flex_attention = None

FLEX_AVAILABLE = flex_attention is not None
KERNELS = ("causal", "sdpa", "sdpa-repeat-kv", "flex", "flex-compiled")


@dataclass(frozen=True)
class AttentionChoice:
    kernel: str
    """One of KERNELS (see the module docstring)."""
    reason: str
    """Why this kernel, in one sentence: logged and written to the manifest."""

    def to_dict(self) -> dict:
        return asdict(self)


def choose_attention(device_type: str, document_mask: bool, gqa: bool, compiled: bool,
                     flex_available: bool = FLEX_AVAILABLE) -> AttentionChoice:
    """The attention kernel for training on ``device_type`` ("cuda", "cpu", ...); see the module docstring.

    document_mask: the batches carry document ids (packed SFT). gqa: n_heads != n_kv_heads.
    compiled: the blocks run under torch.compile (train.compile).
    """
    if not document_mask:
        return AttentionChoice("causal", "no document mask: SDPA is_causal with enable_gqa (flash/cuDNN on CUDA)")
    if device_type != "cuda":
        return AttentionChoice("sdpa", f"document mask on {device_type}: SDPA with a dense (B, 1, T, T) mask; "
                                       f"torch {torch.__version__.split('+')[0]} FlexAttention has no backward off CUDA")
    if flex_available and compiled:
        return AttentionChoice("flex", "document mask on CUDA with compiled blocks: FlexAttention BlockMask inside "
                                       "the block graph (skips masked blocks; a dense mask would force SDPA's math "
                                       "kernel with GQA)")
    if flex_available:
        return AttentionChoice("flex-compiled", "document mask on CUDA with eager blocks: FlexAttention compiled on "
                                                "its own (eager flex materializes every score; a dense mask would "
                                                "force SDPA's math kernel with GQA)")
    if gqa:
        return AttentionChoice("sdpa-repeat-kv", "document mask with GQA on CUDA and no FlexAttention in this torch: "
                                                 "K/V heads repeated so the memory-efficient SDPA kernel takes the mask")
    return AttentionChoice("sdpa", "document mask on CUDA without GQA and no FlexAttention in this torch: the "
                                   "memory-efficient SDPA kernel takes the dense mask")


@functools.cache
def compiled_flex_attention():
    """``torch.compile(flex_attention)``, built once per process (every layer and model shares it)."""
    return torch.compile(flex_attention)


@functools.cache
def compiled_create_block_mask():
    """``torch.compile(create_block_mask)``, built once per process."""
    return torch.compile(create_block_mask)


def apply_attention_choice(model, choice: AttentionChoice) -> None:
    """Set the model's attention attributes (``doc_attention``, ``block_mask_fn``, and per layer
    ``repeat_kv`` / ``flex_attention``) so that its forward runs ``choice.kernel``."""
    if choice.kernel not in KERNELS:
        raise ValueError(f"unknown attention kernel {choice.kernel!r}; expected one of {KERNELS}")
    flex = choice.kernel in ("flex", "flex-compiled")
    if flex and not FLEX_AVAILABLE:
        raise ValueError(f"attention kernel {choice.kernel!r} needs FlexAttention, which this torch build lacks")
    model.doc_attention = "flex" if flex else "sdpa"
    model.block_mask_fn = compiled_create_block_mask() if flex else create_block_mask
    for block in model.layers:
        block.attention.repeat_kv = choice.kernel == "sdpa-repeat-kv"
        block.attention.flex_attention = compiled_flex_attention() if choice.kernel == "flex-compiled" else flex_attention


__all__ = ["AttentionChoice", "choose_attention", "apply_attention_choice", "KERNELS", "FLEX_AVAILABLE"]
