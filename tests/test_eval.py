"""Stage 8 building blocks (dante/evaluation): scoring, perplexity/bpb, generation, long context, lm-eval.

References are independent: a plain per-request forward for the batched scorer, a naive per-token loop
for the sliding windows, a model with exactly uniform predictions for the perplexity/bpb arithmetic,
hand-made logits for the sampling filters, and full-forward argmax for KV-cache greedy decoding.
"""

import json
import math
import random

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from dante.artifacts import load_texts
from dante.config import ModelConfig
from dante.errors import UserError
from dante.evaluation import long_context as lc
from dante.evaluation.generation import (
    GREEDY,
    SamplingParams,
    apply_repetition_penalty,
    generate,
    top_k_filter,
    top_p_filter,
)
from dante.evaluation.perplexity import (
    bits_per_byte,
    encode_texts,
    perplexity_of_texts,
    perplexity_of_token_docs,
    token_byte_lengths,
    window_requests,
)
from dante.evaluation.scoring import ScoreRequest, score_requests
from dante.evaluation.tasks import next_sentence_examples, validate_task_file
from dante.model import Transformer
from dante.tokenizer import SPECIAL_TOKENS

torch.set_num_threads(1)

TEXTS = [
    "L'intelligenza artificiale c'è già: perché aspettare? Città, libertà, qualità.\nSecondo rigo.",
    "The quick brown fox jumps over the lazy dog. Naïve café — 😀 emoji and ü.",
    "def f(x):\n    return x ** 2  # è un commento\n",
]


def tiny_tokenizer(texts=None, vocab_size: int = 400) -> Tokenizer:
    """A byte-level BPE with Dante's special ids 0..5 (trains in well under a second)."""
    texts = texts or load_texts("data/sample/heldout/it.jsonl.gz")[:10] + load_texts("data/sample/heldout/en.jsonl.gz")[:3]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return tok


def tiny_model(vocab_size: int, max_seq_len: int = 64, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    cfg = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=vocab_size, max_seq_len=max_seq_len,
                      multiple_of=16)
    return Transformer(cfg).eval()


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return tiny_model(tok.get_vocab_size())


def plain_logprobs(model, tokens, score_from):
    """Reference: one unpadded forward per request, full logits."""
    with torch.inference_mode():
        t = torch.tensor(tokens)
        logp = model.logits(model(t[None, :-1]))[0].float().log_softmax(-1)
        return logp[torch.arange(score_from - 1, len(t) - 1), t[score_from:]].double().numpy()


# ---------------------------------------------------------------------------------------------------
# scoring
# ---------------------------------------------------------------------------------------------------


def test_scores_identical_at_any_batch_size_and_equal_plain_loop(model):
    rng = random.Random(0)
    V = model.cfg.vocab_size
    reqs = []
    for _ in range(24):
        n = rng.randint(2, model.cfg.max_seq_len + 1)
        reqs.append(ScoreRequest([rng.randrange(V) for _ in range(n)], rng.randint(1, n - 1)))
    by_batch = {b: score_requests(model, reqs, b) for b in (1, 3, 8)}
    for i, req in enumerate(reqs):
        ref = plain_logprobs(model, req.tokens, req.score_from)
        assert np.array_equal(by_batch[1][i].logprobs, by_batch[8][i].logprobs)  # bit-identical
        assert np.array_equal(by_batch[1][i].logprobs, by_batch[3][i].logprobs)
        np.testing.assert_allclose(by_batch[8][i].logprobs, ref, atol=1e-5)


def test_score_request_that_does_not_fit_is_refused(model):
    with pytest.raises(ValueError, match="max_seq_len"):
        score_requests(model, [ScoreRequest(list(range(model.cfg.max_seq_len + 2)), 1)], 4)


# ---------------------------------------------------------------------------------------------------
# perplexity and bits per byte
# ---------------------------------------------------------------------------------------------------


def test_bits_per_byte_arithmetic():
    # a uniform choice among 256 values per byte is exactly 8 bits per byte
    assert bits_per_byte(100 * math.log(256), 100) == pytest.approx(8.0)
    # 3 tokens of 2 bytes each, each with probability 1/4: 3 * 2 bits / 6 bytes = 1 bit per byte
    assert bits_per_byte(3 * math.log(4), 6) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="empty"):
        bits_per_byte(1.0, 0)


def test_token_bytes_are_exactly_utf8_bytes(tok):
    lengths = token_byte_lengths(tok)
    assert lengths[: len(SPECIAL_TOKENS)].sum() == 0  # specials stand for no text
    for text, ids in zip(TEXTS, encode_texts(tok, TEXTS)):
        assert lengths[np.asarray(ids)].sum() == len(text.encode("utf-8"))


def test_uniform_model_gives_known_perplexity_and_bpb(tok):
    """All-zero weights give logits exactly 0, i.e. p = 1/V for every token: ppl = V, bpb known."""
    m = tiny_model(tok.get_vocab_size(), max_seq_len=16)
    for p in m.parameters():
        torch.nn.init.zeros_(p)
    texts = TEXTS * 3  # several documents, most longer than the 16-token context (sliding windows)
    res = perplexity_of_texts(m, tok, texts, stride=5, batch_size=3)
    V = tok.get_vocab_size()
    n_tokens = sum(len(ids) for ids in encode_texts(tok, texts))
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    assert (res.tokens, res.bytes, res.docs) == (n_tokens, n_bytes, len(texts))
    assert res.ppl == pytest.approx(V, rel=1e-5)
    assert res.bpb == pytest.approx(n_tokens * math.log(V) / (math.log(2) * n_bytes), rel=1e-5)


@pytest.mark.parametrize("n,L,stride", [(1, 8, 4), (8, 8, 4), (9, 8, 4), (30, 8, 3), (30, 8, 8), (17, 5, 1)])
def test_windows_score_every_token_once_with_enough_context(n, L, stride):
    tokens = list(range(100, 101 + n))  # BOS stand-in + n targets
    scored = []
    for w in window_requests(tokens, L, stride):
        assert len(w.tokens) - 1 <= L
        for j in range(w.score_from, len(w.tokens)):
            target = tokens.index(w.tokens[j])
            scored.append(target)
            assert j >= min(target, L - stride)  # context: all of it, or at least L - stride tokens
    assert sorted(scored) == list(range(1, n + 1))


def test_sliding_window_perplexity_equals_naive_loop(tok, model):
    L, stride = model.cfg.max_seq_len, 24
    doc = encode_texts(tok, [load_texts("data/sample/heldout/it.jsonl.gz")[0]])[0][: 3 * L]
    res = perplexity_of_token_docs(model, [doc], token_byte_lengths(tok), bos_id=0, stride=stride, batch_size=4)
    tokens = [0] + doc
    nll, prev_end, k = 0.0, 0, 0
    while prev_end < len(doc):  # the windows, recomputed naively: one forward per scored token
        end = min(L + k * stride, len(doc))
        begin = max(0, end - L)
        for t in range(prev_end + 1, end + 1):
            nll -= plain_logprobs(model, tokens[begin:t + 1], t - begin)[0]
        prev_end, k = end, k + 1
    assert res.tokens == len(doc)
    assert res.nll == pytest.approx(nll, rel=1e-6)


def test_token_cap_counts_bytes_of_the_scored_part_only(tok, model):
    docs = encode_texts(tok, TEXTS)
    cap = len(docs[0]) + 5
    res = perplexity_of_token_docs(model, docs, token_byte_lengths(tok), bos_id=0, max_tokens=cap)
    assert res.tokens == cap and res.docs == 2
    assert res.bytes == len(TEXTS[0].encode()) + len(tok.decode(docs[1][:5]).encode())
    with pytest.raises(ValueError, match="empty evaluation set"):
        perplexity_of_token_docs(model, [[]], token_byte_lengths(tok), bos_id=0)


# ---------------------------------------------------------------------------------------------------
# generation
# ---------------------------------------------------------------------------------------------------


def test_top_k_top_p_and_repetition_penalty_on_hand_made_logits():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    kept = top_p_filter(logits.clone(), 0.7)
    assert torch.isfinite(kept).tolist() == [True, True, False, False]  # 0.5 < 0.7 <= 0.5 + 0.3
    assert torch.isfinite(top_p_filter(logits.clone(), 0.5)).tolist() == [True, False, False, False]
    assert torch.isfinite(top_p_filter(logits.clone(), 0.81)).tolist() == [True, True, True, False]
    assert torch.isfinite(top_p_filter(logits.clone(), 1.0)).all()
    shuffled = logits[[2, 0, 3, 1]]
    assert torch.isfinite(top_k_filter(shuffled.clone(), 2)).tolist() == [False, True, False, True]
    assert torch.isfinite(top_k_filter(shuffled.clone(), 0)).all()
    pen = apply_repetition_penalty(torch.tensor([2.0, -2.0, 1.0, -1.0]), [0, 1, 1], 2.0)
    assert pen.tolist() == [1.0, -4.0, 1.0, -1.0]  # positive / 2, negative * 2, unseen untouched


def test_sampling_is_deterministic_for_a_seed(model):
    params = SamplingParams(temperature=0.9, top_p=0.95, top_k=50, repetition_penalty=1.15)
    a = generate(model, [0, 7, 9, 11], max_new_tokens=20, params=params, seed=7)
    b = generate(model, [0, 7, 9, 11], max_new_tokens=20, params=params, seed=7)
    c = generate(model, [0, 7, 9, 11], max_new_tokens=20, params=params, seed=8)
    assert a.new_tokens == b.new_tokens and len(a.new_tokens) == 20
    assert a.new_tokens != c.new_tokens
    assert a.tokens_per_s > 0 and a.stop_reason == "max_new_tokens"


def test_kv_cache_greedy_equals_full_forward_argmax_and_stops(model):
    prompt = [0, 5, 9, 13, 21]
    out = generate(model, prompt, max_new_tokens=12, params=GREEDY)
    seq = list(prompt)
    with torch.inference_mode():
        for _ in range(12):
            seq.append(int(model.logits(model(torch.tensor([seq])))[0, -1].argmax()))
    assert out.new_tokens == seq[len(prompt):]
    stop = seq[len(prompt) + 3]
    cut = generate(model, prompt, max_new_tokens=12, params=GREEDY, stop_ids={stop})
    assert cut.stop_reason == "stop_token" and stop not in cut.new_tokens
    full = generate(model, prompt, max_new_tokens=500, params=GREEDY)
    assert full.stop_reason == "context_full" and len(prompt) + len(full.new_tokens) == model.cfg.max_seq_len


def test_stop_string_cuts_the_text(tok, model):
    out = generate(model, [0, 5, 9], max_new_tokens=10, params=GREEDY, decode=tok.decode)
    needle = out.text[len(out.text) // 2:][:2]
    if needle:
        cut = generate(model, [0, 5, 9], max_new_tokens=10, params=GREEDY, decode=tok.decode, stop_strings=[needle])
        assert cut.stop_reason == "stop_string" and needle not in cut.text and out.text.startswith(cut.text)


# ---------------------------------------------------------------------------------------------------
# long context
# ---------------------------------------------------------------------------------------------------


def test_passkey_prompts_are_exact_and_deterministic(tok):
    prompts = lc.passkey_prompts(tok, lengths=[128, 192], depths=[0.0, 0.5, 1.0], trials=2, distractors=3, seed=5)
    assert len(prompts) == 2 * 3 * 2
    for p in prompts:
        assert len(p.prompt) == p.length - lc.ANSWER_RESERVE and p.prompt[0] == 0
        assert len(p.key) == 5 and p.key.isdigit() and len(set(p.distractors + [p.key])) == 4
        text = tok.decode(p.prompt)
        assert lc.KEY_SENTENCE.format(key=p.key).strip() in text and text.rstrip().endswith(lc.QUESTION.strip())
        key_tokens = tok.encode(lc.KEY_SENTENCE.format(key=p.key), add_special_tokens=False).ids
        assert p.prompt[p.key_position:p.key_position + len(key_tokens)] == key_tokens
    shallow, deep = prompts[0], prompts[4]  # depth 0.0 vs 1.0 at length 128
    assert shallow.key_position < deep.key_position
    again = lc.passkey_prompts(tok, lengths=[128, 192], depths=[0.0, 0.5, 1.0], trials=2, distractors=3, seed=5)
    assert [p.prompt for p in again] == [p.prompt for p in prompts]
    with pytest.raises(UserError, match="too short"):
        lc.passkey_prompts(tok, lengths=[20], depths=[0.5], trials=1, distractors=3, seed=5)


def test_long_context_refuses_lengths_beyond_the_model(tok, model):
    with pytest.raises(UserError, match="exceeds the model's context"):
        lc.long_context_report(model, tok, [list(range(10, 300))], lengths=[model.cfg.max_seq_len * 2],
                               depths=[0.5], trials=1, bucket_size=8, max_sequences=2, seed=0)


def test_long_context_report_on_a_uniform_model(tok):
    m = tiny_model(tok.get_vocab_size(), max_seq_len=192)
    for p in m.parameters():
        torch.nn.init.zeros_(p)
    docs = encode_texts(tok, load_texts("data/sample/heldout/it.jsonl.gz")[:4])
    rep = lc.long_context_report(m, tok, docs, lengths=[160, 192], depths=[0.25, 0.75], trials=2, bucket_size=64,
                                 max_sequences=3, seed=1, distractors=4)
    pos = rep["position"]
    assert pos["length"] == 192 and pos["sequences"] == 3 and pos["bucket_start"] == [0, 64, 128]
    np.testing.assert_allclose(pos["nll"], math.log(tok.get_vocab_size()), rtol=1e-5)
    pk = rep["passkey"]
    assert {(c["length"], c["depth"]) for c in pk["cells"]} == {(160, 0.25), (160, 0.75), (192, 0.25), (192, 0.75)}
    # every candidate ties under a uniform model: a tie is a miss, never a lucky hit
    assert pk["rank_accuracy"] == 0.0 and pk["chance_rank_accuracy"] == pytest.approx(0.2)


def test_long_sequences_rows():
    rows = lc.long_sequences([[7] * 10, [8] * 30], length=12, max_sequences=3, bos_id=0, eos_id=1)
    assert len(rows) == 3 and all(len(r) == 12 and r[0] == 0 for r in rows)
    assert rows[0][1:] == [7] * 10 + [1]


# ---------------------------------------------------------------------------------------------------
# benchmark tasks (local files, lm-eval)
# ---------------------------------------------------------------------------------------------------


def write_task(tmp_path, rows, **overrides):
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    cfg = {"task": "t_local", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
           "output_type": "multiple_choice", "test_split": "test", "doc_to_text": "context",
           "doc_to_choice": "choices", "doc_to_target": "gold", "target_delimiter": " ",
           "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                           {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}]}
    cfg.update(overrides)
    cfg = {k: v for k, v in cfg.items() if v is not None}
    path = tmp_path / "t_local.yaml"
    import yaml

    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


def test_task_file_problems_are_named(tmp_path):
    good = [{"context": "Il cielo è", "choices": ["azzurro", "verde"], "gold": 0}]
    assert validate_task_file(write_task(tmp_path, good)) == []
    no_field = validate_task_file(write_task(tmp_path, [{"context": "x", "gold": 0}]))
    assert any("lacks field(s) ['choices']" in p for p in no_field)
    empty = validate_task_file(write_task(tmp_path, []))
    assert any("empty evaluation set" in p for p in empty)
    no_choice = validate_task_file(write_task(tmp_path, good, doc_to_choice=None))
    assert any("'doc_to_choice'" in p for p in no_choice)
    assert "not found" in validate_task_file(tmp_path / "nope.yaml")[0]
    moved = validate_task_file(write_task(tmp_path, good, dataset_kwargs={"data_files": {"test": "gone.jsonl"}}))
    assert any("gone.jsonl" in p and "not found" in p for p in moved)


def test_next_sentence_task_files_are_reproducible():
    import importlib.util

    spec = importlib.util.spec_from_file_location("build_tasks", "data/eval_tasks/build.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    for lang in build.LANGS:
        rows = next_sentence_examples(load_texts(f"data/sample/heldout/{lang}.jsonl.gz"), build.N_EXAMPLES, build.SEED)
        committed = [json.loads(x) for x in open(f"data/eval_tasks/next_sentence_{lang}.jsonl", encoding="utf-8")]
        assert rows == committed
        assert all(r["choices"].count(r["choices"][r["gold"]]) == 1 and len(r["choices"]) == 4 for r in rows)
        assert validate_task_file(f"data/eval_tasks/next_sentence_{lang}.yaml") == []


def test_lm_eval_multiple_choice_equals_plain_loop_at_batch_1_and_8(tok):
    """simple_evaluate on a local task with our wrapper (batch 8); the same requests at batch 1 give
    bit-identical log-likelihoods, and both equal a plain unpadded loop; acc/acc_norm follow from them."""
    from lm_eval.api.instance import Instance

    from dante.evaluation.lm_eval_adapter import DanteLM, run_tasks

    model = tiny_model(tok.get_vocab_size(), max_seq_len=512)  # every request fits: no truncation involved
    res = run_tasks(DanteLM(model=model, tokenizer=tok, batch_size=8), ["data/eval_tasks/next_sentence_it.yaml"], [],
                    limit=12, num_fewshot=None, seed=1, log_samples=True)
    samples = res["samples"]["dante_next_sentence_it"]
    requests = [Instance("loglikelihood", s["doc"], tuple(args), i) for s in samples for i, args in enumerate(s["arguments"])]
    at_batch_1 = [ll for ll, _ in DanteLM(model=model, tokenizer=tok, batch_size=1).loglikelihood(requests)]
    at_batch_8 = [r[0][0] for s in samples for r in s["resps"]]
    assert at_batch_1 == at_batch_8  # bit-identical
    correct = correct_norm = 0
    for s in samples:
        plain = []
        for context, continuation in s["arguments"]:
            ctx = tok.encode(context, add_special_tokens=False).ids
            whole = tok.encode(context + continuation, add_special_tokens=False).ids
            plain.append(plain_logprobs(model, [0] + whole, 1 + len(ctx)).sum())
        np.testing.assert_allclose([r[0][0] for r in s["resps"]], plain, atol=1e-4)
        choices, gold = s["doc"]["choices"], s["doc"]["gold"]
        correct += int(np.argmax(plain) == gold)
        correct_norm += int(np.argmax(np.array(plain) / [len(c) for c in choices]) == gold)
    metrics = res["tasks"]["dante_next_sentence_it"]
    assert metrics["n"] == 12
    assert metrics["acc"] == pytest.approx(correct / 12) and metrics["acc_norm"] == pytest.approx(correct_norm / 12)


def test_lm_eval_rolling_and_generation_requests(tok, model):
    from lm_eval.api.instance import Instance

    from dante.evaluation.lm_eval_adapter import DanteLM

    lm = DanteLM(model=model, tokenizer=tok, batch_size=4)
    text = TEXTS[0] * 3
    rolling = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])[0]
    expected = perplexity_of_texts(model, tok, [text], stride=model.cfg.max_seq_len).nll
    assert rolling == pytest.approx(-expected, rel=1e-9)
    out = lm.generate_until([Instance("generate_until", {}, ("Il cielo", {"until": ["\n"], "max_gen_toks": 8}), 0)])[0]
    ref = generate(model, [0] + tok.encode("Il cielo", add_special_tokens=False).ids, max_new_tokens=8, params=GREEDY,
                   decode=lm.tok_decode, stop_strings=["\n"], stop_ids={1, 4})
    assert out == ref.text and "\n" not in out


def test_shard_stream_splits_into_documents_across_read_chunks():
    from dante.evaluation.perplexity import iter_shard_documents

    stream = np.array([0, 10, 11, 12, 1, 0, 20, 1, 0, 30, 31, 32, 33, 34, 1, 0, 40], dtype=np.uint16)
    expected = [[10, 11, 12], [20], [30, 31, 32, 33, 34], [40]]
    for chunk in (1, 3, 4, 100):
        assert list(iter_shard_documents([stream], [0, 1, 2, 3, 4, 5], chunk=chunk)) == expected
        for cut in (3, 10, 12):  # a document that runs on into the next shard stays whole
            assert list(iter_shard_documents([stream[:cut], stream[cut:]], range(6), chunk=chunk)) == expected
