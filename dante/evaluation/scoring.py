"""Batched log-likelihood of token sequences: the one scorer behind perplexity, multiple choice and passkey.

A ``ScoreRequest`` is a token list and the index of its first scored token; the scorer returns, for
every scored token ``tokens[i]``, ``log p(tokens[i] | tokens[:i])`` (natural log) and whether it was the
argmax. Perplexity windows, lm-eval (context, continuation) pairs and passkey candidates are all turned
into such requests, so the padding/masking logic exists once.

Design choices
- Right padding only. Attention is causal, so pad tokens placed *after* a row's real tokens can never be
  seen by the real tokens: a request's scores do not depend on what it is batched with or on the batch
  size. (Left padding would shift RoPE positions and need an attention mask: the classic source of
  batch-size-dependent benchmark scores.) Tests check batch 1 == batch 8 == a plain per-request loop.
- Bit-identical for any batch size, not just close: every row is padded to a length bucket that depends
  only on the request itself (``PAD_BUCKET`` multiples), and batches never mix buckets. Measured on CPU:
  the same row computed at padded lengths 30 and 40 differs by 2e-7 (kernels block by sequence length),
  while at one padded length it is bit-identical for batch 1, 2, 3 or 8. Within a bucket requests go
  longest first (stable, by index); results come back in the caller's order. (On a GPU, cuBLAS may
  choose another GEMM kernel for another row count, so there scores agree to rounding, not to the bit;
  what the padding scheme rules out everywhere is a real dependence on what a request is batched with.)
- Only the positions that are scored go through the output projection, in chunks, in fp32 with autocast
  off: a (B, T, 64K) fp32 logit tensor is never built (at B 8, T 2048 it would be 4 GiB). Every chunk
  has exactly ``LOGIT_CHUNK_ROWS`` rows (the last one zero-padded): a GEMM's rounding can depend on its
  row count (measured on CPU: 5e-7 differences between batch 1 and 8 with ragged chunks, 0 with fixed
  ones), while the transformer body gives bit-identical rows for any batch size or right padding.
- Everything runs under ``torch.inference_mode``; on CUDA the transformer body may run in bf16 autocast
  (``autocast_dtype``), the log-softmax is always fp32.

Example::

    scores = score_requests(model, [ScoreRequest(tokens=[0, 17, 42, 99], score_from=1)], batch_size=8)
    total_nll = -scores[0].logprobs.sum()
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

#: Rows of hidden states per output-projection chunk, always this many (512 x 64K fp32 logits = 128 MiB).
LOGIT_CHUNK_ROWS = 512
#: Rows are right-padded to a multiple of this many positions (capped at the model's context).
PAD_BUCKET = 64


@dataclass(frozen=True)
class ScoreRequest:
    """Score ``tokens[score_from:]``, each token given all tokens before it (``score_from >= 1``)."""

    tokens: Sequence[int]
    score_from: int


@dataclass
class TokenScores:
    logprobs: np.ndarray
    """(n_scored,) float64 natural-log probability of each scored token."""
    greedy: np.ndarray
    """(n_scored,) bool: the scored token was the model's argmax."""

    @property
    def total(self) -> float:
        return float(self.logprobs.sum())

    @property
    def all_greedy(self) -> bool:
        return bool(self.greedy.all())


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def autocast_context(device: torch.device, dtype: torch.dtype | None):
    """bf16/fp16 autocast on CUDA when asked; a no-op on CPU (fp32 there: exact and fast enough)."""
    if dtype is None or dtype == torch.float32 or device.type != "cuda":
        return contextlib.nullcontext()
    return torch.autocast(device_type="cuda", dtype=dtype)


def check_request(req: ScoreRequest, max_seq_len: int) -> None:
    n = len(req.tokens)
    if not 1 <= req.score_from < n:
        raise ValueError(f"score_from={req.score_from} must be in [1, {n - 1}] for a request of {n} tokens")
    if n - 1 > max_seq_len:
        raise ValueError(f"request of {n} tokens needs {n - 1} input positions > model.max_seq_len={max_seq_len}")


@torch.inference_mode()
def score_requests(model, requests: Sequence[ScoreRequest], batch_size: int,
                   autocast_dtype: torch.dtype | None = None, pad_id: int = 0) -> list[TokenScores]:
    """Log-probabilities of the scored tokens of every request, in the order given."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be > 0, got {batch_size}")
    max_seq_len = model.cfg.max_seq_len
    for req in requests:
        check_request(req, max_seq_len)
    device = model_device(model)
    buckets: dict[int, list[int]] = {}
    for i, req in enumerate(requests):
        buckets.setdefault(padded_length(len(req.tokens) - 1, max_seq_len), []).append(i)
    results: list[TokenScores | None] = [None] * len(requests)
    for T in sorted(buckets, reverse=True):
        order = sorted(buckets[T], key=lambda i: (-len(requests[i].tokens), i))
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            for i, scores in zip(idx, _score_batch(model, [requests[i] for i in idx], T, device, autocast_dtype, pad_id)):
                results[i] = scores
    return results  # type: ignore[return-value]


def padded_length(n_inputs: int, max_seq_len: int) -> int:
    """The padded input length of a row with n_inputs real positions (a function of the row alone)."""
    return min(-(-n_inputs // PAD_BUCKET) * PAD_BUCKET, max_seq_len)


def _score_batch(model, batch: Sequence[ScoreRequest], T: int, device, autocast_dtype, pad_id: int) -> list[TokenScores]:
    inputs_BT = torch.full((len(batch), T), pad_id, dtype=torch.long)
    rows, cols, targets = [], [], []
    for b, req in enumerate(batch):
        toks = torch.as_tensor(list(req.tokens), dtype=torch.long)
        inputs_BT[b, : len(toks) - 1] = toks[:-1]
        # input position p predicts token p+1: scored tokens score_from..n-1 come from positions score_from-1..n-2
        pos = torch.arange(req.score_from - 1, len(toks) - 1)
        rows.append(torch.full_like(pos, b))
        cols.append(pos)
        targets.append(toks[req.score_from:])
    with autocast_context(device, autocast_dtype):
        hidden_BTD = model(inputs_BT.to(device))
    row_N, col_N, target_N = (torch.cat(x).to(device) for x in (rows, cols, targets))
    hidden_ND = hidden_BTD[row_N, col_N]
    weight_VD = model.output.weight.float()
    logprob_chunks, greedy_chunks = [], []
    with torch.autocast(device_type=device.type, enabled=False):
        for s in range(0, hidden_ND.shape[0], LOGIT_CHUNK_ROWS):
            chunk_ND = hidden_ND[s:s + LOGIT_CHUNK_ROWS].float()
            n = chunk_ND.shape[0]
            if n < LOGIT_CHUNK_ROWS:
                chunk_ND = F.pad(chunk_ND, (0, 0, 0, LOGIT_CHUNK_ROWS - n))
            logits_NV = F.linear(chunk_ND, weight_VD)[:n]
            logp_NV = torch.log_softmax(logits_NV, dim=-1)
            tgt = target_N[s:s + n]
            logprob_chunks.append(logp_NV.gather(1, tgt[:, None])[:, 0])
            greedy_chunks.append(logits_NV.argmax(dim=-1) == tgt)
    logprob_N = torch.cat(logprob_chunks).double().cpu().numpy()
    greedy_N = torch.cat(greedy_chunks).cpu().numpy()
    out, offset = [], 0
    for req in batch:
        n = len(req.tokens) - req.score_from
        out.append(TokenScores(logprobs=logprob_N[offset:offset + n], greedy=greedy_N[offset:offset + n]))
        offset += n
    return out
