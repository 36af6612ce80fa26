"""8_eval.py end to end on a run built in the test (tokenizer, checkpoints, metrics), and its bad inputs.

The run folder is made with the real writers (dante.artifacts.Stage for manifests, dante.checkpoint's
CheckpointManager for the checkpoint) around a random tiny model, so the stage reads exactly what stages
2, 4 and 7 write. Each bad input must exit 2 with a message naming the problem and leave no manifest.
"""

import importlib.util
import io
import json
from pathlib import Path

import pytest
import torch
import yaml
from test_eval import tiny_model, tiny_tokenizer

from dante import config as C
from dante import fertility
from dante.artifacts import Stage, atomic_write_text, load_texts
from dante.checkpoint import CheckpointManager, find_checkpoints
from dante.errors import UserError
from dante.evaluation.chat import chat_loop
from dante.evaluation.loading import load_for_eval

torch.set_num_threads(1)


def load_script():
    spec = importlib.util.spec_from_file_location("eval_script", "8_eval.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class OneRank:
    """The training backend protocol of dante.checkpoint for a single process and a bare model."""

    rank, world_size = 0, 1

    def __init__(self, model):
        self.model = model

    def barrier(self):
        pass

    def save_train_state(self, path):
        pass

    def load_train_state(self, path):
        pass

    def full_state_dict(self):
        return self.model.state_dict()


def make_stage(run: C.RunConfig, name: str, requires=()) -> Stage:
    cls = C.STAGES[name][1]
    stage = Stage.open(cls(run=run), name)
    for r in requires:
        stage.require(r)
    return stage


def add_checkpoint(run: C.RunConfig, name: str, tok, max_seq_len: int, seed: int, requires=("02_tokenizer",)):
    model = tiny_model(tok.get_vocab_size(), max_seq_len=max_seq_len, seed=seed)
    stage = make_stage(run, name, requires)
    CheckpointManager(stage.dir, keep_last=2, backend=OneRank(model)).save(
        7, model.cfg, {"tokens_seen": 1000, "loss": 5.0, "config": {}})
    lines = [{"kind": "train", "step": s, "loss": 6.0 - s / 10} for s in range(1, 8)] + [{"kind": "val", "step": 7, "val_loss": 5.5}]
    atomic_write_text(stage.dir / "metrics.jsonl", "".join(json.dumps(x) + "\n" for x in lines))
    stage.finish()
    return model


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture
def run(tmp_path, tok):
    run = C.RunConfig(name="t", root=str(tmp_path / "runs"))
    stage = make_stage(run, "02_tokenizer")
    tok.save(str(stage.dir / "tokenizer.json"))
    texts = {"it": load_texts("data/sample/heldout/it.jsonl.gz")[:5]}
    fertility.write_report(fertility.fertility_report([fertility.hf_counter("dante", "hf_json", tok)], texts), stage.dir)
    stage.finish(outputs={"tokenizer": "tokenizer.json"})  # as stage 2 records it
    add_checkpoint(run, "04_pretrain", tok, max_seq_len=256, seed=1)
    return run


def write_config(tmp_path, run: C.RunConfig, **eval_overrides) -> Path:
    cfg = {
        "run": {"name": run.name, "root": run.root, "seed": 3},
        "eval": {
            "checkpoints": ["04_pretrain", "05_extend", "07_sft"],
            "heldout": {"it": "data/sample/heldout/it.jsonl.gz", "en": "data/sample/heldout/en.jsonl.gz"},
            "tasks": ["data/eval_tasks/next_sentence_it.yaml"], "task_limit": 8, "max_eval_tokens": 1500,
            "batch_size": 4, "device": "cpu",
            "generation": {"prompts": ["Il futuro della tecnologia"], "max_new_tokens": 8,
                           "chat_prompts": ["Ciao, come stai?"]},
            "long_eval": {"lengths": [192, 256], "depths": [0.5], "trials": 1, "bucket_size": 64, "max_docs": 2},
        },
    }
    for key, value in eval_overrides.items():
        cfg["eval"][key] = value
    path = tmp_path / "eval.yaml"
    path.write_text(yaml.safe_dump(cfg, allow_unicode=True), encoding="utf-8")
    return path


SCRIPT = load_script()


def run_script(args, capsys):
    """8_eval.py in-process, exactly as its __main__ block runs it."""
    code = SCRIPT.cli(args)
    out = capsys.readouterr()
    return code, out.out + out.err


def test_report_compares_checkpoints_and_notes_absent_stages(tmp_path, run, tok, capsys, monkeypatch):
    add_checkpoint(run, "07_sft", tok, max_seq_len=256, seed=2, requires=("04_pretrain",))
    # lm-eval dumps the environment (a `pip list` subprocess, ~4 s) into every result; not what is tested here
    monkeypatch.setattr("lm_eval.evaluator.add_env_info", lambda results: None)
    code, out = run_script(["--config", str(write_config(tmp_path, run))], capsys)
    assert code == 0, out
    d = Path(run.root) / run.name / "08_eval"
    report = json.loads((d / "report.json").read_text())
    assert [c["label"] for c in report["checkpoints"]] == ["04_pretrain", "07_sft"]
    assert any("05_extend: skipped" in n for n in report["notes"])
    for label in ("04_pretrain", "07_sft"):
        s = report["summary"][label]
        assert {"bpb_it", "ppl_it", "bpb_en", "dante_next_sentence_it_acc", "passkey_rank_accuracy"} <= set(s)
        assert s["bpb_it"] > 0 and 0 <= s["dante_next_sentence_it_acc"] <= 1
    base, sft = report["checkpoints"]
    assert base["generation"][0]["chat"] is False and sft["generation"][0]["chat"] is True
    assert base["benchmarks"]["tasks"]["dante_next_sentence_it"]["n"] == 8
    assert base["long_context"]["position"]["length"] == 256
    assert [c["stage"] for c in report["training"]] == ["04_pretrain", "07_sft"]
    md = (d / "report.md").read_text()
    for section in ("## Summary", "## Benchmarks", "## Generation", "## Long context", "## Training curves", "## Notes"):
        assert section in md
    assert "| dante | hf_json | 400 |" in md  # stage 2's fertility table, redrawn by stage 2's writer
    for png in ("bpb.png", "perplexity_by_position.png", "loss_curves.png", "fertility.png"):
        assert (d / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    manifest = json.loads((d / "manifest.json").read_text())
    assert set(manifest["summary"]) == {"04_pretrain", "07_sft"} and "04_pretrain" in manifest["inputs"]
    assert manifest["config"]["eval"]["checkpoints"] == ["04_pretrain", "05_extend", "07_sft"]


def test_checkpoints_flag_and_resume_after_a_finished_checkpoint(tmp_path, run, capsys, monkeypatch):
    cfg = write_config(tmp_path, run, tasks=[], long_eval={"lengths": [], "trials": 0})
    argv = ["--config", str(cfg), "--checkpoints", "04_pretrain"]
    assert SCRIPT.expand_checkpoints(argv)[-2:] == ["--set", 'eval.checkpoints=["04_pretrain"]']

    def crash(*a, **k):
        raise KeyboardInterrupt  # killed after the checkpoint was evaluated, before the report

    monkeypatch.setattr("dante.evaluation.report.write_report", crash)
    with pytest.raises(KeyboardInterrupt):
        run_script(argv, capsys)
    monkeypatch.undo()

    def must_not_run(*a, **k):
        raise AssertionError("a finished checkpoint was evaluated again")

    monkeypatch.setattr("dante.evaluation.stage.evaluate_checkpoint", must_not_run)
    code, out = run_script(argv, capsys)
    assert code == 0 and "04_pretrain: already evaluated (resumed)" in out
    report = json.loads((Path(run.root) / run.name / "08_eval" / "report.json").read_text())
    assert [c["label"] for c in report["checkpoints"]] == ["04_pretrain"]


def test_tokenizer_that_does_not_belong_is_refused(tmp_path, run, capsys):
    other = tiny_tokenizer(vocab_size=350)
    other.save(str(Path(run.root) / run.name / "02_tokenizer" / "tokenizer.json"))
    code, out = run_script(["--config", str(write_config(tmp_path, run))], capsys)
    assert code == 2 and "do not belong together" in out and "model.vocab_size=400" in out
    assert not (Path(run.root) / run.name / "08_eval" / "manifest.json").exists()


def test_checkpoint_of_another_runs_tokenizer_is_refused(tmp_path, run, tok, capsys):
    other = C.RunConfig(name="other", root=run.root)
    stage = make_stage(other, "02_tokenizer")
    tok.save(str(stage.dir / "tokenizer.json"))
    stage.finish(outputs={"tokenizer": "tokenizer.json"})  # same vocabulary size, but a different stage 2 manifest
    ckpt = Path(run.root) / run.name / "04_pretrain"
    code, out = run_script(["--config", str(write_config(tmp_path, other, checkpoints=[str(ckpt)]))], capsys)
    assert code == 2 and "trained with another tokenizer" in out


def test_bad_task_file_empty_heldout_and_too_long_context(tmp_path, run, capsys):
    bad_rows = tmp_path / "rows.jsonl"
    bad_rows.write_text(json.dumps({"context": "x", "gold": 0}) + "\n")
    task = tmp_path / "bad_task.yaml"
    task.write_text(yaml.safe_dump({"task": "bad", "dataset_path": "json", "output_type": "multiple_choice",
                                    "dataset_kwargs": {"data_files": {"test": str(bad_rows)}}, "test_split": "test",
                                    "doc_to_text": "context", "doc_to_choice": "choices", "doc_to_target": "gold"}))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    cfg = write_config(tmp_path, run, tasks=[str(task)], heldout={"it": str(empty)},
                       long_eval={"lengths": [1024], "depths": [0.5], "trials": 1})
    code, out = run_script(["--config", str(cfg)], capsys)
    assert code == 2
    assert "lacks field(s) ['choices']" in out
    assert "empty evaluation set" in out
    assert "[1024]: longer than the context of every checkpoint (at most 256 tokens)" in out
    assert not (Path(run.root) / run.name / "08_eval" / "manifest.json").exists()


def test_dry_run_checks_and_plans_without_writing(tmp_path, run, capsys):
    code, out = run_script(["--config", str(write_config(tmp_path, run, tasks=[])), "--dry-run"], capsys)
    assert code == 0 and "checkpoint 04_pretrain" in out and "05_extend: skipped" in out
    assert "held-out it: 76 documents" in out and "no model loaded" in out
    assert not (Path(run.root) / run.name / "08_eval").exists()


def test_missing_tokenizer_stage_and_no_checkpoint(tmp_path, capsys):
    run = C.RunConfig(name="empty", root=str(tmp_path / "runs"))
    code, out = run_script(["--config", str(write_config(tmp_path, run))], capsys)
    assert code == 2 and "2_train_tokenizer.py" in out
    stage = make_stage(run, "02_tokenizer")
    tiny_tokenizer().save(str(stage.dir / "tokenizer.json"))
    stage.finish(outputs={"tokenizer": "tokenizer.json"})
    code, out = run_script(["--config", str(write_config(tmp_path, run))], capsys)
    assert code == 2 and "no checkpoint to evaluate" in out and "4_pretrain.py" in out


def test_chat_keeps_the_conversation_and_stops_at_eot(tmp_path, run, tok, monkeypatch):
    add_checkpoint(run, "07_sft", tok, max_seq_len=256, seed=2, requires=("04_pretrain",))
    refs, _ = find_checkpoints(run, ["07_sft"])
    loaded = load_for_eval(refs[0], tok, device="cpu")
    seen_prompts = []
    from dante.evaluation import chat as st

    real_generate = st.generate

    def spy(model, ids, **kw):
        seen_prompts.append(list(ids))
        assert kw["stop_ids"] >= {1, 4}
        return real_generate(model, ids, **kw)

    monkeypatch.setattr(st, "generate", spy)
    lines = iter(["Ciao!", "Come ti chiami?", None])
    written = []
    g = C.GenerationConfig(max_new_tokens=6)
    turns = chat_loop(loaded, g, seed=0, read_line=lambda: next(lines), write=written.append)
    assert turns == 2
    first, second = seen_prompts
    assert second[:len(first)] == first  # the second prompt continues the first exchange
    assert tok.decode(second, skip_special_tokens=False).count("<|start_header_id|>user") == 2


def test_chat_command_reads_stdin(tmp_path, run, tok, monkeypatch, capsys):
    add_checkpoint(run, "07_sft", tok, max_seq_len=256, seed=2, requires=("04_pretrain",))
    monkeypatch.setattr("sys.stdin", io.StringIO("Ciao!\n/exit\n"))
    cfg = write_config(tmp_path, run, generation={"max_new_tokens": 4})
    assert SCRIPT.chat(["--config", str(cfg), "--chat"]) == 0
    out = capsys.readouterr().out
    assert "chatting with 07_sft" in out
    assert not (Path(run.root) / run.name / "08_eval").exists()  # chat writes nothing


def test_registered_lm_eval_model_loads_from_paths(run, tok):
    from lm_eval.api.instance import Instance
    from lm_eval.api.registry import get_model

    from dante.evaluation.lm_eval_adapter import DanteLM

    ckpt = Path(run.root) / run.name / "04_pretrain"
    tok_path = Path(run.root) / run.name / "02_tokenizer" / "tokenizer.json"
    assert get_model("dante") is DanteLM
    lm = DanteLM.create_from_arg_string(f"checkpoint={ckpt},tokenizer={tok_path},device=cpu", {"batch_size": 2})
    assert lm.batch_size == 2 and lm.max_length == 256
    [(ll, greedy)] = lm.loglikelihood([Instance("loglikelihood", {}, ("Il cielo", " è azzurro"), 0)])
    assert ll < 0 and isinstance(greedy, bool)


# -- damaged inputs: refused before anything is touched (issue 13) ------------------------------------


def quick_config(tmp_path, run: C.RunConfig) -> Path:
    """The cheapest real evaluation: one held-out language, a few hundred tokens, no tasks, no generation."""
    return write_config(tmp_path, run, checkpoints=["04_pretrain"], heldout={"it": "data/sample/heldout/it.jsonl.gz"},
                        tasks=[], max_eval_tokens=300, generation={"max_new_tokens": 0},
                        long_eval={"lengths": [], "trials": 0})


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: max(1, path.stat().st_size // 2)])


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # a weight changed: the file still parses, only its sha256 can tell
    path.write_bytes(bytes(data))


STEP = "04_pretrain/checkpoints/step-0000007"


@pytest.mark.parametrize("damaged, damage", [(f"{STEP}/meta.json", _truncate), (f"{STEP}/model_config.json", _truncate),
                                             (f"{STEP}/model.safetensors", _truncate),
                                             (f"{STEP}/model.safetensors", _flip_byte),
                                             ("02_tokenizer/tokenizer.json", _truncate)])
def test_damaged_input_is_one_clear_error_and_force_keeps_the_finished_report(tmp_path, run, capsys, damaged, damage):
    """A truncated checkpoint or tokenizer file, or a bit flip in the weights (checked against the sha256
    recorded in meta.json): exit 2 naming the file and the way out (never a JSONDecodeError/SafetensorError
    traceback), and ``--force`` leaves a finished 08_eval as it was."""
    cfg = quick_config(tmp_path, run)
    code, out = run_script(["--config", str(cfg)], capsys)
    assert code == 0, out
    out_dir = Path(run.root) / run.name / "08_eval"
    before = folder_bytes(out_dir)
    path = Path(run.root) / run.name / damaged
    damage(path)
    for extra in ([], ["--force"], ["--dry-run"]):
        code, out = run_script(["--config", str(cfg), *extra], capsys)
        if not extra:  # finished with the same config: the no-op comes before any input is read
            assert code == 0 and "nothing to do" in out
            continue
        assert code == 2, out
        assert str(path.parent) in out and path.name in out and "HINT: restore" in out and "Traceback" not in out, out
        if damage is _flip_byte:
            assert "model.safetensors: sha256" in out and "changed since" in out, out
        assert folder_bytes(out_dir) == before


def test_damaged_checkpoint_is_refused_when_loaded_for_evaluation(run, tok):
    """load_for_eval (the lm-eval adapter, --chat) verifies too: a bit flip after planning is still caught."""
    _flip_byte(Path(run.root) / run.name / STEP / "model.safetensors")
    with pytest.raises(UserError, match=r"(?s)is damaged.*model.safetensors: sha256"):
        load_for_eval(find_checkpoints(run, ["04_pretrain"])[0][0], tok, device="cpu")


def test_tokenizer_changed_since_stage_2_is_refused(tmp_path, tok, capsys):
    """Stage 2 records the tokenizer's sha256; a file that is still valid JSON but not those bytes is refused."""
    from dante.artifacts import file_sha256

    run = C.RunConfig(name="sha", root=str(tmp_path / "runs"))
    stage = make_stage(run, "02_tokenizer")
    path = stage.dir / "tokenizer.json"
    tok.save(str(path))
    stage.finish(outputs={"tokenizer": "tokenizer.json", "tokenizer_sha256": file_sha256(path)})  # as stage 2 does
    add_checkpoint(run, "04_pretrain", tok, max_seq_len=256, seed=1)
    cfg = quick_config(tmp_path, run)
    code, out = run_script(["--config", str(cfg), "--dry-run"], capsys)
    assert code == 0, out
    path.write_bytes(path.read_bytes() + b"\n")  # still a valid tokenizer.json: only the checksum can tell
    code, out = run_script(["--config", str(cfg), "--dry-run"], capsys)
    assert code == 2 and f"{path} changed after 02_tokenizer finished" in out and "2_train_tokenizer.py" in out, out


def test_batch_size_is_output_neutral_on_a_finished_report(tmp_path, run, capsys):
    """eval.batch_size does not change a score (dante.evaluation.scoring: bit-identical at any batch size,
    tests/test_eval.py): a finished report rerun with another batch size is a no-op, not a refusal."""
    cfg = quick_config(tmp_path, run)
    assert run_script(["--config", str(cfg)], capsys)[0] == 0
    code, out = run_script(["--config", str(cfg), "--set", "eval.batch_size=1"], capsys)
    assert code == 0 and "nothing to do" in out, out
    code, out = run_script(["--config", str(cfg), "--set", "eval.max_eval_tokens=200"], capsys)
    assert code == 2 and "eval.max_eval_tokens" in out, out
