"""Text generation with a KV cache: temperature, top-k, top-p, repetition penalty, stop tokens/strings.

One prompt at a time (``dante.model.KVCache`` keeps one length for all rows): a prefill of the prompt,
then one-token steps that attend to the cache. Tokens/s is measured on the whole call (prefill included)
and the prefill time is reported beside it.

Logit processing per step, in the order of transformers' ``generate`` (so settings mean the same there):
1. repetition penalty (CTRL, Keskar et al. 2019): every token id already in the prompt or the output has
   its logit divided by the penalty when positive and multiplied by it when negative;
2. temperature (``temperature == 0`` means greedy: argmax after step 1, no sampling);
3. top-k: keep the k largest logits (ties with the k-th are kept);
4. top-p (nucleus): keep the smallest set of most likely tokens whose probability reaches p (the most
   likely token is always kept);
then one draw from the renormalized distribution with a ``torch.Generator`` seeded per call, so a fixed
seed gives the same text on the same device and build.

Example::

    params = SamplingParams(temperature=0.7, top_p=0.9, top_k=0, repetition_penalty=1.15)
    out = generate(model, prompt_ids, max_new_tokens=64, params=params, stop_ids={1, 4}, seed=1234)
    print(out.tokens_per_s, tokenizer.decode(out.new_tokens))
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F

from dante.errors import raise_problems
from dante.evaluation.scoring import autocast_context, model_device
from dante.model import KVCache


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.7
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0

    @classmethod
    def from_config(cls, g) -> "SamplingParams":
        """The sampling settings of a ``dante.config.GenerationConfig`` (``eval.generation``)."""
        return cls(temperature=g.temperature, top_p=g.top_p, top_k=g.top_k, repetition_penalty=g.repetition_penalty)

    def problems(self) -> list[str]:
        p = []
        if self.temperature < 0:
            p.append(f"temperature={self.temperature}: must be >= 0 (0 is greedy)")
        if not 0 < self.top_p <= 1:
            p.append(f"top_p={self.top_p}: must be in (0, 1]")
        if self.top_k < 0:
            p.append(f"top_k={self.top_k}: must be >= 0 (0 disables)")
        if self.repetition_penalty <= 0:
            p.append(f"repetition_penalty={self.repetition_penalty}: must be > 0 (1 disables)")
        return p


GREEDY = SamplingParams(temperature=0.0)


@dataclass
class Generation:
    prompt_tokens: int
    new_tokens: list[int]
    text: str
    """Decoded new tokens (cut before a stop string when one was hit; stop tokens are not decoded)."""
    stop_reason: str
    """'stop_token', 'stop_string', 'max_new_tokens' or 'context_full'."""
    seconds: float
    prefill_seconds: float

    @property
    def tokens_per_s(self) -> float:
        return len(self.new_tokens) / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "tokens_per_s": self.tokens_per_s}


# ---------------------------------------------------------------------------------------------------
# Logit processors (1-D logits over the vocabulary, modified in place and returned)
# ---------------------------------------------------------------------------------------------------


def apply_repetition_penalty(logits_V: torch.Tensor, seen_ids: Iterable[int], penalty: float) -> torch.Tensor:
    if penalty == 1.0:
        return logits_V
    ids = torch.tensor(sorted(set(seen_ids)), dtype=torch.long, device=logits_V.device)
    if ids.numel() == 0:
        return logits_V
    picked = logits_V[ids]
    logits_V[ids] = torch.where(picked > 0, picked / penalty, picked * penalty)
    return logits_V


def top_k_filter(logits_V: torch.Tensor, k: int) -> torch.Tensor:
    if k <= 0 or k >= logits_V.shape[-1]:
        return logits_V
    kth = torch.topk(logits_V, k).values[-1]
    return logits_V.masked_fill_(logits_V < kth, float("-inf"))


def top_p_filter(logits_V: torch.Tensor, p: float) -> torch.Tensor:
    if p >= 1.0:
        return logits_V
    sorted_V, order_V = torch.sort(logits_V, descending=True)
    probs_V = torch.softmax(sorted_V, dim=-1)
    mass_before_V = torch.cumsum(probs_V, dim=-1) - probs_V
    drop_sorted_V = mass_before_V >= p  # the set before this token already reaches p
    drop_sorted_V[0] = False
    drop_V = torch.zeros_like(drop_sorted_V).scatter_(0, order_V, drop_sorted_V)
    return logits_V.masked_fill_(drop_V, float("-inf"))


def next_token(logits_V: torch.Tensor, seen_ids: Sequence[int], params: SamplingParams,
               generator: torch.Generator | None) -> int:
    """One token id from fp32 logits, after penalty, temperature, top-k and top-p."""
    logits_V = apply_repetition_penalty(logits_V.float().clone(), seen_ids, params.repetition_penalty)
    if params.temperature == 0:
        return int(torch.argmax(logits_V))
    logits_V = logits_V / params.temperature
    logits_V = top_p_filter(top_k_filter(logits_V, params.top_k), params.top_p)
    probs_V = torch.softmax(logits_V, dim=-1)
    return int(torch.multinomial(probs_V, 1, generator=generator))


# ---------------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------------


@torch.inference_mode()
def generate(model, prompt_ids: Sequence[int], *, max_new_tokens: int, params: SamplingParams,
             stop_ids: Iterable[int] = (), seed: int = 0, decode: Callable[[list[int]], str] | None = None,
             stop_strings: Sequence[str] = (), autocast_dtype: torch.dtype | None = None,
             on_token: Callable[[list[int]], None] | None = None) -> Generation:
    """Continue ``prompt_ids`` (which must fit the model's context) for up to ``max_new_tokens`` tokens.

    Stops at a token in ``stop_ids`` (not included in the output), at the first occurrence of a stop
    string in the decoded output (text cut before it; needs ``decode``), or when the context is full.
    ``on_token(new_tokens)`` is called after each kept token (streaming output).
    """
    raise_problems(ValueError, "invalid sampling settings", params.problems())
    if stop_strings and decode is None:
        raise ValueError("stop_strings need a decode function")
    prompt_ids = list(prompt_ids)
    max_len = model.cfg.max_seq_len
    if not 0 < len(prompt_ids) < max_len:
        raise ValueError(f"prompt of {len(prompt_ids)} tokens must be non-empty and shorter than the "
                         f"model's context ({max_len})")
    device = model_device(model)
    stop_ids = set(stop_ids)
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    budget = min(max_new_tokens, max_len - len(prompt_ids))
    cache = KVCache(model.cfg, 1, len(prompt_ids) + budget, device=device, dtype=_cache_dtype(model, device, autocast_dtype))

    _sync(device)
    t0 = time.perf_counter()
    with autocast_context(device, autocast_dtype):
        hidden_1TD = model(torch.tensor([prompt_ids], device=device), kv_cache=cache)
    _sync(device)
    prefill_s = time.perf_counter() - t0

    seen, new = list(prompt_ids), []
    reason, text = ("max_new_tokens" if budget == max_new_tokens else "context_full"), None
    for step in range(budget):
        logits_V = F.linear(hidden_1TD[0, -1].float(), model.output.weight.float())  # fp32 logits
        tok = next_token(logits_V, seen, params, generator)
        if tok in stop_ids:
            reason = "stop_token"
            break
        new.append(tok)
        seen.append(tok)
        if on_token is not None:
            on_token(new)
        if stop_strings:
            decoded = decode(new)
            hits = [decoded.find(s) for s in stop_strings if s and s in decoded]
            if hits:
                text, reason = decoded[: min(hits)], "stop_string"
                break
        if step + 1 < budget:
            with autocast_context(device, autocast_dtype):
                hidden_1TD = model(torch.tensor([[tok]], device=device), kv_cache=cache)
    _sync(device)
    seconds = time.perf_counter() - t0
    if text is None:
        text = decode(new) if decode is not None else ""
    return Generation(prompt_tokens=len(prompt_ids), new_tokens=new, text=text, stop_reason=reason,
                      seconds=seconds, prefill_seconds=prefill_s)


def _cache_dtype(model, device: torch.device, autocast_dtype) -> torch.dtype:
    """Keys/values are stored in the dtype the attention computes in."""
    if device.type == "cuda" and autocast_dtype is not None:
        return autocast_dtype
    return model.output.weight.dtype


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
