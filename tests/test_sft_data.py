"""Stage 6 (SFT data): normalizers, drops by reason, chat template vs transformers, loss weights,
special-token text, best-fit packing, positions/doc ids, over-long policy, batches, and the stage end to end.

Tokenizers are trained inside the tests with dante.tokenizer.train_tokenizer on the sample conversations.
"""

from __future__ import annotations

import gzip
import json
import os
import random
import runpy
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from dante import chat_format, sft_packing
from dante import sft_data as sft
from dante.artifacts import read_json
from dante.cli import run_stage
from dante.config import (
    ConfigError,
    RunConfig,
    SFTDataConfig,
    SFTDataStageConfig,
    SFTSourceConfig,
    load_config,
)
from dante.errors import UserError
from dante.tokenizer import EOT_ID, SPECIAL_TOKENS, to_transformers, train_tokenizer
from tests.helpers import sft_sample_texts, stage_files, write_tokenizer_stage  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "data" / "sft_sample"

CONVERSATIONS = [
    [  # Italian, system prompt, accents, apostrophes, two exchanges
        {"role": "system", "content": "Sei un assistente che risponde in italiano."},
        {"role": "user", "content": "Perché il caffè è così amaro? Dimmi qualcosa sull'acidità."},
        {"role": "assistant", "content": "L'amaro viene dalla caffeina e dai composti che si formano durante la tostatura.\n\nPiù è scura, più è amara."},
        {"role": "user", "content": "E l'orzo?"},
        {"role": "assistant", "content": "L'orzo non contiene caffeina: è più dolce e meno acido."},
    ],
    [  # English, code with indentation, blank lines and tabs; surrounding whitespace to be trimmed
        {"role": "user", "content": "  Write a Python loop that prints 0..2.\n"},
        {"role": "assistant", "content": "```python\nfor i in range(3):\n    print(i)\n\n\tpass\n```\nDone — città, naïve, «ciao»."},
    ],
    [  # content starting with newlines and ending with spaces, emoji
        {"role": "user", "content": "\n\nciao 👋   "},
        {"role": "assistant", "content": "Ciao! 😊"},
    ],
]


@pytest.fixture(scope="module")
def tokenizer():
    # pinned_chars=[]: identical ids across the two template paths do not depend on which merges exist.
    return train_tokenizer(sft_sample_texts(), vocab_size=1000, n_reserved=8, min_frequency=2, pinned_chars=[])


@pytest.fixture(scope="module")
def encoder(tokenizer):
    return chat_format.ChatEncoder(tokenizer)


def make_source(**kw) -> SFTSourceConfig:
    base = dict(name="s", kind="local", path="x.jsonl", format="messages", lang="it", weight=1.0)
    base.update(kw)
    return SFTSourceConfig(**base)


# -- normalizers ---------------------------------------------------------------------------------------
def test_normalizers_all_four_formats():
    expected = [{"role": "system", "content": "Sii breve."}, {"role": "user", "content": "Ciao"},
                {"role": "assistant", "content": "Salve!"}]
    rows = {
        "messages": {"messages": expected},
        "sharegpt": {"conversations": [{"from": "system", "value": "Sii breve."}, {"from": "human", "value": "Ciao"},
                                       {"from": "gpt", "value": "Salve!"}]},
        "alpaca": {"instruction": "Ciao", "input": "", "output": "Salve!", "system": "Sii breve."},
        "prompt_response": {"prompt": "Ciao", "response": "Salve!", "system": "Sii breve."},
    }
    for fmt, row in rows.items():
        assert sft.normalize_row(row, fmt) == expected, fmt
    # Alpaca input goes after the instruction, separated by a blank line; a missing/None input is fine
    assert sft.normalize_row({"instruction": "Riassumi.", "input": "Testo lungo.", "output": "Breve."}, "alpaca")[0] == {
        "role": "user", "content": "Riassumi.\n\nTesto lungo."}
    assert sft.normalize_row({"instruction": "Ciao", "input": None, "output": "Salve"}, "alpaca")[0]["content"] == "Ciao"
    # renamed columns (e.g. Aya's inputs/targets) through the source's `columns`
    row = {"inputs": "Domanda?", "targets": "Risposta."}
    assert sft.normalize_row(row, "prompt_response", {"prompt": "inputs", "response": "targets"}) == [
        {"role": "user", "content": "Domanda?"}, {"role": "assistant", "content": "Risposta."}]
    with pytest.raises(UserError, match="unknown SFT format"):
        sft.normalize_row(row, "chatml")


BAD_ROWS = [
    ("bad_structure", "messages", ["not", "a", "dict"]),
    ("bad_structure", "messages", {"messages": "Ciao"}),
    ("bad_structure", "sharegpt", {"messages": []}),
    ("bad_structure", "alpaca", {"instruction": "x"}),
    ("unknown_role", "messages", {"messages": [{"role": "tool", "content": "x"}]}),
    ("unknown_role", "sharegpt", {"conversations": [{"from": "bing", "value": "x"}]}),
    ("non_string_content", "messages", {"messages": [{"role": "user", "content": 3}]}),
    ("non_string_content", "messages", {"messages": [{"role": "user", "content": [{"type": "text", "text": "x"}]}]}),
    ("bad_structure", "prompt_response", {"prompt": "x", "response": None}),
    ("non_string_content", "prompt_response", {"prompt": "x", "response": 7}),
    ("empty_conversation", "messages", {"messages": []}),
    ("empty_content", "messages", {"messages": [{"role": "user", "content": "Ciao"}, {"role": "assistant", "content": " \n"}]}),
    ("empty_content", "alpaca", {"instruction": "", "output": "x"}),
    ("roles_out_of_order", "messages", {"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]}),
    ("roles_out_of_order", "messages", {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                                                     {"role": "assistant", "content": "c"}]}),
    ("roles_out_of_order", "messages", {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                                                     {"role": "system", "content": "c"}]}),
    ("no_assistant_turn", "messages", {"messages": [{"role": "user", "content": "a"}]}),
    ("no_assistant_turn", "messages", {"messages": [{"role": "system", "content": "a"}]}),
    ("special_token_text", "messages", {"messages": [{"role": "user", "content": "a <|eot|> b"}, {"role": "assistant", "content": "c"}]}),
    ("special_token_text", "messages", {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "<|reserved_3|>"}]}),
]


@pytest.mark.parametrize("reason,fmt,row", BAD_ROWS)
def test_each_bad_row_is_dropped_with_its_reason(encoder, reason, fmt, row):
    with pytest.raises(sft.DroppedRow) as info:
        sft.check_conversation(sft.normalize_row(row, fmt), encoder.special_re)
    assert info.value.reason == reason, info.value


def test_trailing_user_turn_trimmed_and_default_system_prompt():
    msgs = [{"role": "user", "content": " a "}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "grazie"}]
    kept, notes = sft.check_conversation(msgs, system_prompt="Sei utile.")
    assert [m["role"] for m in kept] == ["system", "user", "assistant"] and kept[1]["content"] == "a"
    assert notes.trailing_user_trimmed and notes.system_prompt_added


def test_malformed_sample_file_counted_by_reason(encoder):
    src = make_source(path=str(SAMPLE / "malformed.jsonl"))
    cfg = SFTDataConfig(sources=[src], block_size=512, heldout_fraction=0.0)
    es = sft.encode_source(src, sft.iter_source_rows(src), encoder, cfg, seed=0)
    assert es.stats["rows_read"] == 15 and es.stats["kept"] == 3 and es.stats["dropped"] == 12
    assert es.stats["dropped_by_reason"] == {
        "invalid_json": 1, "bad_structure": 2, "unknown_role": 1, "non_string_content": 1, "empty_conversation": 1,
        "empty_content": 1, "roles_out_of_order": 3, "no_assistant_turn": 1, "special_token_text": 1}
    assert es.stats["trailing_user_trimmed"] == 1
    assert es.stats["drop_examples"]["invalid_json"][0].startswith("row 2: malformed.jsonl:2")


def test_local_reader_gzip_non_utf8_and_max_rows(tmp_path):
    import gzip

    good = json.dumps({"prompt": "Ciao", "response": "Salve"}).encode()
    path = tmp_path / "rows.jsonl.gz"
    with gzip.open(path, "wb") as f:
        f.write(good + b"\n\n" + b'{"prompt": "caff\xe8"}\n' + good + b"\n" + good + b"\n")
    rows = list(sft.iter_source_rows(make_source(path=str(tmp_path / "*.jsonl.gz"), max_rows=3)))
    assert len(rows) == 3 and rows[0] == rows[2] == json.loads(good)  # blank line skipped, not counted
    assert isinstance(rows[1], sft.DroppedRow) and rows[1].reason == "invalid_json" and "not UTF-8" in rows[1].detail


def test_hub_code_path_feeds_the_same_normalizers(tmp_path, encoder):
    # datasets.load_dataset(..., streaming=True) on a dataset folder: the kind-hf path, without a network
    (tmp_path / "train.jsonl").write_text((SAMPLE / "en_sharegpt.jsonl").read_text(encoding="utf-8"), encoding="utf-8")
    src = make_source(kind="hf", hf_id=str(tmp_path), path="", format="sharegpt", lang="en", max_rows=10)
    hub = sft.encode_source(src, sft.iter_source_rows(src), encoder, SFTDataConfig(block_size=512), seed=0)
    local_src = make_source(path=str(SAMPLE / "en_sharegpt.jsonl"), format="sharegpt", max_rows=10)
    local = sft.encode_source(local_src, sft.iter_source_rows(local_src), encoder, SFTDataConfig(block_size=512), seed=0)
    assert hub.stats["kept"] == 10 and np.array_equal(hub.tokens, local.tokens)
    missing = make_source(kind="hf", hf_id=str(tmp_path / "nothing-here"), path="")
    with pytest.raises(UserError, match="cannot stream"):
        list(sft.iter_source_rows(missing))


def test_unknown_format_and_bad_sources_are_config_errors(tmp_path):
    cfg = tmp_path / "sft.yaml"
    cfg.write_text("sft_data:\n  sources:\n    - {name: a, kind: local, path: a.jsonl, format: chatml}\n"
                   "    - {name: b, kind: hf, format: messages, weight: 0}\n")
    with pytest.raises(ConfigError) as info:
        load_config(SFTDataStageConfig, cfg)
    text = str(info.value)
    assert "sft_data.sources[0].format" in text and "chatml" in text
    assert "sft_data.sources[1].hf_id: required" in text and "sft_data.sources[1].weight=0" in text
    problems = sft.check_sources([make_source(path=str(tmp_path / "missing.jsonl"), columns={"question": "q"})], 8)
    assert any("no file matches" in p for p in problems) and any("'question'" in p for p in problems)
    assert any("block_size=8" in p for p in problems)


# -- chat template -------------------------------------------------------------------------------------
def test_python_encoder_equals_apply_chat_template(tokenizer, encoder):
    hf = to_transformers(tokenizer)
    hf.chat_template = chat_format.CHAT_TEMPLATE
    for conv in CONVERSATIONS:
        kept, _ = sft.check_conversation(conv, encoder.special_re)
        ours = encoder.encode(kept).ids.tolist()
        theirs = hf.apply_chat_template(conv, tokenize=True, return_dict=False)  # raw, untrimmed content
        assert ours == theirs
        # the prompt a model completes: history + "<|start_header_id|>assistant<|end_header_id|>\n\n"
        prompt = kept[:-1]
        ours = encoder.encode(prompt, add_generation_prompt=True).ids.tolist()
        assert ours == hf.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True, return_dict=False)
    text = hf.apply_chat_template(CONVERSATIONS[2], tokenize=False)
    assert text == ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nciao 👋<|eot|>"
                    "<|start_header_id|>assistant<|end_header_id|>\n\nCiao! 😊<|eot|><|end_of_text|>")
    assert tokenizer.decode(encoder.encode(CONVERSATIONS[2]).ids, skip_special_tokens=False) == text


def test_special_token_text_is_plain_text_in_our_encoder_but_not_in_jinja(tokenizer, encoder):
    conv = [{"role": "user", "content": "Cosa fa <|eot|> o <|begin_of_text|>?"}, {"role": "assistant", "content": "Nulla."}]
    enc = encoder.encode(conv)
    n_special = len(tokenizer.get_added_tokens_decoder())
    special_positions = np.flatnonzero(enc.ids < n_special).tolist()
    # only the structural ones: BOS, 2 x (start, end, eot), EOS
    assert enc.ids[special_positions].tolist() == [0, 2, 3, 4, 2, 3, 4, 1]
    assert "<|eot|>" in tokenizer.decode(enc.ids.tolist(), skip_special_tokens=True)
    hf = to_transformers(tokenizer)
    hf.chat_template = chat_format.CHAT_TEMPLATE
    theirs = hf.apply_chat_template(conv, tokenize=True, return_dict=False)
    assert theirs.count(EOT_ID) == 3  # transformers turns the typed "<|eot|>" into the control token
    assert theirs != enc.ids.tolist()
    # ... which is why stage 6 drops such conversations (and counts them)
    with pytest.raises(sft.DroppedRow, match="special_token_text"):
        sft.check_conversation(conv, encoder.special_re)


# -- weights ---------------------------------------------------------------------------------------------
def test_only_assistant_tokens_and_their_eot_have_weight(tokenizer, encoder):
    conv, _ = sft.check_conversation(CONVERSATIONS[0], encoder.special_re)
    enc = encoder.encode(conv)
    w = sft_packing.class_weights(0.0)[enc.classes]
    ids = enc.ids
    assert w[0] == 0 and ids[0] == 0  # <|begin_of_text|>
    assert ids[-1] == 1 and w[-1] == 1  # final <|end_of_text|>: weighted (see module docstring)
    assert np.all(w[np.isin(ids, [2, 3])] == 0)  # headers
    # the weighted tokens are exactly the assistant contents, each closed by <|eot|>, then <|end_of_text|>
    weighted = ids[w == 1].tolist()
    answers = [m["content"] for m in conv if m["role"] == "assistant"]
    assert tokenizer.decode(weighted, skip_special_tokens=False) == "".join(a + "<|eot|>" for a in answers) + "<|end_of_text|>"
    # the user/system eot tokens carry user_weight, the assistant ones 1
    eot_weights = sft_packing.class_weights(0.25)[enc.classes][ids == EOT_ID].tolist()
    assert eot_weights == [0.25, 0.25, 1.0, 0.25, 1.0]
    w_user = sft_packing.class_weights(0.25)[enc.classes]
    prompt_text = tokenizer.decode(ids[w_user == 0.25].tolist(), skip_special_tokens=False)
    assert prompt_text == "".join(m["content"] + "<|eot|>" for m in conv if m["role"] != "assistant")


# -- packing ---------------------------------------------------------------------------------------------
def first_fit_blocks(lengths, block_size) -> int:
    """Reference greedy: every item into the first open block (arrival order) that has room."""
    rooms: list[int] = []
    for n in lengths:
        for i, room in enumerate(rooms):
            if room >= n:
                rooms[i] -= n
                break
        else:
            rooms.append(block_size - n)
    return len(rooms)


def best_fit_reference(lengths, block_size) -> list[int]:
    """Plain-loop best-fit decreasing; returns the sorted fill of the blocks."""
    fills: list[int] = []
    for n in sorted(lengths, reverse=True):
        fits = [i for i, f in enumerate(fills) if block_size - f >= n]
        if fits:
            best = min(fits, key=lambda i: block_size - fills[i])
            fills[best] += n
        else:
            fills.append(n)
    return sorted(fills)


def test_best_fit_decreasing_beats_greedy_on_lognormal_lengths():
    rng = np.random.default_rng(0)
    block = 4096
    lengths = np.clip(rng.lognormal(mean=6.2, sigma=0.9, size=3000).astype(int), 8, block)  # median ~500 tokens
    blocks = sft_packing.pack_best_fit(lengths, block)
    placed = sorted(i for b in blocks for i in b)
    assert placed == list(range(len(lengths)))  # every conversation exactly once
    fills = [int(lengths[b].sum()) for b in blocks]
    assert max(fills) <= block
    assert sorted(fills) == best_fit_reference(lengths.tolist(), block)  # same as the plain loop
    ff = first_fit_blocks(lengths.tolist(), block)
    nf = sft_packing.next_fit_blocks(lengths.tolist(), block)
    assert len(blocks) <= ff <= nf
    padding = 1 - lengths.sum() / (len(blocks) * block)
    lower_bound = int(np.ceil(lengths.sum() / block))
    assert len(blocks) - lower_bound <= 2 and padding < 0.01, (len(blocks), lower_bound, padding)


def test_pack_best_fit_edge_cases():
    assert sft_packing.pack_best_fit([], 16) == []
    assert sft_packing.pack_best_fit([16, 16], 16) == [[0], [1]]
    assert sorted(map(sorted, sft_packing.pack_best_fit([10, 6, 6, 4], 16))) == [[0, 1], [2, 3]]
    with pytest.raises(ValueError):
        sft_packing.pack_best_fit([17], 16)


def encoded_source(encoder, convs, name="s", lang="it", copies=None) -> sft.EncodedSource:
    encs = [encoder.encode(sft.check_conversation(c)[0]) for c in convs]
    lengths = [len(e.ids) for e in encs]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return sft.EncodedSource(name, lang, np.concatenate([e.ids for e in encs]), np.concatenate([e.classes for e in encs]),
                             offsets, np.zeros(len(encs), bool), np.array(copies or [1] * len(encs), np.int32))


def test_written_blocks_have_restarting_positions_and_doc_ids(tmp_path, encoder):
    convs = CONVERSATIONS * 4
    es = encoded_source(encoder, convs)
    block = 256
    items = np.stack([np.zeros(len(es), np.int64), es.offsets[:-1], es.offsets[1:]], axis=1)
    blocks = sft_packing.pack_best_fit(es.lengths(), block)
    sft_packing.write_packed(tmp_path, "train", [es], items, blocks, block, encoder.vocab_size, user_weight=0.5, chunk_blocks=2)
    p = sft_packing.load_packed(tmp_path, "train")
    assert p.tokens.shape == (len(blocks), block) and p.pad_id == 5
    for r, b in enumerate(blocks):
        at = 0
        for doc, i in enumerate(b):
            s, e = es.offsets[i], es.offsets[i + 1]
            n = e - s
            assert p.tokens[r, at : at + n].tolist() == es.tokens[s:e].tolist()
            assert p.doc_ids[r, at : at + n].tolist() == [doc] * n
            assert p.positions[r, at : at + n].tolist() == list(range(n))
            assert np.array_equal(p.weights[r, at : at + n], sft_packing.class_weights(0.5)[es.classes[s:e]])
            at += n
        assert np.all(p.tokens[r, at:] == 5) and np.all(p.doc_ids[r, at:] == sft_packing.PAD_DOC_ID)
        assert np.all(p.weights[r, at:] == 0) and np.all(p.positions[r, at:] == 0)
    assert set(np.unique(p.weights)) == {0.0, 0.5, 1.0}
    # a damaged file is refused with a clear message
    path = tmp_path / "train.docs.bin"
    path.write_bytes(path.read_bytes()[:-4])
    with pytest.raises(UserError, match="damaged"):
        sft_packing.load_packed(tmp_path, "train")


def test_batches_never_predict_across_conversations(tmp_path, encoder):
    es = encoded_source(encoder, CONVERSATIONS * 3)
    # every stored weight 1 (even <|begin_of_text|>): only the document logic can zero a boundary target
    es.classes = np.full_like(es.classes, sft_packing.CLS_ASSISTANT)
    block = 200
    items = np.stack([np.zeros(len(es), np.int64), es.offsets[:-1], es.offsets[1:]], axis=1)
    blocks = sft_packing.pack_best_fit(es.lengths(), block)
    sft_packing.write_packed(tmp_path, "train", [es], items, blocks, block, encoder.vocab_size, user_weight=0.0)
    p = sft_packing.load_packed(tmp_path, "train")
    seen = []
    for rank in range(2):
        batches = list(sft_packing.sft_batches(p, micro_batch=2, seed=3, epoch=1, rank=rank, world_size=2))
        assert len(batches) == sft_packing.num_sft_batches(p.n_blocks, 2, 2)
        for b in batches:
            tok, tgt, w, docs, pos = b["tokens"], b["targets"], b["weights"], b["doc_ids"], b["positions"]
            assert tok.shape == tgt.shape == w.shape == docs.shape == pos.shape == (2, block)
            for r in range(2):
                if np.all(docs[r] == sft_packing.PAD_DOC_ID):
                    assert not w[r].any()  # filler row
                    continue
                seen.append(tok[r].tobytes())
                for t in range(block - 1):
                    if docs[r, t] != docs[r, t + 1] or docs[r, t] == sft_packing.PAD_DOC_ID:
                        assert w[r, t] == 0 and tgt[r, t] == p.pad_id  # a conversation's last token predicts nothing
                    else:
                        assert tgt[r, t] == tok[r, t + 1]
                        assert w[r, t] == p.weights[np.flatnonzero((p.tokens == tok[r]).all(1))[0], t + 1]
                assert w[r, -1] == 0
    assert sorted(seen) == sorted(p.tokens[i].astype(np.int64).tobytes() for i in range(p.n_blocks))  # each block once
    # total target weight = total stored weight minus the first token of each conversation
    total = sum(b["weights"].sum() for rank in range(2) for b in sft_packing.sft_batches(p, 2, rank=rank, world_size=2))
    assert total == pytest.approx(float(p.weights.sum()) - 3 * len(CONVERSATIONS))


# -- over-long conversations ---------------------------------------------------------------------------------
def test_overlong_policies(encoder):
    conv, _ = sft.check_conversation(CONVERSATIONS[0], encoder.special_re)
    enc = encoder.encode(conv)
    n = len(enc.ids)
    ids, cls, status = sft.fit_to_block(enc, n, "drop")
    assert status == "ok" and len(ids) == n
    with pytest.raises(sft.DroppedRow, match="overlong"):
        sft.fit_to_block(enc, n - 1, "drop")
    # truncate at a turn boundary: identical to encoding the shorter conversation
    ids, cls, status = sft.fit_to_block(enc, n - 1, "truncate")
    first = encoder.encode(conv[:3])
    assert status == "truncated_turns" and ids.tolist() == first.ids.tolist() and cls.tolist() == first.classes.tolist()
    # not even the first answer fits: cut mid-answer if an assistant token survives, else drop
    first_answer_start = int(np.flatnonzero(first.classes == sft_packing.CLS_ASSISTANT)[0])
    ids, cls, status = sft.fit_to_block(enc, first_answer_start + 2, "truncate")
    assert status == "truncated_mid_turn" and len(ids) == first_answer_start + 2 and (cls == sft_packing.CLS_ASSISTANT).sum() == 2
    with pytest.raises(sft.DroppedRow, match="overlong"):
        sft.fit_to_block(enc, first_answer_start, "truncate")


def test_heldout_split_and_source_weights_are_deterministic():
    convs = [[{"role": "user", "content": f"domanda {i}"}, {"role": "assistant", "content": f"risposta {i}"}] for i in range(4000)]
    res = [sft.split_and_copies(c, "src", 1.5, 0.1, seed=7) for c in convs]
    assert res == [sft.split_and_copies(c, "src", 1.5, 0.1, seed=7) for c in convs]
    heldout = np.array([h for h, _ in res])
    copies = np.array([k for h, k in res if not h])
    assert 0.08 < heldout.mean() < 0.12 and set(copies) == {1, 2} and 1.45 < copies.mean() < 1.55
    assert all(k == 0 for h, k in res if h)  # eval conversations are never also trained on
    # the split is by content: another source weight or seed does not move it
    assert [h for h, _ in res] == [sft.split_and_copies(c, "other", 0.5, 0.1, seed=1)[0] for c in convs]
    small = [k for h, k in (sft.split_and_copies(c, "src", 0.25, 0.0, seed=7) for c in convs)]
    assert 0.22 < np.mean(small) < 0.28


# -- the stage end to end -------------------------------------------------------------------------------------
@pytest.fixture()
def run_with_tokenizer(tmp_path, tokenizer):
    """A run folder whose 02_tokenizer is complete (made through the real Stage lifecycle)."""
    run = RunConfig(name="t", root=str(tmp_path / "runs"))
    write_tokenizer_stage(run, tokenizer)
    return run


def stage6(run, tmp_path, capsys, sources_yaml: str, extra: str = "", args: tuple = ()) -> tuple[int, str]:
    cfg = tmp_path / "sft_data.yaml"
    cfg.write_text(f"run: {{name: {run.name}, root: {run.root}, seed: 5}}\nsft_data:\n{extra}  sources:\n{sources_yaml}")
    script = runpy.run_path(str(ROOT / "6_build_sft.py"), run_name="stage6_test")
    code = run_stage("06_sft_data", "stage 6", script["main"], format_version=sft.FORMAT_VERSION,
                     validate=script["validate"], dry_run=script["dry_run"], argv=["--config", str(cfg), *args])
    out = capsys.readouterr()
    return code, out.out + out.err


SAMPLE_SOURCES = "".join(
    f"    - {{name: {n}, kind: local, path: {SAMPLE / f}, format: {fmt}, lang: {lang}, weight: {w}}}\n"
    for n, f, fmt, lang, w in [
        ("it-msg", "it_messages.jsonl", "messages", "it", 1.0),
        ("it-alpaca", "it_alpaca.jsonl", "alpaca", "it", 1.5),
        ("en-sharegpt", "en_sharegpt.jsonl", "sharegpt", "en", 1.0),
        ("en-pr", "en_prompt_response.jsonl", "prompt_response", "en", 1.0),
        ("code", "code_messages.jsonl", "messages", "code", 2.0),
        ("bad", "malformed.jsonl", "messages", "it", 1.0),
    ]
)


def test_stage6_end_to_end_writes_arrays_and_manifest(run_with_tokenizer, tmp_path, capsys):
    code, out = stage6(run_with_tokenizer, tmp_path, capsys, SAMPLE_SOURCES,
                       "  block_size: 512\n  heldout_fraction: 0.1\n  overlong: truncate\n")
    assert code == 0, out
    d = Path(run_with_tokenizer.root) / "t" / "06_sft_data"
    m = read_json(d / "manifest.json")
    c = m["counts"]
    assert c["rows_read"] == 117 and c["conversations_kept"] == 105 and c["conversations_dropped"] == 12
    assert c["dropped_by_reason"]["roles_out_of_order"] == 3 and c["dropped_by_reason"]["special_token_text"] == 1
    assert c["train"]["unique_conversations"] + c["eval"]["conversations"] == 105
    assert c["train"]["conversations"] > c["train"]["unique_conversations"]  # weights 1.5 and 2 repeat
    assert set(c["train"]["token_share_by_lang"]) == {"it", "en", "code"}
    assert sum(c["train"]["token_share_by_source"].values()) == pytest.approx(1.0, abs=1e-5)
    for split in ("train", "eval"):
        p = sft_packing.load_packed(d, split)
        x = c[split]
        assert p.tokens.shape == (x["blocks"], 512) == tuple(m["outputs"][split]["tokens"]["shape"])
        assert int((p.doc_ids != sft_packing.PAD_DOC_ID).sum()) == x["tokens"]
        assert float(p.weights.sum()) == pytest.approx(x["weighted_tokens"])
        assert x["padding_pct"] == pytest.approx(100 * (p.doc_ids == sft_packing.PAD_DOC_ID).mean(), abs=1e-3)
        assert x["blocks"] <= x["next_fit_blocks"]
        assert int((p.tokens == 0).sum()) == x["conversations"]  # one <|begin_of_text|> per conversation
    assert (d / "chat_template.jinja").read_text() == chat_format.CHAT_TEMPLATE == m["chat_template"]
    assert not (d / "work").exists() and not (d / "progress.json").exists()
    # a second run is a no-op
    code, out = stage6(run_with_tokenizer, tmp_path, capsys, SAMPLE_SOURCES,
                       "  block_size: 512\n  heldout_fraction: 0.1\n  overlong: truncate\n")
    assert code == 0 and "already complete" in out
    # --force with a source that cannot be read is refused before the finished folder is reset
    before = {f.name: f.read_bytes() for f in d.iterdir()}
    code, out = stage6(run_with_tokenizer, tmp_path, capsys, SAMPLE_SOURCES.replace("code_messages", "gone"),
                       "  block_size: 512\n  heldout_fraction: 0.1\n  overlong: truncate\n", args=("--force",))
    assert code == 2 and "gone.jsonl" in out
    assert {f.name: f.read_bytes() for f in d.iterdir()} == before


def test_stage6_resumes_after_an_interruption(run_with_tokenizer, tmp_path, capsys, monkeypatch):
    calls = []
    real = sft.encode_source

    def flaky(src, *a, **kw):
        calls.append(src.name)
        if src.name == "en-pr" and calls.count("en-pr") == 1:
            raise KeyboardInterrupt  # the machine went away in the middle of the fourth source
        return real(src, *a, **kw)

    monkeypatch.setattr(sft, "encode_source", flaky)
    with pytest.raises(KeyboardInterrupt):
        stage6(run_with_tokenizer, tmp_path, capsys, SAMPLE_SOURCES, "  block_size: 512\n")
    d = Path(run_with_tokenizer.root) / "t" / "06_sft_data"
    assert not (d / "manifest.json").exists() and sorted(p.name for p in (d / "work").iterdir()) == [
        "en-sharegpt.npz", "it-alpaca.npz", "it-msg.npz"]
    code, out = stage6(run_with_tokenizer, tmp_path, capsys, SAMPLE_SOURCES, "  block_size: 512\n")
    assert code == 0, out
    assert calls == ["it-msg", "it-alpaca", "en-sharegpt", "en-pr", "en-pr", "code", "bad"]
    assert "reusing" in out and read_json(d / "manifest.json")["counts"]["conversations_kept"] == 105


def test_stage6_bad_inputs_give_clear_errors(run_with_tokenizer, tmp_path, capsys):
    one = f"    - {{name: a, kind: local, path: {SAMPLE / 'it_messages.jsonl'}, format: messages}}\n"
    d = Path(run_with_tokenizer.root) / "t" / "06_sft_data"
    # a format that does not exist: a config error naming the key, before any work
    bad = one.replace("format: messages", "format: chatml")
    code, out = stage6(run_with_tokenizer, tmp_path, capsys, bad, "  block_size: 512\n")
    assert code == 2 and "sft_data.sources[0].format" in out
    # a missing local file, found before any work
    code, out = stage6(run_with_tokenizer, tmp_path, capsys, one.replace("it_messages", "nope"), "  block_size: 512\n")
    assert code == 2 and "no file matches" in out
    # an empty file: said so, naming it (not an empty "dropped by reason" list)
    (tmp_path / "empty.jsonl").write_text("\n")
    code, out = stage6(run_with_tokenizer, tmp_path, capsys, one.replace(str(SAMPLE / "it_messages.jsonl"),
                                                                         str(tmp_path / "empty.jsonl")), "  block_size: 512\n")
    assert code == 2 and "empty.jsonl is empty" in out and "dropped by reason" not in out, out
    assert not d.exists()  # refused before the folder was made
    # a gzip cut short after its first rows: the file and the fix, not a raw EOFError
    data = gzip.compress((SAMPLE / "it_messages.jsonl").read_bytes())
    (tmp_path / "cut.jsonl.gz").write_bytes(data[: len(data) // 2])
    code, out = stage6(run_with_tokenizer, tmp_path, capsys, one.replace(str(SAMPLE / "it_messages.jsonl"),
                                                                         str(tmp_path / "cut.jsonl.gz")), "  block_size: 512\n")
    assert code == 2 and "cut.jsonl.gz cannot be read after line" in out and "Traceback" not in out, out
    assert not (d / "manifest.json").exists()
    # block size shorter than every conversation, policy drop: all counted as overlong -> nothing left
    code, out = stage6(run_with_tokenizer, tmp_path, capsys, one, "  block_size: 20\n  overlong: drop\n")
    assert code == 2 and "no conversation survived" in out and "overlong: 28" in out and "raise sft_data.block_size" in out
    assert not (d / "manifest.json").exists()


def test_stage6_requires_the_tokenizer(tmp_path, capsys):
    run = RunConfig(name="t", root=str(tmp_path / "runs"))
    one = f"    - {{name: a, kind: local, path: {SAMPLE / 'it_messages.jsonl'}, format: messages}}\n"
    code, out = stage6(run, tmp_path, capsys, one, "  block_size: 512\n")
    assert code == 2 and "2_train_tokenizer.py" in out


def test_stage6_refuses_a_truncated_tokenizer_naming_the_file_and_the_fix(run_with_tokenizer, tmp_path, capsys):
    path = Path(run_with_tokenizer.root) / "t" / "02_tokenizer" / "tokenizer.json"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    one = f"    - {{name: a, kind: local, path: {SAMPLE / 'it_messages.jsonl'}, format: messages}}\n"
    code, out = stage6(run_with_tokenizer, tmp_path, capsys, one, "  block_size: 512\n")
    assert code == 2 and str(path) in out and "truncated or damaged" in out, out
    assert "python 2_train_tokenizer.py" in out and "--force" in out and "Traceback" not in out
    assert not (Path(run_with_tokenizer.root) / "t" / "06_sft_data").exists()


def test_profiles_load():
    for profile in ("tiny", "dante-2b"):
        cfg = load_config(SFTDataStageConfig, ROOT / "configs" / profile / "sft_data.yaml")
        assert {s.lang for s in cfg.sft_data.sources} >= {"it", "en"}
        assert not sft.check_sources([s for s in cfg.sft_data.sources if s.kind == "local"], cfg.sft_data.block_size)
    assert SPECIAL_TOKENS[chat_format.SPECIAL_IDS[chat_format.EOT]] == "<|eot|>" and json.dumps(chat_format.SPECIAL_IDS)


def _stage6_files(d: Path) -> dict[str, bytes]:
    return stage_files(d)


def test_stage6_sigkill_at_random_points_then_rerun_gives_the_same_bytes(tmp_path, tokenizer):
    """The tiny profile, killed (SIGKILL) at seeded random moments of its work, then rerun: every file equals
    an uninterrupted run's byte for byte (manifests without their timing fields), and no temporary is left."""
    write_tokenizer_stage(RunConfig(name="tiny", root=str(tmp_path / "runs")), tokenizer)
    cmd = [sys.executable, str(ROOT / "6_build_sft.py"), "--config", "configs/tiny/sft_data.yaml",
           "--set", f"run.root={tmp_path / 'runs'}"]
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    d = tmp_path / "runs/tiny/06_sft_data"
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    reference = _stage6_files(d)
    n_lines = len(r.stdout.splitlines())  # one per source, then one per split
    rng = random.Random(1306)
    killed = 0
    for after_line in rng.sample(range(n_lines), 4):  # 4 different moments: encoding, packing, final writes
        shutil.rmtree(d)
        delay = rng.uniform(0.0, 0.02)
        p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for _ in range(after_line + 1):  # the kill lands between two log lines of the work, not at import
            p.stdout.readline()
        time.sleep(delay)
        p.send_signal(signal.SIGKILL)
        p.communicate(timeout=60)
        killed += p.returncode == -signal.SIGKILL
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
        assert _stage6_files(d) == reference, f"differs after a kill after log line {after_line} + {delay:.3f} s"
        assert not [p for p in d.rglob(".*") if p.name.endswith(".tmp")]
    assert killed >= 2  # most points must interrupt real work (each one reached a log line of it first)


def test_stage6_refuses_a_source_that_keeps_nothing(run_with_tokenizer, tmp_path, capsys):
    """One good source and one that is not JSON Lines at all: refused naming the empty-handed source, not a
    success that silently trains on the other."""
    (tmp_path / "prose.jsonl").write_text("just prose\n" * 20)
    two = (f"    - {{name: a, kind: local, path: {SAMPLE / 'it_messages.jsonl'}, format: messages}}\n"
           f"    - {{name: prose, kind: local, path: {tmp_path / 'prose.jsonl'}, format: messages}}\n")
    code, out = stage6(run_with_tokenizer, tmp_path, capsys, two, "  block_size: 512\n")
    assert code == 2 and "source 'prose': no conversation survived of its 20 rows" in out, out
    assert "sft_data.sources[1]" in out and "Traceback" not in out
    assert not (Path(run_with_tokenizer.root) / "t" / "06_sft_data" / "manifest.json").exists()


def test_packed_files_are_checked_against_the_checksums_stage_6_recorded(tmp_path, encoder):
    """Flipped bytes keep a file's size and header: only the recorded sha256 tells (stage 7 passes it)."""
    es = encoded_source(encoder, CONVERSATIONS * 4)
    items = np.stack([np.zeros(len(es), np.int64), es.offsets[:-1], es.offsets[1:]], axis=1)
    blocks = sft_packing.pack_best_fit(es.lengths(), 256)
    recorded = sft_packing.write_packed(tmp_path, "train", [es], items, blocks, 256, encoder.vocab_size, user_weight=0.5)
    assert sft_packing.load_packed(tmp_path, "train", recorded).n_blocks == len(blocks)
    path = tmp_path / "train.tokens.bin"
    data = bytearray(path.read_bytes())
    data[-64:] = bytes(b ^ 0xFF for b in data[-64:])
    path.write_bytes(bytes(data))
    with pytest.raises(UserError, match=r"(?s)train.tokens.bin: its sha256 differs.*6_build_sft.py --config"):
        sft_packing.load_packed(tmp_path, "train", recorded)
