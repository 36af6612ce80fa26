"""Stage 9's proof that the Hugging Face folder is our model: load it with plain transformers and compare.

``verify_export`` (on by default; any failure raises ``VerificationError`` and no manifest is written)
compares, each in its own ``_compare_*``:

- logits of the native model vs the exported one on real held-out text in fp32, windows as long as the
  model's context (so a YaRN model is compared beyond its original length);
- greedy continuations (stage 8's KV-cache generator vs ``generate``);
- tokenizer ids and decoding (``AutoTokenizer`` vs ``dante.tokenizer``);
- for an SFT model, chat-template ids (``apply_chat_template`` vs ``dante.sft_data.ChatEncoder``).

For a bf16/fp16 export the native model runs with the exported weights (rounded, then upcast to fp32), so
the comparison tests the conversion and not the rounding; the rounding's own effect on the logits is
reported separately. ``transformers`` is imported inside the functions that load or drive it: its model
classes cost seconds to import, and ``--help`` or a run with ``export.verify: false`` never needs them.

Example::

    results = verify_export(cfg, stage_dir(cfg.run, C.EXPORT), model, tokenizer, source, texts_by_lang)
    results["logits"]["max_abs_diff"] <= results["logits"]["bound"]
"""

from __future__ import annotations

import contextlib
import itertools
from pathlib import Path
from typing import Any

import torch

from dante import chat_format
from dante import config as C
from dante import sft_data as sft
from dante.artifacts import read_manifest, stage_done
from dante.errors import StageError, problems_message
from dante.evaluation.generation import GREEDY, generate
from dante.evaluation.loading import resolve_device
from dante.export.run_inputs import Source
from dante.tokenizer import BOS_ID, EOS_ID, PAD_ID, SPECIAL_TOKENS

#: Logit comparison bound: max |native - exported| <= LOGIT_RTOL * max(1, max |native logit|), in fp32.
#: Both sides run the same fp32 math with different kernels (SDPA with enable_gqa vs repeated KV heads), so
#: only rounding may differ: measured 0.0 on CPU for the tiny models of tests/test_export.py. Real mistakes
#: are orders of magnitude above the bound (tiny YaRN model, 256 tokens, bound 7e-4): rope_scaling left out
#: of config.json 0.57, rms_norm_eps 1e-6 instead of 1e-5 0.021.
LOGIT_RTOL = 1e-4

#: Prompt tokens for the greedy comparison (the start of each verification window).
PROMPT_TOKENS = 32

#: Conversations always checked through the chat template (besides stage 6's local sources): a system
#: prompt, several turns, accents, code, leading/trailing whitespace that both paths must trim alike.
BUILTIN_CONVERSATIONS: list[list[dict]] = [
    [
        {"role": "system", "content": "Sei un assistente che risponde in italiano, in modo conciso."},
        {"role": "user", "content": "Qual è la capitale d'Italia?"},
        {"role": "assistant", "content": "La capitale d'Italia è Roma."},
        {"role": "user", "content": "  E quella della Francia?  "},
        {"role": "assistant", "content": "Parigi.\n"},
    ],
    [
        {"role": "user", "content": "Write a Python function that returns the square of a number."},
        {"role": "assistant", "content": "def square(x):\n    return x * x\n\nprint(square(4))  # 16"},
    ],
    [
        {"role": "user", "content": "Traduci in inglese: «Perché l'intelligenza artificiale c'è già?»"},
        {"role": "assistant", "content": "\"Why is artificial intelligence already here?\""},
    ],
]


class VerificationError(StageError):
    """The export does not reproduce the native model; nothing is marked done."""


@contextlib.contextmanager
def _quiet_transformers():
    """No progress bars or 'sequence longer than model_max_length' warnings while verifying (whole documents
    are tokenized on purpose); anything wrong is caught by the comparisons themselves."""
    from transformers.utils import logging as hf_logging  # heavy: see the module docstring

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


@contextlib.contextmanager
def _exact_fp32():
    """Full fp32 matmuls for the comparison: on GPUs, TF32 (10-bit mantissa) would differ by ~1e-3 relative."""
    saved = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(saved)


def verification_windows(tokenizer, texts_by_lang: dict[str, list[str]], n_windows: int, seq_len: int) -> list[list[int]]:
    """Up to n_windows windows of seq_len real tokens, taken from the languages in turn. Each language's
    documents are concatenated as text <|end_of_text|> (stage 3's stream layout), so windows cross documents."""
    per_lang = []
    for lang in sorted(texts_by_lang):
        stream: list[int] = []
        for text in texts_by_lang[lang]:
            stream += tokenizer.encode(text, add_special_tokens=False).ids + [EOS_ID]
            if len(stream) >= n_windows * seq_len:
                break
        per_lang.append([stream[i:i + seq_len] for i in range(0, len(stream) - seq_len + 1, seq_len)])
    interleaved = [w for group in itertools.zip_longest(*per_lang) for w in group if w is not None]
    return interleaved[:n_windows]


def _native_logits(model, tokens_BT):
    return model.logits(model(tokens_BT)).float()


def native_greedy(model, prompt: list[int], n_tokens: int) -> list[int]:
    """Greedy continuation with stage 8's generator (KV cache), never stopping early."""
    return generate(model, prompt, max_new_tokens=n_tokens, params=GREEDY, stop_ids=()).new_tokens


def hf_greedy(hf_model, prompt: list[int], n_tokens: int) -> list[int]:
    """Greedy continuation with transformers' generate: its generation_config.json defaults (sampling,
    repetition penalty, eos) replaced for the call, so exactly n_tokens argmax tokens come back."""
    from transformers import GenerationConfig  # heavy: see the module docstring

    device = next(hf_model.parameters()).device
    saved = hf_model.generation_config
    hf_model.generation_config = GenerationConfig(
        do_sample=False, max_new_tokens=n_tokens, min_new_tokens=n_tokens, eos_token_id=None, pad_token_id=PAD_ID,
        bos_token_id=BOS_ID)
    try:
        ids = torch.tensor([prompt], device=device)
        out = hf_model.generate(ids, attention_mask=torch.ones_like(ids))
    finally:
        hf_model.generation_config = saved
    return out[0, len(prompt):].tolist()


def _greedy_tie(model, prefix: list[int], a: int, b: int, bound: float) -> float | None:
    """If tokens a and b are within the logit bound at this prefix (a numerical tie), their gap; else None."""
    device = next(model.parameters()).device
    logits_V = _native_logits(model, torch.tensor([prefix], device=device))[0, -1]
    gap = abs(float(logits_V[a] - logits_V[b]))
    return gap if gap <= bound else None


def sft_conversations(cfg: C.ExportStageConfig, encoder, limit: int) -> list[list[dict]]:
    """Real conversations from stage 6's local sources (validated like stage 6 does), then the built-in ones."""
    convs: list[list[dict]] = []
    if stage_done(cfg.run, C.SFT_DATA):
        sft_cfg = C.from_dict(C.SFTDataStageConfig, read_manifest(cfg.run, C.SFT_DATA)["config"])
        for src in sft_cfg.sft_data.sources:
            if src.kind != "local":
                continue  # the export never needs the network
            for row in sft.iter_source_rows(src):
                if len(convs) >= limit:
                    break
                if isinstance(row, sft.DroppedRow):
                    continue
                try:
                    messages = sft.normalize_row(row, src.format, getattr(src, "columns", None))
                    messages, _ = sft.check_conversation(messages, encoder.special_re)
                except sft.DroppedRow:
                    continue
                convs.append(messages)
    return convs + [list(c) for c in BUILTIN_CONVERSATIONS]


def _as_ids(result) -> list[int]:
    """apply_chat_template(tokenize=True) returns a list (4.x) or a BatchEncoding (5.x)."""
    if isinstance(result, dict) or hasattr(result, "keys"):
        result = result["input_ids"]
    return [int(i) for i in result]


def verify_export(cfg: C.ExportStageConfig, out_dir: Path, native_model, tokenizer, source: Source,
                  texts_by_lang: dict[str, list[str]]) -> dict:
    """Load ``out_dir`` with AutoModelForCausalLM/AutoTokenizer and compare it with the native model.

    Returns the results (for the manifest and the card); raises VerificationError listing every failure.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig  # heavy: see the module docstring

    e, m = cfg.export, source.model_cfg
    device = resolve_device(e.verify_device)
    seq_len = min(e.verify_seq_len or m.max_seq_len, m.max_seq_len)
    windows = verification_windows(tokenizer, texts_by_lang, e.verify_windows, seq_len)
    if not windows:
        raise VerificationError(f"export.heldout holds fewer than {seq_len} tokens: no window to compare; "
                                "add text or lower export.verify_seq_len")
    results: dict[str, Any] = {"device": device.type, "logit_rtol": LOGIT_RTOL}
    failures: list[str] = []
    native_model = native_model.to(device).eval()
    with _quiet_transformers(), torch.inference_mode(), _exact_fp32():
        results["dtype_rounding_max_abs_logit_change"] = _round_to_export_dtype(native_model, e.dtype, windows[0])
        try:  # load the export exactly as a user would
            hf_model = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32).to(device).eval()
            hf_tok = AutoTokenizer.from_pretrained(out_dir)
            results["generation_eos_token_id"] = GenerationConfig.from_pretrained(out_dir).eos_token_id
        except Exception as err:  # any load failure is the finding: report it, do not crash
            raise VerificationError(f"transformers cannot load the export in {out_dir}: {type(err).__name__}: {err}") from None
        results["hf_class"] = type(hf_model).__name__
        results["logits"] = _compare_logits(native_model, hf_model, windows, m, failures)
        prompts = [w[:PROMPT_TOKENS] for w in windows]
        if source.is_chat:
            prompts.append(chat_format.ChatEncoder(tokenizer).encode(BUILTIN_CONVERSATIONS[0][:2], add_generation_prompt=True).ids.tolist())
        bound = LOGIT_RTOL * max(1.0, results["logits"]["max_abs_logit"])
        results["greedy"] = _compare_greedy(native_model, hf_model, prompts, e.verify_tokens, bound, failures)
        texts = [t for lang in sorted(texts_by_lang) for t in texts_by_lang[lang]]
        results["tokenizer"] = _compare_tokenizers(tokenizer, hf_tok, texts, failures)
        if source.is_chat:
            results["chat_template"] = _compare_chat_template(cfg, tokenizer, hf_tok, failures)
    if failures:
        raise VerificationError(
            problems_message(f"the export in {out_dir} does not reproduce the native model ({len(failures)} problem(s))",
                             failures) + "\n  Nothing was marked done."
        )
    return results


def _round_to_export_dtype(native_model, dtype: str, window: list[int]) -> float:
    """Give the native model the exported weights (rounded to dtype, kept in fp32); return how much that
    rounding alone moves the logits on one window (reported, not bounded: it is the release's precision)."""
    if dtype == "float32":
        return 0.0
    ids = torch.tensor([window], device=next(native_model.parameters()).device)
    before = _native_logits(native_model, ids)
    for p in native_model.parameters():
        p.data = p.data.to(getattr(torch, dtype)).float()
    return float((_native_logits(native_model, ids) - before).abs().max())


def _compare_logits(native_model, hf_model, windows: list[list[int]], m: C.ModelConfig, failures: list[str]) -> dict:
    device = next(native_model.parameters()).device
    worst_ratio, worst, worst_bound, max_logit = -1.0, 0.0, 0.0, 0.0
    for w in windows:
        ids = torch.tensor([w], device=device)
        ours, theirs = _native_logits(native_model, ids), hf_model(input_ids=ids).logits.float()
        diff, top = float((ours - theirs).abs().max()), float(ours.abs().max())
        bound = LOGIT_RTOL * max(1.0, top)
        max_logit = max(max_logit, top)
        if diff > bound:
            failures.append(f"logits differ: max |native - exported| = {diff:.3g} > bound {bound:.3g} on a {len(w)}-token window")
        if diff / bound > worst_ratio:
            worst_ratio, worst, worst_bound = diff / bound, diff, bound
    original = (m.rope_scaling or {}).get("original_max_position_embeddings")
    return {"windows": len(windows), "tokens_per_window": len(windows[0]), "max_abs_diff": worst, "bound": worst_bound,
            "max_abs_logit": max_logit,
            "positions_beyond_original_context": max(0, len(windows[0]) - original) if original else 0}


def _compare_greedy(native_model, hf_model, prompts: list[list[int]], n_tokens: int, tie_bound: float,
                    failures: list[str]) -> dict:
    """Greedy continuations, every token compared (stopping at <|eot|> is the chat test's job). A first
    difference where both tokens are within the logit bound is a numerical tie, recorded, not a failure."""
    # A prompt must leave room for one new token in the model's context (the built-in chat prompt alone is
    # longer than a tiny model's 64 positions); longer ones are counted as skipped, not generated past the end.
    limit = native_model.cfg.max_seq_len
    fitting = [p for p in prompts if len(p) < limit - 1]
    n_new = min(n_tokens, limit - max((len(p) for p in fitting), default=limit) - 1)
    stats = {"prompts": len(fitting), "tokens": max(n_new, 0), "identical": 0, "ties": [],
             "skipped_longer_than_context": len(prompts) - len(fitting)}
    for prompt in fitting:
        ours, theirs = native_greedy(native_model, prompt, n_new), hf_greedy(hf_model, prompt, n_new)
        if ours == theirs:
            stats["identical"] += 1
            continue
        k = next(i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b)
        gap = _greedy_tie(native_model, prompt + ours[:k], ours[k], theirs[k], tie_bound)
        if gap is not None:
            stats["ties"].append({"step": k, "logit_gap": gap})
        else:
            failures.append(f"greedy continuations differ at step {k}: native {ours} vs transformers {theirs}")
    return stats


def _compare_tokenizers(tokenizer, hf_tok, texts: list[str], failures: list[str]) -> dict:
    """Ids (with and without add_special_tokens) and decoding on real text. Documents containing a special
    token's text are skipped: transformers turns that text into the special id, ours never does (by design,
    see dante/tokenizer.py)."""
    specials = [t.content for t in tokenizer.get_added_tokens_decoder().values()]
    stats = {"documents": 0, "tokens": 0, "skipped_special_text": 0, "mismatches": 0}
    for text in texts:
        if any(s in text for s in specials):
            stats["skipped_special_text"] += 1
            continue
        ours = tokenizer.encode(text, add_special_tokens=False).ids
        same = (hf_tok(text, add_special_tokens=False)["input_ids"] == ours and hf_tok(text)["input_ids"] == ours
                and hf_tok.decode(ours) == tokenizer.decode(ours, skip_special_tokens=False))
        stats["documents"] += 1
        stats["tokens"] += len(ours)
        if not same:
            stats["mismatches"] += 1
            if stats["mismatches"] <= 3:
                failures.append(f"tokenizer ids or decoding differ on held-out text {text[:60]!r}...")
    for name, token_id in (("bos", BOS_ID), ("pad", PAD_ID)):
        got = getattr(hf_tok, f"{name}_token_id")
        if got != token_id:
            failures.append(f"AutoTokenizer {name}_token_id={got}, expected {token_id} ({SPECIAL_TOKENS[token_id]})")
    return stats


def _compare_chat_template(cfg: C.ExportStageConfig, tokenizer, hf_tok, failures: list[str]) -> dict:
    """apply_chat_template (the exported Jinja) vs dante.sft_data.ChatEncoder (the training ids), whole
    conversations and generation prompts."""
    encoder = chat_format.ChatEncoder(tokenizer)
    convs = sft_conversations(cfg, encoder, cfg.export.verify_conversations)
    stats = {"conversations": len(convs), "identical": 0}
    for conv in convs:
        cases = [(conv, False)] + ([(conv[:-1], True)] if conv[-1]["role"] == "assistant" else [])
        same = True
        for messages, gen_prompt in cases:
            ours = encoder.encode(messages, add_generation_prompt=gen_prompt).ids.tolist()
            theirs = _as_ids(hf_tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=gen_prompt))
            if ours != theirs:
                same = False
                failures.append(f"chat template ids differ (add_generation_prompt={gen_prompt}) for a conversation "
                                f"starting {messages[0]['content'][:40]!r}")
        stats["identical"] += same
    return stats
