"""bench/gpu_acceptance.py as far as a CPU allows: the dry run validates the production configs and prints
the plan, a CPU run is refused, bad options are refused, and the training workers (pretraining and
packed SFT through the engine and the kernel choice) run for real on tiny configs.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")
torch.set_num_threads(1)

from dante import config as C  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def _load():
    spec = importlib.util.spec_from_file_location("gpu_acceptance", REPO / "bench" / "gpu_acceptance.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_acceptance"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


ga = _load()


def test_dry_run_validates_the_production_configs_and_prints_the_plan(tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert ga.main(["--dry-run", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    for name, goal in [("bf16-2048", ">= 34,000 tok/s"), ("fp8-2048", ">= 45,000 tok/s"),
                       ("bf16-4096", "mb >= 4"), ("sft-4096", "-"), ("decode", ">= 400 tok/s")]:
        assert name in printed and goal in printed, (name, printed)
    assert "all checks passed" in printed and "nothing is measured" in printed
    plan = json.loads(out.read_text())
    assert plan["dry_run"] and [c["case"] for c in plan["cases"]] == [c.name for c in ga.CASES]
    assert plan["estimated_seconds"] <= plan["time_limit_s"] == 480
    by_name = {c["case"]: c for c in plan["cases"]}
    for name in ("bf16-2048", "fp8-2048", "bf16-4096", "sft-4096"):  # the production path: the launcher
        c = by_name[name]
        assert "deepspeed --num_gpus 1" in c["command"] and c["train"]["backend"] == "deepspeed", c
        assert c["train"]["compile"] and c["train"]["precision"] == "bf16" and not c["train"]["activation_checkpointing"]
        assert c["estimated_memory_gib"] > c["zero_sharding_saving_2gpu_gib"] > 0
    assert by_name["fp8-2048"]["train"]["fp8"] and not by_name["bf16-2048"]["train"]["fp8"]
    assert by_name["bf16-4096"]["seq_len"] == 4096 and by_name["bf16-4096"]["micro_batch"] >= 4
    assert by_name["bf16-2048"]["params"] == 2_094_676_480  # Dante-2B, from configs/dante-2b/pretrain.yaml


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_a_run_without_cuda_is_refused_clearly(tmp_path, capsys):
    out = tmp_path / "results.json"
    assert ga.main(["--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "needs a CUDA GPU" in err and "--dry-run" in err and not out.exists()


def test_bad_options_are_refused_with_every_problem(tmp_path, capsys):
    assert ga.main(["--dry-run", "--only", "bf16-2048", "nope", "--steps", "1", "--out", str(tmp_path / "p")]) == 2
    err = capsys.readouterr().err
    assert "nope: unknown case" in err and "--steps 1" in err and not (tmp_path / "p").exists()


def _tiny(monkeypatch):
    """Tiny model and no compile, the rest of the production train sections unchanged."""
    model = C.ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, multiple_of=16, max_seq_len=64)
    real_stage_config = ga.stage_config

    def stage_config(case):
        cfg = real_stage_config(case)
        return replace(cfg, train=replace(cfg.train, compile=False, precision="fp32"))

    monkeypatch.setattr(ga, "stage_config", stage_config)
    monkeypatch.setattr(ga, "model_config", lambda case: model)


@pytest.mark.parametrize("kind, kernel", [("train", "causal"), ("sft", "sdpa")])
def test_training_workers_run_the_engine_for_real_on_tiny_configs(monkeypatch, kind, kernel):
    _tiny(monkeypatch)
    args = argparse.Namespace(steps=3, warmup=1)
    result = ga.run_training_case(ga.Case(f"tiny-{kind}", kind, 32, 2), 2, args)
    assert result["tokens_per_sec"] > 0 and len(result["step_s"]) == 3
    assert result["kernel"] == kernel  # packed SFT on CPU: SDPA with the dense document mask
    assert result["mfu_vs_bf16_peak"] is None  # no GPU peak on CPU
    assert isinstance(result["graphs_compiled"], int)


def test_verdicts_and_table():
    cases = {c.name: c for c in ga.CASES}
    ok = {"case": "bf16-2048", "micro_batch": 8, "tokens_per_sec": 35_000.0, "mfu_vs_bf16_peak": 0.47,
          "peak_reserved_gib": 70.0, "graphs_compiled": 1, "kernel": "causal"}
    slow = {**ok, "tokens_per_sec": 20_000.0}
    mem = {**ok, "case": "bf16-4096", "micro_batch": 4, "projected_2gpu_reserved_gib": 60.0}
    assert ga.verdict(cases["bf16-2048"], ok) == "met" and ga.verdict(cases["bf16-2048"], slow) == "missed"
    assert ga.verdict(cases["bf16-4096"], mem) == "met"
    assert ga.verdict(cases["bf16-4096"], {**mem, "projected_2gpu_reserved_gib": 90.0}) == "missed"
    assert ga.verdict(cases["fp8-2048"], {"case": "fp8-2048", "oom": True}) == "FAIL (oom)"
    text = ga.table([ok, mem])
    assert "35,000" in text and "47.0%" in text and "(60.0 at 2 GPUs)" in text and "causal" in text
