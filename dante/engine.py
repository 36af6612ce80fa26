"""The training engine shared by stage 4 (pretraining), stage 5 (context extension) and stage 7 (SFT).

A stage builds a model (fresh, or from ``dante.checkpoint.load_model``), a batch source and a
``TrainConfig``, then calls ``Trainer(...).fit()``. The engine owns everything else: the distributed
setup, the optimizer and schedule, the step, validation, checkpoints and metrics.

    batch source   anything with ``batch(step, micro_step, rank, world_size) -> dict`` of (B, T) tensors:
                   ``tokens``, ``targets`` (-100 = no loss), optional ``weights`` (float per target; SFT),
                   ``positions`` and ``doc_ids`` (packed documents; passed to the model), and
                   ``state_dict()``/``load_state_dict()`` (checked on resume). Random access by step
                   makes resume exact with no data-loader state (``dante.pretrain_data`` for the pretraining one),
                   and lets ``dante.prefetch`` build the next step in a background thread. An optional
                   ``document_mask`` attribute (True when batches carry ``doc_ids``) feeds the kernel choice.
    val source     optional; ``batches(rank, world_size, max_batches)`` yields the same kind of dicts.

Design choices
- Loss normalization: the model returns (weighted loss SUM, weight sum) per micro-batch
  (``dante.loss``). Before the forward passes of a step, the engine adds up the target weights of all
  micro-batches of the step on all ranks (one all-reduce); each micro-batch then back-propagates
  ``loss_sum * world_size / total_weight``. DeepSpeed averages gradients over ranks (the / world_size
  cancels the * world_size), so the update equals one big batch's mean loss over every weighted token,
  whatever the split into micro-batches and ranks (tested: 1 rank x accumulation 2 == 2 ranks x 1, and
  weighted accumulation == one batch). Per-micro-batch means would overweight tokens of sparsely
  weighted micro-batches (SFT) and short ones.
- Backends: ``deepspeed`` (ZeRO stage 0-2: optimizer states, and with 2 gradients, partitioned over
  ranks; bf16 weights with fp32 masters in the optimizer; gradients accumulated and reduced in fp32 by the
  built-in config, and the dtypes actually in use read back from the live engine into the log and the
  manifest; ZeRO-1 by default: one gradient all-reduce per optimizer step, bench/zero_comm.py) and ``torch`` (one process, fp32 weights with
  bf16 autocast, torch AdamW; needs no DeepSpeed: the fallback where it is missing). DeepSpeed on CPU
  (``DS_ACCELERATOR=cpu``) runs with gloo; bf16 works there too, but the tiny CPU profile trains in fp32
  because this machine's CPUs have no bf16 matmul units (bf16 is emulated, i.e. slower) and because
  the resume test compares losses bit for bit.
- AdamW (torch's, fused kernel on CUDA) with betas/eps/weight decay from the config. No weight decay on
  norms (1-D weights), biases, and the embedding matrix (and so the tied lm_head): decaying them pulls
  per-channel gains and rare-token rows towards zero without regularising anything (the GPT-3 /
  LLaMA practice). An untied lm_head is a projection like the others and decays.
- LR: linear warmup to ``lr`` over ``warmup_steps``, then cosine to ``min_lr`` at the last step
  (``lr_at``). A pure function of the step: nothing to save, and stage 5/7 get a fresh schedule simply
  by starting at step 0 in their own stage folder.
- Model transforms are applied here, never in model.py: torchao float8 (all linears except ``output``,
  the lm_head, whose logits feed the softmax and stay bf16), activation checkpointing (per block,
  non-reentrant), torch.compile of each block's forward (one graph reused by every block, the
  checkpoint inside it: ``apply_compile`` says why), and the attention kernel chosen by
  ``dante.kernels.choose_attention`` (logged, and in the manifest under ``transforms.attention``).
  Parameter names never change.
- The GPU does not wait for the host: micro-batches are built ahead in a background thread into
  pinned memory and copied with ``non_blocking=True``; one host sync per optimizer step (the loss, read
  before the update so that a non-finite one never reaches the weights); gradient norms are read once
  per log interval and before each checkpoint; ``torch.cuda.synchronize()`` only at log steps, where
  the interval's tokens/s is measured.
- Launch: ``python 4_pretrain.py`` runs one process (RANK/WORLD_SIZE/MASTER_* default to a single rank
  on a free port); ``deepspeed`` or ``torchrun`` launch many ranks / nodes, one per GPU (device
  ``LOCAL_RANK % visible GPUs``). The stages start their ranks (``start_ranks``) before opening their
  folder, so a world size other than train.expected_world_size or FP8 without fp8 units is refused
  before anything is written.
- Resume (``dante.checkpoint``): rank 0 picks the checkpoint before the backend is built, because a
  resume on another number of ranks changes grad_accum (the global batch stays the checkpoint's) and
  makes DeepSpeed load the optimizer state through its universal format (``to_universal``, converted
  once by rank 0 into the checkpoint's train_state/universal/). Every DeepSpeed checkpoint carries the
  ``universal_checkpoint_info`` that ``ds_to_universal`` requires.
- DANTE_DATA_TRACE=<folder> makes every rank record the windows it is served (``TracedBatches``), for
  tests that compare what runs split or resumed differently trained on; off by default.
- Failure: a non-finite loss stops the run before the optimizer step, so the weights and the last
  checkpoint stay good, and the error names the step. A non-finite gradient norm is found at the next
  log step or checkpoint, whichever comes first, and names its step; no checkpoint is written after it.
  SIGTERM/SIGINT set a flag checked between steps (with several ranks it travels in the next loss
  all-reduce, so all ranks stop after the same step): the engine saves a checkpoint and returns
  ``stopped_by_signal``; a second SIGINT aborts at once.

Example::

    dist = init_distributed(cfg.train.backend)
    trainer = Trainer(model=model, model_cfg=cfg.model, train_cfg=cfg.train, stage_dir=stage.dir,
                      data=TieredMemmapDataset.from_stage_dir(...), val_data=ValidationWindows.from_stage_dir(...),
                      stage_config=to_dict(cfg), dist=dist, desc="04_pretrain")
    result = trainer.fit()
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import math
import os
import shutil
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

import torch
import torch.distributed as torch_dist
from torch import nn
from torch.utils.checkpoint import checkpoint

from dante.checkpoint import TRAIN_STATE, CheckpointError, CheckpointManager, ResumePlan, from_rank0, plan_resume
from dante.config import ModelConfig, TrainConfig
from dante.errors import UserError
from dante.flops import mfu_fields, planned_steps, tokens_per_step, training_flops_per_token, training_peaks
from dante.kernels import apply_attention_choice, choose_attention
from dante.loss import chunked_cross_entropy
from dante.metrics import MetricsLogger
from dante.model import Transformer
from dante.prefetch import StepPrefetcher

IGNORE_INDEX = -100


class TrainingDiverged(UserError):
    """The loss or the gradient norm became NaN/inf."""


class BatchSource(Protocol):
    def batch(self, step: int, micro_step: int, rank: int, world_size: int) -> dict[str, torch.Tensor]: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


class ValSource(Protocol):
    def batches(self, rank: int, world_size: int, max_batches: int) -> Iterator[dict[str, torch.Tensor]]: ...


# ---------------------------------------------------------------------------------------------------
# Distributed setup
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_device(local_rank: int, cuda_devices: int) -> torch.device:
    """This rank's device: GPU ``local_rank % cuda_devices``, or the CPU when no GPU is visible.

    The modulo matters when a scheduler gives every process one GPU (CUDA_VISIBLE_DEVICES=<its GPU>,
    as SLURM's --gpus-per-task and Kubernetes device plugins do): LOCAL_RANK is still 0..7 on the node,
    but each process sees a single device 0, and ``set_device(LOCAL_RANK)`` would fail on every rank but 0.
    """
    if cuda_devices <= 0:
        return torch.device("cpu")
    return torch.device("cuda", local_rank % cuda_devices)


def world_size_problem(world_size: int, expected: int) -> str | None:
    """Why a launch of ``world_size`` ranks does not match ``train.expected_world_size`` (None if it does).

    The world size sets the tokens per optimizer step (micro_batch x seq_len x grad_accum x ranks), hence
    the steps to the token budget and the schedule: running another size silently trains another recipe.
    """
    if world_size == expected:
        return None
    return (f"the launcher started {world_size} rank(s) but train.expected_world_size={expected}: the global batch "
            f"and the number of steps depend on it. Launch {expected} process(es), or plan for this launch with "
            f"--set train.expected_world_size={world_size} (and adjust train.grad_accum to keep the global batch)")


def init_distributed(backend: str = "deepspeed", expected_world_size: int | None = None) -> DistInfo:
    """Join (or, for a plain ``python`` launch, create) the process group; pick this rank's device.

    Launchers (deepspeed, torchrun) set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; without
    them this is a single rank on a free local port, so two single-process runs never collide. With
    ``expected_world_size`` (the training stages pass train.expected_world_size) another world size is
    refused before any rank joins the group: every rank sees the same WORLD_SIZE, so all of them stop.
    Calling it again returns the same ranks (the stages call it before opening their folder and in main).
    """
    if "RANK" not in os.environ and "WORLD_SIZE" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if expected_world_size is not None and (problem := world_size_problem(world_size, expected_world_size)):
        raise UserError(problem)
    device = rank_device(local_rank, torch.cuda.device_count() if torch.cuda.is_available() else 0)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if backend == "torch":
        if world_size > 1:
            raise UserError(f"train.backend=torch runs one process, but the launcher started {world_size}; "
                            "use train.backend=deepspeed for several GPUs")
        return DistInfo(rank, world_size, local_rank, device)
    if not torch_dist.is_initialized():
        try:
            import deepspeed
        except ImportError:
            raise UserError("train.backend=deepspeed but DeepSpeed is not installed; `pip install deepspeed` "
                            "or set train.backend=torch (single process)") from None
        from deepspeed.utils import logger as ds_logger

        ds_logger.setLevel(logging.WARNING)  # its INFO lines (config dumps, per-step notes) drown the progress bar
        if device.type == "cpu":
            import deepspeed.ops

            # DeepSpeed would JIT-compile a shared-memory all-reduce op here (90 s on first use on a 2-core
            # machine, measured) that only speeds up CPU multi-rank all-reduce; gloo does the job for the
            # CPU profile and tests. deepspeed.ops documents that edits of this dict persist.
            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
    return DistInfo(rank, world_size, local_rank, device)


def start_ranks(stage_cfg: Any) -> DistInfo:
    """``run_stage``'s setup hook for the training stages 4, 5 and 7: the ranks of this launch. What the
    launch itself rules out is refused here, before the stage folder is opened or any work is recorded
    (stage 5 records its "before" evaluation long before the engine would apply FP8): a world size other
    than train.expected_world_size, and train.fp8 on a device without fp8 tensor cores."""
    dist = init_distributed(stage_cfg.train.backend, stage_cfg.train.expected_world_size)
    if stage_cfg.train.fp8 and (problem := device_fp8_problem(dist.device)):
        raise UserError(problem)
    return dist


# ---------------------------------------------------------------------------------------------------
# Schedule, optimizer groups, step plan
# ---------------------------------------------------------------------------------------------------


def lr_at(step: int, cfg: TrainConfig, total_steps: int) -> float:
    """LR of optimizer step ``step`` (0-based): linear warmup to cfg.lr, then cosine down to cfg.min_lr."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    decay_steps = max(1, total_steps - 1 - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / decay_steps)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


def adamw_param_groups(model: nn.Module, weight_decay: float) -> tuple[list[dict], dict]:
    """Two AdamW groups: decayed matrices, and exempt norms/biases/embeddings (see the module docstring)."""
    embedding_ids = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    decay, exempt, exempt_names = [], [], []
    for name, p in model.named_parameters():  # a tied matrix appears once, under its first name
        if not p.requires_grad:
            continue
        if p.ndim < 2 or id(p) in embedding_ids or name.endswith(".bias"):
            exempt.append(p)
            exempt_names.append(name)
        else:
            decay.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": exempt, "weight_decay": 0.0}]
    summary = {"decay_params": sum(p.numel() for p in decay), "exempt_params": sum(p.numel() for p in exempt),
               "exempt_tensors": len(exempt_names), "exempt_examples": exempt_names[:4]}
    return groups, summary


# ---------------------------------------------------------------------------------------------------
# DeepSpeed config
# ---------------------------------------------------------------------------------------------------

_DS_DEFAULT = {
    "zero_optimization": {"stage": 1, "overlap_comm": True, "contiguous_gradients": True, "reduce_scatter": True,
                          "reduce_bucket_size": 200_000_000, "allgather_bucket_size": 200_000_000},
    # bf16 weights and activations, but gradients summed over micro-steps and over ranks in fp32, as Megatron
    # and torchtitan do. Without these two keys DeepSpeed 0.19 uses the model dtype for both
    # (DeepSpeedEngine.get_data_types and .communication_data_type): 16 micro-steps summed in bf16 (8-bit
    # mantissa) lose ~0.4% of the gradient, measured in tests/test_precision.py. With bf16, ZeRO-1 then runs
    # DeepSpeed's BF16_Optimizer (an fp32 gradient buffer filled by per-parameter hooks, one all-reduce per
    # optimizer step); ZeRO-2 adds each micro-step's reduced partition into an fp32 buffer.
    "data_types": {"grad_accum_dtype": "fp32"},
    "communication_data_type": "fp32",
    "steps_per_print": 1 << 30,  # the engine logs; DeepSpeed's own step prints would interleave
    "wall_clock_breakdown": False,
}


def deepspeed_config(cfg: TrainConfig, world_size: int) -> dict:
    """The DeepSpeed config: train.deepspeed_config (JSON or YAML) or the built-in one, with the batch,
    clipping and precision keys filled from train.* ("auto" or absent) and refused when they disagree."""
    import yaml

    if cfg.deepspeed_config:
        path = Path(cfg.deepspeed_config)
        if not path.is_file():
            raise UserError(f"train.deepspeed_config={cfg.deepspeed_config!r}: file not found "
                            "(give a path relative to the working directory, or '' for the built-in config)")
        try:
            ds = yaml.safe_load(path.read_text(encoding="utf-8"))  # YAML is a superset of JSON
        except yaml.YAMLError as e:
            raise UserError(f"{path}: not valid JSON/YAML ({e})") from None
        if not isinstance(ds, dict):
            raise UserError(f"{path}: the top level must be a mapping")
    else:
        ds = json.loads(json.dumps(_DS_DEFAULT))
        ds["zero_optimization"]["stage"] = cfg.zero_stage
    problems = []
    for section in ("optimizer", "scheduler", "fp16"):
        if section in ds and (section != "fp16" or ds[section].get("enabled") not in (False, "auto")):
            problems.append(f"'{section}' section: the engine builds AdamW, the cosine schedule and bf16/fp32 "
                            "from train.*; remove it")
    wanted = {
        "train_micro_batch_size_per_gpu": cfg.micro_batch,
        "gradient_accumulation_steps": cfg.grad_accum,
        "train_batch_size": cfg.micro_batch * cfg.grad_accum * world_size,
        "gradient_clipping": cfg.grad_clip,
    }
    for key, value in wanted.items():
        if ds.get(key, "auto") not in ("auto", value):
            problems.append(f"{key}={ds[key]!r} disagrees with train.* ({value!r}); use \"auto\"")
        ds[key] = value
    bf16 = ds.setdefault("bf16", {})
    if bf16.get("enabled", "auto") not in ("auto", cfg.precision == "bf16"):
        problems.append(f"bf16.enabled={bf16['enabled']!r} disagrees with train.precision={cfg.precision}")
    bf16["enabled"] = cfg.precision == "bf16"
    stage = ds.setdefault("zero_optimization", {}).setdefault("stage", cfg.zero_stage)
    if stage != cfg.zero_stage:
        problems.append(f"zero_optimization.stage={stage} disagrees with train.zero_stage={cfg.zero_stage}")
    if cfg.precision == "bf16" and stage == 0 and not cfg.deepspeed_config:
        # DeepSpeed 0.19 has no fp32-accumulation path without ZeRO (_do_optimizer_sanity_check raises
        # NotImplementedError for bf16 + fp32 accumulation at stage 0); ZeRO-1 communicates as rarely.
        problems.append("train.zero_stage=0 with train.precision=bf16: DeepSpeed can only accumulate and reduce "
                        "gradients in bf16 without ZeRO; use train.zero_stage=1 (the same single all-reduce per "
                        "optimizer step, with fp32 accumulation)")
    ds["zero_allow_untested_optimizer"] = True  # torch AdamW under ZeRO: supported, DeepSpeed just asks
    if problems:
        where = cfg.deepspeed_config or "built-in config"
        raise UserError(f"DeepSpeed config {where}:\n" + "\n".join(f"  - {p}" for p in problems))
    return ds


def deepspeed_precision_warnings(ds: dict, cfg: TrainConfig) -> list[str]:
    """What a DeepSpeed config (as ``deepspeed_config`` returns it) leaves in bf16 that should be fp32.

    Accumulation: DeepSpeed uses the model dtype unless ``data_types.grad_accum_dtype`` says otherwise, so a
    bf16 run without that key sums micro-step gradients in bf16. Reduction: without
    ``communication_data_type`` the all-reduce / reduce-scatter runs in bf16 (half the traffic, 8-bit
    mantissa); an explicit value, bf16 included, is a choice and gets no warning.
    """
    if cfg.precision != "bf16":
        return []
    where = cfg.deepspeed_config or "the built-in DeepSpeed config"
    out = []
    accum = str((ds.get("data_types") or {}).get("grad_accum_dtype", "bf16")).lower()
    if accum not in ("fp32", "float32", "float", "torch.float32"):
        out.append(f"{where}: gradients are accumulated over micro-steps in bf16 (data_types.grad_accum_dtype is "
                   f"{accum!r}); set \"data_types\": {{\"grad_accum_dtype\": \"fp32\"}}")
    if ds.get("communication_data_type") is None:
        out.append(f"{where}: gradients are reduced across ranks in bf16 (no communication_data_type); set "
                   "\"communication_data_type\": \"fp32\" (or \"bf16\" to choose the halved traffic explicitly)")
    return out


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))


def deepspeed_precision(engine) -> dict[str, str]:
    """The dtypes a live DeepSpeed engine uses, read from its optimizer wrapper's buffers and attributes.

    compute: the module's parameters (forward and backward run in it); master: the partition the optimizer
    updates; accumulation: where micro-step gradients are summed; reduction: the dtype of the cross-rank
    all-reduce / reduce-scatter. The wrapper is BF16_Optimizer (ZeRO-1 + bf16 + fp32 accumulation) or
    DeepSpeedZeroOptimizer (ZeRO-1/2 otherwise); a bare torch optimizer (ZeRO-0, fp32) keeps all in fp32.
    """
    opt = engine.optimizer
    compute = next(engine.module.parameters()).dtype
    if hasattr(opt, "fp32_groups_gradients_flat"):  # BF16_Optimizer
        accumulation = opt.fp32_groups_gradients_flat[0].dtype
        master = opt.fp32_groups_flat_partition[0].dtype
        reduction = engine.communication_data_type  # DeepSpeedEngine.allreduce_bucket casts to it
    elif hasattr(opt, "single_partition_of_fp32_groups"):  # DeepSpeedZeroOptimizer, stage 1 or 2
        accumulation = opt.gradient_accumulation_dtype
        master = opt.single_partition_of_fp32_groups[0].dtype
        reduction = opt.communication_data_type
    else:
        accumulation = master = compute
        reduction = engine.communication_data_type
    return {"compute": _dtype_name(compute), "master_weights": _dtype_name(master),
            "grad_accumulation": _dtype_name(accumulation), "grad_reduction": _dtype_name(reduction),
            "optimizer_wrapper": type(opt).__name__, "zero_stage": int(engine.zero_optimization_stage())}


# ---------------------------------------------------------------------------------------------------
# Model transforms (applied from outside model.py) and the loss wrapper
# ---------------------------------------------------------------------------------------------------


def _blocks(model: nn.Module) -> list[nn.Module]:
    return list(model.layers)


def fp8_problem(device_type: str, capability: tuple[int, int] | None) -> str | None:
    """Why train.fp8 cannot run on a device (None if it can): torchao's float8 GEMMs need fp8 tensor cores,
    i.e. compute capability >= 8.9 (Ada, Hopper, Blackwell); A100 (8.0) and CPUs have none."""
    if device_type == "cuda" and capability is not None and tuple(capability) >= (8, 9):
        return None
    found = f"compute capability {capability[0]}.{capability[1]}" if device_type == "cuda" and capability else \
        f"a {device_type} device"
    return (f"train.fp8 needs an NVIDIA GPU with fp8 tensor cores (compute capability >= 8.9: Ada, Hopper, "
            f"Blackwell), this rank has {found}; set train.fp8=false here")


def device_fp8_problem(device: torch.device) -> str | None:
    capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    return fp8_problem(device.type, capability)


def apply_fp8(model: nn.Module, device: torch.device) -> int:
    """torchao float8 training for every linear except ``output``; returns how many were converted."""
    if problem := device_fp8_problem(device):
        raise UserError(problem)
    try:
        from torchao.float8 import convert_to_float8_training
    except ImportError:
        raise UserError("train.fp8 needs torchao (`pip install torchao`)") from None

    def is_converted(module: nn.Module, fqn: str) -> bool:
        # lm_head stays bf16 (its logits feed the softmax/loss); float8 GEMMs also need dims divisible by 16
        return fqn != "output" and isinstance(module, nn.Linear) and \
            module.in_features % 16 == 0 and module.out_features % 16 == 0

    before = sum(1 for m in model.modules() if type(m) is nn.Linear)
    convert_to_float8_training(model, module_filter_fn=is_converted)
    return before - sum(1 for m in model.modules() if type(m) is nn.Linear)


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each block in backward: only block inputs stay alive between forward and backward.

    Each block's ``forward`` attribute becomes a small function that calls non-reentrant
    ``torch.utils.checkpoint`` on the original forward; the module tree, and so every parameter name, is
    unchanged. ``apply_compile`` afterwards compiles that function, which puts the checkpoint inside the
    compiled graph (see there).
    """
    for block in _blocks(model):
        block.forward = _recomputed(block.forward)


def _recomputed(forward: Callable) -> Callable:
    def forward_with_recompute(*args, **kwargs):
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return forward_with_recompute


COMPILE_MODES_VALIDATED = ("default",)


def apply_compile(model: nn.Module, mode: str = "default", backend: str | Callable = "inductor") -> None:
    """torch.compile each block's ``forward`` (one graph, reused by every block; parameter names unchanged).

    Why ``block.forward`` and not ``Module.compile``: ``torch.utils.checkpoint.checkpoint`` is decorated
    with ``torch._disable_dynamo``, so when the checkpoint is the first frame a compiled module call
    enters (``Module.compile`` over a checkpointed forward), Dynamo never traces the block and it runs
    eager: a graph-counting backend captured 0 graphs (torch 2.13). Compiling the function that *calls*
    checkpoint lets Dynamo turn it into the ``tag_activation_checkpoint`` higher-order op inside the
    block graph: 1 graph for all blocks, and AOT autograd's partitioner recomputes the block in backward
    (tests/test_kernels.py counts the graphs, the tensors saved for backward and compares gradients).
    Only mode "default" is accepted: "reduce-overhead" (CUDA graphs) and "max-autotune" have not been
    validated on a GPU with this engine (DeepSpeed's gradient hooks and buffers, per-block graphs).
    """
    if mode not in COMPILE_MODES_VALIDATED:
        raise UserError(compile_mode_problem(mode))
    for block in _blocks(model):
        block.forward = torch.compile(block.forward, mode=mode, backend=backend)


def compile_mode_problem(mode: str) -> str:
    return (f"train.compile_mode={mode!r} is refused: only 'default' has been validated with this engine "
            "(reduce-overhead captures CUDA graphs, max-autotune benchmarks kernels for minutes; neither has run "
            "on a GPU here yet); set train.compile_mode=default")


class LossModule(nn.Module):
    """Transformer + chunked cross-entropy: forward(batch) -> (weighted loss sum, weight sum)."""

    def __init__(self, model: Transformer, chunk_size: int):
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size

    def forward(self, tokens, targets, weights=None, positions=None, doc_ids=None):
        hidden_BTD = self.model(tokens, positions_BT=positions, doc_ids_BT=doc_ids)
        return chunked_cross_entropy(hidden_BTD, self.model.output.weight, targets, weights,
                                     chunk_size=self.chunk_size, ignore_index=IGNORE_INDEX)


def batch_weight(batch: dict[str, torch.Tensor]) -> float:
    """Total loss weight of a micro-batch (what chunked_cross_entropy will return as weight sum)."""
    keep = batch["targets"] != IGNORE_INDEX
    if batch.get("weights") is None:
        return float(keep.sum())
    return float((batch["weights"].double() * keep).sum())


# ---------------------------------------------------------------------------------------------------
# Backends
# ---------------------------------------------------------------------------------------------------


class _BackendBase:
    def __init__(self, module: LossModule, dist: DistInfo):
        self.module, self.dist = module, dist
        self.rank, self.world_size = dist.rank, dist.world_size

    def barrier(self) -> None:
        if self.world_size > 1:
            torch_dist.barrier()

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        if self.world_size == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.dist.device)
        torch_dist.all_reduce(t)
        return t.tolist()

    def all_reduce_sum_(self, t: torch.Tensor) -> torch.Tensor:
        """In-place sum over ranks of a device tensor; no host sync (NCCL queues it on the stream)."""
        if self.world_size > 1:
            torch_dist.all_reduce(t)
        return t

    @property
    def model(self) -> Transformer:
        return self.module.model


DS_TAG = "deepspeed"
"""train_state/deepspeed/: DeepSpeed's own checkpoint (module states, one optimizer partition file per rank)."""
UNIVERSAL_TAG = "universal"
"""train_state/universal/: the same state in DeepSpeed's universal format, made when a resume needs it."""


def partitioned_optimizer(train_state: Path) -> bool:
    """Whether DeepSpeed split the optimizer state of this checkpoint per rank (ZeRO-1/2, or bf16 at ZeRO-0:
    files ``*optim_states.pt``); fp32 at ZeRO-0 keeps the whole torch optimizer state in the module file."""
    return any((train_state / DS_TAG).glob("*optim_states.pt"))


def to_universal(train_state: Path) -> Path:
    """Convert train_state/deepspeed into train_state/universal with DeepSpeed's ``ds_to_universal``.

    The universal format stores, per parameter, the full fp32 master, exp_avg, exp_avg_sq and step, so any
    number of ranks can cut its own partition from it (``load_universal_checkpoint``). Done once per
    checkpoint: the result is kept beside the shards and reused. Written to a temporary folder and renamed,
    so a conversion cut short is never mistaken for a finished one. One worker process: the converter
    forks workers otherwise, and forking a process that holds a CUDA context is unsafe. DeepSpeed's
    progress output goes to train_state/universal.log instead of the training log.
    """
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    out = train_state / UNIVERSAL_TAG
    if out.is_dir():
        return out
    tmp = train_state / f"{UNIVERSAL_TAG}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    args = argparse.Namespace(input_folder=str(train_state / DS_TAG), output_folder=str(tmp), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True,
                              inject_missing_state=True)  # checkpoints saved before the info was set
    with open(train_state / f"{UNIVERSAL_TAG}.log", "w", encoding="utf-8") as log, \
            contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        ds_to_universal(args)
    (train_state / "latest_universal").unlink(missing_ok=True)  # names the temporary folder; loads pass the tag
    tmp.rename(out)
    return out


class DeepSpeedBackend(_BackendBase):
    name = "deepspeed"

    def __init__(self, module: LossModule, cfg: TrainConfig, dist: DistInfo, reshard: Path | None = None):
        """``reshard``: the train_state/ folder of a checkpoint written by another number of ranks that this
        engine will load; its partitioned optimizer state then goes through DeepSpeed's universal format,
        which DeepSpeed reads only when the engine is built with ``checkpoint.load_universal`` on."""
        import deepspeed
        from deepspeed.checkpoint import UNIVERSAL_CHECKPOINT_INFO, UNIVERSAL_CHECKPOINT_VERSION_KEY
        from deepspeed.checkpoint.constants import UNIVERSAL_CHECKPOINT_VERSION_VALUE

        super().__init__(module, dist)
        groups, self.param_summary = adamw_param_groups(module.model, cfg.weight_decay)
        optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                                      fused=dist.device.type == "cuda")
        module.to(dist.device)
        # save_checkpoint stores this in mp_rank_00_model_states.pt; ds_to_universal refuses a checkpoint
        # without it. A plain data-parallel model has no tensor-parallel slicing to describe: the version only.
        setattr(module, UNIVERSAL_CHECKPOINT_INFO, {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE})
        self.universal = reshard is not None and partitioned_optimizer(reshard)
        ds_config = deepspeed_config(cfg, dist.world_size)
        ds_config["checkpoint"] = {**ds_config.get("checkpoint", {}), "load_universal": self.universal}
        self.engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, config=ds_config)
        self.module = self.engine.module
        self.precision = deepspeed_precision(self.engine)
        if dist.is_main:
            for warning in deepspeed_precision_warnings(ds_config, cfg):
                print(f"WARNING: {warning}", file=sys.stderr, flush=True)

    def forward(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        return self.engine(**batch)

    def backward(self, loss: torch.Tensor, boundary: bool) -> None:
        # the engine scales the loss itself (see "Loss normalization"), hence scale_wrt_gas=False
        self.engine.set_gradient_accumulation_boundary(boundary)
        self.engine.backward(loss, scale_wrt_gas=False)

    def step(self, lr: float) -> torch.Tensor | float:
        """The update; returns the gradient norm, a device tensor, read later (Trainer: once per log interval)."""
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return norm if norm is not None else float("nan")

    def train_mode(self, on: bool) -> None:
        self.engine.train(on)

    def save_train_state(self, path: Path) -> None:
        # everything DeepSpeed writes (shards, its recovery scripts) stays inside train_state/
        self.engine.save_checkpoint(str(path), tag=DS_TAG, save_latest=False)

    def load_train_state(self, path: Path, saved_world_size: int | None = None) -> None:
        """The checkpoint's state; written by another number of ranks, via the universal format (see
        ``to_universal``) when the optimizer state is partitioned, as is: when it is not (ZeRO-0 in fp32)."""
        tag = DS_TAG
        if saved_world_size not in (None, self.world_size) and self.universal:
            problem = None
            if self.rank == 0:  # one conversion, on the shared checkpoint folder; the others wait for it
                try:
                    to_universal(path)
                except Exception as e:  # any failure must reach every rank, or they wait forever
                    problem = f"converting {path / DS_TAG} to DeepSpeed's universal format failed: {type(e).__name__}: {e}"
            problem = from_rank0(problem, self.world_size)
            if problem:
                raise CheckpointError(f"{problem}\n  HINT: resume on {saved_world_size} rank(s), as the checkpoint was "
                                      "written, or see the log in the checkpoint's train_state/")
            tag = UNIVERSAL_TAG
        elif saved_world_size not in (None, self.world_size) and partitioned_optimizer(path):
            raise CheckpointError(f"{path} was written by {saved_world_size} rank(s) with a partitioned optimizer "
                                  "state, but this engine was not built to re-partition it (Trainer passes reshard=)")
        loaded, _ = self.engine.load_checkpoint(str(path), tag=tag, load_optimizer_states=True,
                                                load_lr_scheduler_states=False, load_module_strict=True)
        if loaded is None:
            raise CheckpointError(f"DeepSpeed found no state under {path / tag}")

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        from deepspeed.utils import safe_get_full_fp32_param

        out = {}
        for name, p in self.model.named_parameters():
            full = safe_get_full_fp32_param(p)  # collective under ZeRO: all ranks call it, in the same order
            out[name] = (full if full is not None else p.detach()).float().cpu()
        return out if self.rank == 0 else None


class TorchBackend(_BackendBase):
    """One process, fp32 weights, bf16 autocast, torch AdamW: no DeepSpeed needed."""

    name = "torch"

    def __init__(self, module: LossModule, cfg: TrainConfig, dist: DistInfo, reshard: Path | None = None):
        # reshard: never needed, one process writes and reads the whole optimizer state
        super().__init__(module, dist)
        module.to(dist.device)
        groups, self.param_summary = adamw_param_groups(module.model, cfg.weight_decay)
        self.optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                                           fused=dist.device.type == "cuda")
        self.params = [p for g in groups for p in g["params"]]
        self.grad_clip = cfg.grad_clip
        self.autocast = cfg.precision == "bf16"
        # autocast runs the matmuls in bf16, but parameters, their .grad (accumulated by autograd) and
        # AdamW stay fp32; one process, so nothing is reduced
        self.precision = {"compute": cfg.precision, "master_weights": "fp32", "grad_accumulation": "fp32",
                          "grad_reduction": "none (one process)", "optimizer_wrapper": "none"}

    def forward(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.autocast(self.dist.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            return self.module(**batch)

    def backward(self, loss: torch.Tensor, boundary: bool) -> None:
        loss.backward()

    def step(self, lr: float) -> torch.Tensor | float:
        """The update, skipped when the gradient norm is not finite; returns that norm (a device tensor on CUDA)."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        max_norm = self.grad_clip if self.grad_clip > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
        if self.dist.device.type == "cuda":
            # never apply a non-finite gradient, without a host sync: the fused AdamW kernel skips the
            # update (and the step count) where found_inf is 1, the mechanism torch's GradScaler uses
            self.optimizer.found_inf = (~torch.isfinite(norm)).float()
            self.optimizer.step()
        elif math.isfinite(float(norm)):  # on CPU reading the norm costs nothing: there is no queue to drain
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def train_mode(self, on: bool) -> None:
        self.module.train(on)

    def save_train_state(self, path: Path) -> None:
        from dante.artifacts import atomic_path

        with atomic_path(path / "optimizer.pt") as tmp:
            torch.save(self.optimizer.state_dict(), tmp)

    def load_train_state(self, path: Path, saved_world_size: int | None = None) -> None:
        from dante.checkpoint import WEIGHTS, load_weights_into

        load_weights_into(self.model, path.parent / WEIGHTS, self.model.cfg.tie_embeddings)
        self.optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location=self.dist.device))

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        return {name: p.detach() for name, p in self.model.named_parameters()}


BACKENDS = {"deepspeed": DeepSpeedBackend, "torch": TorchBackend}


# ---------------------------------------------------------------------------------------------------
# Signals
# ---------------------------------------------------------------------------------------------------


class StopFlag:
    """SIGTERM/SIGINT -> a flag the loop checks between steps (a second SIGINT aborts at once)."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self) -> "StopFlag":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


# ---------------------------------------------------------------------------------------------------
# Data trace (tests and debugging)
# ---------------------------------------------------------------------------------------------------

TRACE_ENV = "DANTE_DATA_TRACE"
"""A folder: when set, every rank records the micro-batches it is served (``TracedBatches``)."""


class TracedBatches:
    """A batch source that appends, for every micro-batch it serves, one JSON line to
    ``<folder>/rank<r>-pid<p>.jsonl``: step, micro_step, rank, world_size and a short sha256 of every row
    (its tokens and targets). Tests read it to check that runs split over other rank counts or resumed
    elsewhere train on the same windows. Only with DANTE_DATA_TRACE set: it costs a hash per row."""

    def __init__(self, inner: BatchSource, folder: Path, rank: int):
        self.inner = inner
        folder.mkdir(parents=True, exist_ok=True)
        self._file = open(folder / f"rank{rank}-pid{os.getpid()}.jsonl", "a", encoding="utf-8")
        self._lock = threading.Lock()  # a prefetching loader may call batch() from another thread
        self.document_mask = bool(getattr(inner, "document_mask", False))  # the kernel choice reads it

    def batch(self, step: int, micro_step: int, rank: int, world_size: int) -> dict[str, torch.Tensor]:
        out = self.inner.batch(step, micro_step, rank, world_size)
        rows = [hashlib.sha256(t.numpy().tobytes() + y.numpy().tobytes()).hexdigest()[:16]
                for t, y in zip(out["tokens"], out["targets"])]
        line = json.dumps({"step": step, "micro_step": micro_step, "rank": rank, "world_size": world_size,
                           "rows": rows})
        with self._lock:
            self._file.write(line + "\n")
            self._file.flush()
        return out

    def state_dict(self) -> dict:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state)


# ---------------------------------------------------------------------------------------------------
# The trainer
# ---------------------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    steps: int
    tokens_seen: int
    final_loss: float | None
    final_val_loss: float | None
    checkpoint: str | None
    stopped_by_signal: int | None = None
    resumed_from: int = 0
    train_seconds: float = 0.0
    extra: dict = field(default_factory=dict)


def _device_scalars(values: list[float], device: torch.device) -> torch.Tensor:
    """float64 values on ``device`` without a host sync: a copy from pageable memory would wait for the
    GPU's queue, one from pinned memory with non_blocking=True does not."""
    host = torch.tensor(values, dtype=torch.float64, pin_memory=device.type == "cuda")
    return host.to(device, non_blocking=True)


class Trainer:
    """The training loop: one readable ``fit``; checkpoints, metrics and validation are helpers it calls."""

    def __init__(self, *, model: Transformer, model_cfg: ModelConfig, train_cfg: TrainConfig, stage_dir: str | Path,
                 data: BatchSource, stage_config: dict, dist: DistInfo, val_data: ValSource | None = None,
                 desc: str = "train", on_checkpoint: Callable[[int, Path], None] | None = None,
                 resume: ResumePlan | None = None):
        """``resume``: what to resume from, when the stage needed it before building its data (stage 7: the
        SFT order and step count depend on the accumulation); by default decided here (``plan_resume``)."""
        self.stage_dir = Path(stage_dir)
        self.resume_plan = resume or plan_resume(self.stage_dir, stage_config, train_cfg.micro_batch,
                                                 train_cfg.grad_accum, dist.rank, dist.world_size)
        if self.resume_plan.grad_accum != train_cfg.grad_accum:  # the checkpoint's global batch on this many ranks
            train_cfg = replace(train_cfg, grad_accum=self.resume_plan.grad_accum)
        self.cfg, self.model_cfg, self.dist, self.desc = train_cfg, model_cfg, dist, desc
        if os.environ.get(TRACE_ENV):
            data = TracedBatches(data, Path(os.environ[TRACE_ENV]), dist.rank)
        self.data, self.val_data = data, val_data
        self.stage_config = stage_config
        self.on_checkpoint = on_checkpoint  # rank 0, after each complete checkpoint (e.g. Stage.save_progress)
        self.total_steps = planned_steps(train_cfg, dist.world_size)
        self.tokens_per_step = tokens_per_step(train_cfg, dist.world_size)
        self.flops_per_token = training_flops_per_token(model_cfg, train_cfg.seq_len)
        self.peaks = training_peaks(train_cfg.fp8, train_cfg.peak_tflops)  # MFU vs bf16, and vs fp8 with train.fp8
        self.transforms = self._prepare(model)
        reshard = self.resume_plan.step_dir / TRAIN_STATE if self.resume_plan.resharded else None
        self.backend = BACKENDS[train_cfg.backend](LossModule(model, train_cfg.loss_chunk_size), train_cfg, dist,
                                                   reshard=reshard)
        if dist.is_main:
            p = self.backend.precision
            print(f"[{desc}] precision: compute {p['compute']}, master weights {p['master_weights']}, gradient "
                  f"accumulation {p['grad_accumulation']}, gradient reduction {p['grad_reduction']} "
                  f"({train_cfg.backend}, optimizer wrapper {p['optimizer_wrapper']})", flush=True)
        self.checkpoints = CheckpointManager(self.stage_dir, train_cfg.keep_last, self.backend)
        self.saved_step: int | None = None  # step of the checkpoint last written or loaded, the same on every rank
        self.reshards: list[dict] = []  # every change of rank count of this run, carried from checkpoint to checkpoint
        self.step = 0
        self.tokens_seen = 0
        self.last_loss: float | None = None
        self.last_val_loss: float | None = None
        # the next steps' micro-batches are built in a background thread (dante/prefetch.py)
        self.prefetcher = StepPrefetcher(data, train_cfg.grad_accum, dist.rank, dist.world_size,
                                         pin=dist.device.type == "cuda", weight_of=batch_weight, end=self.total_steps)
        self._pending_norms: list[tuple[int, torch.Tensor | float]] = []  # (step, grad norm) not read yet
        self._stop_agreed = False  # some rank asked to stop (learnt from the last step's all-reduce)

    def _prepare(self, model: Transformer) -> dict:
        cfg, applied = self.cfg, {}
        if cfg.compile and cfg.compile_mode not in COMPILE_MODES_VALIDATED:  # before any work
            raise UserError(compile_mode_problem(cfg.compile_mode))
        model.to(self.dist.device)
        if cfg.fp8:
            applied["fp8_linears"] = apply_fp8(model, self.dist.device)
        if cfg.activation_checkpointing:
            apply_activation_checkpointing(model)
            applied["activation_checkpointing"] = True
        if cfg.compile:
            apply_compile(model, cfg.compile_mode)
            applied["compile"] = cfg.compile_mode
        # batch sources of packed documents (SFTBatches) say so with a ``document_mask`` attribute
        choice = choose_attention(self.dist.device.type, document_mask=bool(getattr(self.data, "document_mask", False)),
                                  gqa=self.model_cfg.n_heads != self.model_cfg.n_kv_heads, compiled=cfg.compile)
        apply_attention_choice(model, choice)
        applied["attention"] = choice.to_dict()
        return applied

    # -- resume -------------------------------------------------------------------------------------
    def resume(self) -> int:
        """Load the checkpoint ``plan_resume`` chose (the same on every rank), if any; returns the step to continue from."""
        plan = self.resume_plan
        if plan.step_dir is None:
            return 0
        meta = self.checkpoints.load(plan)
        try:
            self.data.load_state_dict(meta["data"])
        except ValueError as e:
            raise CheckpointError(f"cannot resume from {plan.step_dir}: {e}") from None
        self.step, self.tokens_seen = int(meta["step"]), int(meta["tokens_seen"])
        self.last_loss, self.last_val_loss = meta.get("loss"), meta.get("val_loss")
        self.saved_step = self.step
        self.reshards = list(meta.get("reshards", []))
        if plan.resharded:
            self.reshards.append({"step": self.step, "from_world_size": plan.saved_world_size,
                                  "to_world_size": self.dist.world_size, "grad_accum": self.cfg.grad_accum,
                                  "optimizer_state": "universal" if getattr(self.backend, "universal", False) else "as saved"})
        if plan.removed and self.dist.is_main:
            print(f"[{self.desc}] removed incomplete checkpoint folder(s) {plan.removed}", flush=True)
        return self.step

    def save_checkpoint(self) -> Path:
        meta = {"tokens_seen": self.tokens_seen, "loss": self.last_loss, "val_loss": self.last_val_loss,
                "data": self.data.state_dict(), "config": self.stage_config, "stage": self.desc,
                "backend": self.backend.name, "transforms": self.transforms,
                "batch": {"micro_batch": self.cfg.micro_batch, "grad_accum": self.cfg.grad_accum,
                          "world_size": self.dist.world_size,
                          "global_batch": self.cfg.micro_batch * self.cfg.grad_accum * self.dist.world_size},
                "reshards": self.reshards}
        path = self.checkpoints.save(self.step, self.model_cfg, meta)
        self.saved_step = self.step
        if self.on_checkpoint is not None and self.dist.is_main:
            self.on_checkpoint(self.step, path)
        return path

    # -- one optimizer step ---------------------------------------------------------------------------
    def train_step(self, step: int, stop_requested: bool | Callable[[], bool] = False) -> dict | None:
        """Forward/backward over all micro-batches of ``step`` and one optimizer update.

        Returns None (and changes nothing) when a stop was asked: with one rank, ``stop_requested`` now;
        with several, a request of any rank carried by the previous step's loss all-reduce (every rank
        reads the same sum, so all stop at the same step). Raises TrainingDiverged on a non-finite loss,
        before the update. The gradient norm is returned unread (a device tensor on GPU): ``fit`` reads
        the norms of a whole log interval at once and before every checkpoint (``_read_grad_norms``).

        Host syncs: one per step, reading the loss (with several ranks, together with the stop flags and
        the weight total, in one tensor) before the update. That read must precede the update for the
        non-finite check to keep bad weights out, and it costs one idle gap of the GPU per optimizer step
        (the host then queues the update and the next step's forwards, a few ms against a Dante-2B step
        of ~0.5 s per micro-batch, an estimate: not measured on a GPU yet); the micro-steps in between
        never wait for the host, and their batches were built by the prefetcher while the last step ran.
        """
        cfg, dist, b = self.cfg, self.dist, self.backend
        asked = stop_requested() if callable(stop_requested) else stop_requested
        if self._stop_agreed or (dist.world_size == 1 and asked):
            return None
        prepared = self.prefetcher.get(step)
        if dist.world_size == 1:
            total_weight, total_t = prepared.local_weight, None
            if total_weight <= 0:
                raise UserError(f"step {step + 1}: no target has a loss weight > 0 in the whole batch; check the data")
            scale = 1.0 / total_weight
        else:  # the weight total stays on the device (no sync); checked with the loss below, before the update
            total_t = b.all_reduce_sum_(_device_scalars([prepared.local_weight], dist.device))
            scale = (dist.world_size / total_t[0]).float()
        loss_sum = torch.zeros((), dtype=torch.float64, device=dist.device)
        for m, batch in enumerate(prepared.batches):
            batch = {k: v.to(dist.device, non_blocking=True) for k, v in batch.items()}  # pinned on GPU: async
            micro_loss_sum, _ = b.forward(batch)
            b.backward(micro_loss_sum * scale, boundary=m == len(prepared.batches) - 1)
            loss_sum += micro_loss_sum.detach().double()
        if dist.world_size == 1:
            global_loss_sum = float(loss_sum)  # the step's one host sync
        else:
            summed = b.all_reduce_sum_(torch.cat([loss_sum.reshape(1), _device_scalars([float(asked)], dist.device)]))
            global_loss_sum, stop, total_weight = torch.cat([summed, total_t]).tolist()  # the step's one host sync
            self._stop_agreed = stop > 0
            if total_weight <= 0:
                raise UserError(f"step {step + 1}: no target has a loss weight > 0 in the whole batch; check the data")
        loss = global_loss_sum / total_weight
        if not math.isfinite(loss):
            raise TrainingDiverged(self._diverged_message(step + 1, f"loss is {loss}"))
        lr = lr_at(step, cfg, self.total_steps)
        grad_norm = b.step(lr)
        return {"loss": loss, "lr": lr, "grad_norm": grad_norm}

    def _read_grad_norms(self, pending: list[tuple[int, Any]]) -> dict[int, float]:
        """{step: gradient norm} of the steps not read yet, in one host sync; empties ``pending``.

        Raises TrainingDiverged naming the first step whose norm is not finite. The torch backend and
        DeepSpeed in fp32 skipped that update; DeepSpeed in bf16 applied it. Either way no checkpoint has
        been written since, because ``fit`` calls this before every checkpoint.
        """
        if not pending:
            return {}
        values = [v if isinstance(v, torch.Tensor) else torch.tensor(float(v)) for _, v in pending]
        read = torch.stack([v.detach().double().reshape(()).cpu() for v in values]).tolist()
        norms = {step: value for (step, _), value in zip(pending, read)}
        pending.clear()
        for step, value in norms.items():
            if not math.isfinite(value):
                raise TrainingDiverged(self._diverged_message(step, f"gradient norm is {value}"))
        return norms

    def _diverged_message(self, step: int, what: str) -> str:
        latest = self.checkpoints.latest()
        keep = f"the last good checkpoint is {latest}" if latest else "no checkpoint was written yet"
        return (f"training diverged at step {step}: {what}. Stopped; {keep}.\n"
                "  HINT: lower train.lr or raise train.warmup_steps, keep train.grad_clip > 0, and check the data "
                "around this step (it is reproducible: the sampler is a pure function of the step).")

    # -- validation ---------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict | None:
        if self.val_data is None:
            return None
        b, dist = self.backend, self.dist
        b.train_mode(False)
        sums = torch.zeros(2, dtype=torch.float64, device=dist.device)  # (loss sum, weight sum), read once
        for batch in self.val_data.batches(dist.rank, dist.world_size, self.cfg.eval_batches):
            batch = {k: v.to(dist.device) for k, v in batch.items() if v is not None}
            ls, ws = b.forward(batch)
            sums += torch.stack([ls.detach().double(), torch.as_tensor(ws, device=dist.device).double()])
        b.train_mode(True)
        loss_sum, weight_sum = b.all_reduce_sum_(sums).tolist()
        if weight_sum <= 0:
            return None
        val_loss = loss_sum / weight_sum
        return {"kind": "val", "step": self.step, "val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0)),
                "val_tokens": int(weight_sum)}

    # -- the loop -----------------------------------------------------------------------------------
    def fit(self) -> TrainResult:
        cfg, dist = self.cfg, self.dist
        start = self.resume()
        log = MetricsLogger(self.stage_dir, dist.is_main, start, self.total_steps, self.desc)
        if start:
            log.note(f"resumed from checkpoint step {start} ({self.tokens_seen:,} tokens seen)")
        if start and self.resume_plan.note:
            log.note(self.resume_plan.note)
        if start >= self.total_steps:
            log.close()
            return self._result(start, None)
        self.backend.train_mode(True)
        log.note(f"attention kernel {self.transforms['attention']['kernel']}: {self.transforms['attention']['reason']}")
        recent_step_s: list[float] = []
        train_seconds, stopped = 0.0, None
        interval_steps, interval_s = 0, 0.0  # since the last written record: its tokens/s
        pending_norms: list[tuple[int, Any]] = []  # gradient norms not read yet (read per log interval)
        with StopFlag() as flag:
            try:
                while self.step < self.total_steps:
                    t0 = time.perf_counter()
                    out = self.train_step(self.step, stop_requested=lambda: flag.signum is not None)
                    if out is None:  # a rank got SIGTERM/SIGINT: save where we are and leave cleanly
                        stopped = flag.signum or signal.SIGTERM
                        log.note(f"stop signal received: saving a checkpoint at step {self.step}")
                        self._read_grad_norms(pending_norms)  # a checkpoint never holds a diverged update
                        if self.saved_step != self.step:  # not just saved (or resumed from)
                            self.save_checkpoint()
                        break
                    self.step += 1
                    self.tokens_seen += self.tokens_per_step
                    self.last_loss = out["loss"]
                    pending_norms.append((self.step, out["grad_norm"]))
                    last = self.step == self.total_steps
                    write = self.step % cfg.log_every == 0 or last
                    save = self.step % cfg.checkpoint_every == 0 or last
                    if write and dist.device.type == "cuda":
                        torch.cuda.synchronize()  # the interval's time then covers finished GPU work
                    step_s = time.perf_counter() - t0
                    train_seconds += step_s
                    interval_steps, interval_s = interval_steps + 1, interval_s + step_s
                    recent_step_s = (recent_step_s + [step_s])[-20:]
                    mean_step_s = sum(recent_step_s) / len(recent_step_s)
                    norms = self._read_grad_norms(pending_norms) if write or save else {}
                    tok_s = self.tokens_per_step * interval_steps / interval_s if write else self.tokens_per_step / mean_step_s
                    record = {"kind": "train", "step": self.step, "loss": out["loss"], "lr": out["lr"],
                              "grad_norm": norms.get(self.step), "tokens": self.tokens_seen, "tokens_per_sec": tok_s,
                              **mfu_fields(tok_s, self.flops_per_token, self.peaks, dist.world_size),
                              "step_time_s": interval_s / interval_steps if write else step_s,
                              "elapsed_s": train_seconds}
                    log.train(record, write=write, eta_s=(self.total_steps - self.step) * mean_step_s)
                    if write:
                        interval_steps, interval_s = 0, 0.0
                    if cfg.eval_every and (self.step % cfg.eval_every == 0 or last):
                        val = self.evaluate()
                        if val is not None:
                            self.last_val_loss = val["val_loss"]
                            log.val(val)
                    if save:
                        self.save_checkpoint()
            finally:
                self.prefetcher.close()
                log.close()
        return self._result(start, stopped, train_seconds)

    def _result(self, start: int, stopped: int | None, seconds: float = 0.0) -> TrainResult:
        latest = self.checkpoints.latest()
        return TrainResult(steps=self.step, tokens_seen=self.tokens_seen, final_loss=self.last_loss,
                           final_val_loss=self.last_val_loss, checkpoint=str(latest) if latest else None,
                           stopped_by_signal=stopped, resumed_from=start, train_seconds=seconds,
                           extra={"transforms": self.transforms, "backend": self.backend.name,
                                  "world_size": self.dist.world_size, "total_steps": self.total_steps,
                                  "flops_per_token": self.flops_per_token,
                                  "peak": {k: p.label if p else None for k, p in self.peaks.items()},
                                  "precision": self.backend.precision,
                                  "optimizer_groups": self.backend.param_summary,
                                  "batch": {"micro_batch": self.cfg.micro_batch, "grad_accum": self.cfg.grad_accum,
                                            "global_batch": self.tokens_per_step // self.cfg.seq_len},
                                  "reshards": self.reshards})


__all__ = ["Trainer", "TrainResult", "TrainingDiverged", "DistInfo", "init_distributed", "start_ranks", "rank_device",
           "world_size_problem", "fp8_problem", "deepspeed_precision", "deepspeed_precision_warnings", "lr_at", "adamw_param_groups",
           "planned_steps", "tokens_per_step", "deepspeed_config", "LossModule", "batch_weight",
           "DeepSpeedBackend", "TorchBackend"]
