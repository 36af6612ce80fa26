"""Long-context evaluation (stage 5 before/after extension, stage 8 per checkpoint): perplexity by
position and passkey retrieval.

Perplexity by position (``perplexity_by_position``): sequences of exactly ``length`` tokens are cut from
long held-out documents, or from a concatenation of documents when they are short (``long_sequences``:
``[BOS] doc1 [EOS] [BOS] doc2 ...`` sliced into ``length``-token rows, each row starting with BOS), and
scored in ONE window each (no sliding: the point is to see how the loss behaves at position p with p
tokens of context). Mean NLL is reported per position bucket ``[k*bucket_size, (k+1)*bucket_size)``. A
model that extrapolates badly shows the curve turning up past its trained length.

Passkey retrieval (``passkey_prompts`` / ``evaluate_passkey``, after Mohtashami & Jaggi 2023): a random
5-digit key sentence is hidden at relative depth d of a repeated filler text; the prompt of ``length``
tokens ends with the question. Scored two ways, both reported:
- ``rank``: log-likelihood ranking. The true key and ``distractors`` other random 5-digit keys are
  scored as continuations of the same prompt; a trial is correct when the true key has the highest
  total log-probability (chance = 1 / (distractors + 1)). Informative even for small models.
- ``greedy``: greedy decoding of a few tokens with the KV cache; correct when the first 5-digit number in
  the output is the key (the strict test, ~0 for small models).
The prompt's total length (filler + key sentence + question) is ``length - ANSWER_RESERVE`` tokens so that
any candidate or generated answer fits inside ``length`` positions.

Lengths beyond ``model.max_seq_len`` are refused (``check_length``): the RoPE table only covers the
configured context, and past it the model has no defined behaviour. Extending the context is stage 5's
job (``rope_scaling`` raises max_seq_len).

Example::

    report = long_context_report(model, tokenizer, docs, lengths=[256, 512], depths=[0.1, 0.5, 0.9],
                                 trials=4, bucket_size=64, max_sequences=8, seed=1234)
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

from dante.errors import UserError
from dante.evaluation.generation import GREEDY, generate
from dante.evaluation.scoring import ScoreRequest, score_requests

#: Tokens kept free at the end of each passkey prompt for the answer (" 12345" is <= 6 byte tokens).
ANSWER_RESERVE = 8

#: Filler, intro, key sentence and question in Italian (Dante's main language), after the passkey paper.
FILLER = "L'erba è verde. Il cielo è azzurro. Il sole è giallo. Ecco che si va. Avanti e indietro. "
INTRO = "Nel testo è nascosta una chiave segreta: ricordala.\n"
KEY_SENTENCE = "\nLa chiave segreta è {key}. Ricorda: {key} è la chiave segreta.\n"
QUESTION = "\nQual è la chiave segreta? La chiave segreta è"


def check_length(length: int, max_seq_len: int, what: str = "long-context evaluation") -> None:
    """Refuse a context the model does not support (UserError naming the fix)."""
    if length > max_seq_len:
        raise UserError(
            f"{what}: length {length} exceeds the model's context of {max_seq_len} tokens (model.max_seq_len, "
            f"which includes any rope_scaling). HINT: use lengths <= {max_seq_len}, or extend the context "
            f"first with `python 5_extend_context.py` and evaluate the 05_extend checkpoint."
        )


# ---------------------------------------------------------------------------------------------------
# Perplexity by position
# ---------------------------------------------------------------------------------------------------


def long_sequences(docs: Iterable[Sequence[int]], length: int, max_sequences: int, *, bos_id: int, eos_id: int) -> list[list[int]]:
    """Up to ``max_sequences`` rows of exactly ``length`` tokens: BOS, then the next ``length - 1`` tokens
    of the stream ``doc1 EOS BOS doc2 EOS BOS ...`` (a long document fills several rows on its own)."""
    stream: list[int] = []
    rows: list[list[int]] = []
    for doc in docs:
        stream += [*doc, eos_id, bos_id]
        while len(stream) >= length - 1 and len(rows) < max_sequences:
            rows.append([bos_id] + stream[: length - 1])
            stream = stream[length - 1:]
        if len(rows) >= max_sequences:
            break
    return rows


@dataclass
class PositionCurve:
    length: int
    bucket_size: int
    sequences: int
    bucket_start: list[int]
    nll: list[float]
    """Mean NLL (nats) of the targets in each bucket of positions."""

    @property
    def ppl(self) -> list[float]:
        return [float(np.exp(x)) for x in self.nll]

    def to_dict(self) -> dict:
        return {"length": self.length, "bucket_size": self.bucket_size, "sequences": self.sequences,
                "bucket_start": self.bucket_start, "nll": self.nll, "ppl": self.ppl}


def perplexity_by_position(model, sequences: Sequence[Sequence[int]], bucket_size: int, batch_size: int = 4,
                           autocast_dtype=None) -> PositionCurve:
    """Mean NLL per position bucket; every sequence has the same length and is scored in one window.

    Target position p (1-based: token p predicted from tokens 0..p-1) falls in bucket (p - 1) // bucket_size,
    so bucket 0 holds the predictions with 0..bucket_size-1 tokens of context beyond BOS.
    """
    if not sequences:
        raise UserError("perplexity by position: no sequence long enough; use longer held-out documents or shorter lengths")
    length = len(sequences[0])
    if any(len(s) != length for s in sequences):
        raise ValueError("all sequences must have the same length")
    if bucket_size <= 0:
        raise ValueError(f"bucket_size must be > 0, got {bucket_size}")
    check_length(length - 1, model.cfg.max_seq_len, "perplexity by position")
    scores = score_requests(model, [ScoreRequest(list(s), 1) for s in sequences], batch_size, autocast_dtype)
    nll_SP = -np.stack([s.logprobs for s in scores])  # (S, length-1)
    starts = list(range(0, length - 1, bucket_size))
    means = [float(nll_SP[:, b:b + bucket_size].mean()) for b in starts]
    return PositionCurve(length=length - 1, bucket_size=bucket_size, sequences=len(sequences), bucket_start=starts, nll=means)


# ---------------------------------------------------------------------------------------------------
# Passkey retrieval
# ---------------------------------------------------------------------------------------------------


@dataclass
class PasskeyPrompt:
    length: int
    depth: float
    key: str
    prompt: list[int]
    """Token ids: BOS, intro, filler, key sentence at the depth, filler, question."""
    key_position: int
    """Token index where the key sentence starts."""
    distractors: list[str]


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False).ids


def _random_key(rng: random.Random, exclude: set[str]) -> str:
    while True:
        key = str(rng.randint(10000, 99999))
        if key not in exclude:
            return key


def passkey_prompts(tokenizer, lengths: Sequence[int], depths: Sequence[float], trials: int, distractors: int,
                    seed: int, bos_id: int = 0) -> list[PasskeyPrompt]:
    """Deterministic passkey prompts: one per (length, depth, trial), key and distractors from ``seed``."""
    for d in depths:
        if not 0.0 <= d <= 1.0:
            raise UserError(f"passkey depth {d} must be in [0, 1] (fraction of the filler before the key)")
    rng = random.Random(seed)
    intro, question = _encode(tokenizer, INTRO), _encode(tokenizer, QUESTION)
    filler_unit = _encode(tokenizer, FILLER)
    out = []
    for length in lengths:
        for depth in depths:
            for _ in range(trials):
                key = _random_key(rng, set())
                dis: list[str] = []
                for _ in range(distractors):
                    dis.append(_random_key(rng, {key, *dis}))
                key_ids = _encode(tokenizer, KEY_SENTENCE.format(key=key))
                n_filler = length - ANSWER_RESERVE - 1 - len(intro) - len(key_ids) - len(question)
                if n_filler < 0:
                    raise UserError(f"passkey length {length} is too short for the prompt "
                                    f"({length - n_filler} tokens needed); use lengths >= {length - n_filler}")
                filler = (filler_unit * (n_filler // max(1, len(filler_unit)) + 1))[:n_filler]
                cut = round(depth * n_filler)
                prompt = [bos_id] + intro + filler[:cut] + key_ids + filler[cut:] + question
                out.append(PasskeyPrompt(length=length, depth=depth, key=key, prompt=prompt,
                                         key_position=1 + len(intro) + cut, distractors=dis))
    return out


_FIVE_DIGITS = re.compile(r"(?<!\d)\d{5}(?!\d)")


def evaluate_passkey(model, tokenizer, prompts: Sequence[PasskeyPrompt], batch_size: int = 4,
                     autocast_dtype=None) -> dict:
    """Accuracy (rank and greedy) per (length, depth) and overall; raises UserError on a too-long prompt."""
    for p in prompts:
        check_length(p.length, model.cfg.max_seq_len, "passkey retrieval")
    requests, owners = [], []
    for i, p in enumerate(prompts):
        for cand in [p.key] + p.distractors:
            cont = _encode(tokenizer, " " + cand)
            requests.append(ScoreRequest(p.prompt + cont, len(p.prompt)))
            owners.append(i)
    scores = score_requests(model, requests, batch_size, autocast_dtype)
    totals: dict[int, list[float]] = {}
    for i, s in zip(owners, scores):
        totals.setdefault(i, []).append(s.total)
    cells: dict[tuple[int, float], dict] = {}
    for i, p in enumerate(prompts):
        # the true key is candidate 0; a tie is a miss (an untrained or constant model must score 0, not 1)
        rank_ok = totals[i][0] > max(totals[i][1:], default=float("-inf"))
        gen = generate(model, p.prompt, max_new_tokens=ANSWER_RESERVE, params=GREEDY, autocast_dtype=autocast_dtype,
                       decode=lambda ids: tokenizer.decode(ids, skip_special_tokens=True))
        found = _FIVE_DIGITS.search(gen.text)
        greedy_ok = bool(found and found.group(0) == p.key)
        cell = cells.setdefault((p.length, p.depth), {"length": p.length, "depth": p.depth, "trials": 0,
                                                      "rank_correct": 0, "greedy_correct": 0})
        cell["trials"] += 1
        cell["rank_correct"] += int(rank_ok)
        cell["greedy_correct"] += int(greedy_ok)
    table = []
    for cell in cells.values():
        table.append({**cell, "rank_accuracy": cell["rank_correct"] / cell["trials"],
                      "greedy_accuracy": cell["greedy_correct"] / cell["trials"]})
    n = sum(c["trials"] for c in table)
    n_candidates = 1 + (len(prompts[0].distractors) if prompts else 0)
    return {
        "method": "rank: true key vs distractors by total log-likelihood; greedy: exact 5-digit match of greedy output",
        "candidates": n_candidates,
        "chance_rank_accuracy": 1.0 / n_candidates,
        "rank_accuracy": sum(c["rank_correct"] for c in table) / n if n else 0.0,
        "greedy_accuracy": sum(c["greedy_correct"] for c in table) / n if n else 0.0,
        "cells": table,
    }


def long_context_report(model, tokenizer, docs: Sequence[Sequence[int]], *, lengths: Sequence[int],
                        depths: Sequence[float], trials: int, bucket_size: int, max_sequences: int, seed: int,
                        distractors: int = 4, batch_size: int = 4, bos_id: int = 0, eos_id: int = 1,
                        autocast_dtype=None) -> dict:
    """Both long-context metrics for one model: the dict stage 5 and stage 8 write into their reports.

    ``docs`` are token lists (text tokens, no specials), e.g. held-out documents or
    ``perplexity.val_shard_documents``. Perplexity by position is measured at the longest of ``lengths``;
    every length must fit the model (``check_length`` raises UserError otherwise).
    """
    for length in lengths:
        check_length(length, model.cfg.max_seq_len)
    longest = max(lengths)
    seqs = long_sequences(docs, longest + 1, max_sequences, bos_id=bos_id, eos_id=eos_id)
    curve = perplexity_by_position(model, seqs, bucket_size, batch_size, autocast_dtype)
    prompts = passkey_prompts(tokenizer, lengths, depths, trials, distractors, seed, bos_id)
    return {"position": curve.to_dict(), "passkey": evaluate_passkey(model, tokenizer, prompts, batch_size, autocast_dtype)}
