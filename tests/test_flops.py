"""dante.flops: the FLOPs formula against torch's own FLOP counter, and the GPU peak table."""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from dante.config import ModelConfig
from dante.flops import flops_breakdown, mfu, mfu_fields, peak_for_device, training_flops_per_token, training_peaks
from dante.loss import chunked_cross_entropy
from dante.model import Transformer

torch.set_num_threads(1)


@pytest.mark.parametrize("n_kv_heads,tie", [(2, True), (4, False), (1, True)])
def test_formula_matches_flop_counter(n_kv_heads, tie):
    """Forward + backward of model and loss, counted op by op, equals the formula (full attention square).

    The MATH SDPA backend is forced because it runs attention as plain matmuls, which FlopCounterMode
    counts (it counts the whole T x T square, as causal=False does); the CPU flash kernel has no
    FLOP formula registered.
    """
    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=n_kv_heads, vocab_size=211, max_seq_len=64,
                      multiple_of=32, tie_embeddings=tie)
    torch.manual_seed(0)
    model = Transformer(cfg)
    B, T = 2, 48
    tokens = torch.randint(0, cfg.vocab_size, (B, T + 1))
    counter = FlopCounterMode(display=False)
    with sdpa_kernel(SDPBackend.MATH), counter:
        hidden = model(tokens[:, :-1])
        loss_sum, weight_sum = chunked_cross_entropy(hidden, model.output.weight, tokens[:, 1:], chunk_size=40)
        (loss_sum / weight_sum).backward()
    counted = counter.get_total_flops()
    expected = training_flops_per_token(cfg, T, causal=False) * B * T
    assert counted == pytest.approx(expected, rel=1e-9), (counted, expected)


def test_causal_counts_half_of_the_attention_square():
    cfg = ModelConfig(dim=2560, n_layers=28, n_heads=20, n_kv_heads=4, head_dim=128, vocab_size=65536,
                      max_seq_len=4096)
    full, causal = flops_breakdown(cfg, 2048, causal=False), flops_breakdown(cfg, 2048, causal=True)
    assert full.dense == causal.dense
    assert causal.attention == pytest.approx(full.attention * (2048 + 1) / (2 * 2048))
    # 12 L H h T with L=28, H=20, h=128, T=2048: independent arithmetic
    assert full.attention == 12 * 28 * 20 * 128 * 2048


def test_peak_table_is_dense_and_specific():
    assert peak_for_device("NVIDIA H100 80GB HBM3", fp8=False).tflops == 989.4
    assert peak_for_device("NVIDIA H100 80GB HBM3", fp8=True).tflops == 1978.9
    assert peak_for_device("NVIDIA H100 PCIe", fp8=False).tflops == 756.5
    assert peak_for_device("NVIDIA H100 NVL", fp8=False).tflops == 835.5
    assert peak_for_device("NVIDIA H200", fp8=False).tflops == 989.4
    assert peak_for_device("NVIDIA H200 NVL", fp8=True).tflops == 1670.5
    assert peak_for_device("NVIDIA A100-SXM4-80GB", fp8=False).tflops == 312.0
    assert peak_for_device("NVIDIA A100-SXM4-80GB", fp8=True) is None  # no fp8 tensor cores
    assert peak_for_device("NVIDIA GB200", fp8=False).tflops == 2500.0
    assert peak_for_device("NVIDIA B200", fp8=False).tflops == 2250.0
    assert peak_for_device("Some Unknown Accelerator", fp8=False) is None


def test_mfu_arithmetic():
    peak = peak_for_device("NVIDIA H100 80GB HBM3", fp8=False)
    assert mfu(1000.0, 1e12, peak) == pytest.approx(1000 * 1e12 / 989.4e12)
    assert mfu(1000.0, 1e12, None) is None


def test_training_reports_mfu_against_bf16_always_and_fp8_too_with_fp8():
    """An FP8 run's ``mfu`` is on the bf16 scale (comparable with bf16 runs); ``mfu_fp8`` says how much of
    the fp8 units it uses. Both from the dense table; train.peak_tflops replaces only the bf16 peak."""
    h100 = "NVIDIA H100 80GB HBM3"
    bf16_only = training_peaks(fp8=False, device_name=h100)
    assert list(bf16_only) == ["mfu"] and bf16_only["mfu"].tflops == 989.4
    both = training_peaks(fp8=True, device_name=h100)
    assert both["mfu"].tflops == 989.4 and both["mfu_fp8"].tflops == 1978.9
    tok_s, fpt = 45_000.0, 13.45e9  # the FP8 goal for Dante-2B at seq 2048 (2 GPUs)
    fields = mfu_fields(tok_s * 2, fpt, both, n_gpus=2)
    assert fields["mfu"] == pytest.approx(45_000 * 13.45e9 / 989.4e12)
    assert fields["mfu_fp8"] == pytest.approx(fields["mfu"] / 2, rel=1e-3)  # the fp8 dense peak is 2x bf16
    a100 = training_peaks(fp8=True, device_name="NVIDIA A100-SXM4-80GB")  # no fp8 units: n/a, not a wrong number
    assert a100["mfu"].tflops == 312.0 and a100["mfu_fp8"] is None
    assert mfu_fields(1000.0, 1e12, a100) == {"mfu": pytest.approx(1000 * 1e12 / 312e12), "mfu_fp8": None}
    override = training_peaks(fp8=True, override_tflops=500.0, device_name=h100)
    assert override["mfu"].tflops == 500.0 and override["mfu"].source == "config" and override["mfu_fp8"].tflops == 1978.9
    if not torch.cuda.is_available():  # CPU: no peak, MFU n/a in both fields
        assert training_peaks(fp8=True) == {"mfu": None, "mfu_fp8": None}
