"""Stage 2: pre-tokenization regex, pinned letters, special tokens, round trips, transformers parity,
reference loaders (each against an independent implementation), fertility report, the stage script.

Every tokenizer here is trained inside the test on ~60K characters of generated text (vocab 700,
under a second); nothing is downloaded.
"""

from __future__ import annotations

import base64
import gzip
import io
import json
import os
import random
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import regex
from tokenizers import ByteLevelBPETokenizer, Regex, Tokenizer, models, pre_tokenizers

from dante import config as C
from dante import corpus
from dante import fertility as F
from dante import tokenizer as T
from dante.artifacts import Stage
from dante.errors import UserError
from dante.tokenizer import (
    DANTE_PATTERN,
    EOS_ID,
    EOT_ID,
    LLAMA3_PATTERN,
    PINNED_CHARS,
    SPECIAL_TOKENS,
    byte_symbols,
    load_tokenizer,
    to_transformers,
    tokenizer_facts,
    train_tokenizer,
)

ROOT = Path(__file__).resolve().parent.parent
N_RESERVED = 8
VOCAB = 700

# ---------------------------------------------------------------------------------------------------
# Generated bilingual + code text (shared with tests/test_shards.py)
# ---------------------------------------------------------------------------------------------------

IT_WORDS = ("il la di che non per una sono con più anche come città perché già così però università "
            "tecnologia scienza futuro modello lingua parola dati rete calcolo risultato è era molto").split()
IT_ELISIONS = ["l'intelligenza", "dell'algoritmo", "un'altra", "c'è", "all'università", "nell'ambito",
               "l’anno", "dell’Italia", "quest'estate", "d'accordo", "po'", "l'11"]
EN_WORDS = ("the of and to in is that it for was on are with as this be at by from they we model data "
            "language learning science future").split()
EN_CLITICS = ["don't", "it's", "we'll", "they're", "I've", "I'm", "he'd", "can't", "won’t"]
CODE_LINES = ["def {n}(x, y=1):", "    return x + y * {d}", "class {N}:", "    def __init__(self):",
              "        self.{n} = [{d}, {d}]", "    print(f'{{x}} {n}')", "if {n} is None:", "        pass",
              "for i in range({d}):", "    total += i  # {n}"]


def gen_italian(rng: random.Random, n_sent: int) -> str:
    out = []
    for _ in range(n_sent):
        words = [rng.choice(IT_WORDS) for _ in range(rng.randint(5, 12))]
        words.insert(rng.randrange(len(words)), rng.choice(IT_ELISIONS))
        out.append(" ".join(words).capitalize() + rng.choice([".", ",", "?", ";"]))
    return " ".join(out)


def gen_english(rng: random.Random, n_sent: int) -> str:
    out = []
    for _ in range(n_sent):
        words = [rng.choice(EN_WORDS) for _ in range(rng.randint(5, 12))]
        words.insert(rng.randrange(len(words)), rng.choice(EN_CLITICS))
        out.append(" ".join(words).capitalize() + ".")
    return " ".join(out)


def gen_code(rng: random.Random, n_lines: int) -> str:
    names = ["value", "total", "model", "data", "count"]
    return "\n".join(rng.choice(CODE_LINES).format(n=rng.choice(names), N=rng.choice(names).title(), d=rng.randint(0, 999))
                     for _ in range(n_lines)) + "\n"


def sample_docs(seed: int = 0) -> dict[str, list[str]]:
    rng = random.Random(seed)
    return {
        "it": [gen_italian(rng, 12) for _ in range(60)],
        "en": [gen_english(rng, 12) for _ in range(50)],
        "code": [gen_code(rng, 30) for _ in range(30)],
    }


def write_stage1(root: Path, sources: dict, run_name: str = "t") -> C.RunConfig:
    """A completed 01_corpus for ``sources``: {name: (lang, tier, [texts], docs_per_shard)}."""
    run = C.RunConfig(name=run_name, root=str(root))
    st = Stage.open(C.CorpusStageConfig(run=run), "01_corpus", format_version=corpus.FORMAT_VERSION)
    out = {}
    for name, (lang, tier, texts, per) in sources.items():
        shards = []
        for i in range(0, len(texts), per):
            rel = f"{name}/shard-{i // per:05d}.jsonl.gz"
            corpus.write_shard(st.dir / rel, [{"text": t, "source": name, "lang": lang, "tier": tier} for t in texts[i:i + per]])
            shards.append(rel)
        out[name] = {"lang": lang, "tier": tier, "shards": shards, "docs": len(texts), "chars": sum(map(len, texts))}
    st.finish(outputs={"sources": out})
    return run


def all_text() -> list[str]:
    return [t for docs in sample_docs().values() for t in docs]


@pytest.fixture(scope="module")
def dante_tok(tmp_path_factory) -> Tokenizer:
    tok = train_tokenizer(all_text(), VOCAB, "dante", n_reserved=N_RESERVED)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    path.write_text(tok.to_str())
    return load_tokenizer(path)  # everything below goes through the SAVED file


@pytest.fixture(scope="module")
def base_tok() -> Tokenizer:
    return train_tokenizer(all_text(), VOCAB, "llama3", n_reserved=N_RESERVED)


def pieces(tok: Tokenizer, text: str) -> list[str]:
    """The pre-tokens of the saved tokenizer, mapped from byte symbols back to text."""
    inv = {s: b for b, s in enumerate(byte_symbols())}
    return [bytes(inv[c] for c in p).decode("utf-8") for p, _ in tok.pre_tokenizer.pre_tokenize_str(text)]


def random_unicode(rng: random.Random, n: int) -> str:
    ranges = [(0x20, 0x7E), (0x00, 0x1F), (0xA0, 0xFF), (0x100, 0x17F), (0x300, 0x36F), (0x391, 0x3C9),
              (0x400, 0x4FF), (0x600, 0x6FF), (0x4E00, 0x4FFF), (0xE000, 0xE0FF), (0x1F300, 0x1F64F),
              (0x200B, 0x200F), (0xFEFF, 0xFEFF), (0x10FFF0, 0x10FFFF)]
    out = []
    for _ in range(n):
        lo, hi = rng.choice(ranges)
        out.append(chr(rng.randint(lo, hi)))
        if rng.random() < 0.15:
            out.append(rng.choice([" ", "  ", "\n", "'", "’", "<|eot|>", "\u200d", "\t"]))
    return "".join(out)


# ---------------------------------------------------------------------------------------------------
# Pre-tokenization: what the saved tokenizer.json does
# ---------------------------------------------------------------------------------------------------

REGEX_CASES = [
    ("l'intelligenza dell'algoritmo, un'altra c'è un po' di più",
     ["l'intelligenza", " dell'algoritmo", ",", " un'altra", " c'è", " un", " po'", " di", " più"]),
    ("L’intelligenza dell’algoritmo po’.", ["L’intelligenza", " dell’algoritmo", " po’", "."]),
    ("l'11 settembre dell'800", ["l'", "1", "1", " settembre", " dell'", "8", "0", "0"]),
    ("I don't think it's what we'll do, they're I've I'm he'd DON'T",
     ["I", " don", "'t", " think", " it", "'s", " what", " we", "'ll", " do", ",", " they", "'re", " I", "'ve", " I",
      "'m", " he", "'d", " DON", "'T"]),
    ("won’t it’s", ["won", "’t", " it", "’s"]),
    ("def f(x):\n    return 'abc' + x\n\n\tpass",
     ["def", " f", "(x", "):\n", "   ", " return", " '", "abc", "'", " +", " x", "\n\n", "\tpass"]),
    ("print(f'{x}') r'\\d'", ["print", "(f", "'{", "x", "}')", " r", "'\\", "d", "'"]),
    ("Nel 2024, 3.14", ["Nel", " ", "2", "0", "2", "4", ",", " ", "3", ".", "1", "4"]),
    ("ok 😀😀 👍🏽!", ["ok", " 😀😀", " 👍🏽!"]),
    ("你好世界 Привет мир naïve αβγ", ["你好世界", " Привет", " мир", " naïve", " αβγ"]),
    ("<|eot|> user", ["<|", "eot", "|>", " user"]),
]


@pytest.mark.parametrize("text,expected", REGEX_CASES)
def test_dante_pretokenizer_cases(dante_tok, text, expected):
    assert pieces(dante_tok, text) == expected


def test_saved_pretokenizer_is_split_then_bytelevel_without_regex(dante_tok):
    """tokenizers #1369: ByteLevel must come after the Split and must not re-split with GPT-2's regex."""
    pre = json.loads(dante_tok.to_str())["pre_tokenizer"]
    assert [p["type"] for p in pre["pretokenizers"]] == ["Split", "ByteLevel"]
    assert pre["pretokenizers"][0]["pattern"]["Regex"] == DANTE_PATTERN
    assert pre["pretokenizers"][1]["use_regex"] is False
    # the trap itself, shown: ByteLevel with its own regex splits the elision Dante keeps whole
    trap = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(DANTE_PATTERN), "isolated"),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    assert len(trap.pre_tokenize_str("l'intelligenza")) == 3


def test_training_saw_the_serving_split(dante_tok, base_tok):
    """Frequent elisions became whole tokens: only possible if the trainer split text like the server."""
    assert dante_tok.encode(" l'intelligenza").tokens == [" l'intelligenza".replace(" ", "Ġ")]
    assert len(base_tok.encode(" l'intelligenza").ids) >= 2  # the baseline splits at the apostrophe
    # and no token ever crosses a pre-token boundary of the served pre-tokenizer
    text = all_text()[0] + all_text()[-1]
    bounds = {end for _, (_, end) in dante_tok.pre_tokenizer.pre_tokenize_str(text)}
    for start, end in dante_tok.encode(text).offsets:
        assert not any(start < b < end for b in bounds)


# ---------------------------------------------------------------------------------------------------
# Vocabulary layout, pinned letters, special tokens
# ---------------------------------------------------------------------------------------------------


def test_vocab_layout_and_determinism(dante_tok):
    facts = tokenizer_facts(dante_tok)
    assert facts["vocab_size"] == VOCAB and facts["max_id"] == VOCAB - 1
    assert facts["special_ids"] == {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    assert facts["n_reserved"] == N_RESERVED and facts["pretokenizer"] == "dante"
    first_byte = len(SPECIAL_TOKENS) + N_RESERVED
    assert [dante_tok.id_to_token(first_byte + b) for b in range(256)] == byte_symbols()
    assert dante_tok.id_to_token(first_byte + 256) == "".join(byte_symbols()[b] for b in PINNED_CHARS[0].encode())
    again = train_tokenizer(all_text(), VOCAB, "dante", n_reserved=N_RESERVED)
    assert json.loads(again.to_str())["model"] == json.loads(dante_tok.to_str())["model"]


@pytest.mark.parametrize("template", ["{c}", " {c}", "x{c}y", "{c}{c}{c}", "PERCH{c}", "1{c}2", "'{c}'", "\n{c}\n", "l'{c}a"])
def test_pinned_letters_are_one_token_in_every_context(dante_tok, base_tok, template):
    """A token holding one byte of a 2-byte letter decodes to U+FFFD: so no token may decode to it."""
    n_split_in_baseline = 0
    for c in PINNED_CHARS:
        assert len(dante_tok.encode(c).ids) == 1, c
        text = template.format(c=c)
        assert all("\ufffd" not in dante_tok.decode([i]) for i in dante_tok.encode(text).ids), (c, text)
        n_split_in_baseline += any("\ufffd" in base_tok.decode([i]) for i in base_tok.encode(text).ids)
    assert n_split_in_baseline > 0  # without pinning, letters rare in training (þ, Ð, ...) fall apart into bytes


def test_special_tokens_never_from_plain_text(dante_tok):
    n_special = len(SPECIAL_TOKENS) + N_RESERVED
    text = "user typed <|eot|> and <|end_of_text|><|pad|> and <|reserved_3|>"
    assert min(dante_tok.encode(text).ids) >= n_special  # load_tokenizer: plain text by default
    assert dante_tok.decode(dante_tok.encode(text).ids) == text
    # asked for: each is one id
    structural = Tokenizer.from_str(dante_tok.to_str())
    structural.encode_special_tokens = False
    assert structural.encode("<|eot|>").ids == [EOT_ID]
    assert [structural.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    # a tokenizer trained on text full of the special strings still cannot produce them
    tok = train_tokenizer(["<|eot|> <|end_of_text|> x" * 50] + all_text()[:20], 500, n_reserved=N_RESERVED)
    tok.encode_special_tokens = True
    assert min(tok.encode("<|eot|><|end_of_text|>").ids) >= n_special


def test_transformers_split_special_tokens(dante_tok):
    safe = to_transformers(dante_tok, split_special_tokens=True)
    assert min(safe("hi <|eot|>", add_special_tokens=False)["input_ids"]) >= len(SPECIAL_TOKENS) + N_RESERVED
    template = to_transformers(dante_tok)
    assert template("<|eot|>", add_special_tokens=False)["input_ids"] == [EOT_ID]
    assert (template.bos_token_id, template.eos_token_id, template.pad_token_id) == (0, EOS_ID, 5)


# ---------------------------------------------------------------------------------------------------
# Round trips and parity with transformers
# ---------------------------------------------------------------------------------------------------


def test_roundtrip_random_unicode_and_real_text(dante_tok, base_tok):
    rng = random.Random(7)
    texts = [random_unicode(rng, rng.randint(0, 300)) for _ in range(300)] + all_text()[:40]
    texts += [F.read_texts(ROOT / "data/sample/heldout/it.jsonl.gz")[0]] if (ROOT / "data/sample/heldout/it.jsonl.gz").is_file() else []
    for tok in (dante_tok, base_tok):
        for text in texts:
            assert tok.decode(tok.encode(text).ids, skip_special_tokens=False) == text


def test_tokenizers_and_transformers_agree(dante_tok):
    hf = to_transformers(dante_tok, split_special_tokens=True)
    rng = random.Random(11)
    texts = all_text()[:30] + [random_unicode(rng, 200) for _ in range(100)]
    for text in texts:
        ids = dante_tok.encode(text).ids
        assert hf(text, add_special_tokens=False)["input_ids"] == ids
        assert hf.decode(ids) == dante_tok.decode(ids) == text


def test_too_small_sample_is_refused():
    with pytest.raises(UserError, match="sample_chars"):
        train_tokenizer(["ciao mondo"] * 3, 2000, n_reserved=N_RESERVED)
    with pytest.raises(UserError, match="no room"):
        train_tokenizer(["x"], 300, n_reserved=N_RESERVED)


# ---------------------------------------------------------------------------------------------------
# Reference loaders, each against an independent implementation
# ---------------------------------------------------------------------------------------------------


def test_gpt2_bpe_loader(tmp_path):
    ref = ByteLevelBPETokenizer()
    ref.train_from_iterator(all_text(), vocab_size=500, min_frequency=2, show_progress=False)
    ref.save_model(str(tmp_path))  # vocab.json + merges.txt: the encoder.json + vocab.bpe format
    counter = F.load_gpt2_bpe("gpt2", str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))
    for text in all_text()[:10] + ["I don't", "naïve café"]:
        assert counter.encode([text])[0] == ref.encode(text).ids
    with pytest.raises(UserError, match="not found"):
        F.load_gpt2_bpe("gpt2", str(tmp_path / "vocab.json"), str(tmp_path / "nope.bpe"))


def test_sentencepiece_loader(tmp_path):
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(all_text()), model_writer=model, vocab_size=300,
                                   model_type="bpe", character_coverage=1.0, minloglevel=2)
    (tmp_path / "sp.model").write_bytes(model.getvalue())
    counter = F.load_sentencepiece("sp", str(tmp_path / "sp.model"))
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    texts = all_text()[:5]
    assert counter.encode(texts) == [sp.encode(t) for t in texts]
    assert counter.vocab_size == 300 and sp.decode(counter.encode(texts)[0]) == texts[0]
    (tmp_path / "bad.model").write_bytes(b"not a model")
    with pytest.raises(UserError, match="SentencePiece"):
        F.load_sentencepiece("sp", str(tmp_path / "bad.model"))


def tiktoken_reference_encode(ranks: dict[bytes, int], text: str) -> list[int]:
    """tiktoken's algorithm as a plain loop: split by the regex, then repeatedly merge the adjacent pair
    whose concatenation has the lowest rank (a piece that is itself ranked is taken whole)."""
    ids = []
    for piece in regex.findall(LLAMA3_PATTERN, text):
        b = piece.encode("utf-8")
        if b in ranks:
            ids.append(ranks[b])
            continue
        parts = [bytes([x]) for x in b]
        while len(parts) > 1:
            best = min(((ranks.get(parts[i] + parts[i + 1]), i) for i in range(len(parts) - 1)
                        if parts[i] + parts[i + 1] in ranks), default=None)
            if best is None:
                break
            i = best[1]
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        ids += [ranks[p] for p in parts]
    return ids


def test_tiktoken_loader_matches_tiktoken_algorithm(tmp_path, base_tok):
    inv = {s: b for b, s in enumerate(byte_symbols())}
    offset = len(SPECIAL_TOKENS) + N_RESERVED
    ranks = {bytes(inv[c] for c in base_tok.id_to_token(i)): i - offset for i in range(offset, base_tok.get_vocab_size())}
    lines = [f"{base64.b64encode(b).decode()} {r}" for b, r in sorted(ranks.items(), key=lambda kv: kv[1])]
    (tmp_path / "ranks.model").write_text("\n".join(lines) + "\n")
    counter = F.load_tiktoken("tk", str(tmp_path / "ranks.model"))
    rng = random.Random(3)
    texts = all_text()[:20] + [random_unicode(rng, 150) for _ in range(50)] + ["aaaa bbbb ....!!!! 1234567"]
    for text in texts:
        assert counter.encode([text])[0] == tiktoken_reference_encode(ranks, text)
    (tmp_path / "bad.model").write_text("!!notbase64 x\n")
    with pytest.raises(UserError, match="bad.model:1"):
        F.load_tiktoken("tk", str(tmp_path / "bad.model"))


def test_hf_json_loader_and_fertility_report(tmp_path, dante_tok, base_tok):
    (tmp_path / "ref.json").write_text(base_tok.to_str())
    ref = F.load_reference(C.ReferenceTokenizerConfig(name="ref", kind="hf_json", path=str(tmp_path / "ref.json")))
    docs = sample_docs(seed=99)  # held out: a different seed than the training text
    report = F.fertility_report([F.hf_counter("dante", "dante", dante_tok), F.hf_counter("baseline", "llama3", base_tok), ref],
                                docs, notes=["a note"])
    paths = F.write_report(report, tmp_path)
    saved = json.loads(Path(paths["json"]).read_text())
    it = {r["name"]: r["per_lang"]["it"] for r in saved["tokenizers"]}
    assert it["ref"]["tokens"] == it["baseline"]["tokens"] == sum(len(base_tok.encode(t).ids) for t in docs["it"])
    assert it["dante"]["tokens"] == sum(len(dante_tok.encode(t).ids) for t in docs["it"])
    assert saved["vs_baseline"]["it"]["change"] == pytest.approx(it["dante"]["tokens"] / it["baseline"]["tokens"] - 1)
    assert it["dante"]["tokens"] < it["baseline"]["tokens"]  # this text is elision-heavy by construction
    assert any(s.startswith("Italian: Dante saves") for s in saved["summary"])
    assert "a note" in Path(paths["md"]).read_text()
    assert Path(paths["png"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------------------------------
# The stage script: outputs, resume, bad input
# ---------------------------------------------------------------------------------------------------


def run_script(script: str, args: list[str], capsys) -> tuple[int, str]:
    old = sys.argv
    sys.argv = [script] + args
    try:
        with pytest.raises(SystemExit) as exit_info:
            runpy.run_path(str(ROOT / script), run_name="__main__")
    finally:
        sys.argv = old
    out = capsys.readouterr()
    return exit_info.value.code, out.out + out.err


def stage2_config(tmp_path: Path, heldout: dict, extra: str = "") -> Path:
    for lang, texts in heldout.items():
        with gzip.open(tmp_path / f"held-{lang}.jsonl.gz", "wt", encoding="utf-8") as f:
            f.writelines(json.dumps({"text": t}) + "\n" for t in texts)
    held = ", ".join(f"{lang}: {tmp_path / f'held-{lang}.jsonl.gz'}" for lang in heldout)
    cfg = tmp_path / "tokenizer.yaml"
    cfg.write_text(f"""run: {{name: t, root: {tmp_path / 'runs'}}}
tokenizer:
  vocab_size: 600
  n_reserved: {N_RESERVED}
  sample_chars: 60000
  heldout: {{{held}}}
  references:
    - {{name: missing-ref, kind: sentencepiece, path: {tmp_path / 'absent.model'}, optional: true}}
{extra}""")
    return cfg


def test_stage2_script_end_to_end(tmp_path, capsys):
    docs = sample_docs()
    write_stage1(tmp_path / "runs", {"it-src": ("it", 1, docs["it"], 20), "en-src": ("en", 1, docs["en"], 20),
                                     "code-src": ("code", 2, docs["code"], 10)})
    cfg = stage2_config(tmp_path, sample_docs(seed=5))
    rc, out = run_script("2_train_tokenizer.py", ["--config", str(cfg)], capsys)
    assert rc == 0, out
    d = tmp_path / "runs/t/02_tokenizer"
    m = json.loads((d / "manifest.json").read_text())
    assert m["outputs"]["vocab_size"] == 600 and m["outputs"]["max_id"] == 599
    sample = m["outputs"]["sample"]
    total = sum(s["chars"] for s in sample.values())
    for lang, share in {"it": 0.42, "en": 0.36, "code": 0.22}.items():  # char-balanced per config
        assert sample[lang]["chars"] / total == pytest.approx(share, abs=0.01)
    assert (d / "baseline/tokenizer.json").is_file() and (d / "fertility.png").is_file()
    assert "missing-ref" in (d / "fertility.md").read_text()  # skipped with a note, not a crash
    load_tokenizer(d / "tokenizer.json")
    # the same config draws the same sample and trains the same tokenizer
    first = (d / "tokenizer.json").read_bytes()
    rc, out = run_script("2_train_tokenizer.py", ["--config", str(cfg), "--force"], capsys)
    assert rc == 0 and (d / "tokenizer.json").read_bytes() == first


def test_stage2_bad_inputs(tmp_path, capsys):
    cfg = stage2_config(tmp_path, {"it": ["ciao"]})
    rc, out = run_script("2_train_tokenizer.py", ["--config", str(cfg)], capsys)  # no stage 1 at all
    assert rc == 2 and "1_download_corpus.py" in out
    docs = sample_docs()
    write_stage1(tmp_path / "runs", {"it-src": ("it", 1, docs["it"], 20), "en-src": ("en", 1, docs["en"], 20)})
    rc, out = run_script("2_train_tokenizer.py", ["--config", str(cfg)], capsys)  # code has a share, no text
    assert rc == 2 and "'code'" in out and "language_mix" in out
    assert not (tmp_path / "runs/t/02_tokenizer/manifest.json").exists()
    # a stage-1 shard with bytes that are not UTF-8
    shard = tmp_path / "runs/t/01_corpus/en-src/shard-00001.jsonl.gz"
    shard.write_bytes(gzip.compress(b'{"text": "caf\xe9 latte"}\n'))
    cfg = stage2_config(tmp_path, {"it": ["ciao"]}, extra="  language_mix: {it: 0.6, en: 0.4}\n")
    rc, out = run_script("2_train_tokenizer.py", ["--config", str(cfg), "--force"], capsys)
    assert rc == 2 and "shard-00001.jsonl.gz" in out and "UTF-8" in out
    assert not (tmp_path / "runs/t/02_tokenizer/manifest.json").exists()
    # a reference that is required but absent is refused before training
    cfg = stage2_config(tmp_path, {"it": ["ciao"]}, extra="    - {name: gone, kind: tiktoken, path: /nonexistent.model}\n")
    rc, out = run_script("2_train_tokenizer.py", ["--config", str(cfg), "--force"], capsys)
    assert rc == 2 and "gone" in out and "fetch_reference_tokenizers" in out


def run_real_script(script: str, args: list[str]) -> tuple[int, str]:
    """The script as a user runs it: a fresh interpreter, its real exit code and output."""
    r = subprocess.run([sys.executable, str(ROOT / script), *args], capture_output=True, text=True, timeout=300,
                       cwd=ROOT, env={**os.environ, "DS_ACCELERATOR": "cpu"})
    return r.returncode, r.stdout + r.stderr


def test_stage2_refused_start_leaves_no_folder(tmp_path):
    cfg = stage2_config(tmp_path, {"it": ["ciao"]})
    d = tmp_path / "runs/t/02_tokenizer"
    rc, out = run_real_script("2_train_tokenizer.py", ["--config", str(cfg)])  # no stage 1: refused by validate
    assert rc == 2 and "1_download_corpus.py" in out and "Traceback" not in out, out
    assert not d.exists()
    # refused in main, after the folder was opened: a stage-1 shard that is not UTF-8 (found while drawing)
    docs = sample_docs()
    write_stage1(tmp_path / "runs", {"it-src": ("it", 1, docs["it"], 20), "en-src": ("en", 1, docs["en"], 20)})
    (tmp_path / "runs/t/01_corpus/en-src/shard-00001.jsonl.gz").write_bytes(gzip.compress(b'{"text": "caf\xe9"}\n'))
    cfg = stage2_config(tmp_path, {"it": ["ciao"]}, extra="  language_mix: {it: 0.6, en: 0.4}\n")
    rc, out = run_real_script("2_train_tokenizer.py", ["--config", str(cfg)])
    assert rc == 2 and "shard-00001.jsonl.gz" in out and "Traceback" not in out, out
    assert not d.exists()


def test_stage2_dry_run_checks_corpus_files_and_heldout(tmp_path):
    docs = sample_docs()
    write_stage1(tmp_path / "runs", {"it-src": ("it", 1, docs["it"], 20), "en-src": ("en", 1, docs["en"], 20),
                                     "code-src": ("code", 2, docs["code"], 10)})
    cfg = stage2_config(tmp_path, {"it": ["ciao"]})
    (tmp_path / "held-it.jsonl.gz").unlink()
    (tmp_path / "runs/t/01_corpus/en-src/shard-00002.jsonl.gz").unlink()
    rc, out = run_real_script("2_train_tokenizer.py", ["--config", str(cfg), "--dry-run"])
    assert rc == 2 and "Traceback" not in out, out
    assert "held-it.jsonl.gz" in out and "shard-00002.jsonl.gz" in out  # both problems, one message
    assert not (tmp_path / "runs/t/02_tokenizer").exists()
    # a sample larger than stage 1 holds is refused from the manifest's counts, before any training
    cfg = stage2_config(tmp_path, {"it": ["ciao"]}).read_text().replace("sample_chars: 60000", "sample_chars: 900000")
    (tmp_path / "big.yaml").write_text(cfg)
    (tmp_path / "runs/t/01_corpus/en-src/shard-00002.jsonl.gz").touch()
    rc, out = run_real_script("2_train_tokenizer.py", ["--config", str(tmp_path / "big.yaml"), "--dry-run"])
    assert rc == 2 and "lower tokenizer.sample_chars to at most" in out, out


def test_stage2_changed_config_on_a_finished_run_is_refused(tmp_path, capsys):
    docs = sample_docs()
    write_stage1(tmp_path / "runs", {"it-src": ("it", 1, docs["it"], 20), "en-src": ("en", 1, docs["en"], 20),
                                     "code-src": ("code", 2, docs["code"], 10)})
    cfg = stage2_config(tmp_path, sample_docs(seed=5))
    rc, out = run_script("2_train_tokenizer.py", ["--config", str(cfg), "--set", "tokenizer.baseline=false"], capsys)
    assert rc == 0, out
    d = tmp_path / "runs/t/02_tokenizer"
    before = {p: p.read_bytes() for p in d.rglob("*") if p.is_file()}
    rc, out = run_real_script("2_train_tokenizer.py", ["--config", str(cfg), "--set", "tokenizer.baseline=false",
                                                       "--set", "tokenizer.vocab_size=4096"])
    assert rc == 2 and "tokenizer.vocab_size: 600 -> 4096" in out and "--force" in out, out
    assert {p: p.read_bytes() for p in d.rglob("*") if p.is_file()} == before
    rc, out = run_real_script("2_train_tokenizer.py", ["--config", str(cfg), "--set", "tokenizer.baseline=false"])
    assert rc == 0 and "nothing to do" in out, out  # the same config stays a no-op


@pytest.mark.parametrize("damage", ["truncated", "garbled", "empty", "not_dante"])
def test_damaged_tokenizer_file_names_the_file_and_the_fix(tmp_path, dante_tok, base_tok, damage):
    path = tmp_path / "tokenizer.json"
    good = dante_tok.to_str().encode()
    data = {"truncated": good[: len(good) // 3], "garbled": good[:100] + b"\xff\x00{{" + good[104:], "empty": b"",
            "not_dante": Tokenizer(models.BPE()).to_str().encode()}[damage]
    path.write_bytes(data)
    with pytest.raises(UserError) as e:
        load_tokenizer(path)
    assert str(path) in str(e.value) and "python 2_train_tokenizer.py" in str(e.value) and "--force" in str(e.value)


def test_stage2_dry_run_states_sample_time_and_memory_and_writes_nothing(tmp_path):
    docs = sample_docs()
    write_stage1(tmp_path / "runs", {"it-src": ("it", 1, docs["it"], 20), "en-src": ("en", 1, docs["en"], 20),
                                     "code-src": ("code", 2, docs["code"], 10)})
    cfg = stage2_config(tmp_path, sample_docs(seed=5), extra="  ab_presets: [qwen2]\n")
    before = sorted((p, p.stat().st_mtime_ns) for p in tmp_path.rglob("*"))
    rc, out = run_real_script("2_train_tokenizer.py", ["--config", str(cfg), "--dry-run"])
    assert rc == 0, out
    assert sorted((p, p.stat().st_mtime_ns) for p in tmp_path.rglob("*")) == before  # nothing written, not even a lock
    est = T.training_estimate(60000, 3)  # the run's tokenizer, the baseline, one A/B preset
    assert "sample: 60,000 chars per tokenizer (the same sample for all 3): code 13,200 of" in out
    assert f"3 tokenizer(s) x 60,000 chars / {T.TRAIN_CHARS_PER_SEC:,} chars/s" in out
    assert f"~{est['seconds']:.0f} s" in out
    assert f"~{est['peak_bytes'] / 2**30:.2f} GiB peak" in out and f"{T.TRAIN_BYTES_PER_CHAR} B per sample char" in out
    # the estimate is linear in the number of tokenizers and in the sample
    one, four = T.training_estimate(10**9, 1), T.training_estimate(10**9, 4)
    assert four["train_seconds"] == pytest.approx(4 * one["train_seconds"]) and four["peak_bytes"] == one["peak_bytes"]
