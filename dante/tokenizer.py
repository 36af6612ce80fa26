"""Stage 2: the Dante tokenizer — pre-tokenization regex, special tokens, byte-level BPE training.

Dante is a byte-level BPE (Hugging Face ``tokenizers``) built for Italian + English + code:

- **Vocabulary layout** (docs/DESIGN.md): ids 0..5 are ``SPECIAL_TOKENS``, then ``n_reserved``
  ``<|reserved_i|>`` ids, then the 256 byte symbols in byte order, then (when the preset pins accents) the pinned
  two-byte characters, then the learned merges in merge order. ``vocab_size`` is exact: training that
  cannot learn enough merges is refused rather than padded, so the model's embedding size is the config.
- **No unknown tokens**: every byte is in the vocabulary, so any text encodes; SentencePiece-style
  ``byte_fallback`` is not needed (and would add 256 duplicate ids).
- **Pre-tokenization** (a preset of ``dante/pretokenizers.py``, ``dante`` by default): its regexes, each
  a ``Split`` applied in sequence, followed by a ``ByteLevel(use_regex=False)``. Order and flag matter (tokenizers issue #1369): with ByteLevel first
  the regex would run on byte-mapped text (``è`` becomes ``Ã¨`` and ``\\p{L}`` breaks), and with
  ``use_regex=True`` ByteLevel re-splits every piece with the GPT-2 regex (``l'intelligenza`` back into
  ``l`` ``'`` ``intelligenza``). ``train_tokenizer`` pre-tokenizes its training text with the very
  pre-tokenizer object it saves, so training and serving cannot diverge (tests/test_tokenizer.py checks
  the saved file).
- **Pinned characters** (``PINNED_CHARS``: the Latin-1 letters à è é ì ò ù ... plus « » °): each is one
  token in every context, by construction rather than by frequency. Their two UTF-8 bytes get the first
  merge ranks of the model, so BPE always fuses them before anything else; during training every such
  byte pair is replaced by one private-use placeholder symbol, i.e. the trainer sees exactly the
  segmentation that serving produces after those first merges, and its learned merges are rewritten
  from placeholders back to the byte pairs. The result is the BPE the trainer would have learned had
  it started with the pinned tokens in its alphabet. (A lead byte C2/C3 followed by its continuation
  byte is always that one character in valid UTF-8, so the forced merge never fires on anything else.)
- **Special tokens never come from plain text**: ``load_tokenizer`` returns a tokenizer with
  ``encode_special_tokens=True``, so a document or a user message that contains ``<|eot|>`` is encoded
  as ordinary characters; code that needs a special id inserts it structurally (``EOT_ID``). The saved
  ``tokenizer.json`` keeps the standard behaviour (specials recognized in text) for chat templates in
  ``transformers``; ``to_transformers(..., split_special_tokens=True)`` gives the safe mode there.

- **Preflight**: ``training_estimate`` / ``preflight_lines`` turn the sample size and the number of
  tokenizers into expected seconds and peak memory, from rates measured on the development machine (the
  figures and the commands that measured them are beside the constants).

Example::

    tok = train_tokenizer(texts, vocab_size=8192)        # Dante regex + pinned letters
    tok.save("tokenizer.json"); tok = load_tokenizer("tokenizer.json")
    ids = tok.encode("L'intelligenza artificiale c'è già.").ids
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterable, Iterator

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from dante.artifacts import stable_unit
from dante.corpus import iter_shard_texts
from dante.errors import UserError, problems_message
from dante.pretokenizers import (
    DANTE_PATTERN,  # noqa: F401  (re-exported: tests and tools import it from here)
    PreTokenizerSpec,
    llama_cpp_type_of,
    parse_spec,
    spec_from_saved,
)

# ---------------------------------------------------------------------------------------------------
# Special tokens (contract: docs/DESIGN.md "Special tokens")
# ---------------------------------------------------------------------------------------------------

SPECIAL_TOKENS: list[str] = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot|>",
    "<|pad|>",
]
BOS_ID, EOS_ID, START_HEADER_ID, END_HEADER_ID, EOT_ID, PAD_ID = range(len(SPECIAL_TOKENS))
BOS, EOS, START_HEADER, END_HEADER, EOT, PAD = SPECIAL_TOKENS


def reserved_tokens(n_reserved: int) -> list[str]:
    return [f"<|reserved_{i}|>" for i in range(n_reserved)]


def all_special_tokens(n_reserved: int) -> list[str]:
    """Named specials then reserved ones: their list index is their id."""
    return SPECIAL_TOKENS + reserved_tokens(n_reserved)


# ---------------------------------------------------------------------------------------------------
# Pre-tokenization
# ---------------------------------------------------------------------------------------------------

# The presets (dante, dante-elision, llama3, qwen2, gpt2, minerva) and their llama.cpp equivalents live in
# dante/pretokenizers.py. These two are the original Hugging Face forms of GPT-2's and Llama 3's regexes,
# which the reference tokenizers of the fertility report use (tiktoken's Llama 3 ranks need Meta's regex).
GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def as_spec(pretokenizer: str | PreTokenizerSpec) -> PreTokenizerSpec:
    """A spec string ("dante", "llama3+digits1") or a spec -> PreTokenizerSpec (UserError if unknown)."""
    return pretokenizer if isinstance(pretokenizer, PreTokenizerSpec) else parse_spec(pretokenizer)


def build_pre_tokenizer(pretokenizer: str | PreTokenizerSpec) -> pre_tokenizers.PreTokenizer:
    """Split on the spec's regexes in sequence (on the original text), THEN map each piece to byte symbols."""
    splits = [pre_tokenizers.Split(Regex(p), behavior="isolated", invert=False) for p in as_spec(pretokenizer).patterns]
    return pre_tokenizers.Sequence(
        splits + [pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)]
    )


# ---------------------------------------------------------------------------------------------------
# Byte alphabet and pinned characters
# ---------------------------------------------------------------------------------------------------


def byte_symbols() -> list[str]:
    """The 256 byte-level symbols, index = byte value (the GPT-2 mapping that ByteLevel uses):
    printable Latin-1 bytes map to themselves, the others to U+0100 onwards in byte order."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    out, shifted = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + shifted)
            shifted += 1
    return [out[b] for b in range(256)]


#: Characters guaranteed to be ONE token: every letter of Latin-1 Supplement (U+00C0-U+00FF without
#: the signs × ÷), which covers Italian à è é ì í î ò ó ù ú and their capitals, ç ñ ß ä ö ü ë ï â ê ô û
#: ã õ å æ ø ý þ ð ÿ; plus the Italian quotation marks « » and the degree sign (°C, 3°).
PINNED_CHARS: list[str] = [chr(c) for c in range(0xC0, 0x100) if c not in (0xD7, 0xF7)] + ["«", "»", "°"]

_PLACEHOLDER_BASE = 0xE000  # private-use code points: never produced by ByteLevel (its symbols are < U+0144)


class _Pinning:
    """Byte-symbol pairs of the pinned characters and their single-symbol training placeholders."""

    def __init__(self, chars: Iterable[str]):
        self.chars = tuple(chars)
        symbols = byte_symbols()
        self.pairs = ["".join(symbols[b] for b in c.encode("utf-8")) for c in self.chars]
        for c, pair in zip(self.chars, self.pairs):
            if len(pair) != 2:
                raise UserError(f"pinned character {c!r} is {len(pair)} bytes in UTF-8; only 2-byte characters can be pinned")
        self.placeholders = [chr(_PLACEHOLDER_BASE + i) for i in range(len(self.chars))]
        self._restore_table = {ord(ph): pair for ph, pair in zip(self.placeholders, self.pairs)}

    def substituter(self):
        """str -> str replacing every pinned byte pair by its placeholder (pairs never overlap: see module doc)."""
        table = dict(zip(self.pairs, self.placeholders))
        if not table:
            return lambda s: s
        rx = re.compile("|".join(re.escape(p) for p in table))
        return lambda s: rx.sub(lambda m: table[m.group(0)], s)

    def restore(self, s: str) -> str:
        return s.translate(self._restore_table)


# ---------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------


_TRAIN_BATCH_DOCS = 256


def n_fixed_tokens(n_reserved: int, n_pinned: int) -> int:
    """Ids before the first learned merge: specials + reserved + 256 bytes + pinned characters."""
    return len(SPECIAL_TOKENS) + n_reserved + 256 + n_pinned


def default_pinned(pretokenizer: str | PreTokenizerSpec) -> list[str]:
    """PINNED_CHARS when the spec pins accents (dante, dante-elision, or +pinned), else none."""
    return list(PINNED_CHARS) if as_spec(pretokenizer).pinned else []


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    pretokenizer: str | PreTokenizerSpec = "dante",
    n_reserved: int = 248,
    min_frequency: int = 2,
    pinned_chars: list[str] | None = None,
) -> Tokenizer:
    """Train a byte-level BPE of exactly ``vocab_size`` ids on ``texts`` (streamed once).

    ``pinned_chars`` defaults to ``default_pinned(pretokenizer)``. Raises UserError when the text is too
    small to learn ``vocab_size`` tokens with ``min_frequency``.
    """
    pinning = _Pinning(default_pinned(pretokenizer) if pinned_chars is None else pinned_chars)
    specials = all_special_tokens(n_reserved)
    n_merges = vocab_size - n_fixed_tokens(n_reserved, len(pinning.chars))
    if n_merges <= 0:
        raise UserError(
            f"vocab_size={vocab_size} leaves no room for merges: {len(specials)} special/reserved + 256 bytes "
            f"+ {len(pinning.chars)} pinned characters already take {n_fixed_tokens(n_reserved, len(pinning.chars))}"
        )
    pre = build_pre_tokenizer(pretokenizer)
    substitute = pinning.substituter()

    def trainer_input() -> Iterator[list[str]]:
        # One string per document: its byte-mapped pieces joined by a real space (which no byte symbol
        # or placeholder is), pinned pairs already fused. The trainer splits on that space only.
        # Yielded in batches: one string per next() made training ~50x slower (1 MB of Italian: 77 s
        # vs 1.6 s, measured), the trainer's threads contending with this generator for the GIL.
        batch: list[str] = []
        for text in texts:
            batch.append(substitute(" ".join(piece for piece, _ in pre.pre_tokenize_str(text))))
            if len(batch) == _TRAIN_BATCH_DOCS:
                yield batch
                batch = []
        if batch:
            yield batch

    symbols = byte_symbols()
    trainer_tok = Tokenizer(models.BPE())
    trainer_tok.pre_tokenizer = pre_tokenizers.Split(" ", behavior="removed")
    trainer = trainers.BpeTrainer(
        vocab_size=256 + len(pinning.chars) + n_merges,
        min_frequency=min_frequency,
        show_progress=False,
        initial_alphabet=symbols + pinning.placeholders,
        special_tokens=[],
    )
    trainer_tok.train_from_iterator(trainer_input(), trainer=trainer)
    learned = json.loads(trainer_tok.to_str())["model"]["merges"]
    learned = [tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1)) for m in learned]
    if len(learned) < n_merges:
        raise UserError(
            f"the training sample only supports {len(learned)} merges with min_frequency={min_frequency}, "
            f"but vocab_size={vocab_size} needs {n_merges}. HINT: raise tokenizer.sample_chars, lower "
            f"tokenizer.min_frequency, or lower tokenizer.vocab_size."
        )
    merges = [(p[0], p[1]) for p in pinning.pairs]  # ranks 0..k-1: fused before anything else
    merges += [(pinning.restore(a), pinning.restore(b)) for a, b in learned[:n_merges]]
    tokens = specials + symbols + pinning.pairs + [a + b for a, b in merges[len(pinning.pairs):]]
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens):  # a learned token equal to a special/pinned string: a bug, not user input
        raise RuntimeError("tokenizer vocabulary has duplicate strings; refusing to build an ambiguous tokenizer")

    # ignore_merges: a piece that is itself a token is taken whole (llama3, as llama.cpp's llama-bpe does)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=as_spec(pretokenizer).ignore_merges))
    tok.pre_tokenizer = pre
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    return tok


# ---------------------------------------------------------------------------------------------------
# Loading and facts
# ---------------------------------------------------------------------------------------------------


def load_tokenizer(path: str | Path, plain_text: bool = True) -> Tokenizer:
    """Load a Dante ``tokenizer.json``; with ``plain_text`` special-token strings in text stay text.

    Raises UserError naming the file and the command that rebuilds it when the file is missing, cannot be
    parsed (truncated by a full disk or a copy cut short, garbled bytes) or is not a Dante tokenizer
    (specials not at ids 0..5).
    """
    p = Path(path)
    rebuild = "HINT: rebuild it with `python 2_train_tokenizer.py --config configs/<profile>/tokenizer.yaml --force`"
    if not p.is_file():
        raise UserError(f"tokenizer not found: {p}. HINT: run `python 2_train_tokenizer.py --config ...` first.")
    try:
        tok = Tokenizer.from_file(str(p))
    except Exception as e:  # tokenizers raises a bare Exception on malformed JSON (a truncated file included)
        reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise UserError(f"{p} is not a readable tokenizer.json ({p.stat().st_size:,} bytes; truncated or damaged: "
                        f"{reason}).\n  {rebuild} (stages 3 onwards must then be redone too: their ids come from it).") from None
    wrong = [t for i, t in enumerate(SPECIAL_TOKENS) if tok.token_to_id(t) != i]
    if wrong:
        raise UserError(f"{p} is not a Dante tokenizer: special tokens {wrong} are not at their ids (docs/DESIGN.md).\n"
                        f"  {rebuild}.")
    tok.encode_special_tokens = plain_text
    return tok


def saved_pretokenizer(state: dict) -> tuple[tuple[str, ...], bool, bool]:
    """(regex list, ignore_merges, accents pinned) of a tokenizer.json's parsed state."""
    pre = state.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre])
    patterns = tuple((p.get("pattern") or {}).get("Regex", "") for p in steps if p.get("type") == "Split")
    merges = state["model"].get("merges") or []
    first = merges[0] if merges else None
    first = "".join(first if isinstance(first, list) else str(first).split(" ", 1)) if first else ""
    pinned = first == "".join(byte_symbols()[b] for b in PINNED_CHARS[0].encode("utf-8"))
    return patterns, bool(state["model"].get("ignore_merges")), pinned


def tokenizer_facts(tok: Tokenizer) -> dict:
    """What downstream stages check: sizes, max id, special ids, pre-tokenization (spec name, regex list,
    the llama.cpp type that carries it exactly), pinned letters, merge count."""
    vocab = tok.get_vocab(with_added_tokens=True)
    added = tok.get_added_tokens_decoder()
    state = json.loads(tok.to_str())
    patterns, ignore_merges, pinned = saved_pretokenizer(state)
    kind = spec_from_saved(patterns, ignore_merges, pinned)
    return {
        "vocab_size": tok.get_vocab_size(with_added_tokens=True),
        "max_id": max(vocab.values()),
        "special_ids": {t: tok.token_to_id(t) for t in SPECIAL_TOKENS},
        "n_reserved": sum(1 for t in added.values() if t.content.startswith("<|reserved_")),
        "pretokenizer": kind,
        "pretokenizer_patterns": list(patterns),
        "ignore_merges": ignore_merges,
        "pinned_accents": pinned,
        "llama_cpp_pre": llama_cpp_type_of(patterns, ignore_merges),
        "n_merges": len(state["model"]["merges"]),
    }


def to_transformers(tok: Tokenizer | str | Path, split_special_tokens: bool = False, model_max_length: int | None = None):
    """A ``transformers`` fast tokenizer over the same tokenizer (bos/eos/pad set, no added BOS).

    ``split_special_tokens=True`` is the safe mode for untrusted text (what stage 6 uses for message
    content); the default recognizes specials in text, as chat templates need.
    """
    from transformers import PreTrainedTokenizerFast  # heavy import, only where needed

    if not isinstance(tok, Tokenizer):
        tok = load_tokenizer(tok)
    backend = Tokenizer.from_str(tok.to_str())  # a copy: transformers must not change ours
    backend.encode_special_tokens = False  # transformers controls this through split_special_tokens
    kwargs = {"model_max_length": model_max_length} if model_max_length else {}
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        clean_up_tokenization_spaces=False,
        split_special_tokens=split_special_tokens,
        **kwargs,
    )


# ---------------------------------------------------------------------------------------------------
# The training sample: char-balanced by language, deterministic, streamed from stage 1
# ---------------------------------------------------------------------------------------------------

#: Share of a source's documents read at least (when its target is smaller): the sample is drawn from
#: >= 1/16 of its shards, visited in a seeded order, so it spans the source without reading a whole
#: 100B-token corpus for a 1 GB sample.
MIN_KEEP_RATE = 1 / 16
#: A source may fall short of its target by this fraction before it is refused: a document that crosses the
#: target is cut at a space, and when it is the source's last one the few characters after the cut are
#: missing (6 of 2.2M for a gettext source at 99% of its text, measured).
SHORT_SOURCE_SLACK = 0.005


def plan_sample(corpus_sources: dict, language_mix: dict, sample_chars: int) -> dict:
    """Target characters per language (``language_mix`` shares of ``sample_chars``) and per source (the
    language's target split in proportion to each source's characters in stage 1).

    A language with a share but no text is refused here. A source whose stage-1 manifest already counts
    fewer characters than its target is found by ``sample_shortfalls`` (before training starts), and one
    that runs out while drawing by ``iter_training_sample``; the plan records the largest ``sample_chars``
    the corpus can give for their messages.
    """
    total_share = sum(language_mix.values())
    plan, problems = {}, []
    for lang, share in sorted(language_mix.items()):
        if share <= 0:
            continue
        names = sorted(n for n, s in corpus_sources.items() if s.get("lang") == lang)
        available = {n: int(corpus_sources[n].get("chars", 0)) for n in names}
        total = sum(available.values())
        if total <= 0:
            problems.append(
                f"tokenizer.language_mix gives {lang!r} a share of {share}, but stage 1 produced no {lang!r} text "
                f"(sources: {names or 'none'})"
            )
            continue
        target = int(round(sample_chars * share / total_share))
        sources, assigned = {}, 0
        for i, n in enumerate(names):  # proportional shares; the last source takes the rounding remainder
            t = target - assigned if i == len(names) - 1 else int(round(target * available[n] / total))
            assigned += t
            sources[n] = {"target_chars": t, "available_chars": available[n]}
        plan[lang] = {"target_chars": target, "available_chars": total, "share": share / total_share, "sources": sources}
    if problems:
        raise UserError(
            problems_message("cannot draw the tokenizer training sample", problems)
            + "\n  HINT: add a source of that language to the corpus config, or set its share to 0 in tokenizer.language_mix."
        )
    largest = min(int(p["available_chars"] / p["share"]) for p in plan.values()) if plan else 0
    for p in plan.values():
        p["largest_sample_chars"] = largest
    return plan


def sample_shortfalls(plan: dict) -> list[str]:
    """The sources whose stage-1 character count (manifest) is below their share of the sample: a problem
    each, found from the manifest alone, so the stage refuses before it reads or writes anything."""
    out = []
    for lang, p in plan.items():
        short = [n for n, sp in p["sources"].items() if sp["available_chars"] < (1 - SHORT_SOURCE_SLACK) * sp["target_chars"]]
        if short:  # targets are proportional to size, so a language falls short with all its sources: one line
            out.append(f"cannot draw the tokenizer training sample: {lang!r} gets {p['share']:.0%} of tokenizer.sample_chars, "
                       f"i.e. {p['target_chars']:,} characters, but stage 1 holds {p['available_chars']:,} (sources "
                       f"{', '.join(short)}). HINT: lower tokenizer.sample_chars to at most {p['largest_sample_chars']:,}, "
                       f"add {lang!r} text to the corpus, or lower its share in tokenizer.language_mix.")
    return out


# ---------------------------------------------------------------------------------------------------
# Preflight (stage 2 --dry-run): how long and how much memory
# ---------------------------------------------------------------------------------------------------

#: Sample characters per second of one tokenizer (drawing the sample from the stage-1 shards included), the
#: slowest of the four tokenizers of the tiny profile on the 2-core development machine (shared with other
#: jobs, 45% of its CPU), 8192 ids, 2M chars: 5.7, 4.5, 8.4, 7.9 s, i.e. 238K-444K chars/s, measured with
#:     python 1_download_corpus.py --config configs/tiny/corpus.yaml --set run.root=/tmp/m
#:     /usr/bin/time -v python 2_train_tokenizer.py --config configs/tiny/tokenizer.yaml --set run.root=/tmp/m
#: (each tokenizer prints "<key>: ..., 2,000,000 sample chars, N s"). Conservative for larger samples: the
#: merge phase costs about the same at any size (train_tokenizer alone, llama3, 8192 ids: 294K chars/s on
#: 0.5M chars, 319K on 2M, 555K on 5M), and more cores speed up the pair counting.
TRAIN_CHARS_PER_SEC = 240_000
#: The rest of stage 2 in that measurement (imports, the fertility report of 4 tokenizers and 2 references
#: over the tiny held-out files): 62 s of wall time minus 26.5 s of training.
REPORT_SECONDS = 36
#: Peak resident memory of one training per sample character, above the process: ``ru_maxrss`` around
#: ``train_tokenizer`` on the data/sample text (llama3, 8192 ids) was 55 B/char on 0.5M chars, 28 on 2M,
#: 17 on 5M (dante and qwen2 on 2M: 25, 33). The trainer's word counts grow slower than the text (fewer new
#: words per character), so the figure at 2M is an upper bound for larger samples.
TRAIN_BYTES_PER_CHAR = 30
#: The stage process without the trainer: the tiny profile peaked at 185 MB (``/usr/bin/time -v`` above),
#: of which 2M chars x ~27 B/char is the trainer. Tokenizers train one after another, so the peak does not
#: grow with their number.
STAGE_BASE_BYTES = 130 << 20


def training_estimate(sample_chars: int, n_tokenizers: int) -> dict:
    """Expected seconds and peak bytes of stage 2 for ``n_tokenizers`` trainings on ``sample_chars`` each,
    from the measured rates above (the figures ``2_train_tokenizer.py --dry-run`` prints)."""
    train_s = n_tokenizers * sample_chars / TRAIN_CHARS_PER_SEC
    return {"train_seconds": train_s, "seconds": train_s + REPORT_SECONDS,
            "peak_bytes": STAGE_BASE_BYTES + TRAIN_BYTES_PER_CHAR * sample_chars}


def preflight_lines(sample_chars: int, plan: dict, n_tokenizers: int) -> list[str]:
    """What stage 2 will cost, for --dry-run: the sample (per language, against what stage 1 holds), the
    expected time and the peak memory (``training_estimate``), each with the figures it comes from."""
    est = training_estimate(sample_chars, n_tokenizers)
    s = est["seconds"]
    took = f"{s:.0f} s" if s < 120 else f"{s / 60:.0f} min" if s < 7200 else f"{s / 3600:.1f} h"
    return [
        f"sample: {sample_chars:,} chars per tokenizer (the same sample for all {n_tokenizers}): " + ", ".join(
            f"{lang} {p['target_chars']:,} of {p['available_chars']:,} in 01_corpus" for lang, p in plan.items()),
        f"expected time: ~{took} = {n_tokenizers} tokenizer(s) x {sample_chars:,} chars / {TRAIN_CHARS_PER_SEC:,} "
        f"chars/s + ~{REPORT_SECONDS} s report (rates measured on 2 shared cores: dante/tokenizer.py)",
        f"memory: ~{est['peak_bytes'] / 2**30:.2f} GiB peak = {STAGE_BASE_BYTES >> 20} MiB + {TRAIN_BYTES_PER_CHAR} B "
        f"per sample char (one training at a time; an upper bound above 2M chars)",
    ]


def _short_source(source: str, lang: str, got: int, plan: dict) -> UserError:
    p = plan[lang]
    sp = p["sources"][source]
    return UserError(
        f"cannot draw the tokenizer training sample: source {source!r} holds {got:,} characters, but its share is "
        f"{sp['target_chars']:,} ({lang!r} gets {p['share']:.0%} of tokenizer.sample_chars, i.e. {p['target_chars']:,}, "
        f"split across its sources by size; stage 1 holds {p['available_chars']:,} {lang!r} characters).\n"
        f"  HINT: lower tokenizer.sample_chars to at most {p['largest_sample_chars']:,}, add {lang!r} text to the corpus, "
        "or lower its share in tokenizer.language_mix."
    )


def iter_training_sample(files, plan: dict, seed: int, stats: dict) -> Iterator[str]:
    """Documents (a source's last one cut at a space) until every source reaches its target; fills ``stats``
    with target vs actual characters per language and per source.

    ``files`` are ``dante.corpus.CorpusFile`` s. Each source is drawn on its own, so its share does not depend
    on the order in which shards or sources are visited. A document is kept when its seeded hash falls under
    the source's keep rate (1.25x its share of the source, at least ``MIN_KEEP_RATE``), so the same config
    always draws the same sample, in any environment; if that pass falls short, a second pass takes the
    documents the first one skipped, in the same order. A source that still falls short is a UserError.
    """
    for lang, p in plan.items():
        st = stats.setdefault(lang, {"target_chars": p["target_chars"], "chars": 0, "docs": 0, "by_source": {}})
        for source, sp in p["sources"].items():
            target = sp["target_chars"]
            # 1.25x over the exact rate: a Bernoulli draw at the exact rate falls short about half the time
            # (4% short for English on the sample); the surplus is cut off at the target.
            rate = min(1.0, max(1.25 * target / max(sp["available_chars"], 1), MIN_KEEP_RATE))
            mine = sorted((f for f in files if f.source == source), key=lambda f: stable_unit(seed, "shard", f.source, f.path.name))
            ss = st["by_source"].setdefault(source, {"target_chars": target, "available_chars": sp["available_chars"],
                                                     "chars": 0, "docs": 0})
            for second_pass in (False, True):
                if ss["chars"] >= target or (second_pass and rate >= 1.0):
                    break
                for f in mine:
                    if ss["chars"] >= target:
                        break
                    for line_no, text in iter_shard_texts(f.path):
                        if ss["chars"] >= target:
                            break
                        if (stable_unit(seed, "sample", f.source, f.path.name, line_no) < rate) == second_pass:
                            continue
                        room = target - ss["chars"]
                        if len(text) > room:
                            cut = max(text.rfind(" ", 0, room), text.rfind("\n", 0, room))
                            text = text[: cut if cut > 0 else room]
                        for d in (st, ss):
                            d["chars"] += len(text)
                            d["docs"] += 1
                        yield text
            if ss["chars"] < (1 - SHORT_SOURCE_SLACK) * target:
                raise _short_source(source, lang, ss["chars"], plan)
