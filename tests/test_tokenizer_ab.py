"""Stage 2's multi-way A/B (tokenizer.ab_presets), its per-word-class report, and a sample that honours the mix.

Stage 1 folders are written with tests/test_tokenizer.py's builder (real shards, real manifest); the
tokenizers are trained inside the tests on generated bilingual text at a 600-id vocabulary.
"""

from __future__ import annotations

import json
import random
import re

import pytest

from dante import fertility as F
from dante.artifacts import read_manifest, stage_dir
from dante.corpus import corpus_files
from dante.errors import UserError
from dante.tokenizer import iter_training_sample, plan_sample, train_tokenizer
from tests.test_tokenizer import run_script, sample_docs, stage2_config, write_stage1


def uneven_corpus(tmp_path):
    """English from three sources sharded very differently: one big shard, 25 tiny shards, a medium one."""
    rng = random.Random(1)
    en = sample_docs(seed=3)["en"] * 3  # 150 documents
    rng.shuffle(en)
    docs = sample_docs()
    return write_stage1(tmp_path / "runs", {
        "en-a": ("en", 1, en[:60], 60),      # one shard
        "en-b": ("en", 1, en[60:110], 2),    # 25 shards of 2 documents
        "en-c": ("en", 2, en[110:], 13),     # 4 shards
        "it-src": ("it", 1, docs["it"], 20), "code-src": ("code", 2, docs["code"], 10),
    })


def draw(run, mix, sample_chars, seed=1234, shuffle_files=False):
    manifest = read_manifest(run, "01_corpus")
    files = corpus_files(stage_dir(run, "01_corpus"), manifest)
    if shuffle_files:
        random.Random(5).shuffle(files)
    stats: dict = {}
    plan = plan_sample(manifest["outputs"]["sources"], mix, sample_chars)
    texts = list(iter_training_sample(files, plan, seed, stats))
    return stats, texts, manifest["outputs"]["sources"]


def test_every_source_gets_its_share_whatever_the_sharding(tmp_path):
    run = uneven_corpus(tmp_path)
    stats, texts, sources = draw(run, {"it": 0.42, "en": 0.36, "code": 0.22}, 40_000)
    en = stats["en"]
    en_chars = sum(sources[s]["chars"] for s in ("en-a", "en-b", "en-c"))
    for name, st in en["by_source"].items():
        # target proportional to the source's text in stage 1, and met within 2%
        assert st["target_chars"] == pytest.approx(en["target_chars"] * sources[name]["chars"] / en_chars, abs=1)
        assert st["chars"] == pytest.approx(st["target_chars"], rel=0.02), name
    total = sum(s["chars"] for s in stats.values())
    for lang, share in {"it": 0.42, "en": 0.36, "code": 0.22}.items():
        assert stats[lang]["chars"] / total == pytest.approx(share, abs=0.01)
    assert sum(map(len, texts)) == total
    # the same documents whatever order the shards are listed in
    again, texts2, _ = draw(run, {"it": 0.42, "en": 0.36, "code": 0.22}, 40_000, shuffle_files=True)
    assert again == stats and sorted(texts2) == sorted(texts)


def test_a_source_that_cannot_meet_its_share_is_refused(tmp_path):
    run = uneven_corpus(tmp_path)
    with pytest.raises(UserError, match=r"(?s)source 'en-a' holds [\d,]+ characters, but its share is [\d,]+ .*"
                                        r"lower tokenizer.sample_chars to at most [\d,]+"):
        draw(run, {"it": 0.5, "en": 0.5}, 200_000)


def test_word_classes():
    assert [F.word_class(w) for w in ["l'intelligenza", "dell’anima", "don't", "2024,", "l'11", "città", "naïve",
                                      "PERCHÉ", "casa", "(x):"]] == \
        ["elisions", "elisions", "elisions", "digits", "digits", "accented", "accented", "accented", "other", "other"]


def test_word_class_tokens_add_up():
    docs = sample_docs()
    tok = train_tokenizer(docs["it"] + docs["en"], 600, "dante", n_reserved=8)
    counter = F.hf_counter("t", "dante", tok)
    held = sample_docs(seed=9)["it"][:10]
    per = F.measure_word_classes(counter, held)
    whitespace_only = sum(1 for t in held for e in [tok.encode(t, add_special_tokens=False)]
                          for s, end in e.offsets if not t[s:end].strip())
    assert sum(c["tokens"] for c in per.values()) + whitespace_only == sum(len(tok.encode(t).ids) for t in held)
    assert sum(c["words"] for c in per.values()) == sum(len(t.split()) for t in held)
    assert per["elisions"]["words"] > 0 and per["accented"]["words"] > 0


def test_stage2_multi_way_ab(tmp_path, capsys):
    docs = sample_docs()
    write_stage1(tmp_path / "runs", {"it-src": ("it", 1, docs["it"], 20), "en-src": ("en", 1, docs["en"], 7),
                                     "code-src": ("code", 2, docs["code"], 10)})
    extra = "  ab_presets: [dante-elision, llama3+digits1, minerva, llama3]\n"
    cfg = stage2_config(tmp_path, sample_docs(seed=5), extra=extra)
    rc, out = run_script("2_train_tokenizer.py", ["--config", str(cfg)], capsys)
    assert rc == 0, out
    d = tmp_path / "runs/t/02_tokenizer"
    m = json.loads((d / "manifest.json").read_text())
    assert set(m["outputs"]["ab"]) == {"dante-elision", "llama3+digits1", "minerva"}  # llama3 is the baseline
    assert m["outputs"]["ab"]["minerva"]["gguf"] == "yes (minerva-7b)" and m["outputs"]["gguf"].startswith("no (")
    for name in m["outputs"]["ab"]:
        assert (d / "ab" / name / "tokenizer.json").is_file()
    report = json.loads((d / "fertility.json").read_text())
    rows = {r["name"]: r for r in report["tokenizers"]}
    assert {"dante", "baseline", "dante-elision", "llama3+digits1", "minerva"} <= set(rows)
    assert rows["baseline"]["gguf"] == "yes (llama-bpe)" and rows["llama3+digits1"]["gguf"].startswith("no")
    for name in ("dante", "baseline", "minerva"):
        assert set(rows[name]["per_class"]["it"]) == set(F.WORD_CLASSES)
    assert set(report["ab_vs_baseline"]) == {"dante", "dante-elision", "llama3+digits1", "minerva"}
    md = (d / "fertility.md").read_text()
    assert "| GGUF |" in md and "Per word class, it" in md and "trained once" in md
    by_source = m["outputs"]["sample"]["en"]["by_source"]["en-src"]
    assert by_source["chars"] == pytest.approx(by_source["target_chars"], rel=0.02)
    assert "sample en: en-src" in out


@pytest.mark.parametrize("extra,match", [
    ("  ab_presets: [dante-elision, llama-3]\n", r"ab_presets\[1\]: unknown pre-tokenizer preset 'llama-3'"),
    ("  ab_presets: [gpt2+digits1, minerva]\n", r"ab_presets\[1\]='minerva' repeats entry 'gpt2\+digits1'"),
    ("  ab_presets: [qwen2, qwen2]\n", r"ab_presets\[1\]='qwen2' repeats entry 'qwen2'"),
    ("  pretokenizer: dantee\n", r"tokenizer.pretokenizer: 'dantee' is not one of"),
])
def test_stage2_bad_presets_are_refused(tmp_path, capsys, extra, match):
    docs = sample_docs()
    write_stage1(tmp_path / "runs", {"it-src": ("it", 1, docs["it"], 20), "en-src": ("en", 1, docs["en"], 20),
                                     "code-src": ("code", 2, docs["code"], 10)})
    cfg = stage2_config(tmp_path, {"it": ["ciao"]}, extra=extra)
    rc, out = run_script("2_train_tokenizer.py", ["--config", str(cfg)], capsys)
    assert rc == 2 and re.search(match, out), out
    assert not (tmp_path / "runs/t/02_tokenizer/manifest.json").exists()


def test_stage2_switches_reach_the_saved_tokenizer(tmp_path, capsys):
    docs = sample_docs()
    write_stage1(tmp_path / "runs", {"it-src": ("it", 1, docs["it"], 20), "en-src": ("en", 1, docs["en"], 20),
                                     "code-src": ("code", 2, docs["code"], 10)})
    cfg = stage2_config(tmp_path, {"it": sample_docs(seed=5)["it"]},
                        extra="  digits: group3\n  accents: learned\n  baseline: false\n")
    rc, out = run_script("2_train_tokenizer.py", ["--config", str(cfg)], capsys)
    assert rc == 0, out
    m = json.loads((tmp_path / "runs/t/02_tokenizer/manifest.json").read_text())
    assert m["outputs"]["pretokenizer"] == "dante+digits3+learned" and m["outputs"]["pinned_accents"] is False
    assert r"\p{N}{1,3}" in m["outputs"]["pretokenizer_patterns"][0]


def test_stage2_refuses_a_share_the_corpus_cannot_give(tmp_path, capsys):
    docs = sample_docs()
    write_stage1(tmp_path / "runs", {"it-src": ("it", 1, docs["it"], 20), "en-src": ("en", 1, docs["en"], 20),
                                     "code-src": ("code", 2, docs["code"], 10)})
    cfg = stage2_config(tmp_path, {"it": ["ciao"]})
    rc, out = run_script("2_train_tokenizer.py", ["--config", str(cfg), "--set", "tokenizer.sample_chars=200000"], capsys)
    # found from stage 1's manifest before anything is read or written, one line per language
    assert rc == 2 and re.search(r"'code' gets 22% of tokenizer.sample_chars, i.e. 44,000 characters, but stage 1 "
                                 r"holds [\d,]+ \(sources code-src\)", out), out
    assert "lower tokenizer.sample_chars to at most" in out
    assert not (tmp_path / "runs/t/02_tokenizer").exists()
    # a manifest that overstates the sources: the draw runs out of text and says so, naming the source
    manifest = tmp_path / "runs/t/01_corpus/manifest.json"
    m = json.loads(manifest.read_text())
    for source in m["outputs"]["sources"].values():
        source["chars"] *= 3
    manifest.write_text(json.dumps(m))
    rc, out = run_script("2_train_tokenizer.py", ["--config", str(cfg), "--set", "tokenizer.sample_chars=150000"], capsys)
    assert rc == 2 and re.search(r"source 'code-src' holds [\d,]+ characters, but its share is", out), out
    assert not (tmp_path / "runs/t/02_tokenizer/manifest.json").exists()
