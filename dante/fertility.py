"""Stage 2's fertility report: tokens per word and characters per token on held-out text.

Compares the run's tokenizer with its A/B baseline and the ``tokenizer.ab_presets`` (all trained on the
same sample at the same vocabulary size, each with another pre-tokenizer) and with reference tokenizers
read from their original files. For the trained ones it also counts per word class (``word_class``:
elisions, words with digits, accented words, other; a token belongs to the word of its first non-space
character) and states whether a GGUF can carry the tokenizer exactly. One loader per file kind, each
returning a ``TokenCounter``:

- ``hf_json``: a ``tokenizer.json``.
- ``gpt2_bpe``: GPT-2's ``encoder.json`` + ``vocab.bpe`` via ``tokenizers.ByteLevelBPETokenizer`` (its
  ByteLevel pre-tokenizer carries the GPT-2 regex).
- ``sentencepiece``: a SentencePiece ``.model`` (Mistral v1), through the ``sentencepiece`` library.
- ``tiktoken``: a tiktoken ranks file (Llama 3: "base64-token rank" lines), converted to a Hugging Face
  BPE without the ``tiktoken`` package: vocab = the ranks, merges = every split of each token into two
  ranked halves, ordered by the token's rank, ``ignore_merges=True`` (a piece that is itself a token
  is taken whole, as tiktoken does), and the Llama 3 split regex. tests/test_tokenizer.py checks it
  against a plain-Python loop of tiktoken's algorithm.

Words are whitespace-separated (``str.split``), the measure used in ../shared/DATA.md.

Example::

    report = fertility_report([("dante", dante), ("baseline", base)], load_heldout({"it": "it.jsonl.gz"}))
    write_report(report, Path("runs/tiny/02_tokenizer"))
"""

from __future__ import annotations

import base64
import binascii
import gzip
import json
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from tokenizers import ByteLevelBPETokenizer, Regex, Tokenizer, decoders, models, pre_tokenizers

from dante.artifacts import atomic_path, atomic_write_json, atomic_write_text
from dante.errors import UserError
from dante.report_format import markdown_table
from dante.tokenizer import LLAMA3_PATTERN, byte_symbols

LANGS = ("it", "en", "code")
_BATCH = 64


@dataclass
class TokenCounter:
    """Anything that turns texts into ids: ``encode(list[str]) -> list[list[int]]``; ``offsets`` (character
    spans of the tokens, for the per-word-class table) and ``gguf`` (whether a GGUF carries it) when known."""

    name: str
    kind: str
    vocab_size: int
    encode: Callable[[list[str]], list[list[int]]]
    offsets: Callable[[list[str]], list[list[tuple[int, int]]]] | None = None
    gguf: str | None = None


def hf_counter(name: str, kind: str, tok: Tokenizer, gguf: str | None = None) -> TokenCounter:
    tok.encode_special_tokens = True  # held-out text is plain text
    return TokenCounter(
        name, kind, tok.get_vocab_size(), lambda texts: [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)],
        offsets=lambda texts: [e.offsets for e in tok.encode_batch(texts, add_special_tokens=False)], gguf=gguf,
    )


def _need(path: str, what: str) -> Path:
    p = Path(path)
    if not path or not p.is_file():
        raise UserError(f"{what} not found: {path!r}. HINT: run `python tools/fetch_reference_tokenizers.py`, or fix the path.")
    return p


def load_hf_json(name: str, path: str) -> TokenCounter:
    p = _need(path, "tokenizer.json")
    try:
        return hf_counter(name, "hf_json", Tokenizer.from_file(str(p)))
    except Exception as e:  # tokenizers raises a bare Exception on malformed files
        raise UserError(f"{p}: not a valid tokenizer.json ({e})") from None


def load_gpt2_bpe(name: str, vocab_path: str, merges_path: str) -> TokenCounter:
    v, m = _need(vocab_path, "GPT-2 encoder.json"), _need(merges_path, "GPT-2 vocab.bpe (merges_path)")
    try:
        impl = ByteLevelBPETokenizer(str(v), str(m))
    except Exception as e:
        raise UserError(f"{v} + {m}: not a GPT-2 vocab/merges pair ({e})") from None
    # the wrapper's encode_batch returns Encodings; use its backend Tokenizer directly
    return hf_counter(name, "gpt2_bpe", impl._tokenizer)


def load_sentencepiece(name: str, path: str) -> TokenCounter:
    import sentencepiece as spm  # optional: only SentencePiece references need it

    p = _need(path, "SentencePiece model")
    sp = spm.SentencePieceProcessor()
    try:
        sp.Load(str(p))
    except (OSError, RuntimeError) as e:
        raise UserError(f"{p}: not a SentencePiece model ({e})") from None
    return TokenCounter(name, "sentencepiece", sp.GetPieceSize(), lambda texts: sp.Encode(texts, out_type=int))


def read_tiktoken_ranks(path: str | Path) -> dict[bytes, int]:
    p = _need(str(path), "tiktoken ranks file")
    ranks: dict[bytes, int] = {}
    for line_no, line in enumerate(p.read_text(encoding="ascii", errors="strict").splitlines(), 1):
        if not line.strip():
            continue
        try:
            token_b64, rank = line.split()
            ranks[base64.b64decode(token_b64, validate=True)] = int(rank)
        except (ValueError, binascii.Error):
            raise UserError(f"{p}:{line_no}: expected '<base64 token> <rank>', got {line[:60]!r}") from None
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise UserError(f"{p}: {len(missing)} single bytes have no rank (e.g. {missing[:4]}); not a byte-level ranks file")
    return ranks


def tiktoken_to_tokenizer(ranks: dict[bytes, int], pattern: str = LLAMA3_PATTERN) -> Tokenizer:
    """A Hugging Face tokenizer that encodes like tiktoken with ``ranks`` and split ``pattern``."""
    sym = byte_symbols()

    def as_symbols(b: bytes) -> str:
        return "".join(sym[x] for x in b)

    vocab = {as_symbols(b): r for b, r in ranks.items()}
    merges = []
    for token, _ in sorted(ranks.items(), key=lambda kv: kv[1]):
        halves = [(token[:i], token[i:]) for i in range(1, len(token)) if token[:i] in ranks and token[i:] in ranks]
        for left, right in sorted(halves, key=lambda lr: (ranks[lr[0]], ranks[lr[1]])):
            merges.append((as_symbols(left), as_symbols(right)))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    return tok


def load_tiktoken(name: str, path: str) -> TokenCounter:
    return hf_counter(name, "tiktoken", tiktoken_to_tokenizer(read_tiktoken_ranks(path)))


def load_reference(ref) -> TokenCounter:
    """A ``ReferenceTokenizerConfig`` -> TokenCounter (UserError naming the file if it is missing/bad)."""
    if ref.kind == "hf_json":
        return load_hf_json(ref.name, ref.path)
    if ref.kind == "gpt2_bpe":
        return load_gpt2_bpe(ref.name, ref.path, ref.merges_path)
    if ref.kind == "sentencepiece":
        return load_sentencepiece(ref.name, ref.path)
    if ref.kind == "tiktoken":
        return load_tiktoken(ref.name, ref.path)
    raise UserError(f"reference tokenizer {ref.name!r}: unknown kind {ref.kind!r}")


def missing_reference_files(ref) -> list[str]:
    """The files of ``ref`` that are not there ('' for an unset path)."""
    paths = [ref.path] + ([ref.merges_path] if ref.kind == "gpt2_bpe" else [])
    return [p for p in paths if not p or not Path(p).is_file()]


# ---------------------------------------------------------------------------------------------------
# Held-out text and measurement
# ---------------------------------------------------------------------------------------------------


def read_texts(path: str | Path) -> list[str]:
    """Documents of a ``.jsonl[.gz]`` file ({"text": ...} per line) or one ``.txt[.gz]`` document."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"held-out file not found: {p}. HINT: fix tokenizer.heldout in the config.")
    opener = gzip.open if p.suffix == ".gz" else open
    try:
        with opener(p, "rb") as f:
            raw = f.read()
        data = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{p}: not UTF-8 ({e.reason} at byte {e.start})") from None
    except (OSError, EOFError) as e:
        raise UserError(f"{p}: unreadable ({e})") from None
    if ".jsonl" not in p.name:
        return [data]
    texts = []
    for line_no, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        try:
            texts.append(json.loads(line)["text"])
        except (json.JSONDecodeError, KeyError, TypeError):
            raise UserError(f"{p}:{line_no}: expected a JSON object with a 'text' field") from None
    return texts


def load_heldout(paths: dict) -> dict[str, list[str]]:
    unknown = [k for k in paths if k not in LANGS]
    if unknown:
        raise UserError(f"tokenizer.heldout: unknown language(s) {unknown}; use {list(LANGS)}")
    return {lang: read_texts(paths[lang]) for lang in LANGS if lang in paths}


def measure(counter: TokenCounter, texts: list[str]) -> dict:
    tokens = 0
    for i in range(0, len(texts), _BATCH):
        tokens += sum(len(ids) for ids in counter.encode(texts[i:i + _BATCH]))
    words = sum(len(t.split()) for t in texts)
    chars = sum(len(t) for t in texts)
    return {
        "tokens": tokens,
        "words": words,
        "chars": chars,
        "tokens_per_word": tokens / max(words, 1),
        "chars_per_token": chars / max(tokens, 1),
    }


#: Word classes of the per-class table, in the order a word is assigned to the first that fits.
WORD_CLASSES = ("elisions", "digits", "accented", "other")
_ELISION = re.compile(r"[^\W\d_]['’][^\W\d_]")  # a letter, an apostrophe, a letter: l'uomo, dell’anima (don't in English)
_DIGIT = re.compile(r"\d")


def word_class(word: str) -> str:
    """elisions (an apostrophe between letters), digits (any digit), accented (a letter with a diacritic:
    its NFD form has a combining mark), else other."""
    if _ELISION.search(word):
        return "elisions"
    if _DIGIT.search(word):
        return "digits"
    if any(ch.isalpha() and len(unicodedata.normalize("NFD", ch)) > 1 for ch in word):
        return "accented"
    return "other"


def measure_word_classes(counter: TokenCounter, texts: list[str]) -> dict:
    """Tokens per whitespace word and characters per token, per word class. A token belongs to the word that
    holds its first non-space character (" intelligenza" to intelligenza); tokens of whitespace only belong
    to no word."""
    acc = {c: {"words": 0, "chars": 0, "tokens": 0} for c in WORD_CLASSES}
    for i in range(0, len(texts), _BATCH):
        batch = texts[i:i + _BATCH]
        for text, spans in zip(batch, counter.offsets(batch)):
            owner = np.full(len(text) + 1, -1, dtype=np.int64)  # char -> word index
            classes = []
            for k, m in enumerate(re.finditer(r"\S+", text)):
                owner[m.start():m.end()] = k
                c = word_class(m.group())
                classes.append(c)
                acc[c]["words"] += 1
                acc[c]["chars"] += m.end() - m.start()
            for start, end in spans:
                j = start
                while j < end and text[j].isspace():
                    j += 1
                if j < end and owner[j] >= 0:
                    acc[classes[owner[j]]]["tokens"] += 1
    return {c: a | {"tokens_per_word": a["tokens"] / max(a["words"], 1), "chars_per_token": a["chars"] / max(a["tokens"], 1)}
            for c, a in acc.items()}


def fertility_report(counters: list[TokenCounter], heldout: dict[str, list[str]], notes: list[str] | None = None,
                     dante: str = "dante", baseline: str = "baseline") -> dict:
    rows = []
    for c in counters:
        row = {"name": c.name, "kind": c.kind, "vocab_size": c.vocab_size, "gguf": c.gguf,
               "per_lang": {lang: measure(c, t) for lang, t in heldout.items()}}
        if c.offsets is not None:
            row["per_class"] = {lang: measure_word_classes(c, t) for lang, t in heldout.items()}
        rows.append(row)
    by_name = {r["name"]: r for r in rows}
    comparison, ab = {}, {}
    if dante in by_name and baseline in by_name:
        for lang in heldout:
            d, b = by_name[dante]["per_lang"][lang]["tokens"], by_name[baseline]["per_lang"][lang]["tokens"]
            comparison[lang] = {"dante_tokens": d, "baseline_tokens": b, "change": d / b - 1 if b else 0.0}
    if baseline in by_name:  # every trained tokenizer against the baseline, per language
        for r in rows:
            if "per_class" in r and r["name"] != baseline:
                ab[r["name"]] = {lang: r["per_lang"][lang]["tokens"] / by_name[baseline]["per_lang"][lang]["tokens"] - 1
                                 for lang in heldout if by_name[baseline]["per_lang"][lang]["tokens"]}
    return {"heldout_docs": {k: len(v) for k, v in heldout.items()}, "tokenizers": rows, "vs_baseline": comparison,
            "ab_vs_baseline": ab, "notes": list(notes or [])}


def summary_lines(report: dict, dante: str = "dante") -> list[str]:
    """The sentences the README quotes: Italian saving, English and code change vs the baseline, and
    Dante's Italian tokens against each reference."""
    out = []
    comp = report["vs_baseline"]
    if "it" in comp:
        c = comp["it"]
        out.append(f"Italian: Dante saves {-c['change']:.2%} tokens vs the A/B baseline "
                   f"({c['dante_tokens']:,} vs {c['baseline_tokens']:,}; negative = more tokens).")
    for lang, label in (("en", "English"), ("code", "Code")):
        if lang in comp:
            c = comp[lang]
            out.append(f"{label}: {c['change']:+.2%} tokens vs the A/B baseline ({c['dante_tokens']:,} vs {c['baseline_tokens']:,}).")
    rows = {r["name"]: r for r in report["tokenizers"]}
    if dante in rows and "it" in rows[dante]["per_lang"]:
        mine = rows[dante]["per_lang"]["it"]["tokens"]
        for r in report["tokenizers"]:
            if r["kind"] in ("hf_json", "gpt2_bpe", "sentencepiece", "tiktoken") and "it" in r["per_lang"]:
                out.append(f"Italian vs {r['name']} ({r['vocab_size']:,} ids): {1 - mine / r['per_lang']['it']['tokens']:.1%} fewer tokens.")
    return out


def markdown_lines(report: dict) -> list[str]:
    """fertility.md: per language, per word class (trained tokenizers), the GGUF column, the summary."""
    langs = list(report["heldout_docs"])
    header = ["tokenizer", "kind", "vocab", *[f"{lang} {m}" for lang in langs for m in ("tok/word", "chars/tok")], "GGUF"]
    rows = [[r["name"], r["kind"], f"{r['vocab_size']:,}",
             *[f"{r['per_lang'][lg][m]:.3f}" for lg in langs for m in ("tokens_per_word", "chars_per_token")],
             r.get("gguf") or "-"] for r in report["tokenizers"]]
    lines = ["# Tokenizer fertility on held-out text", "", *markdown_table(header, rows)]
    ab = report.get("ab_vs_baseline") or {}
    if ab:
        lines += ["", "Tokens on held-out text vs the A/B baseline (negative = fewer tokens):", "",
                  *markdown_table(["tokenizer", *langs], [[name, *[f"{ch.get(lg, 0):+.2%}" for lg in langs]]
                                                          for name, ch in ab.items()])]
    trained = [r for r in report["tokenizers"] if "per_class" in r]
    for lang in langs if trained else []:
        lines += ["", f"Per word class, {lang} (tokens/word, chars/token; words: "
                  + ", ".join(f"{c} {trained[0]['per_class'][lang][c]['words']:,}" for c in WORD_CLASSES) + "):", ""]
        lines += markdown_table(["tokenizer", *WORD_CLASSES], [
            [r["name"], *[f"{r['per_class'][lang][c]['tokens_per_word']:.3f}, {r['per_class'][lang][c]['chars_per_token']:.2f}"
                          for c in WORD_CLASSES]] for r in trained])
    lines += ["", "Held-out documents: " + ", ".join(f"{k} {v}" for k, v in report["heldout_docs"].items()), ""]
    lines += [f"- {s}" for s in summary_lines(report)]
    lines += [f"- note: {n}" for n in report["notes"]]
    return lines


def write_report(report: dict, out_dir: Path) -> dict[str, str]:
    """fertility.json, fertility.md and fertility.png in ``out_dir``; returns their paths."""
    langs = list(report["heldout_docs"])
    paths = {k: out_dir / f"fertility.{k}" for k in ("json", "md", "png")}
    atomic_write_json(paths["json"], report | {"summary": summary_lines(report)})

    atomic_write_text(paths["md"], "\n".join(markdown_lines(report)) + "\n")

    import matplotlib  # heavy, and only the plot needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ab_rows = [r for r in report["tokenizers"] if "per_class" in r]
    fig, axes = plt.subplots(1, 3 if ab_rows else 2, figsize=(16 if ab_rows else 11, 4))
    names = [r["name"] for r in report["tokenizers"]]
    width = 0.8 / max(len(names), 1)
    for ax, metric, title in ((axes[0], "tokens_per_word", "tokens per word (lower is better)"),
                              (axes[1], "chars_per_token", "characters per token (higher is better)")):
        for i, r in enumerate(report["tokenizers"]):
            xs = [j + (i - (len(names) - 1) / 2) * width for j in range(len(langs))]
            ax.bar(xs, [r["per_lang"][lg][metric] for lg in langs], width, label=r["name"])
        ax.set_xticks(range(len(langs)), langs)
        ax.set_title(title)
    axes[0].legend(fontsize=8)
    if ab_rows:  # tokens per word by word class, first language (Italian in the profiles)
        lang = langs[0]
        w = 0.8 / len(ab_rows)
        for i, r in enumerate(ab_rows):
            xs = [j + (i - (len(ab_rows) - 1) / 2) * w for j in range(len(WORD_CLASSES))]
            axes[2].bar(xs, [r["per_class"][lang][c]["tokens_per_word"] for c in WORD_CLASSES], w, label=r["name"])
        axes[2].set_xticks(range(len(WORD_CLASSES)), WORD_CLASSES)
        axes[2].set_title(f"{lang}: tokens per word by word class")
        axes[2].legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(paths["png"]) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return {k: str(v) for k, v in paths.items()}
