"""dante.model against transformers.LlamaForCausalLM, plus the properties stages 4-9 rely on."""

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from dante.config import ModelConfig, validate_model
from dante.export.hf_format import HF_NAME_MAP, from_hf_state_dict, llama_config_kwargs, to_hf_state_dict
from dante.model import KVCache, Transformer, count_parameters, ffn_hidden_dim_of, head_dim_of, positions_from_doc_ids

torch.set_num_threads(1)


def tiny(**overrides) -> ModelConfig:
    base = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, max_seq_len=128, multiple_of=32)
    base.update(overrides)
    cfg = ModelConfig(**base)
    assert validate_model(cfg) == []
    return cfg


def make(cfg: ModelConfig, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(cfg).eval()
    with torch.no_grad():  # non-trivial norm weights so a swapped norm name cannot pass
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model


def to_hf(model: Transformer) -> LlamaForCausalLM:
    cfg = model.cfg
    hf = LlamaForCausalLM(LlamaConfig(**llama_config_kwargs(cfg))).eval()
    result = hf.load_state_dict(to_hf_state_dict(model.state_dict(), cfg.tie_embeddings), strict=False)
    assert result.unexpected_keys == []
    assert result.missing_keys == (["lm_head.weight"] if cfg.tie_embeddings else [])
    if cfg.tie_embeddings:
        assert hf.lm_head.weight is hf.model.embed_tokens.weight
    return hf


def assert_rel_close(actual, expected, rel):
    err = ((actual - expected).abs().max() / expected.abs().max()).item()
    assert err <= rel, f"max relative error {err:.2e} > {rel:.0e}"


@pytest.mark.parametrize("overrides", [
    {},                                                    # GQA 4/2, tied
    {"tie_embeddings": False, "n_kv_heads": 1},            # MQA, untied lm_head
    {"n_kv_heads": 4, "head_dim": 8, "ffn_hidden_dim": 80},  # MHA, head_dim != dim / n_heads, explicit FFN width
])
def test_logits_equal_transformers(overrides):
    cfg = tiny(**overrides)
    model = make(cfg)
    hf = to_hf(model)
    tokens = torch.randint(0, cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model.logits(model(tokens))
        ref = hf(tokens).logits
        assert_rel_close(ours, ref, 1e-5)
        # explicit positions (here: an offset) reach RoPE the same way position_ids do in transformers
        positions = torch.arange(40).expand(2, 40) + torch.tensor([[0], [50]])
        assert_rel_close(model.logits(model(tokens, positions_BT=positions)), hf(tokens, position_ids=positions).logits, 1e-5)


def test_hf_name_map_round_trip_and_covers_every_parameter():
    cfg = tiny(tie_embeddings=False)
    sd = make(cfg).state_dict()
    hf_sd = to_hf_state_dict(sd, tie_embeddings=False)
    assert set(from_hf_state_dict(hf_sd)) == set(sd)
    assert len(HF_NAME_MAP) == 12 and set(hf_sd) == set(LlamaForCausalLM(LlamaConfig(**llama_config_kwargs(cfg))).state_dict())


def test_tied_embeddings_and_no_rope_in_state_dict():
    model = make(tiny())
    assert model.output.weight is model.tok_embeddings.weight
    assert not any("rope" in k for k in model.state_dict())
    untied = make(tiny(tie_embeddings=False))
    assert count_parameters(untied) - count_parameters(model) == 97 * 64


@pytest.mark.parametrize("yarn", [False, True])
def test_causality(yarn):
    scaling = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32} if yarn else {}
    model = make(tiny(rope_scaling=scaling))
    g = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, 97, (2, 50), generator=g)
    changed = tokens.clone()
    changed[:, 30:] = torch.randint(0, 97, (2, 20), generator=g)
    with torch.no_grad():
        a, b = model(tokens), model(changed)
    assert torch.equal(a[:, :30], b[:, :30])
    assert not torch.allclose(a[:, 30:], b[:, 30:])


def test_gqa_equals_mha_with_repeated_kv_heads():
    gqa = make(tiny(n_heads=4, n_kv_heads=2))
    mha = Transformer(tiny(n_heads=4, n_kv_heads=4)).eval()
    hd, group = 16, 2
    sd = gqa.state_dict()
    for key, value in list(sd.items()):
        if key.endswith(("attention.wk.weight", "attention.wv.weight")):
            # kv head j serves query heads j*group .. j*group+group-1: repeat each head's rows `group` times
            sd[key] = value.view(2, hd, 64).repeat_interleave(group, dim=0).reshape(4 * hd, 64)
    mha.load_state_dict(sd)
    tokens = torch.randint(0, 97, (2, 33))
    with torch.no_grad():
        assert_rel_close(mha(tokens), gqa(tokens), 1e-6)


def packed_batch():
    docs = torch.tensor([[0] * 5 + [1] * 9 + [2] * 10, [7] * 12 + [8] * 12])
    tokens = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(3))
    return tokens, docs


@pytest.mark.parametrize("impl", ["sdpa", "flex"])
def test_document_mask_equals_each_document_alone(impl):
    model = make(tiny())
    model.doc_attention = impl
    tokens, docs = packed_batch()
    with torch.no_grad():
        packed = model(tokens, doc_ids_BT=docs)
        for row in range(2):
            for doc in docs[row].unique():
                span = (docs[row] == doc).nonzero().squeeze(1)
                alone = model(tokens[row:row + 1, span])
                assert_rel_close(packed[row, span], alone[0], 1e-5)
        # without the mask (and restarted positions) later documents do see earlier ones
        assert not torch.allclose(model(tokens)[0, 5:], packed[0, 5:], atol=1e-4)


def test_flex_and_sdpa_document_paths_agree():
    tokens, docs = packed_batch()
    model = make(tiny(), seed=5)
    with torch.no_grad():  # torch 2.13 FlexAttention has no backward on CPU; forward only here
        model.doc_attention = "flex"
        flex = model(tokens, doc_ids_BT=docs)
        model.doc_attention = "sdpa"
        sdpa = model(tokens, doc_ids_BT=docs)
    assert_rel_close(flex, sdpa, 1e-5)


def test_document_mask_gradients_equal_separate_documents():
    """SFT: a packed row trains exactly like its documents run one by one (no cross-document gradient)."""
    tokens, docs = packed_batch()
    packed_model, alone_model = make(tiny(), seed=7).train(), make(tiny(), seed=7).train()
    packed_model(tokens[:1], doc_ids_BT=docs[:1]).square().sum().backward()
    for doc in docs[0].unique():
        span = (docs[0] == doc).nonzero().squeeze(1)
        alone_model(tokens[:1, span]).square().sum().backward()
    for a, b in zip(packed_model.parameters(), alone_model.parameters()):
        assert_rel_close(a.grad, b.grad, 1e-5)


def test_positions_restart_per_document():
    docs = torch.tensor([[3, 3, 3, 4, 4, 9], [1, 1, 1, 1, 1, 1]])
    assert positions_from_doc_ids(docs).tolist() == [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]]


@pytest.mark.parametrize("overrides", [{}, {"n_kv_heads": 1, "rope_scaling": {"rope_type": "linear", "factor": 2.0}}])
def test_kv_cache_decode_equals_full_forward(overrides):
    cfg = tiny(**overrides)
    model = make(cfg)
    tokens = torch.randint(0, 97, (2, 20), generator=torch.Generator().manual_seed(4))
    cache = KVCache(cfg, batch_size=2, max_len=32)
    with torch.no_grad():
        full = model.logits(model(tokens))
        steps = [model.logits(model(tokens[:, :8], kv_cache=cache))]  # prefill
        steps += [model.logits(model(tokens[:, t:t + 1], kv_cache=cache)) for t in range(8, 15)]  # one token
        steps.append(model.logits(model(tokens[:, 15:20], kv_cache=cache)))  # a chunk after a prefix
    assert cache.length == 20
    assert_rel_close(torch.cat(steps, dim=1), full, 1e-5)
    with pytest.raises(ValueError, match="do not fit"):
        model(tokens, kv_cache=cache)


@pytest.mark.parametrize("scaling", [
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
    {"rope_type": "yarn", "factor": 3.0, "original_max_position_embeddings": 40, "beta_fast": 16, "mscale": 1.0,
     "mscale_all_dim": 0.5},
    {"rope_type": "linear", "factor": 4.0},
])
def test_scaled_rope_model_equals_transformers_beyond_original_length(scaling):
    cfg = tiny(rope_scaling=scaling, max_seq_len=128, rope_theta=500000.0)
    model = make(cfg)
    hf = to_hf(model)
    tokens = torch.randint(0, 97, (1, 120), generator=torch.Generator().manual_seed(6))  # 120 > original 32/40
    with torch.no_grad():
        ours, ref = model.logits(model(tokens)), hf(tokens).logits
    assert_rel_close(ours, ref, 1e-5)
    plain = make(tiny(max_seq_len=128, rope_theta=500000.0))  # same weights, no scaling: must differ
    with torch.no_grad():
        assert not torch.allclose(plain.logits(plain(tokens))[:, 40:], ours[:, 40:], atol=1e-3)


def test_scaled_init():
    cfg = tiny(dim=256, n_layers=8, n_heads=4, n_kv_heads=4, vocab_size=512, multiple_of=256)
    model = Transformer(cfg)
    block = model.layers[3]
    assert block.attention.wq.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert block.attention.wo.weight.std().item() == pytest.approx(0.02 / math.sqrt(16), rel=0.05)
    assert block.feed_forward.w2.weight.std().item() == pytest.approx(0.02 / math.sqrt(16), rel=0.05)
    assert torch.equal(block.ffn_norm.weight, torch.ones(256))


def test_meta_construction_then_materialize():
    cfg = tiny()
    reference = make(cfg)
    with torch.device("meta"):
        model = Transformer(cfg)
    model.materialize("cpu")
    assert model.output.weight is model.tok_embeddings.weight  # plain to_empty would have untied them
    model.load_state_dict(reference.state_dict())
    model.eval()
    tokens = torch.randint(0, 97, (1, 16))
    with torch.no_grad():
        assert torch.equal(model(tokens), reference(tokens))


def test_dante_2b_parameter_count():
    cfg = ModelConfig(dim=2560, n_layers=28, n_heads=20, n_kv_heads=4, vocab_size=65536, max_seq_len=2048,
                      rope_theta=500000.0, tie_embeddings=True)
    assert validate_model(cfg) == []
    with torch.device("meta"):
        model = Transformer(cfg)
    n = count_parameters(model)
    hidden = ffn_hidden_dim_of(cfg)
    per_layer = 2560 * 2560 * 2 + 2560 * 512 * 2 + 3 * 2560 * hidden + 2 * 2560
    print(f"\ndante-2b: {n:,} parameters (head_dim {head_dim_of(cfg)}, SwiGLU hidden {hidden}, "
          f"non-embedding {n - 65536 * 2560:,})")
    assert hidden == 6912 and head_dim_of(cfg) == 128
    assert n == 28 * per_layer + 65536 * 2560 + 2560 == 2_094_676_480


def test_too_long_input_is_a_clear_error():
    model = make(tiny(max_seq_len=16))
    with pytest.raises(ValueError, match="exceed model.max_seq_len=16"):
        model(torch.zeros(1, 17, dtype=torch.long))
