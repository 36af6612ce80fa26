"""dante/artifacts.py: atomic writes, the stage lifecycle (open / resume / finish), manifests and checks."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from dante import artifacts as A
from dante import config as C


def corpus_cfg(tmp_path: Path, **run) -> C.CorpusStageConfig:
    cfg = C.CorpusStageConfig()
    cfg.run = C.RunConfig(name="t", root=str(tmp_path / "runs"), **run)
    return cfg


# ---------------------------------------------------------------------------------------------------
# atomic writes
# ---------------------------------------------------------------------------------------------------


def test_atomic_write_replaces_whole_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "sub" / "f.json"
    A.atomic_write_json(target, {"a": 1, "path": Path("x")})
    assert json.loads(target.read_text()) == {"a": 1, "path": "x"}
    A.atomic_write_text(target, "second")
    assert target.read_text() == "second"
    assert sorted(p.name for p in target.parent.iterdir()) == ["f.json"]


def test_failed_atomic_write_keeps_the_old_content(tmp_path):
    target = tmp_path / "f.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with A.atomic_path(target) as tmp:
            tmp.write_text("half-written")
            raise RuntimeError("killed mid-write")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]


def test_atomic_files_get_umask_permissions_not_0600(tmp_path):
    target = tmp_path / "shared.txt"
    A.atomic_write_text(target, "x")
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    assert stat.S_IMODE(target.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode)


def test_describe_path_hashes_files_and_sums_folders(tmp_path):
    f = tmp_path / "d" / "a.bin"
    f.parent.mkdir()
    f.write_bytes(b"dante" * 1000)
    (tmp_path / "d" / "b.bin").write_bytes(b"12345")
    info = A.describe_path(f)
    assert info == {"path": str(f), "kind": "file", "bytes": 5000, "sha256": hashlib.sha256(b"dante" * 1000).hexdigest()}
    assert A.describe_path(f.parent) == {"path": str(f.parent), "kind": "dir", "files": 2, "bytes": 5005}


# ---------------------------------------------------------------------------------------------------
# the stage lifecycle
# ---------------------------------------------------------------------------------------------------


def test_open_then_finish_writes_a_complete_manifest_last(tmp_path):
    cfg = corpus_cfg(tmp_path)
    st = A.Stage.open(cfg, "01_corpus", format_version=3)
    assert st.dir == tmp_path / "runs" / "t" / "01_corpus"
    assert (st.dir / A.PROGRESS).exists() and not (st.dir / A.MANIFEST).exists()
    st.add_input("source", Path(__file__))
    m = st.finish(outputs={"files": 1}, counts={"docs": 7})
    on_disk = json.loads((st.dir / A.MANIFEST).read_text())
    assert on_disk == json.loads(json.dumps(m))
    for key in ("stage", "script", "format_version", "config", "inputs", "outputs", "counts", "software",
                "git_commit", "started", "finished"):
        assert key in on_disk, key
    assert on_disk["stage"] == "01_corpus" and on_disk["script"] == "1_download_corpus.py"
    assert on_disk["format_version"] == 3 and on_disk["counts"] == {"docs": 7}
    assert on_disk["config"] == C.to_dict(cfg)
    assert on_disk["inputs"]["source"]["sha256"] == hashlib.sha256(Path(__file__).read_bytes()).hexdigest()
    assert not (st.dir / A.PROGRESS).exists()
    assert A.stage_done(cfg.run, "01_corpus")


def test_complete_stage_is_not_reopened_unless_forced(tmp_path):
    cfg = corpus_cfg(tmp_path)
    st = A.Stage.open(cfg, "01_corpus")
    (st.dir / "output.txt").write_text("result")
    st.finish()
    with pytest.raises(A.StageAlreadyDone, match="nothing to do.*--force"):
        A.Stage.open(cfg, "01_corpus")
    st2 = A.Stage.open(cfg, "01_corpus", force=True)
    assert not (st2.dir / "output.txt").exists() and not (st2.dir / A.MANIFEST).exists()


def test_unfinished_stage_resumes_with_the_same_config(tmp_path):
    cfg = corpus_cfg(tmp_path)
    st = A.Stage.open(cfg, "01_corpus")
    assert not st.resumed
    st.save_progress({"shards_done": 4})
    again = A.Stage.open(cfg, "01_corpus")
    assert again.resumed and again.load_progress() == {"shards_done": 4}


def test_unfinished_stage_with_another_config_is_refused(tmp_path):
    st = A.Stage.open(corpus_cfg(tmp_path), "01_corpus")
    st.save_progress({"shards_done": 4})
    other = corpus_cfg(tmp_path, seed=99)
    with pytest.raises(A.StageError, match=r"(?s)different config \(differs at: run\.seed\).*--force"):
        A.Stage.open(other, "01_corpus")
    assert A.Stage.open(other, "01_corpus", force=True).load_progress() == {}


def test_resume_check_hook_may_accept_a_changed_config(tmp_path):
    st = A.Stage.open(corpus_cfg(tmp_path), "01_corpus")
    st.save_progress({"parts": ["a"]})
    other = corpus_cfg(tmp_path, seed=7)
    seen = []

    def refuse(old, new, state):
        seen.append((old["run"]["seed"], new["run"]["seed"], state))
        return "part 'a' depends on the seed"

    with pytest.raises(A.StageError, match="part 'a' depends on the seed"):
        A.Stage.open(other, "01_corpus", resume_check=refuse)
    assert seen == [(1234, 7, {"parts": ["a"]})]
    resumed = A.Stage.open(other, "01_corpus", resume_check=lambda old, new, state: None)
    assert resumed.resumed and resumed.load_progress() == {"parts": ["a"]}
    assert json.loads((resumed.dir / A.PROGRESS).read_text())["config"]["run"]["seed"] == 7


def test_config_fix_after_a_run_that_did_no_work_starts_fresh(tmp_path):
    """A stage that stopped on bad input before recording any work must not demand --force."""
    A.Stage.open(corpus_cfg(tmp_path), "01_corpus")  # progress.json with an empty state
    fixed = corpus_cfg(tmp_path, seed=5)
    st = A.Stage.open(fixed, "01_corpus")
    assert not st.resumed
    saved = json.loads((st.dir / A.PROGRESS).read_text())
    assert saved["config"]["run"]["seed"] == 5 and saved["state"] == {}


def test_finished_stage_with_a_changed_config_is_refused_naming_keys_and_values(tmp_path):
    cfg = corpus_cfg(tmp_path)
    A.Stage.open(cfg, "01_corpus").finish()
    edited = corpus_cfg(tmp_path, seed=77)
    with pytest.raises(A.StageError) as e:
        A.Stage.open(edited, "01_corpus")
    msg = str(e.value)
    assert "run.seed: 1234 -> 77" in msg and "--force" in msg and "run.name" in msg
    assert A.stage_done(cfg.run, "01_corpus")  # the finished stage is untouched


def test_finished_stage_rerun_with_only_neutral_keys_changed_is_a_no_op(tmp_path):
    cfg = C.ShardsStageConfig()
    cfg.run = C.RunConfig(name="t", root=str(tmp_path / "runs"))
    A.Stage.open(cfg, "03_shards").finish()
    cfg.shards.workers = 7  # how many processes share the work, not what is written
    with pytest.raises(A.StageAlreadyDone):
        A.Stage.open(cfg, "03_shards")
    saved = A.read_json(A.stage_dir(cfg.run, "03_shards") / A.MANIFEST)["config"]
    del saved["shards"]["workers"]  # a field added to the schema after the stage ran is not compared
    assert A.finished_config_changes(saved, C.to_dict(cfg)) == []
    saved["shards"]["val_fraction"] = 0.5
    assert A.finished_config_changes(saved, C.to_dict(cfg)) == [
        f"shards.val_fraction: 0.5 -> {cfg.shards.val_fraction}"]


def test_user_mappings_are_compared_whole_and_by_value():
    saved = {"train": {"tier_weights": {"1": 3, "2": 2}, "lr": 3e-4}}
    assert A.finished_config_changes(saved, {"train": {"tier_weights": {1: 3.0, 2: 2.0}, "lr": 0.0003}}) == []
    changes = A.finished_config_changes(saved, {"train": {"tier_weights": {1: 3, 2: 2, 3: 1}, "lr": 3e-4}})
    assert changes == ["train.tier_weights.3: null -> 1"]


def test_a_second_process_on_the_same_stage_is_refused_naming_the_holder(tmp_path):
    cfg = corpus_cfg(tmp_path)
    A.Stage.open(cfg, "01_corpus")
    code = ("import sys; from dante import artifacts as A, config as C\n"
            "cfg = C.CorpusStageConfig(); cfg.run = C.RunConfig(name='t', root=sys.argv[1])\n"
            "try:\n    A.Stage.open(cfg, '01_corpus')\nexcept A.StageError as e:\n    print(e); sys.exit(3)\n")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "runs")], capture_output=True, text=True,
                       cwd=Path(__file__).resolve().parent.parent)
    assert r.returncode == 3, r.stderr
    assert f"pid {os.getpid()}" in r.stdout and "being run by another process" in r.stdout
    assert A.Stage.open(cfg, "01_corpus").resumed is False  # reentrant in the holding process


def test_the_lock_dies_with_its_holder(tmp_path):
    code = ("import os, sys; from dante import artifacts as A, config as C\n"
            "cfg = C.CorpusStageConfig(); cfg.run = C.RunConfig(name='t', root=sys.argv[1])\n"
            "A.Stage.open(cfg, '01_corpus'); os.kill(os.getpid(), 9)\n")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "runs")], capture_output=True, text=True,
                       cwd=Path(__file__).resolve().parent.parent)
    assert r.returncode == -9, r.stderr
    A.Stage.open(corpus_cfg(tmp_path), "01_corpus")  # no stale lock to clean up


def test_open_removes_the_temporaries_of_a_killed_run(tmp_path):
    cfg = corpus_cfg(tmp_path)
    st = A.Stage.open(cfg, "01_corpus")
    st.save_progress({"shards": 1})
    (st.dir / "sub").mkdir()
    debris = [st.dir / ".progress.json.abc123.tmp", st.dir / "sub" / ".train.bin.x9.tmp", st.dir / ".rank-1-ff"]
    for d in debris:
        d.write_text("half")
    (st.dir / "keep.tmp").write_text("a user's file, not a temporary of ours")
    A._HELD.clear()  # as if this were the next process
    again = A.Stage.open(cfg, "01_corpus")
    assert again.resumed and not any(d.exists() for d in debris) and (st.dir / "keep.tmp").exists()


def test_a_start_refused_before_any_work_leaves_no_folder(tmp_path):
    st = A.Stage.open(corpus_cfg(tmp_path), "01_corpus")
    assert st.fresh and st.discard_if_untouched() and not st.dir.exists()
    st = A.Stage.open(corpus_cfg(tmp_path), "01_corpus")
    st.save_progress({"shards": 1})
    assert not st.discard_if_untouched() and st.dir.exists()  # work recorded: kept for resuming


# ---------------------------------------------------------------------------------------------------
# input manifests
# ---------------------------------------------------------------------------------------------------


def test_missing_input_names_the_script_to_run(tmp_path):
    cfg = corpus_cfg(tmp_path)
    with pytest.raises(A.StageError) as e:
        A.read_manifest(cfg.run, "01_corpus")
    assert "python 1_download_corpus.py --config configs/<profile>/corpus.yaml" in str(e.value)
    A.Stage.open(cfg, "01_corpus")  # started, never finished
    with pytest.raises(A.StageError, match="did not finish: rerun it to resume"):
        A.read_manifest(cfg.run, "01_corpus")


def test_incompatible_input_manifest_is_refused(tmp_path):
    cfg = corpus_cfg(tmp_path)
    A.Stage.open(cfg, "01_corpus", format_version=1).finish()
    assert A.read_manifest(cfg.run, "01_corpus", format_version=1)["format_version"] == 1
    with pytest.raises(A.StageError, match=r"format version 1.*reads version 2.*1_download_corpus.py --force"):
        A.read_manifest(cfg.run, "01_corpus", format_version=2)
    path = A.stage_dir(cfg.run, "01_corpus") / A.MANIFEST
    path.write_text(json.dumps({**json.loads(path.read_text()), "stage": "03_shards"}))
    with pytest.raises(A.StageError, match="describes stage '03_shards'"):
        A.read_manifest(cfg.run, "01_corpus")
    path.write_text("{ truncated")
    with pytest.raises(A.StageError, match="unreadable"):
        A.read_manifest(cfg.run, "01_corpus")


def test_require_records_the_input_manifest_hash(tmp_path):
    cfg = corpus_cfg(tmp_path)
    A.Stage.open(cfg, "01_corpus").finish()
    tok_cfg = C.TokenizerStageConfig(run=cfg.run)
    st = A.Stage.open(tok_cfg, "02_tokenizer")
    st.require("01_corpus")
    manifest = A.stage_dir(cfg.run, "01_corpus") / A.MANIFEST
    assert st.inputs["01_corpus"]["manifest_sha256"] == hashlib.sha256(manifest.read_bytes()).hexdigest()


# ---------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------


def test_check_writable(tmp_path):
    assert A.check_writable(tmp_path / "new" / "nested") == []
    (tmp_path / "file").write_text("x")
    problems = A.check_writable(tmp_path / "file" / "runs")
    assert len(problems) == 1 and "is a file" in problems[0]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through permission bits")
def test_check_writable_read_only_folder(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        assert "not writable" in A.check_writable(ro / "runs")[0]
    finally:
        ro.chmod(0o700)


def test_diff_configs_lists_dotted_keys():
    a = {"run": {"name": "x", "seed": 1}, "corpus": {"docs_per_shard": 3, "sources": [1]}}
    b = {"run": {"name": "x", "seed": 2}, "corpus": {"docs_per_shard": 3, "sources": [2]}, "extra": 1}
    assert A.diff_configs(a, b) == ["corpus.sources", "extra", "run.seed"]


def test_saved_and_live_configs_compare_by_value():
    """A config read back from JSON has string mapping keys and may write 3 for 3.0: neither is a change
    (resuming after only train.log_every changed was refused over train.tier_weights.1 before)."""
    saved = {"train": {"tier_weights": {"1": 3.0, "2": 2}, "log_every": 10, "betas": [0.9, 0.95]}}
    live = {"train": {"tier_weights": {1: 3.0, 2: 2.0}, "log_every": 20, "betas": (0.9, 0.95)}}
    assert A.diff_configs(saved, live) == ["train.log_every"]
    live["train"]["tier_weights"][1] = 2.5
    assert A.diff_configs(saved, live) == ["train.log_every", "train.tier_weights.1"]


# ---------------------------------------------------------------------------------------------------
# run_stage: validate, then destroy
# ---------------------------------------------------------------------------------------------------


def _corpus_args(tmp_path: Path) -> list[str]:
    """The tiny stage-1 config, run under tmp_path (the test bodies stand in for the stage's work)."""
    config = Path(__file__).resolve().parent.parent / "configs" / "tiny" / "corpus.yaml"
    return ["--config", str(config), "--set", f"run.root={tmp_path / 'runs'}", "--set", "run.name=t"]


def test_force_with_inputs_that_fail_validation_changes_nothing(tmp_path):
    from dante.cli import run_stage
    from dante.errors import UserError

    def main(stage, cfg, args):
        (stage.dir / "result.txt").write_text("good work")
        stage.finish()

    assert run_stage("01_corpus", "t", main, argv=_corpus_args(tmp_path)) == 0
    folder = tmp_path / "runs" / "t" / "01_corpus"
    before = {p.name: p.read_bytes() for p in folder.iterdir()}

    def bad_inputs(stage, cfg, args):
        raise UserError("the new source is missing")

    assert run_stage("01_corpus", "t", main, validate=bad_inputs, argv=_corpus_args(tmp_path) + ["--force"]) == 2
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_validate_result_reaches_main_and_refused_main_leaves_no_folder(tmp_path):
    from dante.cli import run_stage
    from dante.errors import UserError
    seen = []

    def main(stage, cfg, args):
        seen.append(stage.plan)
        raise UserError("refused after opening")

    rc = run_stage("01_corpus", "t", main, validate=lambda st, cfg, args: {"checked": 1},
                   argv=_corpus_args(tmp_path))
    assert rc == 2 and seen == [{"checked": 1}]
    assert not (tmp_path / "runs" / "t" / "01_corpus").exists()


def test_full_disk_is_a_clear_error_not_a_traceback(tmp_path, capsys):
    import errno as _errno

    from dante.cli import run_stage

    def main(stage, cfg, args):
        stage.save_progress({"shards": 1})
        raise OSError(_errno.ENOSPC, "No space left on device", str(stage.dir / "shard-00001.jsonl.gz"))

    assert run_stage("01_corpus", "t", main, argv=_corpus_args(tmp_path)) == 2
    err = capsys.readouterr().err
    assert "no space left" in err and "shard-00001.jsonl.gz" in err and "run.root" in err and "Traceback" not in err


def test_tokenizer_path_refuses_a_file_changed_after_stage_2(tmp_path):
    run = C.RunConfig(name="t", root=str(tmp_path / "runs"))
    st = A.Stage.open(C.TokenizerStageConfig(run=run), "02_tokenizer")
    (st.dir / "tokenizer.json").write_text('{"model": "x"}')
    st.finish(outputs={"tokenizer": "tokenizer.json", "tokenizer_sha256": A.file_sha256(st.dir / "tokenizer.json")})
    assert A.tokenizer_path(run) == st.dir / "tokenizer.json"
    (st.dir / "tokenizer.json").write_text('{"model": "y"}')  # still parses: only the checksum can tell
    with pytest.raises(A.StageError, match=r"(?s)changed after 02_tokenizer finished.*2_train_tokenizer.py --force"):
        A.tokenizer_path(run)
