"""Ranks and devices: join the launcher's process group (or make a single rank), pick each rank's GPU, and
refuse a launch the training plan does not fit, before any stage folder is opened.

``deepspeed`` and ``torchrun`` set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; a plain
``python`` launch is one rank on a free local port. The environment, not ``--local_rank``, is the source of
truth. Device: GPU ``LOCAL_RANK % visible GPUs`` (schedulers that give each process one GPU). A world size
other than ``train.expected_world_size`` and FP8 without fp8 tensor cores are refused here.

Example::

    dist = init_distributed(cfg.train.backend, cfg.train.expected_world_size)
    print(dist.rank, dist.world_size, dist.device)
"""

from __future__ import annotations

import atexit
import logging
import os
import socket
import sys
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as torch_dist

from dante.errors import UserError
from dante.transforms import device_fp8_problem

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
        atexit.register(_destroy_process_group_at_exit)
    return DistInfo(rank, world_size, local_rank, device)


def _destroy_process_group_at_exit() -> None:
    """Tear the process group down before the interpreter does. Left to interpreter exit, gloo's threads
    were sometimes still running when their C++ objects were destroyed: a rank that had printed a clear
    error aborted ("terminate called without an active exception", exit -6) instead of exiting 2 (seen
    once in CI, tests/test_launchers.py, a refused launch). At exit, not when the stage ends: in-process
    callers (the tests) go on using the group."""
    if torch_dist.is_available() and torch_dist.is_initialized():
        try:
            torch_dist.destroy_process_group()
        except Exception as e:  # noqa: BLE001 -- the exit code already says what happened
            print(f"[dante] note: destroying the process group at exit failed ({type(e).__name__}: {e})", file=sys.stderr)


def start_ranks(stage_cfg: Any) -> DistInfo:
    """``run_stage``'s setup hook for the training stages 4, 5 and 7: the ranks of this launch. What the
    launch itself rules out is refused here, before the stage folder is opened or any work is recorded
    (stage 5 records its "before" evaluation long before the engine would apply FP8): a world size other
    than train.expected_world_size, and train.fp8 on a device without fp8 tensor cores."""
    dist = init_distributed(stage_cfg.train.backend, stage_cfg.train.expected_world_size)
    if stage_cfg.train.fp8 and (problem := device_fp8_problem(dist.device)):
        raise UserError(problem)
    return dist
