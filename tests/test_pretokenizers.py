"""Pre-tokenizer presets (dante/pretokenizers.py): the standard ones split real text exactly as llama.cpp does.

The reference is independent of the code under test: llama.cpp's regex lists are copied here from its
``src/llama-vocab.cpp`` (llama-cpp-python 0.3.36 sdist, ``llm_tokenizer_bpe``) and applied with the
``regex`` module the way llama.cpp's ``unicode_regex_split`` applies them: each regex splits every piece of
the previous one, and text between two matches stays a piece. The other side is the pre-tokenizer that a
trained, saved and reloaded ``tokenizer.json`` carries (Hugging Face ``tokenizers``, Oniguruma regexes).
The corpus is real text from data/sample/ and its held-out split: Italian (with ' and ’ elisions,
accents), English, Python code, URLs and digits.
"""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import pytest
import regex

from dante import pretokenizers as P
from dante.errors import UserError
from dante.tokenizer import byte_symbols, load_tokenizer, tokenizer_facts, train_tokenizer

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "data" / "sample"

# llama.cpp's lists, as written in src/llama-vocab.cpp (C++ escapes undone)
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
LLAMA_CPP_LISTS = {
    "llama3": [r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"],
    "qwen2": [r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
              r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"],
    "gpt2": [_GPT2],
    "minerva": [r"\p{N}", _GPT2],
}
LLAMA_CPP_NAMES = {"llama3": "llama-bpe", "qwen2": "qwen2", "gpt2": "gpt-2", "minerva": "minerva-7b"}


def llama_cpp_split(text: str, patterns: list[str]) -> list[str]:
    """unicode_regex_split's offsets loop: every regex over every current piece, gaps kept as pieces."""
    pieces = [text]
    for pattern in patterns:
        rx = regex.compile(pattern)
        out = []
        for piece in pieces:
            pos = 0
            for m in rx.finditer(piece):
                if m.start() > pos:
                    out.append(piece[pos:m.start()])
                out.append(m.group())
                pos = m.end()
            if pos < len(piece):
                out.append(piece[pos:])
        pieces = out
    return pieces


def _docs(path: Path) -> list[str]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    """Real documents: the whole held-out split plus the training-sample lines with URLs, ’ or digits."""
    docs = [d for lang in ("it", "en", "code") for d in _docs(SAMPLE / "heldout" / f"{lang}.jsonl.gz")]
    for name in ("it-diodati", "it-libreoffice-help", "it-fortunes", "en-shakespeare", "code-cpython"):
        lines = [ln for d in _docs(SAMPLE / f"{name}.jsonl.gz") for ln in d.splitlines()
                 if re.search(r"https?://|’|\d", ln)]
        docs.append("\n".join(lines[:300]))
    return docs


def test_corpus_has_what_the_acceptance_asks_for(corpus):
    text = "\n".join(corpus)
    assert len(text.splitlines()) >= 1000
    assert len(re.findall(r"\b\w+['’]\w", text)) > 500  # elisions (l'uomo, dell’anima)
    assert text.count("’") > 100 and len(re.findall(r"https?://", text)) > 10
    assert len(re.findall(r"\d", text)) > 1000 and len(re.findall(r"[àèéìòù]", text)) > 500
    assert "def " in text and "    return" in text


def saved_pieces(tok, text: str) -> list[str]:
    inv = {s: b for b, s in enumerate(byte_symbols())}
    return [bytes(inv[c] for c in p).decode("utf-8") for p, _ in tok.pre_tokenizer.pre_tokenize_str(text)]


@pytest.mark.parametrize("preset", ["llama3", "qwen2", "gpt2", "minerva"])
def test_standard_preset_splits_like_llama_cpp(preset, corpus, tmp_path):
    tok = train_tokenizer(corpus[:40], 600, preset, n_reserved=8)
    tok.save(str(tmp_path / "tokenizer.json"))
    tok = load_tokenizer(tmp_path / "tokenizer.json")
    facts = tokenizer_facts(tok)
    assert facts["pretokenizer"] == preset and facts["llama_cpp_pre"] == LLAMA_CPP_NAMES[preset]
    assert facts["pretokenizer_patterns"] == LLAMA_CPP_LISTS[preset]
    n_pieces = 0
    for doc in corpus:
        ours, theirs = saved_pieces(tok, doc), llama_cpp_split(doc, LLAMA_CPP_LISTS[preset])
        if ours != theirs:
            k = next(i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b)
            pytest.fail(f"{preset}: piece {k} differs: ours {ours[k - 2:k + 3]} vs llama.cpp {theirs[k - 2:k + 3]}")
        n_pieces += len(ours)
    assert n_pieces > 100_000


def test_llama3_takes_whole_pieces_like_llama_cpp(corpus):
    """llama.cpp sets ignore_merges for llama-bpe: a piece that is a token is one id, whatever the merges."""
    tok = train_tokenizer(corpus[:40], 600, "llama3", n_reserved=8)
    assert tokenizer_facts(tok)["ignore_merges"] is True
    assert tokenizer_facts(train_tokenizer(corpus[:40], 600, "qwen2", n_reserved=8))["ignore_merges"] is False


ELISION_CASES = [
    ("l'intelligenza dell'algoritmo, un'altra c'è un po' di più",
     ["l'", "intelligenza", " dell'", "algoritmo", ",", " un'", "altra", " c'", "è", " un", " po'", " di", " più"]),
    ("L’intelligenza dell’algoritmo po’.", ["L’", "intelligenza", " dell’", "algoritmo", " po’", "."]),
    ("I don't think it's we'll", ["I", " don", "'t", " think", " it", "'s", " we", "'ll"]),
    ("print(f'{x}') r'abc' l'11 quest'estate", ["print", "(f", "'{", "x", "}')", " r", "'abc", "'", " l'", "1", "1",
                                                 " quest'", "estate"]),
]


@pytest.fixture(scope="module")
def elision_tok(corpus, tmp_path_factory):
    path = tmp_path_factory.mktemp("elision") / "tokenizer.json"
    train_tokenizer(corpus[:40], 600, "dante-elision", n_reserved=8).save(str(path))
    return load_tokenizer(path)


@pytest.mark.parametrize("text,expected", ELISION_CASES)
def test_dante_elision_splits_the_elided_word(elision_tok, text, expected):
    assert saved_pieces(elision_tok, text) == expected


def test_switches_change_one_thing_and_name_it():
    spec = P.parse_spec("llama3", digits="single")
    assert spec.name == "llama3+digits1" and spec.patterns == tuple(LLAMA_CPP_LISTS["qwen2"])
    assert spec.ignore_merges and spec.llama_cpp_type is None  # qwen2's regex with llama3's merge rule: no type
    assert P.parse_spec("gpt2+digits1").key == P.parse_spec("minerva").key
    assert P.parse_spec("qwen2+digits3").llama_cpp_type == "smaug-bpe"  # llama3's regex, merges applied
    dante3 = P.parse_spec("dante+digits3")
    assert r"\p{N}{1,3}" in dante3.patterns[0] and dante3.pinned and dante3.llama_cpp_type is None
    assert P.parse_spec("dante", accents="learned").name == "dante+learned"
    assert P.parse_spec("dante+digits1").name == "dante"  # the preset's own setting: no modifier
    assert P.parse_spec("gpt2+pinned").pinned and P.parse_spec("gpt2+pinned").llama_cpp_type == "gpt-2"
    for bad, match in (("dantee", "unknown pre-tokenizer preset 'dantee'"), ("llama3+digits2", "unknown modifier 'digits2'")):
        with pytest.raises(UserError, match=match):
            P.parse_spec(bad)


def test_saved_spec_is_recognized(corpus):
    for spec in ("dante", "dante-elision", "dante+digits3", "dante+learned", "llama3+digits1", "gpt2+pinned"):
        tok = train_tokenizer(corpus[:10], 500, spec, n_reserved=8)
        assert tokenizer_facts(tok)["pretokenizer"] == spec
