"""dante.kernels (the one attention-kernel choice) and the compile/activation-checkpointing composition
of dante.engine: the choice table for every (device, mask, GQA, compile) case, equal outputs of every
CPU-runnable kernel on a packed batch, the block graph captured with checkpointing on (counted by a
custom torch.compile backend), recomputation kept by AOT autograd, gradients equal to the eager model,
and the refused compile modes.
"""

from __future__ import annotations

import itertools
import os

import pytest
import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")
torch.set_num_threads(1)

from torch._dynamo.backends.common import aot_autograd  # noqa: E402
from torch._functorch.aot_autograd import make_boxed_func  # noqa: E402
from torch._functorch.partitioners import min_cut_rematerialization_partition  # noqa: E402

from dante import config as C  # noqa: E402
from dante.engine import LossModule  # noqa: E402
from dante.errors import UserError  # noqa: E402
from dante.kernels import KERNELS, AttentionChoice, apply_attention_choice, choose_attention  # noqa: E402
from dante.model import Transformer  # noqa: E402
from dante.transforms import apply_activation_checkpointing, apply_compile  # noqa: E402

MODEL = dict(dim=64, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=97, multiple_of=16, max_seq_len=64)


def tiny(**over) -> C.ModelConfig:
    return C.ModelConfig(**{**MODEL, **over})


def make(seed: int = 0, **over) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(tiny(**over))


# ---------------------------------------------------------------------------------------------------
# The choice
# ---------------------------------------------------------------------------------------------------

# CUDA with a document mask: (gqa, compiled, flex_available) -> kernel, written out by hand from the rules
CUDA_MASKED = {
    (False, False, False): "sdpa", (False, False, True): "flex-compiled",
    (False, True, False): "sdpa", (False, True, True): "flex",
    (True, False, False): "sdpa-repeat-kv", (True, False, True): "flex-compiled",
    (True, True, False): "sdpa-repeat-kv", (True, True, True): "flex",
}


@pytest.mark.parametrize("device", ["cuda", "cpu", "mps"])
def test_choice_for_every_device_mask_gqa_compile_combination(device):
    for mask, gqa, compiled, flex in itertools.product([False, True], repeat=4):
        choice = choose_attention(device, document_mask=mask, gqa=gqa, compiled=compiled, flex_available=flex)
        assert choice.kernel in KERNELS and len(choice.reason) > 20, choice
        if not mask:
            assert choice.kernel == "causal", choice
        elif device == "cuda":
            assert choice.kernel == CUDA_MASKED[gqa, compiled, flex], (gqa, compiled, flex, choice)
            # the pairing that sends SDPA on CUDA to its unfused math kernel never comes out
            assert not (gqa and choice.kernel == "sdpa"), choice
        else:  # no FlexAttention backward off CUDA in torch 2.13: the dense mask, whatever the rest
            assert choice.kernel == "sdpa" and device in choice.reason, choice


def packed_batch():
    docs = torch.tensor([[0] * 5 + [1] * 9 + [2] * 10, [7] * 12 + [8] * 12])
    tokens = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(3))
    return tokens, docs


@pytest.mark.parametrize("gqa", [True, False])
def test_every_cpu_runnable_kernel_gives_the_same_packed_output(gqa):
    """sdpa, sdpa-repeat-kv and flex (forward: no flex backward on CPU) agree on a packed batch."""
    tokens, docs = packed_batch()
    model = make(seed=5, n_kv_heads=2 if gqa else 4).eval()
    outputs = {}
    with torch.no_grad():
        for kernel in ("sdpa", "sdpa-repeat-kv", "flex"):
            apply_attention_choice(model, AttentionChoice(kernel, "test"))
            assert model.doc_attention == ("flex" if kernel == "flex" else "sdpa")
            assert model.layers[0].attention.repeat_kv == (kernel == "sdpa-repeat-kv")
            outputs[kernel] = model(tokens, doc_ids_BT=docs)
    for kernel in ("sdpa-repeat-kv", "flex"):
        torch.testing.assert_close(outputs[kernel], outputs["sdpa"], rtol=1e-5, atol=1e-5, msg=kernel)


class TwoDocuments:
    """The engine tests' windows, each row cut into two documents: a packed source (document_mask)."""

    document_mask = True

    def __init__(self, inner):
        self.inner = inner

    def batch(self, *args):
        b = self.inner.batch(*args)
        B, T = b["tokens"].shape
        return {**b, "doc_ids": (torch.arange(T) >= T // 3).long().expand(B, T).clone()}

    def state_dict(self):
        return self.inner.state_dict()

    def load_state_dict(self, state):
        self.inner.load_state_dict(state)


def test_trainer_chooses_from_the_batch_source_and_records_the_choice(tmp_path):
    from tests.test_engine import make_trainer  # the engine tests' tiny trainer

    plain = make_trainer(tmp_path / "plain", {"max_steps": 1, "backend": "torch"})
    assert plain.transforms["attention"]["kernel"] == "causal"
    packed = make_trainer(tmp_path / "packed", {"max_steps": 2, "backend": "torch"}, data=TwoDocuments(plain.data))
    assert packed.backend.model.doc_attention == "sdpa"
    result = packed.fit()
    assert result.extra["transforms"]["attention"] == packed.transforms["attention"]
    assert result.extra["transforms"]["attention"]["kernel"] == "sdpa" and "dense" in result.extra["transforms"]["attention"]["reason"]


# ---------------------------------------------------------------------------------------------------
# Compile with activation checkpointing
# ---------------------------------------------------------------------------------------------------


class GraphCounter:
    """A torch.compile backend that records every graph Dynamo hands it and runs it as is."""

    def __init__(self):
        self.graphs = []

    def __call__(self, gm, example_inputs):
        self.graphs.append(gm)
        return gm.forward

    def ops(self) -> list[str]:
        """Functions called in the graphs, higher-order ops' bodies included."""
        return [str(n.target) for g in self.graphs for m in g.modules() if isinstance(m, torch.fx.GraphModule)
                for n in m.graph.nodes if n.op == "call_function"]


@pytest.mark.parametrize("checkpointed", [False, True])
def test_compile_captures_the_block_graph_with_activation_checkpointing(checkpointed):
    torch._dynamo.reset()
    model = make()
    names = [n for n, _ in model.named_parameters()]
    keys = list(model.state_dict())
    if checkpointed:
        apply_activation_checkpointing(model)
    counter = GraphCounter()
    apply_compile(model, "default", backend=counter)
    assert [n for n, _ in model.named_parameters()] == names and list(model.state_dict()) == keys
    tokens = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(1))
    model(tokens).square().mean().backward()
    model(tokens).square().mean().backward()  # a second step compiles nothing new
    assert len(counter.graphs) == 1  # one graph for all 3 blocks: no recompile per block, no graph break
    has_checkpoint = "tag_activation_checkpoint" in " ".join(counter.ops())
    assert has_checkpoint == checkpointed


def test_document_mask_flex_block_graph_has_no_graph_break_under_checkpointing():
    """The BlockMask travels into a compiled, checkpointed block as one graph (forward: CPU flex has no
    backward; the GPU acceptance run trains through it)."""
    torch._dynamo.reset()
    model = make().eval()
    apply_attention_choice(model, AttentionChoice("flex", "test"))
    apply_activation_checkpointing(model)
    counter = GraphCounter()
    apply_compile(model, "default", backend=counter)
    tokens, docs = packed_batch()
    with torch.no_grad():
        model(tokens, doc_ids_BT=docs)
    assert len(counter.graphs) == 1 and "flex_attention" in " ".join(counter.ops())


def _saved_for_backward(checkpointed: bool) -> tuple[dict, list[int]]:
    """Gradients of a compiled model (AOT autograd with inductor's min-cut partitioner, eager kernels),
    and per forward graph the number of tensors it saves for backward."""
    torch._dynamo.reset()
    saved = []

    def forward_compiler(gm, example_inputs):
        (outputs,) = [n.args[0] for n in gm.graph.nodes if n.op == "output"]
        saved.append(len(outputs) - 1)  # the block output, then what backward needs
        return make_boxed_func(gm.forward)

    backend = aot_autograd(fw_compiler=forward_compiler, bw_compiler=lambda gm, _: make_boxed_func(gm.forward),
                           partition_fn=min_cut_rematerialization_partition)
    model = make(seed=2)
    if checkpointed:
        apply_activation_checkpointing(model)
    apply_compile(model, "default", backend=backend)
    tokens = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(4))
    loss_sum, weight = LossModule(model, 16)(tokens[:, :-1], tokens[:, 1:])
    (loss_sum / weight).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}, saved


def test_checkpointed_compiled_blocks_recompute_and_match_eager_gradients():
    eager = make(seed=2)
    tokens = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(4))
    loss_sum, weight = LossModule(eager, 16)(tokens[:, :-1], tokens[:, 1:])
    (loss_sum / weight).backward()
    plain_grads, plain_saved = _saved_for_backward(checkpointed=False)
    ac_grads, ac_saved = _saved_for_backward(checkpointed=True)
    # recomputation survived compilation: the checkpointed block graph keeps only inputs and weights
    # (measured: 13 tensors vs 26 without checkpointing at this size)
    assert len(ac_saved) == len(plain_saved) == 1 and ac_saved[0] < plain_saved[0] * 0.7, (ac_saved, plain_saved)
    for name, p in eager.named_parameters():
        # AOT autograd's decompositions reorder a few fp32 sums: equal to ~1e-7, not bit for bit
        torch.testing.assert_close(ac_grads[name], p.grad, rtol=1e-5, atol=1e-7, msg=name)
        torch.testing.assert_close(plain_grads[name], p.grad, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("mode", ["reduce-overhead", "max-autotune"])
def test_unvalidated_compile_modes_are_refused_before_any_work(mode):
    problems = C.validate(C.PretrainStageConfig(train=C.TrainConfig(compile=True, compile_mode=mode)))
    assert any("compile_mode" in p and "refused" in p for p in problems), problems
    model = make()
    with pytest.raises(UserError, match="only 'default' has been validated"):
        apply_compile(model, mode)
    assert not any("forward" in vars(block) for block in model.layers)  # nothing was compiled
