"""Stage 3: shard round trip against a plain encode loop, workers 1 vs 2 byte-identical, SIGKILL and
resume byte-identical, --verify naming corrupted / truncated / stray files, and refused bad input."""

from __future__ import annotations

import gzip
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from test_tokenizer import N_RESERVED, ROOT, run_script, sample_docs, write_stage1
from tokenizers import AddedToken, Tokenizer, decoders, models

from dante import config as C
from dante.artifacts import Stage, stable_unit
from dante.errors import UserError
from dante.pretrain_data import TieredMemmapDataset, ValidationWindows
from dante.shards import SPLITS, ShardReader, check_dtype_fits, list_shards
from dante.tokenizer import (
    EOS_ID,
    SPECIAL_TOKENS,
    all_special_tokens,
    build_pre_tokenizer,
    byte_symbols,
    load_tokenizer,
    train_tokenizer,
)
from tests.helpers import stage_files

SEED = 1234


def write_stage2(run: C.RunConfig, tok: Tokenizer) -> Path:
    st = Stage.open(C.TokenizerStageConfig(run=run), "02_tokenizer", force=True)
    (st.dir / "tokenizer.json").write_text(tok.to_str())
    st.finish(outputs={"tokenizer": "tokenizer.json"})
    return st.dir / "tokenizer.json"


def make_run(root: Path, copies: int = 1, per_shard: int = 10) -> tuple[C.RunConfig, dict]:
    docs = sample_docs()
    sources = {"it-a": ("it", 1, docs["it"] * copies, per_shard), "en-b": ("en", 1, docs["en"] * copies, per_shard),
               "code-c": ("code", 2, docs["code"] * copies, per_shard)}
    # duplicates across copies get distinct text so the split hash sees distinct documents
    sources = {k: (lang, tier, [f"{t} #{i}" for i, t in enumerate(texts)], per) for k, (lang, tier, texts, per) in sources.items()}
    run = write_stage1(root, sources)
    write_stage2(run, train_tokenizer([t for d in docs.values() for t in d], 600, n_reserved=N_RESERVED))
    return run, sources


def shards_yaml(path: Path, root: Path, **over) -> Path:
    s = {"shard_tokens": 2000, "val_fraction": 0.1, "workers": 2, "batch_docs": 7, "verify_samples": 8} | over
    path.write_text(f"run: {{name: t, root: {root}, seed: {SEED}}}\nshards: {json.dumps(s)}\n")
    return path


def test_shards_round_trip_against_plain_loop(tmp_path, capsys):
    run, sources = make_run(tmp_path / "runs")
    rc, out = run_script("3_tokenize_shards.py", ["--config", str(shards_yaml(tmp_path / "s.yaml", tmp_path / "runs"))], capsys)
    assert rc == 0, out
    d = tmp_path / "runs/t/03_shards"
    tok = load_tokenizer(tmp_path / "runs/t/02_tokenizer/tokenizer.json")
    # the independent reference: one document at a time, in stage-1 order, split by the same hash
    expect = {}
    for name in sorted(sources):
        lang, tier, texts, _ = sources[name]
        for text in texts:
            split = "val" if stable_unit(SEED, "split", text) < 0.1 else "train"
            ids, starts = expect.setdefault((tier, split), ([], []))
            starts.append(len(ids))
            ids += tok.encode(text).ids + [EOS_ID]
    for split in SPLITS:
        for tier, paths in list_shards(d, split).items():
            readers = [ShardReader(p) for p in paths]
            assert all(r.n_tokens == 2000 for r in readers[:-1]) and 0 < readers[-1].n_tokens <= 2000
            got = np.concatenate([np.asarray(r.tokens) for r in readers])
            starts = np.concatenate([r.doc_starts.astype(np.int64) + 2000 * i for i, r in enumerate(readers)])
            ids, exp_starts = expect[(tier, split)]
            assert got.dtype == np.uint16 and got.tolist() == ids
            assert starts.tolist() == exp_starts
            r = readers[0]
            s, e = next(r.complete_documents())
            assert tok.decode(r.tokens[s:e - 1].tolist()) in sources[{1: "en-b", 2: "code-c"}[tier]][2] + sources["it-a"][2]
    m = json.loads((d / "manifest.json").read_text())
    total_docs = sum(len(v[2]) for v in sources.values())
    assert sum(m["counts"]["total"][s]["docs"] for s in SPLITS) == total_docs
    assert m["counts"]["by_lang"]["code"]["train"]["docs"] + m["counts"]["by_lang"]["code"]["val"]["docs"] == len(sources["code-c"][2])
    assert m["counts"]["by_source"]["it-a"]["val"]["docs"] > 0 and m["outputs"]["dtype"] == "uint16"
    assert not (d / ".work").exists()
    # one worker, no pool: the same bytes
    two_workers = _snapshot(d)
    rc, out = run_script("3_tokenize_shards.py", ["--config", str(shards_yaml(tmp_path / "s1.yaml", tmp_path / "runs", workers=1)),
                                                  "--force"], capsys)
    assert rc == 0, out
    assert _snapshot(d) == two_workers


def _snapshot(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.glob("t*-*-*.*"))}


TIMING_FIELDS = ("started", "finished", "throughput", "resumed")


def _json_diff(a: bytes | None, b: bytes | None, prefix: str = "") -> list[str]:
    """Dotted keys where two JSON documents differ (for the failure message)."""
    x, y = (json.loads(a) if isinstance(a, bytes) else a), (json.loads(b) if isinstance(b, bytes) else b)
    if isinstance(x, dict) and isinstance(y, dict):
        return [d for k in sorted(set(x) | set(y)) for d in _json_diff(x.get(k), y.get(k), f"{prefix}{k}.")] \
            if x != y else []
    return [] if x == y else [f"{prefix[:-1]}: {str(x)[:80]} != {str(y)[:80]}"]


def _all_files(d: Path) -> dict[str, bytes]:
    """Every file under ``d`` by relative path; manifest.json without its timing fields."""
    return stage_files(d, TIMING_FIELDS)


def _tiny_profile_args(root: Path, **over) -> list[str]:
    """configs/tiny/shards.yaml (the tiny profile) pointed at a test run; shards small enough to be many."""
    sets = {"run.root": str(root), "run.name": "t", "shards.shard_tokens": 1500} | over
    return ["--config", str(ROOT / "configs/tiny/shards.yaml")] + [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]


def _start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / "3_tokenize_shards.py"), *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def test_sigkill_at_random_points_then_rerun_gives_identical_files(tmp_path, capsys):
    """Tiny profile; SIGKILL (stage and workers) once mid-run for sure and at a seeded random time; the rerun's
    files, manifest included (without timing fields), equal an uninterrupted run's byte for byte."""
    root = tmp_path / "runs"
    make_run(root, copies=2, per_shard=10)
    args = _tiny_profile_args(root)
    out_dir = root / "t/03_shards"
    t0 = time.time()
    rc, out = run_script("3_tokenize_shards.py", args, capsys)
    ref_seconds = time.time() - t0
    assert rc == 0, out
    reference = _all_files(out_dir)
    assert "manifest.json" in reference and len([k for k in reference if k.endswith(".bin")]) >= 6
    rng = random.Random(SEED)
    points = ["mid-run", rng.uniform(0.3, 1.0 + ref_seconds)]  # a sure mid-run kill, a seeded one (start-up included)
    killed_mid_run = 0
    for point in points:
        shutil.rmtree(out_dir)
        proc = _start(args)
        if point == "mid-run":
            deadline = time.time() + 60
            while time.time() < deadline and not any(out_dir.glob("t1-train-0000[3-9].bin")):
                time.sleep(0.005)
        else:
            time.sleep(point)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        killed_mid_run += not (out_dir / "manifest.json").exists()
        rc, out = run_script("3_tokenize_shards.py", args, capsys)
        assert rc == 0, (point, out)
        again = _all_files(out_dir)
        assert sorted(again) == sorted(reference), point
        changed = [k for k in reference if again[k] != reference[k]]
        assert changed == [], (point, changed, _json_diff(again.get("manifest.json"), reference.get("manifest.json")))
    assert killed_mid_run >= 1, "every kill came after the end; make the input larger"


def test_two_concurrent_runs_one_succeeds_one_names_the_holder(tmp_path):
    root = tmp_path / "runs"
    make_run(root, copies=3, per_shard=10)
    args = _tiny_profile_args(root)
    out_dir = root / "t/03_shards"
    first = _start(args)
    deadline = time.time() + 60
    while time.time() < deadline and not (out_dir / "progress.json").exists():
        time.sleep(0.005)
    os.killpg(first.pid, signal.SIGSTOP)  # holds the lock mid-run for as long as the second one needs
    try:
        second = subprocess.run([sys.executable, str(ROOT / "3_tokenize_shards.py"), *args], cwd=ROOT,
                                capture_output=True, text=True, timeout=120)
    finally:
        os.killpg(first.pid, signal.SIGCONT)
    out_first, _ = first.communicate(timeout=120)
    assert first.returncode == 0, out_first
    assert second.returncode == 2, second.stdout + second.stderr
    assert f"pid {first.pid}" in second.stderr and "being run by another process" in second.stderr
    assert "Traceback" not in second.stderr
    assert (out_dir / "manifest.json").is_file()
    assert ShardReader(next(out_dir.glob("t1-train-*.bin"))).check_crc() is None


def test_force_with_bad_inputs_changes_nothing(tmp_path, capsys):
    """validate runs before --force resets the folder: a rejected command leaves the finished stage as it was."""
    root = tmp_path / "runs"
    make_run(root)
    cfg = shards_yaml(tmp_path / "s.yaml", root)
    assert run_script("3_tokenize_shards.py", ["--config", str(cfg)], capsys)[0] == 0
    out_dir = root / "t/03_shards"
    before = _all_files(out_dir)
    tok = root / "t/02_tokenizer/tokenizer.json"
    tok.write_text(tok.read_text()[:-40])  # truncated tokenizer.json
    missing = root / "t/01_corpus/en-b/shard-00001.jsonl.gz"
    missing.unlink()
    for extra in (["--force"], ["--force", "--dry-run"]):
        rc, out = run_script("3_tokenize_shards.py", ["--config", str(cfg), *extra], capsys)
        assert rc == 2, out
        assert "tokenizer.json" in out and "shard-00001.jsonl.gz" in out and "Traceback" not in out
        assert _all_files(out_dir) == before


def test_verify_names_bad_files(tmp_path, capsys):
    run, _ = make_run(tmp_path / "runs")
    cfg = shards_yaml(tmp_path / "s.yaml", tmp_path / "runs")
    assert run_script("3_tokenize_shards.py", ["--config", str(cfg)], capsys)[0] == 0
    rc, out = run_script("3_tokenize_shards.py", ["--config", str(cfg), "--verify"], capsys)
    assert rc == 0 and "verified" in out
    d = tmp_path / "runs/t/03_shards"
    corrupt, truncated, bad_idx = d / "t1-train-00000.bin", d / "t1-train-00001.bin", d / "t2-train-00000.idx"
    data = bytearray(corrupt.read_bytes())
    data[200] ^= 0x01  # one bit inside the tokens
    corrupt.write_bytes(bytes(data))
    truncated.write_bytes(truncated.read_bytes()[:-6])
    bad_idx.write_bytes(bad_idx.read_bytes()[:-8])
    (d / "t9-train-00000.bin").write_bytes(b"junk")
    rc, out = run_script("3_tokenize_shards.py", ["--config", str(cfg), "--verify"], capsys)
    assert rc == 2
    for name in (corrupt.name, truncated.name, bad_idx.name, "t9-train-00000.bin"):
        assert name in out, (name, out)
    assert "checksum" in out and "truncated" in out
    with pytest.raises(Exception, match="truncated"):
        ShardReader(truncated)


def test_bad_inputs_are_refused_and_nothing_marked_done(tmp_path, capsys):
    cfg = shards_yaml(tmp_path / "s.yaml", tmp_path / "runs")
    rc, out = run_script("3_tokenize_shards.py", ["--config", str(cfg)], capsys)
    assert rc == 2 and "1_download_corpus.py" in out  # no stage 1
    run, sources = make_run(tmp_path / "runs")
    shard = tmp_path / "runs/t/01_corpus/en-b/shard-00002.jsonl.gz"
    shard.write_bytes(gzip.compress(b'{"text": "ok"}\n{"text": "caf\xe9"}\n'))
    rc, out = run_script("3_tokenize_shards.py", ["--config", str(cfg)], capsys)
    assert rc == 2 and "en-b/shard-00002.jsonl.gz" in out and "UTF-8" in out
    shard.write_bytes(gzip.compress(b'{"text": "ok"}\n' * 50)[:-10])  # truncated gzip
    rc, out = run_script("3_tokenize_shards.py", ["--config", str(cfg), "--force"], capsys)
    assert rc == 2 and "shard-00002.jsonl.gz" in out and "truncated" in out
    assert not (tmp_path / "runs/t/03_shards/manifest.json").exists()
    # a tokenizer with more ids than uint16 holds
    vocab = {t: i for i, t in enumerate(all_special_tokens(N_RESERVED))}
    vocab |= {f"tok{i}": len(vocab) + i for i in range(70_000)}
    big = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    big.add_special_tokens([AddedToken(t, special=True) for t in all_special_tokens(N_RESERVED)])
    write_stage2(run, big)
    rc, out = run_script("3_tokenize_shards.py", ["--config", str(cfg), "--force"], capsys)
    assert rc == 2 and "uint16" in out and "shards.dtype=uint32" in out
    assert not (tmp_path / "runs/t/03_shards/manifest.json").exists()
    check_dtype_fits(70_000, "uint32", Path("x"))  # what the hint says works
    assert SPECIAL_TOKENS[EOS_ID] == "<|end_of_text|>"


def _finished_shards(tmp_path, capsys) -> Path:
    make_run(tmp_path / "runs")
    assert run_script("3_tokenize_shards.py", ["--config", str(shards_yaml(tmp_path / "s.yaml", tmp_path / "runs"))],
                      capsys)[0] == 0
    return tmp_path / "runs/t/03_shards"


def _damage(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "flip64":  # 64 bytes inside the tokens, size unchanged
        for i in range(64):
            data[300 + 7 * i] ^= 0x5A
    elif how == "truncate":
        data = data[:-10]
    elif how == "header":
        data[0:8] = b"NOTDANTE"
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("how, expect", [("flip64", "checksum mismatch in bytes 0..") , ("truncate", "truncated"),
                                         ("header", "not a Dante shard")])
def test_training_readers_refuse_a_damaged_shard(tmp_path, capsys, how, expect):
    """Stages 4 and 5 read through TieredMemmapDataset / ValidationWindows: a damaged shard is a UserError
    naming the file, the problem and both fixes, also after an earlier open left its verified-once marker."""
    d = _finished_shards(tmp_path, capsys)
    TieredMemmapDataset.from_stage_dir(d, {1: 1.0, 2: 1.0}, 16, 2, SEED)  # intact: verified, markers written
    assert (d / "verified" / "t1-train-00000.bin.json").is_file()
    victim = d / "t1-train-00001.bin"
    _damage(victim, how)
    with pytest.raises(UserError) as e:
        TieredMemmapDataset.from_stage_dir(d, {1: 1.0, 2: 1.0}, 16, 2, SEED)
    msg = str(e.value)
    assert victim.name in msg and expect in msg and "--verify" in msg and "--force" in msg, msg
    val = d / "t1-val-00000.bin"
    _damage(val, how)
    with pytest.raises(UserError, match="t1-val-00000.bin"):
        ValidationWindows.from_stage_dir(d, 16, 2)


def test_readers_refuse_ids_beyond_the_vocabulary(tmp_path, capsys):
    d = _finished_shards(tmp_path, capsys)
    vocab = json.loads((d / "manifest.json").read_text())["outputs"]["vocab_size"]
    data = TieredMemmapDataset.from_stage_dir(d, {1: 1.0, 2: 1.0}, 16, 2, SEED)
    assert data.vocab_size == vocab
    with pytest.raises(UserError) as e:  # model.vocab_size smaller than the ids in the shards
        TieredMemmapDataset.from_stage_dir(d, {1: 1.0, 2: 1.0}, 16, 2, SEED, vocab_size=300)
    assert "not below the vocabulary size 300" in str(e.value) and f"model.vocab_size={vocab}" in str(e.value)
    with pytest.raises(UserError, match="vocabulary size 300"):
        ValidationWindows.from_stage_dir(d, 16, 2, vocab_size=300)


def test_marker_makes_later_opens_cheap_and_follows_the_file(tmp_path, capsys):
    """The full check runs once per file version: the marker's key is (size, mtime_ns, checksums hash)."""
    d = _finished_shards(tmp_path, capsys)
    TieredMemmapDataset.from_stage_dir(d, {1: 1.0}, 16, 2, SEED)
    marker = d / "verified" / "t1-train-00000.bin.json"
    saved = json.loads(marker.read_text())
    assert saved["max_id"] == int(np.asarray(ShardReader(d / "t1-train-00000.bin").tokens).max())
    stamp = marker.stat().st_mtime_ns
    TieredMemmapDataset.from_stage_dir(d, {1: 1.0}, 16, 2, SEED)
    assert marker.stat().st_mtime_ns == stamp  # not rechecked
    shard = d / "t1-train-00000.bin"
    shard.write_bytes(shard.read_bytes())  # same bytes, new mtime: checked again (and still fine)
    TieredMemmapDataset.from_stage_dir(d, {1: 1.0}, 16, 2, SEED)
    assert json.loads(marker.read_text())["key"] != saved["key"]
    assert run_script("3_tokenize_shards.py", ["--config", str(tmp_path / "s.yaml"), "--verify"], capsys)[0] == 0


# ---------------------------------------------------------------------------------------------------
# The tiktoken path (#15): equal bytes where proven, refused with the reason where not
# ---------------------------------------------------------------------------------------------------


def _encoder_run(tmp_path, capsys, root: Path, encoder: str, force: bool, **over) -> tuple[dict, dict, str]:
    args = _tiny_profile_args(root, **{"shards.encoder": encoder} | over) + (["--force"] if force else [])
    rc, out = run_script("3_tokenize_shards.py", args, capsys)
    assert rc == 0, out
    d = root / "t/03_shards"
    return _snapshot(d), json.loads((d / "manifest.json").read_text()), out


def test_tiktoken_path_is_byte_identical_to_tokenizers_path(tmp_path, capsys):
    """Tiny profile (its Dante tokenizer of make_run): auto picks tiktoken after the proof; same shard bytes."""
    root = tmp_path / "runs"
    make_run(root, copies=2)
    fast, m_fast, out = _encoder_run(tmp_path, capsys, root, "auto", False)
    assert m_fast["encoder"]["used"] == "tiktoken" and m_fast["encoder"]["checked_docs"] > 100, m_fast["encoder"]
    assert "encoder: tiktoken (ids equal" in out
    slow, m_slow, _ = _encoder_run(tmp_path, capsys, root, "tokenizers", True)
    assert m_slow["encoder"]["used"] == "tokenizers"
    assert fast == slow and len(fast) > 20
    assert m_fast["counts"] == m_slow["counts"] and m_fast["outputs"]["checksums"] == m_slow["outputs"]["checksums"]


def _real_text() -> dict[str, list[str]]:
    out = {}
    for f in sorted((ROOT / "data/sample").glob("*.jsonl.gz")):
        with gzip.open(f, "rt", encoding="utf-8") as fh:
            out[f.name.split(".")[0]] = [json.loads(line)["text"] for line in fh]
    return out


def test_tiktoken_path_equals_tokenizers_path_at_32k_on_real_text(tmp_path, capsys):
    """A 32K llama3 tokenizer (the tiny profile's preset) trained here on data/sample's real text, stage 1
    from the same text: both encoders write the same shard bytes."""
    texts = _real_text()
    tok = train_tokenizer([t for ts in texts.values() for t in ts], 32768, "llama3", n_reserved=248)
    assert tok.get_vocab_size() == 32768
    root = tmp_path / "runs"
    sources = {name: (name.split("-")[0], 2 if name.startswith("code") else 1, ts, 100) for name, ts in texts.items()}
    run = write_stage1(root, sources)
    write_stage2(run, tok)
    over = {"shards.shard_tokens": 200_000}
    fast, m_fast, _ = _encoder_run(tmp_path, capsys, root, "tiktoken", False, **over)
    slow, m_slow, _ = _encoder_run(tmp_path, capsys, root, "tokenizers", True, **over)
    assert m_fast["encoder"]["used"] == "tiktoken" and m_fast["encoder"]["fallback_docs"] == 0
    assert fast == slow and m_fast["counts"] == m_slow["counts"]
    assert m_fast["counts"]["total"]["train"]["tokens"] > 1_000_000


def _edited(tok: Tokenizer, edit) -> Tokenizer:
    """A copy of ``tok`` with its saved JSON state changed by ``edit``."""
    state = json.loads(tok.to_str())
    edit(state)
    return Tokenizer.from_str(json.dumps(state))


def _che_tokenizer() -> Tokenizer:
    """A valid Dante tokenizer tiktoken gets wrong: merges h+e, c+h, ch+e. On "che" tokenizers stops at
    c|he ((c, he) is no merge); tiktoken merges c+he because "che" is a token."""
    specials = all_special_tokens(N_RESERVED)
    symbols = byte_symbols()
    vocab = {t: i for i, t in enumerate(specials + symbols + ["he", "ch", "che"])}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[("h", "e"), ("c", "h"), ("ch", "e")]))
    tok.pre_tokenizer = build_pre_tokenizer("llama3")
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    return tok


def test_a_tokenizer_tiktoken_cannot_reproduce_is_refused_and_stage_3_completes(tmp_path, capsys):
    root = tmp_path / "runs"
    run, _ = make_run(root)
    base = load_tokenizer(root / "t/02_tokenizer/tokenizer.json")
    cases = {
        "normalizer": (_edited(base, lambda s: s.update(normalizer={"type": "Lowercase"})),
                       "it has a normalizer (Lowercase); tiktoken applies none"),
        "two regexes": (_edited(base, lambda s: s["pre_tokenizer"]["pretokenizers"].insert(
            0, {"type": "Split", "pattern": {"Regex": r"\p{N}"}, "behavior": "Isolated", "invert": False})),
            "applies 2 split regexes in sequence"),
        "BPE differs": (_che_tokenizer(), "tiktoken's ids differ from tokenizers' on this run's documents"),
    }
    for name, (tok, reason) in cases.items():
        write_stage2(run, tok)
        rc, out = run_script("3_tokenize_shards.py", _tiny_profile_args(root, **{"shards.encoder": "tiktoken"}) + ["--force"], capsys)
        assert rc == 2 and reason in out and "shards.encoder=auto" in out, (name, out)
        assert not (root / "t/03_shards").exists(), name  # refused before any work: no folder left
        _, m, out = _encoder_run(tmp_path, capsys, root, "auto", True)
        assert m["encoder"]["used"] == "tokenizers" and reason in m["encoder"]["reason"], (name, m["encoder"])
        assert "the tiktoken path is off because" in out and reason in out
    assert "ids differ at token" in m["encoder"]["reason"] and "che" in m["encoder"]["reason"]
    # the fallback's shards are tokenizers' own ids
    d = root / "t/03_shards"
    tok = load_tokenizer(root / "t/02_tokenizer/tokenizer.json")
    r = ShardReader(sorted(d.glob("t1-train-*.bin"))[0])
    s, e = next(r.complete_documents())
    assert r.tokens[s:e - 1].tolist() == tok.encode(tok.decode(r.tokens[s:e - 1].tolist())).ids


def test_stage_3_reads_a_version_1_gzip_corpus(tmp_path):
    """A 01_corpus written before zstd (format version 1, gzip shards) is still stage 3's input."""
    from dante import corpus as corpus_mod
    from dante.artifacts import Stage
    from dante.shards import validate_stage
    from dante.tokenizer import train_tokenizer
    from tests.helpers import sft_sample_texts, write_tokenizer_stage

    run = C.RunConfig(name="v1", root=str(tmp_path / "runs"))
    st = Stage.open(C.CorpusStageConfig(run=run), "01_corpus", format_version=1)
    texts = [f"Documento numero {i}: l'intelligenza dell'algoritmo." for i in range(9)]
    corpus_mod.write_shard(st.dir / "a" / "shard-00000.jsonl.gz",
                           [{"text": t, "source": "a", "lang": "it", "tier": 1} for t in texts])
    assert (st.dir / "a" / "shard-00000.jsonl.gz").read_bytes()[:2] == corpus_mod.GZIP_MAGIC
    st.finish(outputs={"sources": {"a": {"lang": "it", "tier": 1, "shards": ["a/shard-00000.jsonl.gz"]}}})
    write_tokenizer_stage(run, train_tokenizer(sft_sample_texts(), vocab_size=600, n_reserved=8, pinned_chars=[]))
    cfg = C.ShardsStageConfig(run=run)
    plan = validate_stage(Stage.prepare(cfg, "03_shards"), cfg)
    assert len(plan.files) == 1
