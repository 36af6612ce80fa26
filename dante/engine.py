"""The training engine shared by stage 4 (pretraining), stage 5 (context extension) and stage 7 (SFT).

A stage builds a model (fresh, or from ``dante.checkpoint.load_model``), a batch source and a
``TrainConfig``, then calls ``Trainer(...).fit()``. The engine owns everything else: the distributed
setup, the optimizer and schedule, the step, validation, checkpoints and metrics.

    batch source   anything with ``batch(step, micro_step, rank, world_size) -> dict`` of (B, T) tensors:
                   ``tokens``, ``targets`` (-100 = no loss), optional ``weights`` (float per target; SFT),
                   ``positions`` and ``doc_ids`` (packed documents; passed to the model), and
                   ``state_dict()``/``load_state_dict()`` (checked on resume). Random access by step
                   makes resume exact with no data-loader state (``dante.data`` for the pretraining one).
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
  non-reentrant), torch.compile per block (``Module.compile``, which keeps parameter names; one
  compiled graph is reused by every block).
- Launch: ``python 4_pretrain.py`` runs one process (RANK/WORLD_SIZE/MASTER_* default to a single rank
  on a free port); ``deepspeed`` or ``torchrun`` launch many ranks / nodes, one per GPU (device
  ``LOCAL_RANK % visible GPUs``). The stages start their ranks (``start_ranks``) before opening their
  folder, so a world size other than train.expected_world_size or FP8 without fp8 units is refused
  before anything is written.
- Failure: a non-finite loss stops the run before the optimizer step, so the weights and the last
  checkpoint stay good, and the error names the step. SIGTERM/SIGINT set a flag checked between steps:
  the engine saves a checkpoint and returns ``stopped_by_signal``; a second SIGINT aborts at once.

Example::

    dist = init_distributed(cfg.train.backend)
    trainer = Trainer(model=model, model_cfg=cfg.model, train_cfg=cfg.train, stage_dir=stage.dir,
                      data=TieredMemmapDataset.from_stage_dir(...), val_data=ValidationWindows.from_stage_dir(...),
                      stage_config=to_dict(cfg), dist=dist, desc="04_pretrain")
    result = trainer.fit()
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

import torch
import torch.distributed as torch_dist
from torch import nn

from dante.checkpoint import CheckpointError, CheckpointManager, step_dir_name
from dante.config import ModelConfig, TrainConfig
from dante.errors import UserError
from dante.flops import mfu, mfu_fields, training_flops_per_token, training_peaks
from dante.loss import chunked_cross_entropy
from dante.metrics import MetricsLogger, format_duration
from dante.model import Transformer

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


def tokens_per_step(cfg: TrainConfig, world_size: int) -> int:
    return cfg.micro_batch * cfg.seq_len * cfg.grad_accum * world_size


def planned_steps(cfg: TrainConfig, world_size: int) -> int:
    """train.max_steps, or the steps that reach train.token_budget (rounded up)."""
    if cfg.max_steps > 0:
        return cfg.max_steps
    return -(-cfg.token_budget // tokens_per_step(cfg, world_size))


# ---------------------------------------------------------------------------------------------------
# DeepSpeed config
# ---------------------------------------------------------------------------------------------------

_DS_DEFAULT = {
    "zero_optimization": {"stage": 1, "overlap_comm": True, "contiguous_gradients": True, "reduce_scatter": True,
                          "reduce_bucket_size": 200_000_000, "allgather_bucket_size": 200_000_000},
    # bf16 weights and activations, but gradients summed over micro-steps and over ranks in fp32, as Megatron
    # and torchtitan do. Without these two keys DeepSpeed 0.19 uses the model dtype for both
    # (DeepSpeedEngine.get_data_types and .communication_data_type): 16 micro-steps summed in bf16 (8-bit
    # mantissa) are off by 4.9e-3 (relative L2) from the exact sum, fp32 by 3.4e-9 (tests/test_precision.py).
    # With bf16, ZeRO-1 then runs DeepSpeed's BF16_Optimizer (an fp32 gradient buffer filled by per-parameter hooks, one all-reduce per
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
    """Recompute each block in backward: only block inputs stay alive between forward and backward."""
    from torch.utils.checkpoint import checkpoint

    for block in _blocks(model):
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)


def apply_compile(model: nn.Module, mode: str) -> None:
    for block in _blocks(model):
        block.compile(mode=mode)


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

    @property
    def model(self) -> Transformer:
        return self.module.model


class DeepSpeedBackend(_BackendBase):
    name = "deepspeed"

    def __init__(self, module: LossModule, cfg: TrainConfig, dist: DistInfo):
        import deepspeed

        super().__init__(module, dist)
        groups, self.param_summary = adamw_param_groups(module.model, cfg.weight_decay)
        optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                                      fused=dist.device.type == "cuda")
        module.to(dist.device)
        ds_config = deepspeed_config(cfg, dist.world_size)
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

    def step(self, lr: float) -> float:
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def train_mode(self, on: bool) -> None:
        self.engine.train(on)

    def save_train_state(self, path: Path) -> None:
        # everything DeepSpeed writes (shards, its recovery scripts) stays inside train_state/
        self.engine.save_checkpoint(str(path), tag="deepspeed", save_latest=False)

    def load_train_state(self, path: Path) -> None:
        loaded, _ = self.engine.load_checkpoint(str(path), tag="deepspeed", load_optimizer_states=True,
                                                load_lr_scheduler_states=False, load_module_strict=True)
        if loaded is None:
            raise CheckpointError(f"DeepSpeed found no state under {path}/deepspeed")

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

    def __init__(self, module: LossModule, cfg: TrainConfig, dist: DistInfo):
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

    def step(self, lr: float) -> float:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        max_norm = self.grad_clip if self.grad_clip > 0 else float("inf")
        norm = float(torch.nn.utils.clip_grad_norm_(self.params, max_norm))
        if math.isfinite(norm):  # like DeepSpeed: never apply a non-finite gradient (the trainer then stops)
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def train_mode(self, on: bool) -> None:
        self.module.train(on)

    def save_train_state(self, path: Path) -> None:
        from dante.artifacts import atomic_path

        with atomic_path(path / "optimizer.pt") as tmp:
            torch.save(self.optimizer.state_dict(), tmp)

    def load_train_state(self, path: Path) -> None:
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


class Trainer:
    """The training loop: one readable ``fit``; checkpoints, metrics and validation are helpers it calls."""

    def __init__(self, *, model: Transformer, model_cfg: ModelConfig, train_cfg: TrainConfig, stage_dir: str | Path,
                 data: BatchSource, stage_config: dict, dist: DistInfo, val_data: ValSource | None = None,
                 desc: str = "train", on_checkpoint: Callable[[int, Path], None] | None = None):
        self.cfg, self.model_cfg, self.dist, self.desc = train_cfg, model_cfg, dist, desc
        self.stage_dir = Path(stage_dir)
        self.data, self.val_data = data, val_data
        self.stage_config = stage_config
        self.on_checkpoint = on_checkpoint  # rank 0, after each complete checkpoint (e.g. Stage.save_progress)
        self.total_steps = planned_steps(train_cfg, dist.world_size)
        self.tokens_per_step = tokens_per_step(train_cfg, dist.world_size)
        self.flops_per_token = training_flops_per_token(model_cfg, train_cfg.seq_len)
        self.peaks = training_peaks(train_cfg.fp8, train_cfg.peak_tflops)  # MFU vs bf16, and vs fp8 with train.fp8
        self.transforms = self._prepare(model)
        self.backend = BACKENDS[train_cfg.backend](LossModule(model, train_cfg.loss_chunk_size), train_cfg, dist)
        if dist.is_main:
            p = self.backend.precision
            print(f"[{desc}] precision: compute {p['compute']}, master weights {p['master_weights']}, gradient "
                  f"accumulation {p['grad_accumulation']}, gradient reduction {p['grad_reduction']} "
                  f"({train_cfg.backend}, optimizer wrapper {p['optimizer_wrapper']})", flush=True)
        self.checkpoints = CheckpointManager(self.stage_dir, train_cfg.keep_last, self.backend)
        self.step = 0
        self.tokens_seen = 0
        self.last_loss: float | None = None
        self.last_val_loss: float | None = None

    def _prepare(self, model: Transformer) -> dict:
        cfg, applied = self.cfg, {}
        model.to(self.dist.device)
        if cfg.fp8:
            applied["fp8_linears"] = apply_fp8(model, self.dist.device)
        if cfg.activation_checkpointing:
            apply_activation_checkpointing(model)
            applied["activation_checkpointing"] = True
        if cfg.compile:
            apply_compile(model, cfg.compile_mode)
            applied["compile"] = cfg.compile_mode
        return applied

    # -- resume -------------------------------------------------------------------------------------
    def resume(self) -> int:
        """Load the newest complete checkpoint of this stage, if any; returns the step to continue from."""
        removed = self.checkpoints.remove_incomplete()
        latest = self.checkpoints.latest()
        if latest is None:
            return 0
        meta = self.checkpoints.load(latest, self.stage_config, self.dist.world_size)
        try:
            self.data.load_state_dict(meta["data"])
        except ValueError as e:
            raise CheckpointError(f"cannot resume from {latest}: {e}") from None
        self.step, self.tokens_seen = int(meta["step"]), int(meta["tokens_seen"])
        self.last_loss, self.last_val_loss = meta.get("loss"), meta.get("val_loss")
        if removed and self.dist.is_main:
            print(f"[{self.desc}] removed incomplete checkpoint folder(s) {removed}", flush=True)
        return self.step

    def save_checkpoint(self) -> Path:
        meta = {"tokens_seen": self.tokens_seen, "loss": self.last_loss, "val_loss": self.last_val_loss,
                "data": self.data.state_dict(), "config": self.stage_config, "stage": self.desc,
                "backend": self.backend.name, "transforms": self.transforms}
        path = self.checkpoints.save(self.step, self.model_cfg, meta)
        if self.on_checkpoint is not None and self.dist.is_main:
            self.on_checkpoint(self.step, path)
        return path

    # -- one optimizer step ---------------------------------------------------------------------------
    def train_step(self, step: int, stop_requested: bool = False) -> dict | None:
        """Forward/backward over all micro-batches of ``step`` and one optimizer update.

        Returns None (and changes nothing) if any rank asked to stop; raises TrainingDiverged on a
        non-finite loss (before the update) or gradient norm.
        """
        cfg, dist, b = self.cfg, self.dist, self.backend
        batches = [self.data.batch(step, m, dist.rank, dist.world_size) for m in range(cfg.grad_accum)]
        local_weight = sum(batch_weight(x) for x in batches)
        total_weight, stop = b.all_reduce_sum([local_weight, float(stop_requested)])
        if stop > 0:
            return None
        if total_weight <= 0:
            raise UserError(f"step {step + 1}: no target has a loss weight > 0 in the whole batch; check the data")
        scale = dist.world_size / total_weight
        loss_sum = torch.zeros((), dtype=torch.float64, device=dist.device)
        for m, batch in enumerate(batches):
            batch = {k: v.to(dist.device, non_blocking=True) for k, v in batch.items() if v is not None}
            micro_loss_sum, _ = b.forward(batch)
            b.backward(micro_loss_sum * scale, boundary=m == cfg.grad_accum - 1)
            loss_sum += micro_loss_sum.detach().double()
        (global_loss_sum,) = b.all_reduce_sum([float(loss_sum)])
        loss = global_loss_sum / total_weight
        if not math.isfinite(loss):
            raise TrainingDiverged(self._diverged_message(step + 1, f"loss is {loss}"))
        lr = lr_at(step, cfg, self.total_steps)
        grad_norm = b.step(lr)
        if not math.isfinite(grad_norm):
            raise TrainingDiverged(self._diverged_message(step + 1, f"gradient norm is {grad_norm} (the update was "
                                                          "skipped)"))
        if dist.device.type == "cuda":
            torch.cuda.synchronize()  # step times below measure finished work
        return {"loss": loss, "lr": lr, "grad_norm": grad_norm}

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
        loss_sum, weight_sum = 0.0, 0.0
        for batch in self.val_data.batches(dist.rank, dist.world_size, self.cfg.eval_batches):
            batch = {k: v.to(dist.device) for k, v in batch.items() if v is not None}
            ls, ws = b.forward(batch)
            loss_sum, weight_sum = loss_sum + float(ls), weight_sum + float(ws)
        b.train_mode(True)
        loss_sum, weight_sum = b.all_reduce_sum([loss_sum, weight_sum])
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
        if start >= self.total_steps:
            log.close()
            return self._result(start, None)
        self.backend.train_mode(True)
        recent_step_s: list[float] = []
        train_seconds, stopped = 0.0, None
        with StopFlag() as flag:
            try:
                while self.step < self.total_steps:
                    t0 = time.perf_counter()
                    out = self.train_step(self.step, stop_requested=flag.signum is not None)
                    if out is None:  # a rank got SIGTERM/SIGINT: save where we are and leave cleanly
                        stopped = flag.signum or signal.SIGTERM
                        log.note(f"stop signal received: saving a checkpoint at step {self.step}")
                        latest = self.checkpoints.latest()
                        if latest is None or latest.name != step_dir_name(self.step):  # not just saved
                            self.save_checkpoint()
                        break
                    step_s = time.perf_counter() - t0
                    train_seconds += step_s
                    self.step += 1
                    self.tokens_seen += self.tokens_per_step
                    self.last_loss = out["loss"]
                    recent_step_s = (recent_step_s + [step_s])[-20:]
                    mean_step_s = sum(recent_step_s) / len(recent_step_s)
                    tok_s = self.tokens_per_step / step_s
                    record = {"kind": "train", "step": self.step, "loss": out["loss"], "lr": out["lr"],
                              "grad_norm": out["grad_norm"], "tokens": self.tokens_seen, "tokens_per_sec": tok_s,
                              **mfu_fields(tok_s, self.flops_per_token, self.peaks, dist.world_size),
                              "step_time_s": step_s, "elapsed_s": train_seconds}
                    last = self.step == self.total_steps
                    log.train(record, write=self.step % cfg.log_every == 0 or last,
                              eta_s=(self.total_steps - self.step) * mean_step_s)
                    if cfg.eval_every and (self.step % cfg.eval_every == 0 or last):
                        val = self.evaluate()
                        if val is not None:
                            self.last_val_loss = val["val_loss"]
                            log.val(val)
                    if self.step % cfg.checkpoint_every == 0 or last:
                        self.save_checkpoint()
            finally:
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
                                  "optimizer_groups": self.backend.param_summary})


# ---------------------------------------------------------------------------------------------------
# Preflight (--dry-run)
# ---------------------------------------------------------------------------------------------------


def preflight_report(model_cfg: ModelConfig, train_cfg: TrainConfig, world_size: int | None = None) -> str:
    """Parameters, FLOPs, step plan, per-GPU memory under ZeRO and ETA: what to know before renting GPUs."""
    from dante.flops import estimate_memory, flops_breakdown, peak_for_device

    world = world_size or train_cfg.expected_world_size
    with torch.device("meta"):
        n_params = sum(p.numel() for p in Transformer(model_cfg).parameters())
    causal = flops_breakdown(model_cfg, train_cfg.seq_len, causal=True)
    full = flops_breakdown(model_cfg, train_cfg.seq_len, causal=False)
    per_step = tokens_per_step(train_cfg, world)
    steps = planned_steps(train_cfg, world)
    tokens = steps * per_step
    lines = [
        f"model      {n_params:,} parameters ({n_params / 1e9:.3f} B); matmul weights incl. lm_head "
        f"{causal.linear_params:,}",
        f"FLOPs/tok  {causal.total / 1e9:.2f} GFLOP for training (6N {causal.dense / 1e9:.2f} + causal attention "
        f"{causal.attention / 1e9:.2f}); full-square convention {full.total / 1e9:.2f}",
        f"batch      {train_cfg.micro_batch} x {train_cfg.seq_len} tokens x accumulation {train_cfg.grad_accum} x "
        f"{world} rank(s) = {per_step:,} tokens per optimizer step",
        f"steps      {steps:,} ({'train.max_steps' if train_cfg.max_steps else 'to reach train.token_budget'}) "
        f"= {tokens / 1e9:.3f} B tokens; warmup {train_cfg.warmup_steps:,}",
    ]
    mem = estimate_memory(model_cfg, train_cfg, world)
    zero = f"ZeRO-{train_cfg.zero_stage} " if train_cfg.backend == "deepspeed" else ""
    lines.append(f"memory     per GPU, {train_cfg.backend} {zero}{train_cfg.precision}, {world} rank(s); an estimate "
                 "(dante/flops.py estimate_memory, +-15%):")
    for key, value in mem["parts"].items():
        lines.append(f"             {key:<58} {value / 2**30:7.2f} GiB")
    lines.append(f"           = {'total':<58} {mem['total'] / 2**30:7.2f} GiB")
    if train_cfg.backend == "deepspeed":
        by_stage = {z: estimate_memory(model_cfg, train_cfg, world, zero_stage=z)["total"] / 2**30 for z in (1, 2)}
        lines.append(f"ZeRO       on {world} GPU(s): ZeRO-1 {by_stage[1]:.2f} GiB (gradients reduced once per optimizer "
                     f"step), ZeRO-2 {by_stage[2]:.2f} GiB (reduced on each of the {train_cfg.grad_accum} micro-steps); "
                     f"train.zero_stage={train_cfg.zero_stage}")
    by_world = []
    for w in sorted({1, 2, 8, world}):
        m = estimate_memory(model_cfg, train_cfg, w)
        by_world.append(f"{w} GPU{'s' if w > 1 else ' '}: {m['total_no_ac'] / 2**30:5.1f} GiB without / "
                        f"{m['total_ac'] / 2**30:5.1f} GiB with activation checkpointing")
    lines.append("           by GPU count (same micro-batch): " + ("\n" + " " * 44).join(by_world))
    rate = train_cfg.assumed_tokens_per_sec * world
    lines.append(f"ETA        {format_duration(tokens / rate)} at train.assumed_tokens_per_sec="
                 f"{train_cfg.assumed_tokens_per_sec:,.0f} per GPU x {world}")
    utils = []
    for device in ("NVIDIA H100 80GB HBM3", "NVIDIA H100 PCIe", "NVIDIA A100-SXM4-80GB"):
        peak = peak_for_device(device, train_cfg.fp8)
        util = mfu(train_cfg.assumed_tokens_per_sec, causal.total, peak)
        if util is not None:
            note = ": impossible, the assumed throughput exceeds this GPU's peak" if util > 1 else ""
            utils.append(f"{100 * util:.1f}% on {peak.label} ({peak.tflops:,.1f} TFLOP/s dense){note}")
    lines.append("MFU        at that throughput: " + "; ".join(utils))
    return "\n".join(lines)


__all__ = ["Trainer", "TrainResult", "TrainingDiverged", "DistInfo", "init_distributed", "start_ranks", "rank_device",
           "world_size_problem", "fp8_problem", "deepspeed_precision", "deepspeed_precision_warnings", "lr_at", "adamw_param_groups",
           "planned_steps", "tokens_per_step", "deepspeed_config", "preflight_report", "LossModule", "batch_weight",
           "DeepSpeedBackend", "TorchBackend"]
