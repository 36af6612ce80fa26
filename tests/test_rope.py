"""dante.rope against transformers' own RoPE code (ROPE_INIT_FUNCTIONS, LlamaRotaryEmbedding, rotate_half)."""

import math

import pytest
import torch
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from dante.config import ModelConfig, validate_model
from dante.rope import apply_rotary, rope_inv_freq, rope_table

torch.set_num_threads(1)


def hf_config(head_dim: int, theta: float, rope_scaling: dict, max_len: int) -> LlamaConfig:
    rope_parameters = {"rope_type": "default", **rope_scaling, "rope_theta": theta}
    return LlamaConfig(hidden_size=head_dim * 2, num_attention_heads=2, head_dim=head_dim,
                       max_position_embeddings=max_len, rope_parameters=rope_parameters)


def hf_inv_freq(head_dim, theta, rope_scaling, max_len):
    config = hf_config(head_dim, theta, rope_scaling, max_len)
    rope_type = config.rope_parameters["rope_type"]
    if rope_type == "default":
        return LlamaRotaryEmbedding.compute_default_rope_parameters(config)
    return ROPE_INIT_FUNCTIONS[rope_type](config)


@pytest.mark.parametrize("head_dim,theta", [(16, 10000.0), (64, 500000.0), (128, 10000.0)])
def test_default_and_linear_match_transformers(head_dim, theta):
    for scaling in ({}, {"rope_type": "linear", "factor": 4.0}, {"rope_type": "linear", "factor": 2}):
        ours, our_scale = rope_inv_freq(head_dim, theta, scaling)
        ref, ref_scale = hf_inv_freq(head_dim, theta, scaling, 4096)
        assert torch.equal(ours, ref), scaling
        assert our_scale == ref_scale == 1.0


YARN_CASES = [
    # (factor, original length, head dim, extra keys)
    (2.0, 256, 16, {}),
    (4.0, 2048, 128, {}),
    (4, 2048, 64, {"truncate": False}),
    (8.0, 4096, 64, {"beta_fast": 16.0, "beta_slow": 2.0}),
    (2.5, 1024, 128, {"attention_factor": 1.25}),
    (40.0, 4096, 64, {"mscale": 1.0, "mscale_all_dim": 0.707}),
    (16.0, 8192, 128, {"mscale": 0.707, "mscale_all_dim": 0.707}),
    (4.0, 2048, 128, {"mscale": 1.0}),  # mscale alone: transformers ignores it (needs both)
]


@pytest.mark.parametrize("factor,original,head_dim,extra", YARN_CASES)
@pytest.mark.parametrize("theta", [10000.0, 500000.0])
def test_yarn_matches_transformers(factor, original, head_dim, extra, theta):
    scaling = {"rope_type": "yarn", "factor": factor, "original_max_position_embeddings": original, **extra}
    ours, our_scale = rope_inv_freq(head_dim, theta, scaling)
    ref, ref_scale = hf_inv_freq(head_dim, theta, scaling, int(original * factor))
    assert ours.dtype == torch.float32 and ours.shape == (head_dim // 2,)
    torch.testing.assert_close(ours, ref, rtol=1e-7, atol=0)
    assert our_scale == pytest.approx(ref_scale, rel=1e-12)
    if not extra:
        assert our_scale == pytest.approx(0.1 * math.log(factor) + 1)
    # YaRN keeps the highest frequencies and divides the lowest by factor (an independent sanity check)
    base = rope_inv_freq(head_dim, theta)[0]
    assert ours[0] == base[0]
    if "truncate" not in extra:
        torch.testing.assert_close(ours[-1], base[-1] / factor)


@pytest.mark.parametrize("scaling", [{}, {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}])
def test_table_equals_transformers_cos_sin(scaling):
    head_dim, max_len = 32, 256
    config = hf_config(head_dim, 10000.0, scaling, max_len)
    hf_rope = LlamaRotaryEmbedding(config)
    position_ids = torch.arange(max_len)[None]
    hf_cos, hf_sin = hf_rope(torch.zeros(1, max_len, head_dim), position_ids)  # (1, L, D) with halves repeated
    inv_freq, scale = rope_inv_freq(head_dim, 10000.0, scaling)
    cos, sin = rope_table(inv_freq, max_len, scale)
    assert torch.equal(torch.cat((cos, cos), -1), hf_cos[0])
    assert torch.equal(torch.cat((sin, sin), -1), hf_sin[0])


def test_apply_rotary_matches_transformers_rotate_half():
    torch.manual_seed(0)
    B, T, H, D = 2, 12, 3, 16
    q, k = torch.randn(B, T, H, D), torch.randn(B, T, H, D)
    cos, sin = rope_table(rope_inv_freq(D, 10000.0)[0], T)
    ref_q, ref_k = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2),
                                        torch.cat((cos, cos), -1)[None], torch.cat((sin, sin), -1)[None])
    assert torch.equal(apply_rotary(q, cos, sin), ref_q.transpose(1, 2))
    assert torch.equal(apply_rotary(k, cos, sin), ref_k.transpose(1, 2))


def test_rotation_scores_depend_only_on_relative_position():
    torch.manual_seed(0)
    D = 32
    cos, sin = rope_table(rope_inv_freq(D, 10000.0)[0], 64)
    q, k = torch.randn(1, 1, 1, D).double(), torch.randn(1, 1, 1, D).double()

    def score(m, n):
        qm = apply_rotary(q, cos[m:m + 1].double(), sin[m:m + 1].double())
        kn = apply_rotary(k, cos[n:n + 1].double(), sin[n:n + 1].double())
        return (qm * kn).sum().item()

    assert score(10, 3) == pytest.approx(score(40, 33), rel=1e-5)
    assert score(10, 3) != pytest.approx(score(10, 4), rel=1e-3)


@pytest.mark.parametrize("scaling,needle", [
    ({"rope_type": "dynamic", "factor": 2.0}, "rope_type='dynamic' is not supported"),
    ({"rope_type": "linear", "factor": 1.0}, "factor must be a number > 1"),
    ({"rope_type": "yarn", "factor": 0.5, "original_max_position_embeddings": 64}, "factor must be a number > 1"),
    ({"rope_type": "yarn", "factor": 2.0}, "needs ['original_max_position_embeddings']"),
    ({"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 64, "beta": 3}, "unknown key(s) ['beta']"),
    ({"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6}, "set model.rope_theta instead"),
    ({"factor": 2.0}, "rope_type=None is not supported"),
])
def test_bad_scaling_gives_clear_error(scaling, needle):
    with pytest.raises(ValueError) as err:
        rope_inv_freq(64, 10000.0, scaling)
    assert needle in str(err.value)
    problems = validate_model(ModelConfig(rope_scaling=scaling, max_seq_len=4096))
    assert any(needle in p for p in problems), problems


def test_config_requires_longer_context_than_original():
    cfg = ModelConfig(max_seq_len=2048, rope_scaling={"rope_type": "yarn", "factor": 2.0,
                                                      "original_max_position_embeddings": 2048})
    assert any("must exceed" in p for p in validate_model(cfg))
