"""Stage 3's fast encoder: a ``tiktoken`` encoding built from the stage-2 ``tokenizer.json``, used only
where it is proven to give the ids Hugging Face ``tokenizers`` gives.

Why: stage 3 is bound by the encoder (#15: ~110 core-hours of ``tokenizers`` for the reference corpus),
and tiktoken's BPE encodes the same byte-level vocabulary several times faster per core.

How the encoding is built (``build_tiktoken``): the one pre-tokenizer regex of the Dante tokenizer is
tiktoken's ``pat_str``; each vocabulary entry, mapped from GPT-2 byte symbols back to raw bytes, is a
mergeable token whose rank is its Dante id; the special/reserved tokens are tiktoken special tokens (never
matched in text: stage 3 encodes with none allowed, ``encode_plain``, as ``load_tokenizer``'s ``encode_special_tokens``
keeps them text). Ranks = ids reproduces BPE's merge order because Dante ids of learned tokens follow
merge order (docs/DESIGN.md, vocabulary layout). A tokenizer that breaks an assumption tiktoken relies on
is refused with the reason (``Unreproducible``): a normalizer, several regexes in sequence, a
non-byte-level model, non-special added tokens, tokens no merge produces, ids out of merge order, a regex
tiktoken cannot compile.

What the static checks cannot rule out (the two BPE algorithms differ in corner cases: tiktoken merges
any adjacent pair whose concatenation is a token, ``tokenizers`` only listed merges; and tiktoken takes a
piece that is a token whole, which ``tokenizers`` does only with ``ignore_merges``), ``prove_equal``
measures: both encoders on the run's own documents (held-out files of stage 2 and a sample of every
stage-1 source), and any difference refuses the fast path, naming the document and the first differing
position. The workers also check every document's token bytes add up to its UTF-8 length (a regex gap
would drop text) and re-encode such a document with ``tokenizers``.

Example::

    enc = build_tiktoken("runs/tiny/02_tokenizer/tokenizer.json")   # or Unreproducible(reason)
    problem = prove_equal(enc, load_tokenizer(path), texts)          # None: ids equal on every text
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from dante.tokenizer import byte_symbols


class Unreproducible(Exception):
    """The tokenizer cannot be expressed as a tiktoken encoding (the message says why)."""


def _check_model(state: dict) -> list[str]:
    problems = []
    if state.get("normalizer"):
        problems.append(f"it has a normalizer ({state['normalizer'].get('type')}); tiktoken applies none")
    model = state.get("model") or {}
    if model.get("type") != "BPE":
        problems.append(f"its model is {model.get('type')}, not BPE")
    for key in ("dropout", "unk_token", "continuing_subword_prefix", "end_of_word_suffix"):
        if model.get(key):
            problems.append(f"its BPE sets {key}={model[key]!r}")
    if model.get("byte_fallback"):
        problems.append("its BPE uses byte_fallback")
    non_special = [t["content"] for t in state.get("added_tokens") or [] if not t.get("special")]
    if non_special:
        problems.append(f"it has non-special added tokens ({non_special[:3]}), matched in text before BPE")
    return problems


def _pattern(state: dict) -> tuple[str | None, list[str]]:
    """The single Split regex of a Split(s) + ByteLevel(use_regex=False) pre-tokenizer, or the problems."""
    pre = state.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    splits = [s for s in steps if s.get("type") == "Split"]
    others = [s for s in steps if s.get("type") != "Split"]
    problems = []
    if len(splits) != 1:
        problems.append(f"its pre-tokenizer applies {len(splits)} split regexes in sequence; tiktoken applies exactly one")
    if len(others) != 1 or others[0].get("type") != "ByteLevel" or others[0].get("use_regex") \
            or others[0].get("add_prefix_space") or steps[-1] is not others[0]:
        kinds = [s.get("type") for s in steps]
        problems.append(f"its pre-tokenizer is {kinds}, not one Split then ByteLevel(use_regex=False, add_prefix_space=False)")
    if splits:
        sp = splits[0]
        if sp.get("behavior") != "Isolated" or sp.get("invert") or "Regex" not in (sp.get("pattern") or {}):
            problems.append(f"its Split is {sp.get('behavior')}/invert={sp.get('invert')} on "
                            f"{list((sp.get('pattern') or {}))}, not an isolated regex")
    return (splits[0]["pattern"].get("Regex") if not problems else None), problems


def build_tiktoken(tokenizer_json: str | Path):
    """A ``tiktoken.Encoding`` equal in construction to the tokenizer, or ``Unreproducible(reason)``."""
    try:
        import tiktoken
    except ImportError:
        raise Unreproducible("tiktoken is not installed") from None
    state = json.loads(Path(tokenizer_json).read_text(encoding="utf-8"))
    problems = _check_model(state)
    pattern, found = _pattern(state)
    problems += found
    if problems:
        raise Unreproducible("; ".join(problems))
    model = state["model"]
    specials = {t["content"]: int(t["id"]) for t in state.get("added_tokens") or []}
    to_byte = {sym: b for b, sym in enumerate(byte_symbols())}
    ranks: dict[bytes, int] = {}
    for token, i in model["vocab"].items():
        if token in specials:
            continue
        try:
            ranks[bytes(to_byte[c] for c in token)] = int(i)
        except KeyError:
            raise Unreproducible(f"vocabulary entry {token!r} (id {i}) is not made of byte-level symbols") from None
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise Unreproducible(f"{len(missing)} of the 256 single bytes have no token (e.g. byte {missing[0]})")
    vocab, last, produced = model["vocab"], -1, set()
    for n, m in enumerate(model.get("merges") or []):
        a, b = m if isinstance(m, list) else m.split(" ", 1)
        i = vocab.get(a + b)
        if i is None or i <= last:  # tiktoken merges by the rank of the result: ids must follow merge order
            raise Unreproducible(f"merge {n} ({a!r} + {b!r}) gives {'no token' if i is None else f'id {i}'}, "
                                 f"not an id above the previous merge's {last}")
        last = i
        produced.add(a + b)
    orphans = [t for t in vocab if t not in specials and len(t) > 1 and t not in produced]
    if orphans:
        raise Unreproducible(f"{len(orphans)} vocabulary entries no merge produces (e.g. {orphans[0]!r}); "
                             f"tiktoken would build them from any two halves")
    try:
        return tiktoken.Encoding(f"dante-{len(ranks) + len(specials)}", pat_str=pattern, mergeable_ranks=ranks,
                                 special_tokens=specials)
    except Exception as e:  # fancy-regex's compile error arrives as a plain ValueError
        raise Unreproducible(f"tiktoken cannot compile its regex ({type(e).__name__}: {str(e)[:200]})") from None


def token_byte_lengths(enc, n_ids: int) -> np.ndarray:
    """Bytes each id stands for (0 for special tokens): a document's ids must add up to its UTF-8 length."""
    out = np.zeros(n_ids, dtype=np.int64)
    for i in range(min(n_ids, enc.n_vocab)):
        try:
            out[i] = len(enc.decode_single_token_bytes(i))
        except KeyError:
            continue  # an id tiktoken does not know (a gap): never produced
    for s in enc.special_tokens_set:
        out[enc.encode_single_token(s)] = 0
    return out


def encode_plain(enc, text: str) -> np.ndarray:
    """Ids of ``text`` with special-token strings as plain text (= ``encode_ordinary``) as a uint32 array:
    one buffer from Rust instead of a list of Python ints (13% of stage 3's fast path, profiled)."""
    return enc.encode_to_numpy(text, allowed_special=set(), disallowed_special=())


def prove_equal(enc, tokenizer, texts: list[tuple[str, str]]) -> str | None:
    """None when tiktoken's ids equal ``tokenizer``'s on every (where, text); else the first difference."""
    ref = tokenizer.encode_batch_fast([t for _, t in texts], add_special_tokens=False)
    for (where, text), r in zip(texts, ref):
        fast = encode_plain(enc, text).tolist()
        if fast != r.ids:
            pos = next((i for i, (a, b) in enumerate(zip(fast, r.ids)) if a != b), min(len(fast), len(r.ids)))
            snippet = tokenizer.decode(r.ids[max(0, pos - 3):pos + 3])
            return (f"{where}: ids differ at token {pos} (tiktoken {fast[pos:pos + 3]} vs tokenizers "
                    f"{r.ids[pos:pos + 3]}, near {snippet!r})")
    return None
