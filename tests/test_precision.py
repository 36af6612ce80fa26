"""The DeepSpeed side of dante.engine: the dtypes a live engine really uses (bf16 compute, fp32 masters,
fp32 gradient accumulation and reduction), the accumulated gradient of 16 bf16 micro-steps against an
fp32 reference, warnings for user configs that would accumulate in bf16, the refused config sections,
and the FP8 and world-size decisions that are taken before a stage folder is opened.

DeepSpeed runs here as one CPU rank (gloo, DS_ACCELERATOR=cpu); bf16 is emulated on this CPU, which is
slow but exact to the bf16 format, so the accumulation error measured here is the one a GPU would see.
"""

from __future__ import annotations

import copy
import json
import os
import runpy
from pathlib import Path

import pytest
import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")
torch.set_num_threads(1)

from dante.backends import DeepSpeedBackend, deepspeed_config, deepspeed_precision_warnings  # noqa: E402
from dante.cli import run_stage  # noqa: E402
from dante.config import ModelConfig, TrainConfig  # noqa: E402
from dante.distributed import init_distributed, rank_device, world_size_problem  # noqa: E402
from dante.engine import LossModule  # noqa: E402
from dante.errors import UserError  # noqa: E402
from dante.model import Transformer  # noqa: E402
from dante.transforms import fp8_problem  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
MODEL = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, max_seq_len=32, multiple_of=32)
MICRO_STEPS = 16
# Relative L2 error of the accumulated gradient vs the fp32 (float64) sum of the same 16 bf16 micro-step
# gradients. fp32 accumulation: 16 additions of 2^-24 relative rounding each bound it by ~1e-6; measured
# 3.4e-9 (ZeRO-1 and ZeRO-2). bf16 accumulation (DeepSpeed's default without data_types): each partial
# sum rounded to an 8-bit mantissa; measured 4.9e-3, i.e. ~0.5% of every update is rounding noise.
FP32_ACCUMULATION_BOUND = 1e-6
BF16_ACCUMULATION_FLOOR = 1e-3


def old_style_config(tmp_path: Path, stage: int) -> str:
    """The built-in config as it was before data_types/communication_data_type (what a user file may be)."""
    path = tmp_path / f"zero{stage}-old.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": stage, "overlap_comm": True,
                                                      "contiguous_gradients": True, "reduce_scatter": True},
                                "bf16": {"enabled": "auto"}}))
    return str(path)


def accumulate(stage: int, ds_file: str = "") -> tuple[dict, float]:
    """(effective dtypes of the live engine, relative error of its accumulated gradient after 16 bf16
    micro-steps against the float64 sum of the same micro-step gradients of an identical bf16 model)."""
    from deepspeed.utils import safe_get_full_grad

    cfg = TrainConfig(precision="bf16", micro_batch=2, seq_len=32, grad_accum=MICRO_STEPS, zero_stage=stage,
                      deepspeed_config=ds_file, grad_clip=0.0)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**MODEL))
    reference = LossModule(copy.deepcopy(model).to(torch.bfloat16), 64)  # what DeepSpeed's bf16 module computes
    backend = DeepSpeedBackend(LossModule(model, 64), cfg, init_distributed("deepspeed"))
    generator = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(MICRO_STEPS):
        rows = torch.randint(0, MODEL["vocab_size"], (2, 33), generator=generator)
        batches.append({"tokens": rows[:, :-1], "targets": rows[:, 1:]})
    scale = 1.0 / (MICRO_STEPS * 2 * 32)  # the engine's normalization: mean over every target of the step
    for m, batch in enumerate(batches):
        loss_sum, _ = backend.forward(batch)
        backend.backward(loss_sum * scale, boundary=m == MICRO_STEPS - 1)
    accumulated = torch.cat([safe_get_full_grad(p).double().flatten() for p in backend.model.parameters()])
    exact = torch.zeros_like(accumulated)
    for batch in batches:
        reference.zero_grad(set_to_none=True)
        loss_sum, _ = reference(**batch)
        (loss_sum * scale).backward()
        exact += torch.cat([p.grad.double().flatten() for p in reference.model.parameters()])
    return backend.precision, float((accumulated - exact).norm() / exact.norm())


@pytest.mark.parametrize("stage", [1, 2])
def test_bf16_runs_accumulate_and_reduce_in_fp32_and_the_old_config_does_not(tmp_path, stage):
    precision, error = accumulate(stage)
    assert precision["compute"] == "bf16" and precision["master_weights"] == "fp32", precision
    assert precision["grad_accumulation"] == "fp32" and precision["grad_reduction"] == "fp32", precision
    assert precision["zero_stage"] == stage
    # ZeRO-1 + bf16 + fp32 accumulation is DeepSpeed's BF16_Optimizer; ZeRO-2 its ZeRO optimizer
    assert precision["optimizer_wrapper"] == ("BF16_Optimizer" if stage == 1 else "DeepSpeedZeroOptimizer")
    old_precision, old_error = accumulate(stage, old_style_config(tmp_path, stage))
    assert old_precision["grad_accumulation"] == "bf16" and old_precision["grad_reduction"] == "bf16", old_precision
    print(f"ZeRO-{stage}: accumulated-gradient relative error fp32 {error:.2e}, bf16 (old config) {old_error:.2e}")
    assert error < FP32_ACCUMULATION_BOUND < BF16_ACCUMULATION_FLOOR < old_error


def test_a_user_config_that_accumulates_in_bf16_gets_a_warning_naming_the_key(tmp_path):
    bf16 = TrainConfig(precision="bf16", zero_stage=1, deepspeed_config=old_style_config(tmp_path, 1))
    warnings = deepspeed_precision_warnings(deepspeed_config(bf16, 2), bf16)
    assert len(warnings) == 2
    assert '"data_types": {"grad_accum_dtype": "fp32"}' in warnings[0] and "zero1-old.json" in warnings[0]
    assert '"communication_data_type": "fp32"' in warnings[1]
    builtin = TrainConfig(precision="bf16", zero_stage=1)
    assert deepspeed_precision_warnings(deepspeed_config(builtin, 2), builtin) == []
    for shipped in ("zero1.json", "zero2.json"):  # the shipped files state fp32 too
        cfg = TrainConfig(precision="bf16", zero_stage=int(shipped[4]), deepspeed_config=str(REPO / "configs" / "deepspeed" / shipped))
        assert deepspeed_precision_warnings(deepspeed_config(cfg, 2), cfg) == [], shipped
    explicit = tmp_path / "explicit.json"
    explicit.write_text(json.dumps({"data_types": {"grad_accum_dtype": "fp32"}, "communication_data_type": "bf16",
                                    "zero_optimization": {"stage": 1}}))
    chosen = TrainConfig(precision="bf16", zero_stage=1, deepspeed_config=str(explicit))
    assert deepspeed_precision_warnings(deepspeed_config(chosen, 2), chosen) == []  # bf16 reduction, chosen
    fp32 = TrainConfig(precision="fp32", zero_stage=1, deepspeed_config=old_style_config(tmp_path, 1))
    assert deepspeed_precision_warnings(deepspeed_config(fp32, 2), fp32) == []


@pytest.mark.parametrize("section,value", [("fp16", {"enabled": True}), ("optimizer", {"type": "AdamW"}),
                                           ("scheduler", {"type": "WarmupLR"})])
def test_deepspeed_config_sections_the_engine_owns_are_refused(tmp_path, section, value):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({section: value, "zero_optimization": {"stage": 1}}))
    with pytest.raises(UserError, match=f"'{section}' section: the engine builds AdamW.*remove it"):
        deepspeed_config(TrainConfig(zero_stage=1, deepspeed_config=str(path)), 2)
    path.write_text(json.dumps({"fp16": {"enabled": False}, "zero_optimization": {"stage": 1}}))
    deepspeed_config(TrainConfig(zero_stage=1, deepspeed_config=str(path)), 2)  # a disabled fp16 section is fine


def test_builtin_config_states_fp32_and_refuses_bf16_without_zero():
    ds = deepspeed_config(TrainConfig(precision="bf16"), 2)
    assert ds["zero_optimization"]["stage"] == 1  # the default: one gradient reduction per optimizer step
    assert ds["data_types"] == {"grad_accum_dtype": "fp32"} and ds["communication_data_type"] == "fp32"
    with pytest.raises(UserError, match="train.zero_stage=0 with train.precision=bf16.*use train.zero_stage=1"):
        deepspeed_config(TrainConfig(precision="bf16", zero_stage=0), 2)
    assert deepspeed_config(TrainConfig(precision="fp32", zero_stage=0), 2)["zero_optimization"]["stage"] == 0


# ---------------------------------------------------------------------------------------------------
# Decisions taken at launch, before the stage folder is opened
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device,capability,ok", [("cpu", None, False), ("cuda", (8, 0), False), ("cuda", (8, 6), False),
                                                  ("cuda", (8, 9), True), ("cuda", (9, 0), True), ("cuda", (10, 0), True),
                                                  ("cuda", (12, 0), True)])
def test_fp8_needs_fp8_tensor_cores(device, capability, ok):
    """A100 (8.0) and Ampere GeForce (8.6) have no fp8 units; Ada (8.9), Hopper (9.0), Blackwell (10.0, 12.0) do."""
    problem = fp8_problem(device, capability)
    if ok:
        assert problem is None
    else:
        assert "compute capability >= 8.9" in problem and "set train.fp8=false" in problem
        assert (f"compute capability {capability[0]}.{capability[1]}" if capability else "a cpu device") in problem


@pytest.mark.parametrize("script,stage", [("4_pretrain.py", "04_pretrain"), ("5_extend_context.py", "05_extend"),
                                          ("7_sft.py", "07_sft")])
def test_fp8_on_a_device_without_fp8_units_is_refused_before_the_stage_opens(tmp_path, capsys, script, stage):
    ns = runpy.run_path(str(REPO / script), run_name=f"{stage}_fp8_test")
    code = run_stage(stage, stage, ns["main"], dry_run=ns.get("dry_run"), setup=ns["start_ranks"],
                     argv=["--set", f"run.root={tmp_path}", "--set", "train.fp8=true", "--set", "train.precision=bf16", "--set", "train.max_steps=1",
                           "--config", str(REPO / "configs" / "tiny" / {"04_pretrain": "pretrain.yaml",
                                                                         "05_extend": "extend.yaml",
                                                                         "07_sft": "sft.yaml"}[stage])])
    assert code == 2
    assert "train.fp8 needs an NVIDIA GPU with fp8 tensor cores" in capsys.readouterr().err
    assert not (tmp_path / "tiny").exists()  # nothing opened, nothing marked


def test_world_size_and_device_decisions():
    assert world_size_problem(2, 2) is None
    problem = world_size_problem(1, 2)
    assert "started 1 rank(s) but train.expected_world_size=2" in problem and "--set train.expected_world_size=1" in problem
    # one process per GPU (CUDA_VISIBLE_DEVICES set per rank): every rank sees device 0
    assert [rank_device(r, 1) for r in range(4)] == [torch.device("cuda", 0)] * 4
    assert [rank_device(r, 2) for r in range(4)] == [torch.device("cuda", i) for i in (0, 1, 0, 1)]
    assert rank_device(3, 8) == torch.device("cuda", 3) and rank_device(5, 0) == torch.device("cpu")
