"""Stage 8 as a library: plan (every check, no weights), evaluate one checkpoint (chat: ``chat.py``).

``make_plan`` runs every check that needs no weights before anything expensive starts, and reports all
problems in one error: the config values; that 02_tokenizer is done and its tokenizer.json is the file it
wrote; which checkpoints exist (absent stages are skipped with a note, at least one must remain) and that
their files are readable (``loading.checkpoint_problems``); that each checkpoint belongs with the run's
tokenizer (``dante.checkpoint.tokenizer_problems``); held-out files that exist and hold text; local benchmark
files and lm-eval task names; and that every long-context length fits at least one checkpoint (a length
no checkpoint supports is an error; a length beyond one checkpoint's context is skipped for that
checkpoint only, with a note, so a base model and its YaRN extension can share one config).

``evaluate_checkpoint`` computes, for one loaded model: perplexity/bpb per held-out language and per
stage 3 validation tier, lm-eval benchmarks, generation samples (chat-formatted for 07_sft checkpoints)
with tokens/s, and the long-context metrics of ``dante.evaluation.long_context``.

Example::

    plan = make_plan(cfg)
    for ref in plan.refs:
        result = evaluate_checkpoint(load_for_eval(ref, plan.tokenizer, cfg.eval.device, cfg.eval.dtype), cfg, plan)
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from dante import config as C
from dante.artifacts import load_texts, stage_dir, stage_done
from dante.chat_format import ChatEncoder
from dante.checkpoint import CheckpointRef, find_checkpoints, read_model_config, tokenizer_problems
from dante.errors import StageError, UserError, raise_problems
from dante.evaluation import long_context as lc
from dante.evaluation.generation import SamplingParams, generate
from dante.evaluation.loading import LoadedModel, checkpoint_problems, run_tokenizer
from dante.evaluation.perplexity import (
    encode_texts,
    perplexity_of_token_docs,
    token_byte_lengths,
    val_shard_documents,
)
from dante.shards import list_shards
from dante.tokenizer import BOS_ID, EOS_ID, SPECIAL_TOKENS


@dataclass
class EvalPlan:
    refs: list[CheckpointRef]
    notes: list[str]
    tokenizer_path: Path
    tokenizer: Any
    heldout: dict[str, list[list[int]]]
    """Held-out documents per language, tokenized (text tokens only)."""
    shards_dir: Path | None
    """Stage 3 folder when its validation shards are scored."""
    model_cfgs: dict[str, C.ModelConfig]
    """Per checkpoint label, read from model_config.json (no weights)."""
    task_manager: Any = None
    long_lengths: dict[str, list[int]] = field(default_factory=dict)
    """Per checkpoint label: the long-context lengths it supports."""

    def describe(self) -> list[str]:
        lines = [f"tokenizer: {self.tokenizer_path} ({self.tokenizer.get_vocab_size()} ids)"]
        for ref in self.refs:
            m = self.model_cfgs[ref.label]
            lines.append(f"checkpoint {ref.label}: {ref.path} (context {m.max_seq_len}, rope_scaling "
                         f"{m.rope_scaling or 'none'}; long-context lengths {self.long_lengths.get(ref.label) or 'none'})")
        lines += [f"held-out {lang}: {len(docs)} documents" for lang, docs in self.heldout.items()]
        lines.append(f"validation shards: {self.shards_dir or 'not scored'}")
        return lines + [f"note: {n}" for n in self.notes]


def config_problems(e: C.EvalConfig) -> list[str]:
    p = []
    if e.batch_size <= 0:
        p.append(f"eval.batch_size={e.batch_size}: must be > 0")
    if e.max_eval_tokens < 0 or e.stride < 0 or e.task_limit < 0:
        p.append("eval.max_eval_tokens, eval.stride and eval.task_limit must be >= 0 (0 means no cap / default / all)")
    if e.num_fewshot < -1:
        p.append(f"eval.num_fewshot={e.num_fewshot}: use -1 (task default) or a count >= 0")
    if not e.checkpoints:
        p.append("eval.checkpoints: empty; list stage names (04_pretrain, 05_extend, 07_sft) or checkpoint paths")
    bad_langs = [k for k in e.heldout if k not in ("it", "en", "code")]
    if bad_langs:
        p.append(f"eval.heldout: keys must be among it, en, code; got {bad_langs}")
    g = e.generation
    p += [f"eval.generation: {x}" for x in SamplingParams.from_config(g).problems()]
    if g.max_new_tokens < 0:
        p.append("eval.generation.max_new_tokens must be >= 0 (0 skips generation)")
    unknown = [t for t in g.stop_tokens if t not in SPECIAL_TOKENS]
    if unknown:
        p.append(f"eval.generation.stop_tokens: {unknown} are not special tokens ({SPECIAL_TOKENS})")
    p += C.long_eval_problems(e.long_eval, "eval.long_eval")
    return p


def read_heldout(e: C.EvalConfig) -> tuple[dict[str, list[str]], list[str]]:
    docs, problems = {}, []
    for lang, path in sorted(e.heldout.items()):
        p = Path(path)
        if not p.is_file():
            problems.append(f"eval.heldout.{lang}: {p} not found (JSON Lines with a 'text' field, optionally .gz)")
            continue
        try:
            texts = load_texts(p)
        except (ValueError, OSError) as err:
            problems.append(f"eval.heldout.{lang}: {err}")
            continue
        if not texts:
            problems.append(f"eval.heldout.{lang}: empty evaluation set: {p} holds no non-empty text")
        docs[lang] = texts
    return docs, problems


def make_plan(cfg: C.EvalStageConfig, with_tasks: bool = True) -> EvalPlan:
    """Every check that needs no model weights; raises UserError/StageError listing all problems."""
    e = cfg.eval
    problems = config_problems(e)
    # StageError naming 2_train_tokenizer.py when missing; UserError naming the file when damaged
    tokenizer_path, tokenizer = run_tokenizer(cfg.run)
    refs, notes = find_checkpoints(cfg.run, list(e.checkpoints))
    if not refs:
        raise StageError("no checkpoint to evaluate: " + "; ".join(notes) +
                         "\n  HINT: run `python 4_pretrain.py --config configs/<profile>/pretrain.yaml` first, or list "
                         "checkpoint folders in eval.checkpoints / --checkpoints.")
    heldout, heldout_problems = read_heldout(e)
    unreadable = [p for ref in refs for p in checkpoint_problems(ref, notes)]
    if unreadable:  # the checks below read these files: report now, with the problems found so far
        raise_problems(UserError, "stage 8 cannot start", problems + unreadable + heldout_problems)
    model_cfgs = {ref.label: read_model_config(ref.path) for ref in refs}
    for ref in refs:
        problems += tokenizer_problems(ref, model_cfgs[ref.label], tokenizer, tokenizer_path)
    problems += heldout_problems
    heldout_tokens = {lang: encode_texts(tokenizer, texts) for lang, texts in heldout.items()}
    shards_dir = None
    if e.shards:
        if stage_done(cfg.run, C.SHARDS):
            shards_dir = stage_dir(cfg.run, C.SHARDS)
            if not list_shards(shards_dir, "val"):
                notes.append(f"validation shards: none in {shards_dir} (shards.val_fraction is 0?)")
                shards_dir = None
        else:
            notes.append("validation shards: skipped, 03_shards has not run for this run")
    long_lengths = {}
    if e.long_eval.lengths and e.long_eval.trials > 0:
        for ref in refs:
            ctx = model_cfgs[ref.label].max_seq_len
            long_lengths[ref.label] = [n for n in e.long_eval.lengths if n <= ctx]
            too_long = [n for n in e.long_eval.lengths if n > ctx]
            if too_long:
                notes.append(f"{ref.label}: long-context lengths {too_long} skipped: beyond its context of {ctx} tokens")
        available = sum(len(d) + 2 for docs in heldout_tokens.values() for d in docs)
        if available < max(e.long_eval.lengths) and not heldout_problems:
            problems.append(f"eval.long_eval: the held-out text (eval.heldout) has {available} tokens, fewer than one "
                            f"sequence of {max(e.long_eval.lengths)}; add held-out files or use shorter lengths")
        unsupported = [n for n in e.long_eval.lengths if not any(n in v for v in long_lengths.values())]
        if unsupported:
            best = max(m.max_seq_len for m in model_cfgs.values())
            problems.append(f"eval.long_eval.lengths {unsupported}: longer than the context of every checkpoint "
                            f"(at most {best} tokens) and no rope_scaling covers them. HINT: use lengths <= {best}, or "
                            f"extend the context with `python 5_extend_context.py` and evaluate 05_extend.")
    manager = None
    if with_tasks and e.tasks:
        # imported only when tasks are configured: lm-eval is a heavy import (and optional without tasks)
        from dante.evaluation.lm_eval_adapter import check_task_specs, task_manager

        task_problems = check_task_specs(e.tasks, e.task_include_paths)
        problems += task_problems
        if not task_problems:
            try:
                manager = task_manager(e.tasks, e.task_include_paths)
            except UserError as err:
                problems.append(str(err))
    raise_problems(UserError, "stage 8 cannot start", problems)
    return EvalPlan(refs=refs, notes=notes, tokenizer_path=tokenizer_path, tokenizer=tokenizer, heldout=heldout_tokens,
                    shards_dir=shards_dir, model_cfgs=model_cfgs, task_manager=manager, long_lengths=long_lengths)


# ---------------------------------------------------------------------------------------------------
# One checkpoint
# ---------------------------------------------------------------------------------------------------


def generation_prompts(loaded: LoadedModel, g: C.GenerationConfig) -> list[tuple[str, list[int], bool]]:
    """(shown prompt, token ids, chat?) per prompt: chat-formatted user turns for SFT checkpoints."""
    tok = loaded.tokenizer
    if loaded.ref.is_chat:
        enc = ChatEncoder(tok)
        return [(p, enc.encode([{"role": "user", "content": p}], add_generation_prompt=True).ids.tolist(), True)
                for p in g.chat_prompts]
    return [(p, [BOS_ID] + tok.encode(p, add_special_tokens=False).ids, False) for p in g.prompts]


def run_generation(loaded: LoadedModel, g: C.GenerationConfig, seed: int) -> list[dict]:
    if g.max_new_tokens == 0:
        return []
    tok = loaded.tokenizer
    stop_ids = {tok.token_to_id(t) for t in g.stop_tokens}
    samples = []
    for i, (prompt, ids, chat) in enumerate(generation_prompts(loaded, g)):
        ids = ids[-(loaded.model_cfg.max_seq_len - 1):]
        gen = generate(loaded.model, ids, max_new_tokens=g.max_new_tokens, params=SamplingParams.from_config(g), stop_ids=stop_ids,
                       seed=seed + i, decode=lambda x: tok.decode(x, skip_special_tokens=True),
                       autocast_dtype=loaded.autocast_dtype)
        samples.append({"prompt": prompt, "chat": chat, "text": gen.text, "prompt_tokens": gen.prompt_tokens,
                        "new_tokens": len(gen.new_tokens), "stop_reason": gen.stop_reason, "seconds": gen.seconds,
                        "prefill_seconds": gen.prefill_seconds, "tokens_per_s": gen.tokens_per_s, "seed": seed + i})
    return samples


def evaluate_checkpoint(loaded: LoadedModel, cfg: C.EvalStageConfig, plan: EvalPlan,
                        log: Callable[[str], None] = print) -> dict:
    e = cfg.eval
    model, tok, label = loaded.model, loaded.tokenizer, loaded.ref.label
    autocast = loaded.autocast_dtype
    byte_lengths = token_byte_lengths(tok)
    timings: dict[str, float] = {}

    @contextlib.contextmanager
    def section(name: str, what: str):
        log(f"{label}: {what}")
        t = time.perf_counter()
        yield
        timings[name] = time.perf_counter() - t
        log(f"{label}: {name} done in {timings[name]:.1f} s")

    result: dict = {
        "label": label, "stage": loaded.ref.stage, "path": str(loaded.ref.path), "step": loaded.meta.get("step"),
        "tokens_seen": loaded.meta.get("tokens_seen"), "max_seq_len": loaded.model_cfg.max_seq_len,
        "rope_scaling": loaded.model_cfg.rope_scaling, "device": str(next(model.parameters()).device),
        "autocast": str(autocast).replace("torch.", "") if autocast else "float32", "seconds": timings,
    }
    ppl: dict = {"heldout": {}, "shards": {}}
    with section("perplexity", f"perplexity on {', '.join(plan.heldout) or 'no'} held-out text"
                 + (f" and the validation shards of {plan.shards_dir}" if plan.shards_dir else "")):
        for lang, docs in plan.heldout.items():
            ppl["heldout"][lang] = perplexity_of_token_docs(
                model, docs, byte_lengths, bos_id=BOS_ID, stride=e.stride, batch_size=e.batch_size,
                max_tokens=e.max_eval_tokens, autocast_dtype=autocast).to_dict()
        if plan.shards_dir is not None:
            for tier, docs in sorted(val_shard_documents(plan.shards_dir).items()):
                try:
                    ppl["shards"][f"tier{tier}"] = perplexity_of_token_docs(
                        model, docs, byte_lengths, bos_id=BOS_ID, stride=e.stride, batch_size=e.batch_size,
                        max_tokens=e.max_eval_tokens, autocast_dtype=autocast).to_dict()
                except ValueError as err:  # an empty validation tier: reported, not fatal for the others
                    ppl["shards"][f"tier{tier}"] = {"skipped": str(err)}
    result["perplexity"] = ppl
    if e.tasks:
        from dante.evaluation.lm_eval_adapter import DanteLM, run_tasks  # heavy, optional: see make_plan

        with section("benchmarks", f"benchmarks {', '.join(e.tasks)}"):
            lm = DanteLM(model=model, tokenizer=tok, batch_size=e.batch_size, autocast_dtype=autocast)
            bench = run_tasks(lm, e.tasks, e.task_include_paths, limit=e.task_limit or None,
                              num_fewshot=None if e.num_fewshot < 0 else e.num_fewshot, seed=cfg.run.seed,
                              manager=plan.task_manager)
        result["benchmarks"] = {**bench, "limit": e.task_limit or None}
    with section("generation", "generation"):
        result["generation"] = run_generation(loaded, e.generation, cfg.run.seed)
    lengths = plan.long_lengths.get(label)
    if lengths:
        le = e.long_eval
        with section("long_context", f"long context (lengths {lengths})"):
            docs = [d for lang_docs in plan.heldout.values() for d in lang_docs]
            result["long_context"] = lc.long_context_report(
                model, tok, docs, lengths=lengths, depths=le.depths, trials=le.trials, bucket_size=le.bucket_size,
                max_sequences=le.max_docs, seed=cfg.run.seed, distractors=le.distractors, batch_size=e.batch_size,
                bos_id=BOS_ID, eos_id=EOS_ID, autocast_dtype=autocast)
    return result
