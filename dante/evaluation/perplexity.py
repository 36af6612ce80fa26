"""Perplexity and bits per byte on held-out text, with sliding windows at the model's context length.

Perplexity depends on the tokenizer (a tokenizer with longer tokens has fewer, harder predictions), so
the number that compares across tokenizers and models is **bits per byte**:

    bpb = total NLL in nats / (ln 2 x total UTF-8 bytes of the scored text)

Both are computed from the same scored tokens. The bytes are those of exactly the tokens that were
scored: each document is ``[BOS] + tokens(text)``, every text token is predicted once, and the byte
count is the sum of the byte lengths of those tokens (``token_byte_lengths``: for a byte-level BPE every
vocabulary entry is a fixed byte string; special tokens count 0 bytes and are never scored). For a
whole document this equals ``len(text.encode("utf-8"))`` of the (tokenizer-normalized) text, which a
test checks; for a document cut by the token cap it is the bytes of the part that was scored.

Sliding windows (``window_requests``): a document longer than the context L is scored in windows of at
most L inputs whose ends advance by ``stride`` tokens: window k ends at e_k = min(L + k*stride, n) and
starts at max(0, e_k - L). It scores only the targets after the previous window's end, so every token is
scored exactly once, each with at least L - stride tokens of context (except the first L), and the last
window is right-aligned so its tokens get the full context. stride = L gives lm-eval's
``loglikelihood_rolling`` windows; stride < L buys context with compute (stride L/2 costs 2x).

Sources: raw held-out documents per language (``data/sample/heldout/<lang>.jsonl.gz``, ``{"text"}``
lines), tokenized on the fly; and stage 3's validation shards per tier (``dante.evaluation.stage``
splits their token stream into documents at the special tokens, which are not scored).

Example::

    texts = load_texts("data/sample/heldout/it.jsonl.gz")   # dante.artifacts
    result = perplexity_of_texts(model, tokenizer, texts, stride=256, batch_size=8)
    print(result.ppl, result.bpb)
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from dante.evaluation.scoring import ScoreRequest, score_requests
from dante.shards import open_split
from dante.tokenizer import byte_symbols

LN2 = math.log(2.0)


@dataclass
class PerplexityResult:
    nll: float
    """Total negative log-likelihood of the scored tokens, in nats."""
    tokens: int
    """Scored tokens."""
    bytes: int
    """UTF-8 bytes of exactly the scored tokens."""
    docs: int
    """Documents (fully or partly) scored."""
    context_len: int
    """Window length used (the model's context)."""
    stride: int
    """Window stride used."""

    @property
    def ppl(self) -> float:
        return math.exp(self.nll / self.tokens)

    @property
    def bpb(self) -> float:
        return bits_per_byte(self.nll, self.bytes)

    @property
    def nll_per_token(self) -> float:
        return self.nll / self.tokens

    def to_dict(self) -> dict:
        return {**asdict(self), "ppl": self.ppl, "bpb": self.bpb, "nll_per_token": self.nll_per_token}


def bits_per_byte(nll_nats: float, n_bytes: int) -> float:
    """Total NLL in nats over the UTF-8 bytes it covers, in bits per byte."""
    if n_bytes <= 0:
        raise ValueError("bits per byte of an empty text is undefined (0 bytes scored)")
    return nll_nats / (LN2 * n_bytes)


# ---------------------------------------------------------------------------------------------------
# Bytes per token
# ---------------------------------------------------------------------------------------------------


def token_byte_lengths(tokenizer) -> np.ndarray:
    """(vocab,) int64: UTF-8 bytes that each token id stands for; 0 for special/added tokens.

    Raises ValueError for a tokenizer that is not byte-level (a token string outside the byte alphabet):
    bits per byte then has no exact per-token byte count.
    """
    to_byte = {sym: b for b, sym in enumerate(byte_symbols())}
    specials = {tok.content for tok in tokenizer.get_added_tokens_decoder().values()}
    lengths = np.zeros(tokenizer.get_vocab_size(), dtype=np.int64)
    for piece, idx in tokenizer.get_vocab().items():
        if piece in specials:
            continue
        if any(ch not in to_byte for ch in piece):
            raise ValueError(f"token {idx} {piece!r} is not a byte-level BPE token: bits per byte needs a byte-level tokenizer")
        lengths[idx] = len(piece)
    return lengths


# ---------------------------------------------------------------------------------------------------
# Windows and scoring
# ---------------------------------------------------------------------------------------------------


def window_requests(tokens: Sequence[int], context_len: int, stride: int) -> list[ScoreRequest]:
    """Sliding-window requests scoring tokens[1:] of one sequence exactly once (tokens[0] is BOS).

    Window k covers input positions [b_k, e_k) and targets (e_{k-1}, e_k], with e_k = min(L + k*stride, n),
    b_k = max(0, e_k - L), n = len(tokens) - 1 targets. Returned requests hold tokens[b_k : e_k + 1].
    """
    if context_len <= 0 or not 0 < stride <= context_len:
        raise ValueError(f"need 0 < stride <= context_len, got stride={stride}, context_len={context_len}")
    n = len(tokens) - 1
    requests, prev_end, k = [], 0, 0
    while prev_end < n:
        end = min(context_len + k * stride, n)
        begin = max(0, end - context_len)
        requests.append(ScoreRequest(tokens=tokens[begin:end + 1], score_from=prev_end + 1 - begin))
        prev_end, k = end, k + 1
    return requests


def perplexity_of_token_docs(model, docs: Iterable[Sequence[int]], byte_lengths: np.ndarray, *, bos_id: int,
                             stride: int = 0, batch_size: int = 8, max_tokens: int = 0,
                             autocast_dtype=None) -> PerplexityResult:
    """Perplexity / bpb of documents given as token lists (text tokens only, no BOS/EOS).

    Each document is scored as ``[BOS] + doc`` in sliding windows of the model's context. ``stride`` 0
    means half the context. ``max_tokens`` > 0 stops after that many scored tokens (the last document is
    cut; its bytes are those of its scored part). Raises ValueError when nothing is scored.
    """
    context_len = model.cfg.max_seq_len
    stride = stride or max(1, context_len // 2)
    requests, scored_bytes, n_tokens, n_docs = [], 0, 0, 0
    for doc in docs:
        doc = list(doc)
        if max_tokens and n_tokens + len(doc) > max_tokens:
            doc = doc[: max_tokens - n_tokens]
        if not doc:
            if max_tokens and n_tokens >= max_tokens:
                break
            continue
        requests += window_requests([bos_id] + doc, context_len, stride)
        scored_bytes += int(byte_lengths[np.asarray(doc)].sum())
        n_tokens += len(doc)
        n_docs += 1
    if n_tokens == 0:
        raise ValueError("empty evaluation set: no token to score")
    scores = score_requests(model, requests, batch_size, autocast_dtype=autocast_dtype)
    nll = -float(sum(s.logprobs.sum() for s in scores))
    assert sum(len(s.logprobs) for s in scores) == n_tokens  # every token exactly once (internal invariant)
    return PerplexityResult(nll=nll, tokens=n_tokens, bytes=scored_bytes, docs=n_docs,
                            context_len=context_len, stride=stride)


def encode_texts(tokenizer, texts: Iterable[str]) -> list[list[int]]:
    """Text tokens of each document (no special tokens added, whatever the tokenizer's post-processor)."""
    return [enc.ids for enc in tokenizer.encode_batch(list(texts), add_special_tokens=False)]


def perplexity_of_texts(model, tokenizer, texts: Sequence[str], *, bos_id: int = 0, stride: int = 0,
                        batch_size: int = 8, max_tokens: int = 0, autocast_dtype=None) -> PerplexityResult:
    """Perplexity / bpb of raw text documents, tokenized on the fly."""
    return perplexity_of_token_docs(model, encode_texts(tokenizer, texts), token_byte_lengths(tokenizer),
                                    bos_id=bos_id, stride=stride, batch_size=batch_size,
                                    max_tokens=max_tokens, autocast_dtype=autocast_dtype)


# ---------------------------------------------------------------------------------------------------
# Stage 3 validation shards
# ---------------------------------------------------------------------------------------------------

#: Tokens read from a shard at a time: a capped evaluation touches only the start of a large memmap.
SHARD_READ_CHUNK = 1 << 20


def iter_shard_documents(shards: Iterable[np.ndarray], special_ids: Sequence[int],
                         chunk: int = SHARD_READ_CHUNK) -> Iterator[list[int]]:
    """Documents of consecutive shards' token streams: the maximal runs without a special token (BOS/EOS
    ...). A document that runs on into the next shard of the tier is joined, not cut in two."""
    specials = np.asarray(list(special_ids))
    carry: list[int] = []
    for tokens in shards:
        for start in range(0, len(tokens), chunk):
            part = np.asarray(tokens[start:start + chunk])
            prev = 0
            for cut in np.flatnonzero(np.isin(part, specials)):
                doc = carry + part[prev:cut].tolist()
                if doc:
                    yield doc
                carry, prev = [], cut + 1
            carry += part[prev:].tolist()
    if carry:
        yield carry


def split_special(tokens: np.ndarray, special_ids: Sequence[int]) -> list[list[int]]:
    """All documents of a token stream at once (``iter_shard_documents`` reads lazily)."""
    return list(iter_shard_documents([tokens], special_ids))


def val_shard_documents(shards_dir: str | Path, n_special: int = 6) -> dict[int, Iterator[list[int]]]:
    """{tier: lazy iterator over the documents of its validation shards} of a stage 3 folder (special ids
    are 0..n_special-1, docs/DESIGN.md). Stage 5 uses it for its long-context sequences too."""
    def docs(readers: list) -> Iterator[list[int]]:
        yield from iter_shard_documents((r.tokens for r in readers), range(n_special))

    # open_split: headers, sizes, stage 3's checksums and the id range checked (once per file version)
    return {tier: docs(readers) for tier, readers in open_split(shards_dir, "val").items()}
