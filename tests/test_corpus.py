"""Stage 1 (1_download_corpus.py / dante/corpus.py) on small local sources written by the tests.

Checked against a plain-Python reference of the rules (NFC, min_chars, first-occurrence dedup); every
bad input of issue 2 gives exit code 2, a message naming the problem, and no manifest; a real SIGKILL in
the middle of a run followed by a rerun gives exactly the records of an uninterrupted run.
"""

from __future__ import annotations

import gzip
import json
import os
import random
import runpy
import signal
import subprocess
import sys
import time
import unicodedata
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from dante import config as C
from dante import corpus, corpus_chunks
from dante.dedup import DedupIndex
from tests.helpers import stage_files as helper_stage_files

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "1_download_corpus.py"
# No test may reach the network: a hub lookup must fail fast instead of waiting on DNS.
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
os.environ.update(OFFLINE_ENV)

LOREM = (
    "Il sistema operativo gestisce le risorse della macchina e offre servizi ai programmi che vi girano sopra; "
    "ogni processo ha uno spazio di indirizzamento separato."
)


# ---------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------


def write_jsonl(path: Path, rows: list[dict], gz: bool = False) -> Path:
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")
    path.write_bytes(gzip.compress(data, mtime=0) if gz else data)
    return path


def source(name: str, path: Path, **kw) -> dict:
    return {"name": name, "kind": "local", "path": str(path), "lang": "it", "tier": 1, "min_chars": 20, **kw}


def write_config(tmp_path: Path, sources: list[dict], name: str = "corpus.yaml", **corpus_kw) -> Path:
    cfg = {
        "run": {"name": "t", "root": str(tmp_path / "runs")},
        "corpus": {"docs_per_shard": 3, "non_utf8": "skip", **corpus_kw, "sources": sources},
    }
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return path


def run_stage1(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """Run 1_download_corpus.py in this process (as __main__): exit code, stdout, stderr."""
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), *args])
    with pytest.raises(SystemExit) as exc:
        runpy.run_path(str(SCRIPT), run_name="__main__")
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err


def stage_dir(tmp_path: Path, root: str = "runs") -> Path:
    return tmp_path / root / "t" / "01_corpus"


def all_records(sdir: Path) -> list[dict]:
    manifest = json.loads((sdir / "manifest.json").read_text())
    return list(corpus.iter_documents(sdir, manifest))


def reference_keep(docs: list[str | None], min_chars: int, seen: set[str]) -> list[str]:
    """The rules written as a plain loop: NFC, min_chars on stripped length, first occurrence wins."""
    kept = []
    for d in docs:
        text = unicodedata.normalize("NFC", d or "")
        if len(text.strip()) < max(min_chars, 1) or text in seen:
            continue
        seen.add(text)
        kept.append(text)
    return kept


# ---------------------------------------------------------------------------------------------------
# the happy path
# ---------------------------------------------------------------------------------------------------


def test_local_jsonl_txt_parquet_filter_dedup_normalize_count(tmp_path, monkeypatch, capsys):
    decomposed = "Perche\u0301 il caffe\u0300 e\u0300 buono: " + LOREM  # e + combining accents
    composed = unicodedata.normalize("NFC", decomposed)
    assert decomposed != composed and "è" in composed and "e\u0300" not in composed
    jsonl_docs = [decomposed, "troppo corto", composed, None, LOREM, LOREM + " Fine.", "  " + " " * 40]
    write_jsonl(tmp_path / "a.jsonl", [{"text": t, "id": i} for i, t in enumerate(jsonl_docs)])
    txt_lines = ["Prima riga abbastanza lunga da superare il filtro.", "corta", LOREM, "Seconda riga lunga, diversa da ogni altra."]
    (tmp_path / "b.txt").write_text("\n".join(txt_lines) + "\n", encoding="utf-8")
    pq_docs = ["Un documento parquet con un campo dal nome diverso.", composed, "Ultimo documento del parquet, unico."]
    pq.write_table(pa.table({"body": pq_docs, "n": list(range(3))}), tmp_path / "c.parquet")

    cfg = write_config(tmp_path, [
        source("a", tmp_path / "a.jsonl"),
        source("b", tmp_path / "b.txt", format="txt", lang="en", tier=2),
        source("c", tmp_path / "c.parquet", format="parquet", text_field="body", lang="code", tier=3),
    ])
    code, out, err = run_stage1(monkeypatch, capsys, "--config", str(cfg))
    assert code == 0, err

    seen: set[str] = set()
    expected = {
        "a": reference_keep(jsonl_docs, 20, seen),
        "b": reference_keep(txt_lines, 20, seen),
        "c": reference_keep(pq_docs, 20, seen),
    }
    sdir = stage_dir(tmp_path)
    manifest = json.loads((sdir / "manifest.json").read_text())
    assert manifest["stage"] == "01_corpus" and manifest["format_version"] == corpus.FORMAT_VERSION
    sources = manifest["outputs"]["sources"]
    for name, lang, tier in (("a", "it", 1), ("b", "en", 2), ("c", "code", 3)):
        records = [r for rel in sources[name]["shards"] for r in corpus.read_shard(sdir / rel)]
        assert [r["text"] for r in records] == expected[name]
        assert all(r == {"text": r["text"], "source": name, "lang": lang, "tier": tier} for r in records)
        assert sources[name]["docs"] == len(expected[name])
        assert sources[name]["chars"] == sum(len(t) for t in expected[name])
        assert sources[name]["lang"] == lang and sources[name]["tier"] == tier
    # the decomposed spelling was stored composed, and its composed twin counted as a duplicate
    assert sources["a"]["shards"] and composed in expected["a"]
    assert (sources["a"]["docs_read"], sources["a"]["dropped_filter"], sources["a"]["dropped_dedup"]) == (7, 3, 1)
    assert (sources["b"]["docs_read"], sources["b"]["dropped_filter"], sources["b"]["dropped_dedup"]) == (4, 1, 1)
    assert (sources["c"]["docs_read"], sources["c"]["dropped_filter"], sources["c"]["dropped_dedup"]) == (3, 0, 1)
    assert len(sources["a"]["shards"]) == 1 and len(sources["b"]["shards"]) == 1  # 3 docs <= docs_per_shard
    totals = manifest["outputs"]["totals"]
    assert totals["it"]["docs"] == len(expected["a"]) and totals["en"]["chars"] == sum(map(len, expected["b"]))
    assert manifest["counts"]["docs"] == sum(len(v) for v in expected.values())
    assert set(manifest["inputs"]) == {"source:a", "source:b", "source:c"}
    assert not (sdir / "progress.json").exists()


def test_shards_split_at_docs_per_shard_and_budget_stops_a_source(tmp_path, monkeypatch, capsys):
    docs = [f"documento numero {i:03d} " + "x" * 79 for i in range(10)]  # 100 chars each
    write_jsonl(tmp_path / "a.jsonl.gz", [{"text": t} for t in docs], gz=True)
    write_jsonl(tmp_path / "b.jsonl", [{"text": t.upper()} for t in docs])
    cfg = write_config(tmp_path, [
        source("unlimited", tmp_path / "a.jsonl.gz", char_budget=0),
        source("budget", tmp_path / "b.jsonl", char_budget=250),
    ], docs_per_shard=4)
    code, _, err = run_stage1(monkeypatch, capsys, "--config", str(cfg))
    assert code == 0, err
    sdir = stage_dir(tmp_path)
    m = json.loads((sdir / "manifest.json").read_text())["outputs"]["sources"]
    # budget 0 means no limit: all 10 documents, in shards of 4, 4, 2
    assert m["unlimited"]["docs"] == 10
    assert [len(list(corpus.read_shard(sdir / s))) for s in m["unlimited"]["shards"]] == [4, 4, 2]
    # budget 250 chars: the third 100-char document crosses it and is the last one kept
    assert (m["budget"]["docs"], m["budget"]["chars"], m["budget"]["docs_read"]) == (3, 300, 3)


def test_rerun_of_complete_stage_is_a_noop(tmp_path, monkeypatch, capsys):
    write_jsonl(tmp_path / "a.jsonl", [{"text": LOREM + str(i)} for i in range(5)])
    cfg = write_config(tmp_path, [source("a", tmp_path / "a.jsonl")])
    assert run_stage1(monkeypatch, capsys, "--config", str(cfg))[0] == 0
    manifest = stage_dir(tmp_path) / "manifest.json"
    before = (manifest.read_bytes(), manifest.stat().st_mtime_ns)
    code, out, _ = run_stage1(monkeypatch, capsys, "--config", str(cfg))
    assert code == 0 and "already complete" in out and "nothing to do" in out
    assert (manifest.read_bytes(), manifest.stat().st_mtime_ns) == before


def test_dry_run_prints_plan_without_work(tmp_path, monkeypatch, capsys):
    write_jsonl(tmp_path / "a.jsonl", [{"text": LOREM}])
    cfg = write_config(tmp_path, [
        source("local-a", tmp_path / "a.jsonl", char_budget=1000),
        {"name": "hub-b", "kind": "hf", "hf_id": "org/never-contacted", "hf_config": "x", "lang": "en", "tier": 2},
    ])
    code, out, _ = run_stage1(monkeypatch, capsys, "--config", str(cfg), "--dry-run")
    assert code == 0
    assert "local-a" in out and "1,000" in out and "[1 file(s)]" in out
    assert "hub-b" in out and "hf:org/never-contacted config=x" in out and "unlimited" in out
    assert not (tmp_path / "runs").exists()


def test_hf_kind_streams_a_dataset_folder(tmp_path, monkeypatch, capsys):
    """kind hf goes through load_dataset(hf_id, streaming=True); a local dataset folder needs no network."""
    repo = tmp_path / "hub-repo" / "data"
    repo.mkdir(parents=True)
    pq.write_table(pa.table({"content": [LOREM + " uno", LOREM + " due"], "meta": ["a", "b"]}),
                   repo / "train-00000-of-00001.parquet")
    cfg = write_config(tmp_path, [{"name": "hub", "kind": "hf", "hf_id": str(tmp_path / "hub-repo"),
                                    "text_field": "content", "lang": "code", "tier": 1, "min_chars": 20}])
    code, out, err = run_stage1(monkeypatch, capsys, "--config", str(cfg))
    assert code == 0, err
    assert [r["text"] for r in all_records(stage_dir(tmp_path))] == [LOREM + " uno", LOREM + " due"]
    assert "source 'hub': the hub stream is one shard (a file that cannot be split); it is read in this process" in out


def test_dotted_text_field_reaches_nested_mapping(tmp_path, monkeypatch, capsys):
    rows = [{"translation": {"en": "An English sentence long enough.", "it": "Una frase italiana abbastanza lunga."}}]
    write_jsonl(tmp_path / "pairs.jsonl", rows)
    cfg = write_config(tmp_path, [source("pairs-it", tmp_path / "pairs.jsonl", text_field="translation.it")])
    assert run_stage1(monkeypatch, capsys, "--config", str(cfg))[0] == 0
    assert [r["text"] for r in all_records(stage_dir(tmp_path))] == ["Una frase italiana abbastanza lunga."]


@pytest.mark.parametrize("sample_by, expected", [
    ("paragraph", ["Primo paragrafo,\nsu due righe.", "Secondo paragrafo."]),
    ("document", ["Primo paragrafo,\nsu due righe.\n\nSecondo paragrafo."]),
])
def test_txt_document_unit(tmp_path, monkeypatch, capsys, sample_by, expected):
    (tmp_path / "p.txt").write_text("Primo paragrafo,\nsu due righe.\n\nSecondo paragrafo.", encoding="utf-8")
    cfg = write_config(tmp_path, [source("p", tmp_path / "p.txt", format="txt", sample_by=sample_by, min_chars=5)])
    assert run_stage1(monkeypatch, capsys, "--config", str(cfg))[0] == 0
    assert [r["text"] for r in all_records(stage_dir(tmp_path))] == expected


# ---------------------------------------------------------------------------------------------------
# non-UTF-8 policy
# ---------------------------------------------------------------------------------------------------


def _files_with_bad_bytes(tmp_path: Path) -> tuple[Path, Path]:
    good = [json.dumps({"text": LOREM + f" {i}"}).encode() + b"\n" for i in range(3)]
    bad_json = b'{"text": "Latin-1 bytes: perch\xe9 non \xe8 UTF-8, una riga rovinata nel mezzo"}\n'
    (tmp_path / "bad.jsonl").write_bytes(good[0] + bad_json + good[1] + good[2])
    (tmp_path / "bad.txt").write_bytes(
        b"Una riga buona, lunga abbastanza per il filtro.\n"
        b"Una riga con un byte rotto \xff in mezzo al testo.\n"
        b"Un'altra riga buona alla fine del file di testo.\n"
    )
    return tmp_path / "bad.jsonl", tmp_path / "bad.txt"


def test_non_utf8_skip_drops_and_counts_the_bad_document(tmp_path, monkeypatch, capsys):
    bad_jsonl, bad_txt = _files_with_bad_bytes(tmp_path)
    cfg = write_config(tmp_path, [source("j", bad_jsonl), source("t", bad_txt, format="txt")], non_utf8="skip")
    code, _, err = run_stage1(monkeypatch, capsys, "--config", str(cfg))
    assert code == 0, err
    sdir = stage_dir(tmp_path)
    m = json.loads((sdir / "manifest.json").read_text())["outputs"]["sources"]
    assert (m["j"]["docs_read"], m["j"]["docs"], m["j"]["dropped_non_utf8"]) == (4, 3, 1)
    assert (m["t"]["docs_read"], m["t"]["docs"], m["t"]["dropped_non_utf8"]) == (3, 2, 1)
    assert all("\ufffd" not in r["text"] for r in all_records(sdir))


@pytest.mark.parametrize("which", ["jsonl", "txt"])
def test_non_utf8_error_refuses_naming_the_source(tmp_path, monkeypatch, capsys, which):
    bad_jsonl, bad_txt = _files_with_bad_bytes(tmp_path)
    src = source("rotten", bad_jsonl) if which == "jsonl" else source("rotten", bad_txt, format="txt")
    cfg = write_config(tmp_path, [src], non_utf8="error")
    code, _, err = run_stage1(monkeypatch, capsys, "--config", str(cfg))
    assert code == 2
    assert "'rotten'" in err and "not UTF-8" in err and "non_utf8" in err and "line 2" in err
    assert not (stage_dir(tmp_path) / "manifest.json").exists()


# ---------------------------------------------------------------------------------------------------
# bad input: clear error, exit 2, nothing marked done
# ---------------------------------------------------------------------------------------------------


def _bad_case(tmp_path: Path, case: str) -> tuple[Path, list[str]]:
    ok = write_jsonl(tmp_path / "ok.jsonl", [{"text": LOREM}])
    if case == "unknown_kind":
        return write_config(tmp_path, [{**source("s", ok), "kind": "ftp"}]), ["corpus.sources[0].kind", "'ftp'", "corpus.yaml"]
    if case == "missing_path":
        return write_config(tmp_path, [source("s", tmp_path / "nope.jsonl")]), ["'s'", "nope.jsonl", "does not exist"]
    if case == "glob_matches_nothing":
        return write_config(tmp_path, [source("s", tmp_path / "none-*.jsonl")]), ["'s'", "no file matches"]
    if case == "text_field_absent":
        write_jsonl(tmp_path / "other.jsonl", [{"body": LOREM, "id": 1}])
        return write_config(tmp_path, [source("s", tmp_path / "other.jsonl")]), ["'s'", "text field 'text' not found", "body", "text_field"]
    if case == "empty_source":
        write_jsonl(tmp_path / "short.jsonl", [{"text": "corto"}, {"text": "breve"}])
        return write_config(tmp_path, [source("s", tmp_path / "short.jsonl", min_chars=50)]), ["'s' kept no document", "2 shorter than min_chars=50"]
    if case == "empty_file":
        (tmp_path / "empty.jsonl").write_bytes(b"")
        return write_config(tmp_path, [source("s", tmp_path / "empty.jsonl")]), ["'s' kept no document", "0 read"]
    if case == "negative_budget":
        return write_config(tmp_path, [source("s", ok, char_budget=-5)]), ["corpus.sources[0].char_budget", "0 means unlimited"]
    if case == "wrong_type":
        return write_config(tmp_path, [source("s", ok, tier="one")]), ["corpus.sources[0].tier", "expected an integer"]
    if case == "not_writable":
        (tmp_path / "a-file").write_text("in the way")
        cfg = write_config(tmp_path, [source("s", ok)])
        data = yaml.safe_load(cfg.read_text())
        data["run"]["root"] = str(tmp_path / "a-file" / "runs")
        cfg.write_text(yaml.safe_dump(data))
        return cfg, ["cannot be created", "a-file", "run.root"]
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["unknown_kind", "missing_path", "glob_matches_nothing", "text_field_absent",
                                  "empty_source", "empty_file", "negative_budget", "wrong_type", "not_writable"])
def test_bad_input_is_a_clear_error_and_nothing_is_done(tmp_path, monkeypatch, capsys, case):
    cfg, expected = _bad_case(tmp_path, case)
    code, out, err = run_stage1(monkeypatch, capsys, "--config", str(cfg))
    assert code == 2, (out, err)
    assert "Traceback" not in err
    for piece in expected:
        assert piece in err, (piece, err)
    assert not list(tmp_path.rglob("manifest.json"))


def test_a_failing_source_keeps_the_others_progress(tmp_path, monkeypatch, capsys):
    """One source fails (here: its rows lack the text field); the others complete, the stage exits 2
    naming it, writes no manifest, and a rerun does not redo the sources that completed."""
    write_jsonl(tmp_path / "a.jsonl", [{"text": LOREM + f" a{i}"} for i in range(4)])
    write_jsonl(tmp_path / "bad.jsonl", [{"body": LOREM}])
    write_jsonl(tmp_path / "b.jsonl", [{"text": LOREM + f" b{i}"} for i in range(4)])
    cfg = write_config(tmp_path, [source("first", tmp_path / "a.jsonl"), source("broken", tmp_path / "bad.jsonl"),
                                  source("last", tmp_path / "b.jsonl")])
    code, _, err = run_stage1(monkeypatch, capsys, "--config", str(cfg))
    assert code == 2 and "1 source(s) failed" in err and "broken" in err and "first:" not in err
    sdir = stage_dir(tmp_path)
    assert not (sdir / "manifest.json").exists()
    state = json.loads((sdir / "progress.json").read_text())["state"]["sources"]
    assert state["first"]["status"] == "done" and state["last"]["status"] == "done"
    assert state["broken"]["status"] == "failed" and "text field 'text' not found" in state["broken"]["error"]
    shard = sdir / state["first"]["shards"][0]
    mtime = shard.stat().st_mtime_ns

    code, out, err = run_stage1(monkeypatch, capsys, "--config", str(cfg))
    assert code == 2 and "broken" in err
    assert "first: already complete" in out and "last: already complete" in out
    assert shard.stat().st_mtime_ns == mtime

    # changing a source that already wrote shards would invalidate them: refused, naming it
    code, _, err = run_stage1(monkeypatch, capsys, "--config", str(cfg), "--set", "corpus.docs_per_shard=9")
    assert code == 2 and "settings outside corpus.sources changed" in err and "--force" in err
    data = yaml.safe_load(cfg.read_text())
    data["corpus"]["sources"][0]["min_chars"] = 5
    changed_done = write_config(tmp_path, data["corpus"]["sources"], name="changed.yaml")
    code, _, err = run_stage1(monkeypatch, capsys, "--config", str(changed_done))
    assert code == 2 and "source 'first' already wrote shards" in err

    # correcting the failed source (its config) resumes: the completed sources are kept as they are
    data["corpus"]["sources"][0]["min_chars"] = 20
    data["corpus"]["sources"][1]["text_field"] = "body"
    fixed = write_config(tmp_path, data["corpus"]["sources"], name="fixed.yaml")
    code, out, err = run_stage1(monkeypatch, capsys, "--config", str(fixed))
    assert code == 0, err
    assert "first: already complete" in out and shard.stat().st_mtime_ns == mtime
    manifest = json.loads((sdir / "manifest.json").read_text())
    assert manifest["outputs"]["dedup_order"] == ["first", "last", "broken"]
    assert manifest["outputs"]["sources"]["broken"]["docs"] == 1
    assert manifest["config"]["corpus"]["sources"][1]["text_field"] == "body"


def test_missing_hub_dataset_fails_alone(tmp_path):
    """A hub dataset that cannot be reached (offline here) is recorded as failed, by name."""
    write_jsonl(tmp_path / "a.jsonl", [{"text": LOREM + f" a{i}"} for i in range(4)])
    cfg = write_config(tmp_path, [
        {"name": "missing-hub", "kind": "hf", "hf_id": "dante-tests/does-not-exist", "lang": "en", "tier": 1},
        source("local", tmp_path / "a.jsonl"),
    ])
    r = subprocess.run([sys.executable, str(SCRIPT), "--config", str(cfg)], cwd=REPO,
                       env={**os.environ, **OFFLINE_ENV}, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert "missing-hub" in r.stderr and "dante-tests/does-not-exist" in r.stderr and "Traceback" not in r.stderr
    state = json.loads((stage_dir(tmp_path) / "progress.json").read_text())["state"]["sources"]
    assert state["local"]["status"] == "done" and state["missing-hub"]["status"] == "failed"
    assert not (stage_dir(tmp_path) / "manifest.json").exists()


# ---------------------------------------------------------------------------------------------------
# resume after a real SIGKILL
# ---------------------------------------------------------------------------------------------------


def _big_sources(tmp_path: Path) -> list[dict]:
    """~7k documents with duplicates (within and across sources) and short ones, deterministic."""
    rng = random.Random(7)
    words = LOREM.replace(";", "").replace(",", "").replace(".", "").split()
    rows_a = []
    for i in range(6000):
        if i % 97 == 0 and i:
            rows_a.append(rows_a[rng.randrange(len(rows_a))])  # duplicate of an earlier document
        elif i % 31 == 0:
            rows_a.append({"text": "breve"})
        else:
            rows_a.append({"text": f"{i} " + " ".join(rng.choice(words) for _ in range(rng.randint(8, 40)))})
    rows_b = [rows_a[j] for j in range(0, 6000, 25)] + [{"text": f"b{i} " + LOREM} for i in range(1000)]
    write_jsonl(tmp_path / "a.jsonl.gz", rows_a, gz=True)
    write_jsonl(tmp_path / "b.jsonl", rows_b)
    return [source("big-a", tmp_path / "a.jsonl.gz"), source("big-b", tmp_path / "b.jsonl", lang="en")]


def _kill_mid_run(cfg: Path, sdir: Path) -> None:
    proc = subprocess.Popen([sys.executable, str(SCRIPT), "--config", str(cfg)], cwd=REPO,
                            env={**os.environ, **OFFLINE_ENV}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            try:
                prog = json.loads((sdir / "progress.json").read_text())
                if len(prog["state"].get("sources", {}).get("big-a", {}).get("shards", [])) >= 3:
                    break
            except (FileNotFoundError, json.JSONDecodeError, KeyError):
                pass
            assert proc.poll() is None, "stage 1 finished before it could be killed; make the source bigger"
            time.sleep(0.002)
        time.sleep(0.002)  # land inside the next shard (a fast machine finishes the rest in ~50 ms)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert not (sdir / "manifest.json").exists()


def test_sigkill_then_rerun_gives_the_uninterrupted_result(tmp_path, monkeypatch, capsys):
    sources = _big_sources(tmp_path)
    ref_cfg = write_config(tmp_path, sources, name="ref.yaml", docs_per_shard=400)
    data = yaml.safe_load(ref_cfg.read_text())
    data["run"]["root"] = str(tmp_path / "killed")
    kill_cfg = tmp_path / "killed.yaml"
    kill_cfg.write_text(yaml.safe_dump(data))

    killed_dir = stage_dir(tmp_path, "killed")
    _kill_mid_run(kill_cfg, killed_dir)
    progress = json.loads((killed_dir / "progress.json").read_text())["state"]["sources"]
    n_done_before = len(progress["big-a"]["shards"])
    assert n_done_before >= 3 and progress["big-a"]["pos"]["at"] is not None

    code, out, err = run_stage1(monkeypatch, capsys, "--config", str(kill_cfg))
    assert code == 0, err
    assert "resuming" in out
    code, _, err = run_stage1(monkeypatch, capsys, "--config", str(ref_cfg))
    assert code == 0, err

    reference = all_records(stage_dir(tmp_path))
    assert len(reference) > 6000
    assert all_records(killed_dir) == reference
    ref_m = json.loads((stage_dir(tmp_path) / "manifest.json").read_text())["outputs"]
    got_m = json.loads((killed_dir / "manifest.json").read_text())["outputs"]
    assert got_m == ref_m  # same shards, same statistics (docs, dropped by filter and dedup)
    assert ref_m["sources"]["big-a"]["dropped_dedup"] > 50 and ref_m["sources"]["big-b"]["dropped_dedup"] > 200


# ---------------------------------------------------------------------------------------------------
# the embedded sample and the profiles
# ---------------------------------------------------------------------------------------------------


def test_embedded_sample_is_documented_and_heldout_is_disjoint():
    sample = REPO / "data" / "sample"
    readme = (sample / "README.md").read_text(encoding="utf-8")
    assert "python tools/build_sample.py" in readme
    files = sorted(p.relative_to(sample).as_posix() for p in sample.rglob("*.jsonl.gz"))
    assert {"heldout/it.jsonl.gz", "heldout/en.jsonl.gz", "heldout/code.jsonl.gz"} <= set(files)
    train_texts, total_bytes = set(), 0
    for rel in files:
        assert f"`{rel}`" in readme, f"{rel} is not listed in data/sample/README.md"
        total_bytes += (sample / rel).stat().st_size
        with gzip.open(sample / rel, "rt", encoding="utf-8") as f:
            rows = [json.loads(line) for line in f]
        assert rows and all(isinstance(r["text"], str) and r["text"] for r in rows)
        if not rel.startswith("heldout/"):
            train_texts.update(r["text"] for r in rows)
    for lang in ("it", "en", "code"):
        with gzip.open(sample / "heldout" / f"{lang}.jsonl.gz", "rt", encoding="utf-8") as f:
            assert not {json.loads(line)["text"] for line in f} & train_texts
    assert total_bytes < 6_000_000


def test_profile_corpus_configs_point_at_real_sources():
    tiny = C.load_config(C.CorpusStageConfig, REPO / "configs" / "tiny" / "corpus.yaml")
    cwd = Path.cwd()
    try:
        os.chdir(REPO)  # profile paths are relative to the repository root
        assert corpus.check_sources(tiny) == []
    finally:
        os.chdir(cwd)
    assert {s.lang for s in tiny.corpus.sources} == {"it", "en", "code"}
    big = C.load_config(C.CorpusStageConfig, REPO / "configs" / "dante-2b" / "corpus.yaml")
    assert all(s.kind == "hf" and s.char_budget > 0 for s in big.corpus.sources)
    chars = {lang: sum(s.char_budget for s in big.corpus.sources if s.lang == lang) for lang in ("it", "en", "code")}
    share = {k: v / sum(chars.values()) for k, v in chars.items()}
    # the reference mix is it 42 / en 36 / code 22 in tokens; chars per token differ by language
    assert share["it"] > share["en"] > share["code"] > 0.15


# ---------------------------------------------------------------------------------------------------
# reliability (issue 13): validate first, byte-identical resume, no debris
# ---------------------------------------------------------------------------------------------------

TIMING_FIELDS = ("started", "finished", "resumed")


def tiny_config(tmp_path: Path, root: Path, name: str = "tiny.yaml", mixed: bool = False, plain: bool = False,
                **corpus_kw) -> Path:
    """The tiny profile with absolute source paths and its run under ``root``. ``mixed``: also a budget
    that stops a source inside a chunk, and a second reading of the quotes (min_chars 20) whose longer
    half duplicates the first reading's documents (dedup across sources). ``plain``: the sources
    decompressed (.jsonl: chunks the workers read themselves) instead of the embedded .jsonl.gz."""
    data = yaml.safe_load((REPO / "configs" / "tiny" / "corpus.yaml").read_text())
    data["run"]["root"] = str(root)
    for s in data["corpus"]["sources"]:
        s["path"] = str(REPO / s["path"])
        if plain:
            out = tmp_path / "plain" / Path(s["path"]).name.removesuffix(".gz")
            if not out.exists():
                out.parent.mkdir(exist_ok=True)
                out.write_bytes(gzip.decompress(Path(s["path"]).read_bytes()))
            s["path"] = str(out)
    if mixed:
        sources = data["corpus"]["sources"]
        next(s for s in sources if s["name"] == "it-diodati")["char_budget"] = 400_000
        fortunes = next(s for s in sources if s["name"] == "it-fortunes")
        sources.append({**fortunes, "name": "it-fortunes-short", "min_chars": 20})
    data["corpus"].update(corpus_kw)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def run_script(cfg: Path, *extra: str, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), "--config", str(cfg), *extra], cwd=REPO,
                          env={**os.environ, **OFFLINE_ENV, **(env or {})}, capture_output=True, text=True, timeout=timeout)


# a small run would otherwise be done by the committer before the worker processes are up (dante.corpus._Pool)
POOL_ONLY = {"DANTE_CORPUS_INLINE_START": "0"}


def stage_files(sdir: Path) -> dict[str, bytes]:
    """Every file of a stage folder, by relative path; the manifest without its timing fields and the
    output-neutral keys (where the run lives, and how many processes made it)."""
    return helper_stage_files(sdir, TIMING_FIELDS, ("run.root", "corpus.workers"))


def kill_at(cfg: Path, sdir: Path, fraction: float, work_s: float, *extra: str) -> bool:
    """Start stage 1, SIGKILL it ``fraction * work_s`` seconds after its stage folder appears (the work,
    not the interpreter start); True if it was still running (really killed)."""
    proc = subprocess.Popen([sys.executable, str(SCRIPT), "--config", str(cfg), *extra], cwd=REPO,
                            env={**os.environ, **OFFLINE_ENV, **POOL_ONLY}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (sdir / "progress.json").exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.002)
        proc.wait(timeout=fraction * work_s)
        return False
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        return True


def work_seconds(cfg: Path, sdir: Path, *extra: str) -> float:
    """An uninterrupted run; the seconds from its stage folder appearing to its end."""
    proc = subprocess.Popen([sys.executable, str(SCRIPT), "--config", str(cfg), *extra], cwd=REPO,
                            env={**os.environ, **OFFLINE_ENV}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    while not (sdir / "progress.json").exists() and proc.poll() is None:
        time.sleep(0.002)
    t0 = time.monotonic()
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    return time.monotonic() - t0


def test_dry_run_and_force_refuse_a_missing_source_before_touching_anything(tmp_path):
    root = tmp_path / "runs"
    good = tiny_config(tmp_path, root)
    data = yaml.safe_load(good.read_text())
    data["corpus"]["sources"][2]["path"] = str(tmp_path / "gone.jsonl.gz")
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(data))
    r = run_script(bad, "--dry-run")
    assert r.returncode == 2 and "it-fortunes" in r.stderr and "gone.jsonl.gz" in r.stderr and "Traceback" not in r.stderr
    assert not root.exists()
    assert run_script(good).returncode == 0
    sdir = root / "tiny" / "01_corpus"
    before = stage_files(sdir)
    r = run_script(bad, "--force")  # the finished stage must survive a --force that cannot run
    assert r.returncode == 2 and "gone.jsonl.gz" in r.stderr
    assert stage_files(sdir) == before


def kills_then_reruns_match(tmp_path: Path, seed: int, rounds: int, ref_kw: dict, kill_kw: dict,
                            rerun_args: tuple[str, ...] = (), second_kill: float = 0.0) -> int:
    """Per round: SIGKILL stage 1 at a seeded random moment (again in the resumed run with probability
    ``second_kill``), rerun it, and require exactly the files of an uninterrupted run and no temporary.
    Returns how many kills landed while the process was running."""
    ref_cfg = tiny_config(tmp_path, tmp_path / "ref", name="ref.yaml", **ref_kw)
    work = work_seconds(ref_cfg, tmp_path / "ref" / "tiny" / "01_corpus")
    reference = stage_files(tmp_path / "ref" / "tiny" / "01_corpus")
    rng = random.Random(seed)
    killed = 0
    for i in range(rounds):
        root = tmp_path / f"k{i}"
        sdir = root / "tiny" / "01_corpus"
        cfg = tiny_config(tmp_path, root, name=f"k{i}.yaml", **kill_kw)
        killed += kill_at(cfg, sdir, rng.uniform(0.0, 0.9), work)
        if rng.random() < second_kill:  # a second kill during the resumed run
            killed += kill_at(cfg, sdir, rng.uniform(0.0, 0.5), work)
        r = run_script(cfg, *rerun_args)
        assert r.returncode == 0, r.stderr
        assert not [p for p in sdir.rglob("*.tmp")], "temporaries left in a finished stage"
        assert stage_files(sdir) == reference
    return killed


def test_sigkill_at_random_moments_then_rerun_is_byte_identical(tmp_path):
    """Seeded random kill points over the whole run (first shard, mid-source, the final writes)."""
    kw = {"docs_per_shard": 200}
    killed = kills_then_reruns_match(tmp_path, 13, 3, kw, kw, second_kill=0.5)
    assert killed >= 2, "the kills landed after the runs ended; the kill window is wrong"


# ---------------------------------------------------------------------------------------------------
# parallel stage 1 (issue 15): same bytes for any worker count, zstd shards, old shards still read
# ---------------------------------------------------------------------------------------------------

SMALL_CHUNKS = {"docs_per_shard": 150, "chunk_bytes": 65536}  # many chunks and shards, cut across each other


@pytest.mark.parametrize("plain", [False, True], ids=["jsonl.gz", "jsonl"])
def test_one_two_three_workers_write_identical_bytes(tmp_path, plain):
    """1 worker (inline), 2 (every chunk through the processes), 3 (the committer takes the first chunks
    while the processes start): the same files, byte for byte, for compressed and plain inputs."""
    outputs = []
    for w, env in ((1, {}), (2, POOL_ONLY), (3, {})):
        cfg = tiny_config(tmp_path, tmp_path / f"w{w}", name=f"w{w}.yaml", mixed=True, plain=plain, workers=w, **SMALL_CHUNKS)
        r = run_script(cfg, env=env)
        assert r.returncode == 0, r.stderr
        assert f"{w} worker process(es)" in r.stdout
        if env:
            assert "by the 2 worker processes, 0 by the committer" in r.stdout, r.stdout
        outputs.append(stage_files(tmp_path / f"w{w}" / "tiny" / "01_corpus"))
    assert outputs[0] == outputs[1] == outputs[2]
    shards = [k for k in outputs[0] if k.endswith(".jsonl.zst")]
    assert len(shards) > 12 and all(outputs[0][k][:4] == corpus.ZSTD_MAGIC for k in shards)
    # the shards hold what the manifest counts, readable by stage 2/3's reader
    m = json.loads((tmp_path / "w1" / "tiny" / "01_corpus" / "manifest.json").read_text())
    files = corpus.corpus_files(tmp_path / "w1" / "tiny" / "01_corpus", m)
    assert sum(1 for f in files for _ in corpus.iter_shard_texts(f.path)) == m["counts"]["docs"]
    src = m["outputs"]["sources"]
    assert 400_000 <= src["it-diodati"]["chars"] < 400_000 + 20_000 and src["it-diodati"]["docs_read"] < 348
    assert src["it-fortunes-short"]["dropped_dedup"] == src["it-fortunes"]["docs"] > 1000


def test_kill_with_two_workers_then_rerun_with_one_gives_the_same_bytes(tmp_path):
    kw = {"mixed": True, "plain": True, **SMALL_CHUNKS}
    killed = kills_then_reruns_match(tmp_path, 15, 2, {"workers": 1, **kw}, {"workers": 2, **kw},
                                     rerun_args=("--set", "corpus.workers=1"))
    assert killed >= 1


@pytest.mark.parametrize("workers", [-1, 2 * (os.cpu_count() or 1) + 1])
def test_bad_worker_count_is_refused(tmp_path, monkeypatch, capsys, workers):
    cfg = tiny_config(tmp_path, tmp_path / "runs", workers=workers)
    code, _, err = run_stage1(monkeypatch, capsys, "--config", str(cfg), "--dry-run")
    assert code == 2 and f"corpus.workers={workers}" in err and "--set corpus.workers=" in err
    assert not (tmp_path / "runs").exists()


def test_shards_are_the_workers_frames_closed_by_an_end_mark(tmp_path, monkeypatch):
    """A worker's frames go into the shard as they are when all their records are kept; a frame cut by a
    duplicate, the budget or a shard boundary is re-encoded from exactly the kept records."""
    monkeypatch.setattr(corpus_chunks, "FRAME_BYTES", 2048)
    lines = [json.dumps({"text": f"{LOREM} {i}"}) for i in range(60)]
    (tmp_path / "a.jsonl").write_text("\n".join(lines) + "\n")
    rules = corpus_chunks.SourceRules("a", "it", 1, 1, "text", "skip", "jsonl", "line")
    [chunk] = corpus_chunks.line_chunks([tmp_path / "a.jsonl"], None, 0, 1 << 20)
    r = corpus_chunks.process_chunk(chunk, rules)
    assert len(r.frame_first) > 3  # several frames in one chunk
    everything = corpus_chunks.records_frames(r, np.arange(60))
    assert b"".join(everything) == r.frames  # all kept: the worker's bytes, unchanged

    def records(frames):
        return [json.loads(x)["text"] for f in frames for x in zstd_content(f).splitlines()]

    some = np.array([0, 1, 2, 5, 7, 30, 59])
    assert records(corpus_chunks.records_frames(r, some)) == [f"{LOREM} {i}" for i in some]
    # split at a frame boundary (as two shards would), the pieces are the frames of the whole, in order
    cut = int(r.frame_first[2])
    subset = np.array([i for i in range(60) if i % 4])
    head, tail = subset[subset < cut], subset[subset >= cut]
    assert corpus_chunks.records_frames(r, head) + corpus_chunks.records_frames(r, tail) == corpus_chunks.records_frames(r, subset)


def zstd_content(frame: bytes) -> bytes:
    import zstandard

    return zstandard.ZstdDecompressor().decompress(frame)


def test_a_shard_cut_between_frames_or_miscounted_is_refused_and_a_format_2_shard_reads(tmp_path):
    import zstandard

    recs = [json.dumps({"text": f"{LOREM} {i}"}) + "\n" for i in range(9)]
    frames = [corpus_chunks.compress_frame("".join(recs[k:k + 3]).encode()) for k in (0, 3, 6)]
    path = tmp_path / "shard-00000.jsonl.zst"
    path.write_bytes(b"".join(frames) + corpus.end_mark(9))
    assert [t for _, t in corpus.iter_shard_texts(path)] == [f"{LOREM} {i}" for i in range(9)]
    assert zstandard.ZstdDecompressor().decompressobj().decompress(path.read_bytes())  # a plain zstd stream
    for bad, why in ((b"".join(frames[:2]), "without the shard's end mark"),
                     (b"".join(frames) + corpus.end_mark(8), "counts 8 records, 9 were read"),
                     (b"".join(frames) + corpus.end_mark(9) + b"x", "after the shard's end mark")):
        path.write_bytes(bad)
        with pytest.raises(corpus.UserError) as e:
            list(corpus.iter_shard_texts(path))
        assert why in str(e.value) and str(path) in str(e.value) and "--force" in str(e.value)
    path.write_bytes(corpus_chunks.compress_frame("".join(recs).encode()))  # format 2: one frame, no end mark
    assert len(list(corpus.iter_shard_texts(path))) == 9


def hub_config(tmp_path: Path, root: Path, name: str, **corpus_kw) -> Path:
    """A kind-hf source over a local parquet dataset (the same ``load_dataset(..., streaming=True)`` path
    as the hub) of 3 files, 8 row groups, one of them longer than a batch of HF_CHUNK_ROWS rows; a second
    one whose first 200 rows repeat the first's (dedup across sources) and that stops at a budget inside
    its third row group."""
    repo = tmp_path / "hub-repo" / "data"
    if not repo.exists():
        repo.mkdir(parents=True)
        rng = random.Random(5)
        texts = [f"{LOREM[:rng.randint(40, 400)]} {i}" for i in range(5200)]
        pq.write_table(pa.table({"content": texts[:600]}), repo / "train-00000-of-00003.parquet", row_group_size=150)
        pq.write_table(pa.table({"content": texts[600:3000] + texts[:50]}), repo / "train-00001-of-00003.parquet",
                       row_group_size=2450)
        pq.write_table(pa.table({"content": texts[3000:]}), repo / "train-00002-of-00003.parquet", row_group_size=1100)
        other = tmp_path / "hub-repo-2" / "data"
        other.mkdir(parents=True)
        more = texts[5000:] + [f"{LOREM[:rng.randint(40, 400)]} altro {i}" for i in range(3000)]
        pq.write_table(pa.table({"content": more}), other / "train-00000-of-00001.parquet", row_group_size=1000)
    sources = [{"name": "hub", "kind": "hf", "hf_id": str(tmp_path / "hub-repo"), "text_field": "content", "lang": "it",
                "tier": 1, "min_chars": 30},
               {"name": "hub-again", "kind": "hf", "hf_id": str(tmp_path / "hub-repo-2"), "text_field": "content",
                "lang": "it", "tier": 2, "min_chars": 30, "char_budget": 300_000}]
    cfg = {"run": {"name": "tiny", "root": str(root)}, "corpus": {"docs_per_shard": 700, "non_utf8": "skip", **corpus_kw,
                                                               "sources": sources}}
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def test_hub_stream_shards_are_processed_by_the_workers_with_the_same_bytes(tmp_path):
    """A hub source is cut by IterableDataset.reshard()/shard() (parquet: one chunk per row group) and each
    worker streams its own shards: 1, 2 and 3 workers write the same files, byte for byte."""
    outputs = []
    for w, env in ((1, {}), (2, POOL_ONLY), (3, {})):
        r = run_script(hub_config(tmp_path, tmp_path / f"w{w}", f"w{w}.yaml", workers=w), env=env)
        assert r.returncode == 0, r.stderr
        if env:
            assert "by the 2 worker processes, 0 by the committer" in r.stdout, r.stdout
        outputs.append(stage_files(tmp_path / f"w{w}" / "tiny" / "01_corpus"))
    assert outputs[0] == outputs[1] == outputs[2]
    m = json.loads((tmp_path / "w1" / "tiny" / "01_corpus" / "manifest.json").read_text())
    hub, again = m["outputs"]["sources"]["hub"], m["outputs"]["sources"]["hub-again"]
    assert (hub["docs_read"], hub["dropped_dedup"], hub["docs"]) == (5250, 50, 5200)  # the 50 repeated rows
    assert again["dropped_dedup"] == 200 and 2000 < again["docs_read"] < 3000 and again["chars"] >= 300_000
    texts = [t for f in corpus.corpus_files(tmp_path / "w1" / "tiny" / "01_corpus", m) if f.source == "hub"
             for _, t in corpus.iter_shard_texts(f.path)]
    assert len(texts) == 5200 and texts[0].endswith(" 0") and texts[-1].endswith(" 5199")  # the stream's order


def test_kill_with_two_workers_inside_a_hub_stream_shard_then_rerun_with_one(tmp_path):
    ref = hub_config(tmp_path, tmp_path / "ref", "ref.yaml", workers=1, docs_per_shard=300)
    work = work_seconds(ref, tmp_path / "ref" / "tiny" / "01_corpus")
    reference = stage_files(tmp_path / "ref" / "tiny" / "01_corpus")
    rng, killed = random.Random(8), 0
    for i in range(3):
        root = tmp_path / f"k{i}"
        cfg = hub_config(tmp_path, root, f"k{i}.yaml", workers=2, docs_per_shard=300)
        killed += kill_at(cfg, root / "tiny" / "01_corpus", rng.uniform(0.1, 0.9), work)
        r = run_script(cfg, "--set", "corpus.workers=1")
        assert r.returncode == 0, r.stderr
        assert stage_files(root / "tiny" / "01_corpus") == reference
    assert killed >= 1


def test_truncated_zstd_shard_is_a_clear_error(tmp_path):
    path = tmp_path / "shard-00000.jsonl.zst"
    corpus.write_shard(path, [{"text": f"{LOREM} {i}"} for i in range(500)])
    assert len(list(corpus.iter_shard_texts(path))) == 500
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(corpus.UserError) as e:
        list(corpus.iter_shard_texts(path))
    assert str(path) in str(e.value) and "truncated" in str(e.value) and "--force" in str(e.value)


def test_version_1_gzip_shards_are_still_read(tmp_path):
    """A stage 1 written by format version 1 (gzip shards) reads the same through corpus_files / iter_shard_texts."""
    sdir = tmp_path / "01_corpus"
    texts = [f"{LOREM} {i}" for i in range(7)]
    corpus.write_shard(sdir / "a" / "shard-00000.jsonl.gz", [{"text": t, "source": "a", "lang": "it", "tier": 1} for t in texts])
    raw = (sdir / "a" / "shard-00000.jsonl.gz").read_bytes()
    assert raw[:2] == corpus.GZIP_MAGIC
    manifest = {"format_version": 1, "outputs": {"sources": {"a": {"lang": "it", "tier": 1, "shards": ["a/shard-00000.jsonl.gz"]}}}}
    assert 1 in corpus.READABLE_FORMATS
    [f] = corpus.corpus_files(sdir, manifest)
    assert [t for _, t in corpus.iter_shard_texts(f.path)] == texts


def test_malformed_jsonl_names_the_file_and_line(tmp_path, monkeypatch, capsys):
    good = [json.dumps({"text": f"{LOREM} {i}"}) for i in range(5)]
    (tmp_path / "bad.jsonl").write_text("\n".join(good[:3] + ['{"text": "cut in the mid'] + good[3:]) + "\n")
    cfg = write_config(tmp_path, [source("s", tmp_path / "bad.jsonl")])
    code, _, err = run_stage1(monkeypatch, capsys, "--config", str(cfg))
    assert code == 2 and "Traceback" not in err
    assert f"{tmp_path / 'bad.jsonl'}:4: not a JSON record" in err and "'s'" in err


def test_a_source_that_cannot_be_cut_says_so(tmp_path, monkeypatch, capsys):
    (tmp_path / "book.txt").write_text("Primo paragrafo abbastanza lungo.\n\nSecondo paragrafo abbastanza lungo.")
    cfg = write_config(tmp_path, [source("book", tmp_path / "book.txt", format="txt", sample_by="paragraph")])
    code, out, err = run_stage1(monkeypatch, capsys, "--config", str(cfg))
    assert code == 0, err
    assert "source 'book': one txt file read by paragraph cannot be cut; it runs on one worker" in out


def test_line_chunks_are_a_function_of_the_file_and_resume_at_any_chunk(tmp_path):
    rng = random.Random(3)
    lines = [("x" * rng.randint(0, 300)) for _ in range(400)] + ["y" * 5000] + ["z" * 10 for _ in range(50)]
    data = ("\n".join(lines)).encode()  # the last line has no newline
    (tmp_path / "f.jsonl").write_bytes(data)
    (tmp_path / "f.jsonl.gz").write_bytes(gzip.compress(data))
    for name in ("f.jsonl", "f.jsonl.gz"):
        files = [tmp_path / name]
        chunks = list(corpus_chunks.line_chunks(files, None, 0, 1024))
        pieces = [corpus_chunks.line_bytes(c) for c in chunks]
        assert b"".join(pieces) == data
        assert all(p.endswith(b"\n") for p in pieces[:-1]) and max(len(p) for p in pieces) >= 5000
        # a plain file's chunk carries only its bounds (the worker reads them); a compressed one its bytes
        assert {c.kind for c in chunks} == ({"lines"} if name.endswith(".gz") else {"span"})
        assert [c.index for c in chunks] == list(range(len(chunks)))
        # the file line of each chunk's first row (a plain file's counted only when a message needs it)
        assert [corpus_chunks.line_number(c, 0) for c in chunks] == [
            1 + sum(corpus_chunks.line_bytes(p).count(b"\n") for p in chunks[:k]) for k in range(len(chunks))]
        for k in (1, len(chunks) // 2, len(chunks) - 1):
            again = list(corpus_chunks.line_chunks(files, chunks[k].pos, k, 1024))
            assert [(c.index, c.pos, corpus_chunks.line_bytes(c)) for c in again] == [(c.index, c.pos, corpus_chunks.line_bytes(c)) for c in chunks[k:]]


def test_dedup_index_agrees_with_a_python_set():
    rng = np.random.default_rng(0)
    index, seen = DedupIndex(capacity=16), set()
    for _ in range(60):
        keys = rng.integers(0, 5000, size=rng.integers(1, 400), dtype=np.uint64)  # many repeats, and key 0
        keys = np.concatenate([keys, rng.integers(0, 2**64 - 1, size=50, dtype=np.uint64, endpoint=True)])
        present = index.contains(keys)
        assert present.tolist() == [int(k) in seen or (k == 0 and 1 in seen) or (k == 1 and 0 in seen) for k in keys]
        _, first = np.unique(keys, return_index=True)
        new = keys[np.sort(first)]
        new = new[~index.contains(new)]
        index.add_new(new)
        seen.update(int(k) for k in new)
    assert len(index) == len({1 if k == 0 else k for k in seen}) and index.nbytes / len(index) <= 24


def test_hub_stream_chunks_resume_from_their_recorded_state(tmp_path):
    """Hub rows come in batches; restarting from any chunk's recorded position (stream state, else the
    row count to skip) yields the same chunks, across the dataset's file boundary."""
    repo = tmp_path / "hub-repo" / "data"
    repo.mkdir(parents=True)
    pq.write_table(pa.table({"content": [f"{LOREM} {i}" for i in range(250)]}), repo / "train-00000-of-00002.parquet")
    pq.write_table(pa.table({"content": [f"{LOREM} {i}" for i in range(250, 400)]}), repo / "train-00001-of-00002.parquet")
    src = C.SourceConfig(name="hub", kind="hf", hf_id=str(tmp_path / "hub-repo"), text_field="content", lang="it")
    chunks = list(corpus_chunks.hub_chunks(corpus.open_stream(src), None, 0, "content", "hub", rows_per_chunk=60))
    assert [r["content"] for c in chunks for r in c.payload] == [f"{LOREM} {i}" for i in range(400)]
    assert len(chunks) == 7 and chunks[3].pos["stream_state"] is not None
    for k in (2, 4):
        for at in (chunks[k].pos, {"rows": chunks[k].pos["rows"], "stream_state": None}):
            ds = corpus.open_stream(src)
            if at["stream_state"] is not None:
                ds.load_state_dict(at["stream_state"])
            else:
                ds = ds.skip(at["rows"])
            again = list(corpus_chunks.hub_chunks(ds, at, k, "content", "hub", rows_per_chunk=60))
            assert [(c.index, c.payload, c.first_line) for c in again] == [(c.index, c.payload, c.first_line) for c in chunks[k:]]
