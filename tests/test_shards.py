"""Stage 3: shard round trip against a plain encode loop, workers 1 vs 2 byte-identical, SIGKILL and
resume byte-identical, --verify naming corrupted / truncated / stray files, and refused bad input."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from test_tokenizer import N_RESERVED, ROOT, run_script, sample_docs, write_stage1
from tokenizers import AddedToken, Tokenizer, models

from dante import config as C
from dante.artifacts import Stage, stable_unit
from dante.shards import SPLITS, ShardReader, check_dtype_fits, list_shards
from dante.tokenizer import EOS_ID, SPECIAL_TOKENS, all_special_tokens, load_tokenizer, train_tokenizer

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


def test_sigkill_then_resume_gives_identical_shards(tmp_path, capsys):
    ref_root, kill_root = tmp_path / "ref", tmp_path / "kill"
    make_run(ref_root, copies=3, per_shard=10)
    make_run(kill_root, copies=3, per_shard=10)
    rc, out = run_script("3_tokenize_shards.py", ["--config", str(shards_yaml(tmp_path / "r.yaml", ref_root, shard_tokens=1500))], capsys)
    assert rc == 0, out
    reference = _snapshot(ref_root / "t/03_shards")
    cfg = shards_yaml(tmp_path / "k.yaml", kill_root, shard_tokens=1500)
    out_dir = kill_root / "t/03_shards"
    proc = subprocess.Popen([sys.executable, str(ROOT / "3_tokenize_shards.py"), "--config", str(cfg)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 60
    while time.time() < deadline and not any(out_dir.glob("t1-train-0000[3-9].bin")):
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)  # the stage and its worker processes, mid-run
    proc.wait()
    assert not (out_dir / "manifest.json").exists(), "the run finished before the kill; make the input larger"
    assert (out_dir / "progress.json").exists()
    rc, out = run_script("3_tokenize_shards.py", ["--config", str(cfg)], capsys)
    assert rc == 0 and "resuming" in out, out
    assert _snapshot(out_dir) == reference
    m = json.loads((out_dir / "manifest.json").read_text())
    assert m["counts"] == json.loads((ref_root / "t/03_shards/manifest.json").read_text())["counts"]


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
