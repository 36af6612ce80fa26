"""The config system (dante/config/) and the shared command line (dante/cli.py).

One error message listing every problem with file and key; every YAML under configs/ loads into its
stage's dataclass (generic over PROFILE_FILES, so files added later are covered); typed --set overrides;
a stage whose input is missing or incompatible refuses and names the script; a complete stage is a no-op.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from pathlib import Path

import pytest
import yaml

from dante import artifacts as A
from dante import cli
from dante import config as C

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs"
FILE_TO_STAGE = {fname: stage for stage, fname in C.PROFILE_FILES.items()}


def write(tmp_path: Path, data, name: str = "cfg.yaml") -> Path:
    p = tmp_path / name
    p.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return p


# ---------------------------------------------------------------------------------------------------
# strict loading: one message with every problem
# ---------------------------------------------------------------------------------------------------


def test_every_problem_is_reported_once_with_file_and_key(tmp_path):
    path = write(tmp_path, {
        "run": {"name": "x", "colour": "red"},                     # unknown key
        "model": {"dim": "256", "n_layers": 2.5},                   # wrong types
        "train": {"precision": "fp12", "lr": True, "max_steps": 10},  # bad literal, bool is not a number
        "optimiser": {},                                            # unknown section
    })
    with pytest.raises(C.ConfigError) as e:
        C.load_config(C.PretrainStageConfig, path)
    msg = str(e.value)
    assert str(path) in msg.splitlines()[0]
    expected = ["run.colour: unknown key", "model.dim: expected an integer", "model.n_layers: expected an integer",
                "train.precision: 'fp12' is not one of", "train.lr: expected a number", "optimiser: unknown key"]
    for piece in expected:
        assert piece in msg, (piece, msg)
    assert len(e.value.problems) == len(expected)
    assert f"{len(expected)} problem(s)" in msg


def test_unknown_key_lists_the_known_ones(tmp_path):
    with pytest.raises(C.ConfigError, match=r"corpus.doc_per_shard: unknown key \(known: chunk_bytes, docs_per_shard, non_utf8, sources, workers\)"):
        C.load_config(C.CorpusStageConfig, write(tmp_path, {"corpus": {"doc_per_shard": 5}}))


def test_nested_list_of_sections_is_checked_item_by_item(tmp_path):
    path = write(tmp_path, {"corpus": {"sources": [
        {"name": "a", "kind": "local", "path": "x.jsonl"},
        {"name": "a", "kind": "s3", "path": "y.jsonl", "tier": 4, "min_chars": "ten"},
    ]}})
    with pytest.raises(C.ConfigError) as e:
        C.load_config(C.CorpusStageConfig, path)
    msg = str(e.value)
    assert "corpus.sources[1].kind: 's3' is not one of ['hf', 'local']" in msg
    assert "corpus.sources[1].min_chars: expected an integer" in msg


def test_invalid_combinations_are_reported_together(tmp_path):
    path = write(tmp_path, {"corpus": {"docs_per_shard": 0, "sources": [
        {"name": "a", "kind": "local", "path": "x.jsonl"},
        {"name": "a", "kind": "hf", "tier": 4, "char_budget": -1},
        {"name": "../escape", "kind": "local", "path": "z", "text_field": "a..b"},
    ]}})
    with pytest.raises(C.ConfigError) as e:
        C.load_config(C.CorpusStageConfig, path)
    msg = str(e.value)
    for piece in ("corpus.sources[1].name: duplicate source name 'a'", "corpus.sources[1].hf_id: required for kind hf",
                  "corpus.sources[1].tier: must be 1, 2 or 3", "corpus.sources[1].char_budget: must be >= 0",
                  "corpus.sources[2].name='../escape': must be a plain folder name", "corpus.sources[2].text_field",
                  "corpus.docs_per_shard: must be > 0"):
        assert piece in msg, (piece, msg)


def test_missing_file_syntax_error_and_non_mapping(tmp_path):
    with pytest.raises(C.ConfigError, match=r"config file not found: .*nope\.yaml.*--config configs/<profile>/"):
        C.load_config(C.CorpusStageConfig, tmp_path / "nope.yaml")
    with pytest.raises(C.ConfigError, match="YAML syntax error"):
        C.load_config(C.CorpusStageConfig, write(tmp_path, "run: {name: [unclosed\n"))
    with pytest.raises(C.ConfigError, match="top level must be a mapping, got list"):
        C.load_config(C.CorpusStageConfig, write(tmp_path, "- a\n- b\n"))


# ---------------------------------------------------------------------------------------------------
# --set overrides
# ---------------------------------------------------------------------------------------------------


def test_set_overrides_are_typed(tmp_path):
    path = write(tmp_path, {"train": {"max_steps": 10}})
    cfg = C.load_config(C.PretrainStageConfig, path, [
        "train.lr=1e-4", "train.micro_batch=8", "train.compile=true", "run.name=2024",
        "train.tier_weights={1: 2.5, 3: 1}",
    ])
    assert cfg.train.lr == 1e-4 and isinstance(cfg.train.lr, float)
    assert cfg.train.micro_batch == 8 and cfg.train.compile is True
    assert cfg.run.name == "2024"  # a string field keeps the literal text
    assert cfg.train.tier_weights == {1: 2.5, 3: 1}
    assert cfg.train.max_steps == 10  # the file value survives other overrides


def test_set_errors_name_the_key(tmp_path):
    path = write(tmp_path, {"train": {"max_steps": 10}})
    with pytest.raises(C.ConfigError) as e:
        C.load_config(C.PretrainStageConfig, path, ["train.lr=fast", "train.lrr=1", "model", "optim.x=1"])
    msg = str(e.value)
    assert "train.lr: expected a number, got str 'fast'" in msg
    assert "--set train.lrr: unknown key 'train.lrr'" in msg
    assert "--set 'model': expected key=value" in msg
    assert "--set optim.x: unknown key 'optim'" in msg


def test_set_reaches_into_lists_by_item_index(tmp_path):
    base = {"corpus": {"sources": [{"name": "a", "kind": "local", "path": "x"},
                                   {"name": "b", "kind": "local", "path": "y", "min_chars": 7}]}}
    cfg = C.load_config(C.CorpusStageConfig, write(tmp_path, base), [
        "corpus.docs_per_shard=7", "corpus.non_utf8=error", "corpus.sources.0.min_chars=50", "corpus.sources.1.tier=2"])
    assert (cfg.corpus.docs_per_shard, cfg.corpus.non_utf8) == (7, "error")
    a, b = cfg.corpus.sources
    assert (a.name, a.min_chars, a.tier) == ("a", 50, 1) and (b.name, b.min_chars, b.tier) == ("b", 7, 2)
    with pytest.raises(C.ConfigError, match=r"corpus.non_utf8: 'ignore' is not one of \['skip', 'error'\]"):
        C.load_config(C.CorpusStageConfig, write(tmp_path, base), ["corpus.non_utf8=ignore"])
    # other lists of sections, and a list of plain values (its item replaced whole)
    sft = {"sft_data": {"sources": [{"name": "s", "kind": "local", "path": "x.jsonl", "format": "messages"}]}}
    cfg = C.load_config(C.SFTDataStageConfig, write(tmp_path, sft), ["sft_data.sources.0.weight=2.5"])
    assert cfg.sft_data.sources[0].weight == 2.5
    tok = {"tokenizer": {"ab_presets": ["dante-elision", "qwen2"], "references": [{"name": "r", "path": "p"}]}}
    cfg = C.load_config(C.TokenizerStageConfig, write(tmp_path, tok), [
        "tokenizer.ab_presets.1=gpt2", "tokenizer.references.0.optional=true", "tokenizer.references.0.kind=tiktoken"])
    assert cfg.tokenizer.ab_presets == ["dante-elision", "gpt2"]
    assert (cfg.tokenizer.references[0].optional, cfg.tokenizer.references[0].kind) == (True, "tiktoken")


def test_set_list_index_errors_name_the_list_and_its_length(tmp_path):
    base = write(tmp_path, {"corpus": {"sources": [{"name": "a", "kind": "local", "path": "x"}]}})
    cases = {
        "corpus.sources.1.min_chars=5": "index 1 is out of range: corpus.sources has 1 item(s) (indices 0..0)",
        "corpus.sources.x.min_chars=5": "corpus.sources is a list, so the key after it must be an item index",
        "corpus.sources.0.bogus=1": "unknown key 'corpus.sources.0.bogus'",
        "corpus.sources.0.min_chars=many": "corpus.sources[0].min_chars: expected an integer, got str 'many'",
        "corpus.sources.0.kind=ftp": "corpus.sources[0].kind: 'ftp' is not one of ['hf', 'local']",
        "corpus.docs_per_shard.x=1": "corpus.docs_per_shard is a single value (int)",
    }
    for override, expected in cases.items():
        with pytest.raises(C.ConfigError) as e:
            C.load_config(C.CorpusStageConfig, base, [override])
        assert expected in str(e.value) and "expected a list, got dict" not in str(e.value), (override, str(e.value))
    with pytest.raises(C.ConfigError, match=r"tokenizer.references has 0 item\(s\) \(no index is valid\)"):
        C.load_config(C.TokenizerStageConfig, None, ["tokenizer.references.0.optional=true"])


def test_help_config_lists_item_keys_and_allowed_values():
    lines = C.describe(C.CorpusStageConfig)
    text = "\n".join(lines)
    keys = {f.name for f in dataclasses.fields(C.SourceConfig)}
    assert {k for k in keys if any(line.lstrip().startswith(f"corpus.sources[].{k} = ") for line in lines)} == keys
    assert "corpus.sources[].kind = 'local'  [one of 'hf', 'local']" in text
    assert "corpus.non_utf8 = 'skip'  [one of 'skip', 'error']" in text
    # every enumeration of every stage shows all its allowed values
    for stage, (_, cls) in C.STAGES.items():
        described = "\n".join(C.describe(cls))
        seen: set = set()
        _dataclasses_of(cls, seen)
        for klass in seen:
            for name, tp in typing.get_type_hints(klass).items():
                if typing.get_origin(tp) is typing.Literal:
                    assert "[one of " + ", ".join(map(repr, typing.get_args(tp))) + "]" in described, (stage, name)


# ---------------------------------------------------------------------------------------------------
# the profiles under configs/
# ---------------------------------------------------------------------------------------------------


def _profiles() -> list[Path]:
    """Folders of configs/ that hold stage files (configs/deepspeed/ and the like are not profiles)."""
    return [d for d in sorted(CONFIGS.iterdir()) if d.is_dir() and any((d / f).is_file() for f in FILE_TO_STAGE)]


def _profile_yamls() -> list[Path]:
    return [f for d in _profiles() for f in sorted([*d.glob("*.yaml"), *d.glob("*.yml")])]


@pytest.mark.parametrize("path", _profile_yamls(), ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_yaml_under_configs_loads_into_its_stage(path):
    assert path.name in FILE_TO_STAGE, (
        f"{path.relative_to(REPO)} does not name a stage; profile files are {sorted(FILE_TO_STAGE)} (dante.config.PROFILE_FILES)"
    )
    stage = FILE_TO_STAGE[path.name]
    cfg = C.load_config(C.STAGES[stage][1], path)
    assert isinstance(cfg, C.STAGES[stage][1])
    # the saved form round-trips: the resolved config written as YAML loads back to the same value
    assert C.from_dict(C.STAGES[stage][1], yaml.safe_load(C.to_yaml(cfg))) == cfg


def test_profiles_have_the_same_stage_files():
    profiles = _profiles()
    assert {p.name for p in profiles} >= {"tiny", "dante-2b"}
    files = {p.name: sorted(f.name for f in p.glob("*.yaml")) for p in profiles}
    assert len({tuple(v) for v in files.values()}) == 1, f"every profile needs the same stage files: {files}"


def _dataclasses_of(cls: type, seen: set) -> None:
    if cls in seen:
        return
    seen.add(cls)
    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        for t in (tp, *typing.get_args(tp)):
            if dataclasses.is_dataclass(t):
                _dataclasses_of(t, seen)


def test_every_field_has_a_default_and_a_doc():
    classes: set = set()
    for _, cls in C.STAGES.values():
        _dataclasses_of(cls, classes)
    missing = []
    for cls in sorted(classes, key=lambda c: c.__name__):
        cls()  # every field has a default
        docs = C.field_docs(cls)
        missing += [f"{cls.__name__}.{f.name}" for f in dataclasses.fields(cls) if not docs.get(f.name)]
    assert not missing, f"fields without a one-line doc: {missing}"


def test_stage_table_is_the_one_source_of_stage_names():
    folders = [s.folder for s in C.STAGE_TABLE]
    assert folders == [C.CORPUS, C.TOKENIZER, C.SHARDS, C.PRETRAIN, C.EXTEND, C.SFT_DATA, C.SFT, C.EVAL, C.EXPORT]
    for n, s in enumerate(C.STAGE_TABLE, start=1):
        assert s.folder.startswith(f"0{n}_") and s.script.startswith(f"{n}_"), s
        assert (REPO / s.script).is_file(), f"{s.script} named in dante/config/stages.py does not exist"
        assert C.STAGES[s.folder] == (s.script, s.config) and C.PROFILE_FILES[s.folder] == s.profile_file
    assert set(C.CHECKPOINT_STAGES) <= set(folders)
    # every stage config has exactly one cross-field checker, and validate() reaches it
    assert set(C.STAGE_CHECKS) == {s.config for s in C.STAGE_TABLE}


def test_corpus_and_sft_sources_share_one_check(tmp_path):
    bad = [{"name": "a", "kind": "hf"}, {"name": "a", "kind": "local", "path": "p"}, {"name": "", "path": "q"},
           {"name": "b", "kind": "local"}]
    common = ["sources[0].hf_id: required for kind hf", "sources[1].name: duplicate source name 'a'",
              "sources[2].name: required", "sources[3].path: required for kind local"]
    for cls, section in ((C.CorpusStageConfig, "corpus"), (C.SFTDataStageConfig, "sft_data")):
        with pytest.raises(C.ConfigError) as e:
            C.load_config(cls, write(tmp_path, {section: {"sources": bad}}))
        for piece in common:
            assert f"{section}.{piece}" in e.value.problems, (section, piece, e.value.problems)
    assert issubclass(C.SourceConfig, C.BaseSourceConfig) and issubclass(C.SFTSourceConfig, C.BaseSourceConfig)


# ---------------------------------------------------------------------------------------------------
# the shared command line (dante/cli.py)
# ---------------------------------------------------------------------------------------------------


def _tokenizer_yaml(tmp_path: Path) -> Path:
    return write(tmp_path, {"run": {"name": "t", "root": str(tmp_path / "runs")}}, "tokenizer.yaml")


def test_cli_config_error_is_one_message_and_exit_2(tmp_path, capsys):
    path = write(tmp_path, {"run": {"nam": "x"}, "tokenizer": {"vocab_size": "big"}})
    rc = cli.run_stage("02_tokenizer", "test", lambda st, cfg, args: None, argv=["--config", str(path)])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("ERROR") == 1 and str(path) in err
    assert "run.nam: unknown key" in err and "tokenizer.vocab_size: expected an integer" in err
    assert "Traceback" not in err
    assert not (tmp_path / "runs").exists()


def test_cli_requires_config_and_prints_resolved_config(tmp_path, capsys):
    assert cli.run_stage("02_tokenizer", "test", lambda *a: None, argv=[]) == 2
    assert "--config is required" in capsys.readouterr().err
    path = _tokenizer_yaml(tmp_path)
    assert cli.run_stage("02_tokenizer", "test", lambda *a: None, argv=["--config", str(path), "--print-config",
                                                                       "--set", "tokenizer.vocab_size=1024"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["tokenizer"]["vocab_size"] == 1024 and printed["run"]["name"] == "t"
    with pytest.raises(SystemExit) as e:
        cli.run_stage("02_tokenizer", "test", lambda *a: None, argv=["--help-config"])
    assert e.value.code == 0
    assert "tokenizer.vocab_size = 8192  [int]" in capsys.readouterr().out


def test_missing_input_manifest_refuses_with_the_script_to_run(tmp_path, capsys):
    path = _tokenizer_yaml(tmp_path)

    def main(stage, cfg, args):
        stage.require("01_corpus", format_version=1)
        raise AssertionError("must not get here")

    assert cli.run_stage("02_tokenizer", "test", main, argv=["--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "01_corpus is missing" in err and "python 1_download_corpus.py --config configs/<profile>/corpus.yaml" in err
    assert not A.stage_done(C.RunConfig(name="t", root=str(tmp_path / "runs")), "02_tokenizer")


def test_incompatible_input_manifest_refuses_with_the_script_to_run(tmp_path, capsys):
    run = C.RunConfig(name="t", root=str(tmp_path / "runs"))
    A.Stage.open(C.CorpusStageConfig(run=run), "01_corpus", format_version=7).finish()
    path = _tokenizer_yaml(tmp_path)
    rc = cli.run_stage("02_tokenizer", "test", lambda st, cfg, args: st.require("01_corpus", format_version=1),
                       argv=["--config", str(path)])
    err = capsys.readouterr().err
    assert rc == 2 and "format version 7" in err and "python 1_download_corpus.py --force" in err
    assert not A.stage_done(run, "02_tokenizer")


def test_rerun_of_a_complete_stage_is_a_noop_unless_forced(tmp_path, capsys):
    path = _tokenizer_yaml(tmp_path)
    calls = []

    def main(stage, cfg, args):
        calls.append(stage.resumed)
        stage.finish(counts={"n": len(calls)})

    argv = ["--config", str(path)]
    assert cli.run_stage("02_tokenizer", "test", main, argv=argv) == 0
    manifest = tmp_path / "runs" / "t" / "02_tokenizer" / "manifest.json"
    first = manifest.read_bytes()
    assert cli.run_stage("02_tokenizer", "test", main, argv=argv) == 0
    assert "already complete" in capsys.readouterr().out
    assert len(calls) == 1 and manifest.read_bytes() == first
    assert cli.run_stage("02_tokenizer", "test", main, argv=[*argv, "--force"]) == 0
    assert len(calls) == 2 and json.loads(manifest.read_text())["counts"] == {"n": 2}


def test_user_error_leaves_nothing_marked_done(tmp_path, capsys):
    path = _tokenizer_yaml(tmp_path)

    def main(stage, cfg, args):
        raise cli.UserError("held-out file it.jsonl.gz is empty")

    assert cli.run_stage("02_tokenizer", "test", main, argv=["--config", str(path)]) == 2
    assert "held-out file it.jsonl.gz is empty" in capsys.readouterr().err
    assert not (tmp_path / "runs" / "t" / "02_tokenizer" / "manifest.json").exists()


def test_tokenizer_checks_report_every_bad_setting_together(tmp_path):
    path = write(tmp_path, {"tokenizer": {"min_frequency": 0, "n_reserved": -1, "sample_chars": 0,
                                          "heldout": {"fr": "x.jsonl"}, "language_mix": {"it": -1}}})
    with pytest.raises(C.ConfigError) as e:
        C.load_config(C.TokenizerStageConfig, path)
    msg = str(e.value)
    for key in ("tokenizer.min_frequency=0", "tokenizer.n_reserved=-1", "tokenizer.sample_chars",
                "tokenizer.heldout: must map language tags", "tokenizer.language_mix: shares"):
        assert key in msg, key
    assert e.value.problems and len(e.value.problems) == 5
