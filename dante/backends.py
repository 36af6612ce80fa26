"""The two optimizer backends of the trainer, and the DeepSpeed config they are built from.

``DeepSpeedBackend``: ZeRO stage 0-2 (ZeRO-1 by default: gradients reduced once per optimizer step,
docs/PERFORMANCE.md), bf16 compute with fp32 master weights, fp32 gradient accumulation and reduction in the
built-in config (``deepspeed_config``; a user config that would accumulate in bf16 gets a warning naming the
key), checkpoints convertible to DeepSpeed's universal format so a run resumes on another GPU count.
``TorchBackend``: one process, fp32 weights with bf16 autocast, torch AdamW; needs no DeepSpeed.
Both use the same AdamW groups (``adamw_param_groups``: no decay on norms, biases and embeddings).

Example::

    backend = BACKENDS[cfg.train.backend](LossModule(model, chunk), cfg.train, dist)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import shutil
import sys
from pathlib import Path

import torch
import torch.distributed as torch_dist
from torch import nn

from dante.checkpoint import CheckpointError, from_rank0
from dante.config import TrainConfig
from dante.distributed import DistInfo
from dante.errors import UserError
from dante.model import Transformer


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
    # mantissa) are off by 4.9e-3 (relative L2) from the exact sum, fp32 by 3.4e-9 (tests/test_precision.py).
    # With bf16, ZeRO-1 then runs DeepSpeed's BF16_Optimizer (an fp32 gradient buffer filled by per-parameter
    # hooks, one all-reduce per
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
# Backends
# ---------------------------------------------------------------------------------------------------


class _BackendBase:
    def __init__(self, module: nn.Module, dist: DistInfo):
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

    def __init__(self, module: nn.Module, cfg: TrainConfig, dist: DistInfo, reshard: Path | None = None):
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

    def __init__(self, module: nn.Module, cfg: TrainConfig, dist: DistInfo, reshard: Path | None = None):
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
        from dante.checkpoint import save_torch_object

        save_torch_object(path / "optimizer.pt", self.optimizer.state_dict())  # deterministic bytes

    def load_train_state(self, path: Path, saved_world_size: int | None = None) -> None:
        from dante.checkpoint import WEIGHTS, load_weights_into

        load_weights_into(self.model, path.parent / WEIGHTS, self.model.cfg.tie_embeddings)
        self.optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location=self.dist.device))

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        return {name: p.detach() for name, p in self.model.named_parameters()}


BACKENDS = {"deepspeed": DeepSpeedBackend, "torch": TorchBackend}
