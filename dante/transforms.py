"""Transforms applied to the model from outside ``dante/model.py``: torchao float8 training (every linear
but the lm_head), activation checkpointing per block, and torch.compile per block.

They compose: the checkpointed forward is what each block compiles (``torch.utils.checkpoint`` disables
Dynamo around itself, so wrapping a compiled block in it would run the block eager while the log says
compiled; ``tests/test_kernels.py`` counts the graphs). Compile modes other than ``default`` are refused
until validated on a GPU. The attention kernel is chosen in ``dante.kernels``.

Example::

    apply_activation_checkpointing(model); apply_compile(model, "default")
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from dante.errors import UserError

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
