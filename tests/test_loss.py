"""dante.loss.chunked_cross_entropy against F.cross_entropy on full logits (plain, weighted, autocast, compiled, FP8)."""

import pytest
import torch
import torch.nn.functional as F

from dante.config import ModelConfig
from dante.loss import chunked_cross_entropy
from dante.model import Transformer

torch.set_num_threads(1)


def rel_err(actual, expected) -> float:
    return ((actual.float() - expected.float()).abs().max() / expected.float().abs().max()).item()


def case(N=37, D=24, V=53, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, D, generator=g, dtype=dtype).requires_grad_()
    weight = (torch.randn(V, D, generator=g, dtype=dtype) * 0.5).requires_grad_()
    targets = torch.randint(0, V, (N,), generator=g)
    targets[[3, 10, 11]] = -100
    return hidden, weight, targets


def reference(hidden, weight, targets, loss_weights=None):
    """Plain full-logits loss sum: sum_i w_i * CE_i over non-ignored tokens."""
    per_token = F.cross_entropy(hidden @ weight.T, targets, ignore_index=-100, reduction="none")
    if loss_weights is not None:
        per_token = per_token * loss_weights
    return per_token.sum()


@pytest.mark.parametrize("chunk_size", [1, 8, 37, 4096])
def test_equals_full_logits_fp32(chunk_size):
    hidden, weight, targets = case()
    loss, weight_sum = chunked_cross_entropy(hidden, weight, targets, chunk_size=chunk_size)
    ours = torch.autograd.grad(loss, (hidden, weight))
    ref_loss = reference(hidden, weight, targets)
    ref = torch.autograd.grad(ref_loss, (hidden, weight))
    assert weight_sum.item() == 34
    assert rel_err(loss, ref_loss) <= 1e-5
    assert rel_err(ours[0], ref[0]) <= 1e-5 and rel_err(ours[1], ref[1]) <= 1e-5
    # the mean over kept tokens is exactly F.cross_entropy's default reduction
    mean = F.cross_entropy(hidden @ weight.T, targets)
    assert rel_err(loss / weight_sum, mean) <= 1e-5


def test_token_weights_and_upstream_gradient():
    hidden, weight, targets = case(seed=1)
    loss_weights = torch.rand(37, generator=torch.Generator().manual_seed(2))
    loss_weights[:5] = 0.0  # e.g. prompt tokens in SFT
    loss, weight_sum = chunked_cross_entropy(hidden, weight, targets, loss_weights, chunk_size=5)
    kept = targets != -100
    assert weight_sum.item() == pytest.approx(loss_weights[kept].sum().item(), rel=1e-6)
    ours = torch.autograd.grad(loss * 0.37, (hidden, weight))
    ref_loss = reference(hidden, weight, targets, loss_weights)
    ref = torch.autograd.grad(ref_loss * 0.37, (hidden, weight))
    assert rel_err(loss, ref_loss) <= 1e-5
    assert rel_err(ours[0], ref[0]) <= 1e-5 and rel_err(ours[1], ref[1]) <= 1e-5
    assert ours[0][:5].abs().max() == 0  # zero-weight tokens get no gradient


def test_never_materializes_full_logits():
    """No op in forward or backward produces a tensor as large as (tokens x vocab)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class LargestOutput(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor):
                    LargestOutput.largest = max(LargestOutput.largest, t.numel())
            return out

    hidden, weight, targets = case(N=512, D=16, V=1000, seed=10)
    with LargestOutput():
        loss, _ = chunked_cross_entropy(hidden, weight, targets, chunk_size=64)
        loss.backward()
    assert LargestOutput.largest == 64 * 1000  # one chunk of logits; full logits would be 512 * 1000


def test_gradient_accumulation_normalisation():
    """Two micro-batches, each loss sum divided by the step's total weight, equal one big batch."""
    hidden, weight, targets = case(N=40, seed=3)
    loss_weights = torch.rand(40, generator=torch.Generator().manual_seed(4))
    total = chunked_cross_entropy(hidden, weight, targets, loss_weights)[1]
    accumulated = sum(chunked_cross_entropy(hidden[s], weight, targets[s], loss_weights[s], chunk_size=7)[0] / total
                      for s in (slice(0, 12), slice(12, 40)))
    full_grad = torch.autograd.grad(reference(hidden, weight, targets, loss_weights) / total, weight)[0]
    assert rel_err(torch.autograd.grad(accumulated, weight)[0], full_grad) <= 1e-5


def test_no_grad_path_and_bad_shapes():
    hidden, weight, targets = case()
    with torch.no_grad():
        loss, _ = chunked_cross_entropy(hidden, weight, targets, chunk_size=4)
    assert not loss.requires_grad
    assert rel_err(loss, reference(hidden, weight, targets).detach()) <= 1e-5
    with pytest.raises(ValueError, match="weight must be"):
        chunked_cross_entropy(hidden, weight[:, :5], targets)
    with pytest.raises(ValueError, match="targets for"):
        chunked_cross_entropy(hidden, weight, targets[:-1])


def test_bf16_autocast_matches_autocast_reference():
    hidden, weight, targets = case(N=64, D=32, V=100, seed=5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = chunked_cross_entropy(hidden, weight, targets, chunk_size=16)
        ref_loss = F.cross_entropy(F.linear(hidden, weight), targets, reduction="sum")  # bf16 logits, fp32 CE
    ours = torch.autograd.grad(loss, (hidden, weight))
    ref = torch.autograd.grad(ref_loss, (hidden, weight))
    assert ours[0].dtype == torch.float32 and ours[1].dtype == torch.float32
    # both use bf16 logits (8-bit mantissa); gradients then pass through a bf16 matmul in each
    assert rel_err(loss, ref_loss) <= 1e-3
    assert rel_err(ours[0], ref[0]) <= 2e-2 and rel_err(ours[1], ref[1]) <= 2e-2


def tiny_model(seed=0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128, max_seq_len=64,
                                   multiple_of=64))


def model_loss(model, tokens):
    hidden = model(tokens[:, :-1])
    loss, weight_sum = chunked_cross_entropy(hidden, model.output.weight, tokens[:, 1:], chunk_size=24)
    return loss / weight_sum


def test_model_loss_under_torch_compile_matches_eager():
    """Dynamo + AOTAutograd trace model and loss as one graph (fullgraph: the loss must not break it).

    aot_eager checks the tracing, where custom autograd Functions and compile clash, in ~8 s; inductor's
    C++ code generation for the whole model takes ~60 s on 2 CPU cores, so it is tested on the loss alone.
    """
    tokens = torch.randint(0, 128, (2, 33), generator=torch.Generator().manual_seed(6))
    eager, compiled = tiny_model(), tiny_model()
    ref = model_loss(eager, tokens)
    ref.backward()
    loss = torch.compile(model_loss, fullgraph=True, backend="aot_eager")(compiled, tokens)
    loss.backward()
    assert rel_err(loss, ref) <= 1e-5
    for (name, a), b in zip(compiled.named_parameters(), eager.parameters()):
        assert rel_err(a.grad, b.grad) <= 1e-5, name
    # and the plain reference: F.cross_entropy on the model's full logits
    full = F.cross_entropy(eager.logits(eager(tokens[:, :-1])).flatten(0, 1), tokens[:, 1:].flatten())
    assert rel_err(ref, full) <= 1e-5


def test_loss_compiled_with_inductor_matches_plain():
    hidden, weight, targets = case(seed=8)
    loss_weights = torch.rand(37, generator=torch.Generator().manual_seed(9))
    compiled = torch.compile(lambda h, w, t, lw: chunked_cross_entropy(h, w, t, lw, chunk_size=16)[0], fullgraph=True)
    loss = compiled(hidden, weight, targets, loss_weights)
    ours = torch.autograd.grad(loss, (hidden, weight))
    ref_loss = reference(hidden, weight, targets, loss_weights)
    ref = torch.autograd.grad(ref_loss, (hidden, weight))
    assert rel_err(loss, ref_loss) <= 1e-5
    assert rel_err(ours[0], ref[0]) <= 1e-5 and rel_err(ours[1], ref[1]) <= 1e-5


def test_with_torchao_float8_linears_under_compile():
    """FP8 training as stage 4 runs it: every linear float8 except the output (tied) projection, compiled."""
    from torchao.float8 import convert_to_float8_training
    from torchao.float8.float8_linear import Float8Linear

    tokens = torch.randint(0, 128, (2, 33), generator=torch.Generator().manual_seed(7))
    models = [tiny_model(1) for _ in range(3)]
    for model in models[:2]:
        convert_to_float8_training(model, module_filter_fn=lambda module, fqn: fqn != "output")
    compiled, eager, fp32 = models
    assert isinstance(compiled.layers[0].attention.wq, Float8Linear)
    assert type(compiled.output) is torch.nn.Linear and compiled.output.weight is compiled.tok_embeddings.weight
    loss = torch.compile(model_loss, fullgraph=True, backend="aot_eager")(compiled, tokens)
    loss.backward()
    ref = model_loss(eager, tokens)
    ref.backward()
    assert rel_err(loss, ref) <= 1e-5
    for a, b in zip(compiled.parameters(), eager.parameters()):
        assert torch.isfinite(a.grad).all() and rel_err(a.grad, b.grad) <= 1e-5
    # float8 matmuls (e4m3, ~2 significant digits) change the loss only slightly at init
    assert rel_err(loss, model_loss(fp32, tokens)) <= 1e-2
