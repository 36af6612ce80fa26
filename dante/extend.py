"""Stage 5 as a library: the extended model config, every check before training, and the long-context
measurements before and after (``5_extend_context.py`` is the thin script over it).

The extension (``extended_model_config``) changes exactly two fields of the stage 4 ``ModelConfig``:
``max_seq_len`` becomes the new context, and ``rope_scaling`` becomes a dict in transformers' format, so
that the stage 9 export is a copy and the model behaves identically in transformers:

    yarn       {rope_type: yarn, factor: f, original_max_position_embeddings: L, beta_fast, beta_slow}
    linear     {rope_type: linear, factor: f}                      (position interpolation)
    continued  {}                                                  (plain RoPE, only trained longer)

Design choices
- The original length L is the sequence length stage 4 trained at (its ``train.seq_len``, recorded in
  every checkpoint's meta.json), not its ``model.max_seq_len``: YaRN's ramp sorts frequencies by how
  many rotations they complete over the context the model actually saw, and positions a config allowed
  but training never used are not "seen".
- One meaning of ``factor`` in every mode: new length / L, > 1. ``extend.new_max_seq_len`` may restate
  the new length but must then equal factor x L. Transformers reads YaRN's ratio from
  ``max_position_embeddings / original_max_position_embeddings`` too and warns when it differs from
  ``factor`` ("Using the explicit factor ... This may cause unexpected behaviour"), so a disagreement
  would export a model that is not the one that was trained. ``continued`` uses the same rule so that
  its A/B against ``yarn`` differs in the mode alone.
- Weights only from stage 4. The optimizer, the schedule and the step start fresh in 05_extend/ (the
  engine's schedule is a pure function of the step), and the model is rebuilt from the new config: the
  RoPE table is not part of a checkpoint, so the same weights under a new ``rope_scaling`` is the whole
  extension.
- Evaluation (``dante.evaluation.long_context``, shared with stage 8) runs on the same long sequences for
  every model: before = the stage 4 weights with their original RoPE at the new length (perplexity should
  climb past L: what the extension fixes), the stage 4 weights under the new scaling without any training
  (YaRN's paper reports it already works without fine-tuning: measured, not assumed), and after = the
  final 05_extend checkpoint. The sequences are the beginnings of the longest held-out documents, one
  per document (``extend.heldout`` files, else stage 3's validation shards), concatenations only when too
  few documents are long enough: a long document measures long context, a concatenation of short ones
  mostly measures document boundaries (the YaRN paper likewise evaluates on long documents only:
  Proof-pile, GovReport).

Example::

    plan = make_plan(cfg)                        # every check, no weights loaded
    model = load_weights_as(plan.base_checkpoint, plan.model_cfg)
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dante import config as C
from dante.artifacts import atomic_write_json, atomic_write_text, read_manifest, stage_dir, tokenizer_path
from dante.checkpoint import (
    MODEL_FILES,
    WEIGHTS,
    checkpoint_ref,
    load_weights_into,
    read_meta,
    read_model_config,
    tokenizer_problems,
    verify_checkpoint,
)
from dante.errors import StageError, UserError, problems_message
from dante.evaluation import long_context as lc
from dante.evaluation.loading import resolve_autocast
from dante.evaluation.perplexity import encode_texts, split_special
from dante.evaluation.report import plot_positions
from dante.evaluation.stage import read_heldout  # stage 8's reader and checks of the same {lang: path} mapping
from dante.model import Transformer
from dante.pretrain_data import DataError, TieredMemmapDataset, ValidationWindows
from dante.report_format import markdown_table as md_table
from dante.shards import open_split
from dante.tokenizer import BOS_ID, EOS_ID, SPECIAL_TOKENS, load_tokenizer

SCALED_MODES = ("yarn", "linear")
REPORT_JSON, REPORT_MD, REPORT_PNG = "long_context.json", "long_context.md", "long_context.png"


# ---------------------------------------------------------------------------------------------------
# The extended model config
# ---------------------------------------------------------------------------------------------------


def trained_length(base_cfg: C.ModelConfig, base_meta: dict) -> int:
    """The sequence length stage 4 trained at: its train.seq_len, or model.max_seq_len when not recorded."""
    seq_len = ((base_meta.get("config") or {}).get("train") or {}).get("seq_len")
    return int(seq_len) if isinstance(seq_len, int) and seq_len > 0 else base_cfg.max_seq_len


def target_length(e: C.ExtendConfig, original: int) -> int:
    """The new context: extend.new_max_seq_len, or factor x original when it is 0."""
    return e.new_max_seq_len or int(round(e.factor * original))


def rope_scaling_for(e: C.ExtendConfig, original: int) -> dict:
    """transformers' rope_scaling dict for the mode ({} for continued)."""
    if e.mode == "yarn":
        return {"rope_type": "yarn", "factor": float(e.factor), "original_max_position_embeddings": original,
                "beta_fast": float(e.beta_fast), "beta_slow": float(e.beta_slow)}
    if e.mode == "linear":
        return {"rope_type": "linear", "factor": float(e.factor)}
    return {}


def extension_problems(base_cfg: C.ModelConfig, e: C.ExtendConfig, original: int) -> list[str]:
    """Why ``base_cfg`` (trained at ``original`` tokens) cannot be extended as ``e`` says (empty when it can)."""
    p = []
    if base_cfg.rope_scaling:
        p.append(f"the stage 4 model already has rope_scaling {base_cfg.rope_scaling}; stage 5 extends a model "
                 "trained with plain RoPE (rerun stage 4 without model.rope_scaling)")
    if e.factor <= 1:
        p.append(f"extend.factor={e.factor}: must be > 1 (new context / the stage 4 training length {original})")
        return p
    exact = e.factor * original
    if e.new_max_seq_len and e.new_max_seq_len <= original:
        p.append(f"extend.new_max_seq_len={e.new_max_seq_len} must exceed the stage 4 training length {original}: "
                 "stage 5 only lengthens the context")
    elif e.new_max_seq_len and e.new_max_seq_len != exact:
        p.append(f"extend.new_max_seq_len={e.new_max_seq_len} disagrees with extend.factor={e.factor} x the stage 4 "
                 f"training length {original} = {exact:g}; set new_max_seq_len to {exact:g} or 0, or factor to "
                 f"{e.new_max_seq_len / original:g} (transformers derives YaRN's ratio from both and warns on a mismatch)")
    elif not e.new_max_seq_len and exact != int(exact):
        p.append(f"extend.factor={e.factor} x the stage 4 training length {original} = {exact:g} is not a whole number "
                 "of tokens; choose a factor that gives one")
    new_len = target_length(e, original)
    if not p and new_len < base_cfg.max_seq_len:
        p.append(f"the new context {new_len} is shorter than the stage 4 model.max_seq_len={base_cfg.max_seq_len}")
    return p


def try_extend(base_cfg: C.ModelConfig, e: C.ExtendConfig, original: int) -> tuple[C.ModelConfig | None, list[str]]:
    """(the stage 4 config with the new max_seq_len and rope_scaling, []), or (None, every problem)."""
    problems = extension_problems(base_cfg, e, original)
    if problems:
        return None, problems
    new_cfg = dataclasses.replace(base_cfg, max_seq_len=target_length(e, original),
                                  rope_scaling=rope_scaling_for(e, original))
    problems = C.validate_model(new_cfg)
    return (None, problems) if problems else (new_cfg, [])


def extended_model_config(base_cfg: C.ModelConfig, e: C.ExtendConfig, original: int) -> C.ModelConfig:
    """The stage 4 config with the new max_seq_len and rope_scaling; UserError listing every problem."""
    new_cfg, problems = try_extend(base_cfg, e, original)
    if new_cfg is None:
        raise UserError(problems_message("cannot extend the context", problems))
    return new_cfg


def load_weights_as(step_dir: str | Path, model_cfg: C.ModelConfig, device: str | torch.device = "cpu"):
    """The fp32 weights of a checkpoint in a Transformer built from ``model_cfg`` (which may differ from the
    checkpoint's own config in max_seq_len and rope_scaling only: neither changes a weight's shape)."""
    with torch.device("meta"):
        model = Transformer(model_cfg)
    model.materialize(device)
    load_weights_into(model, Path(step_dir) / WEIGHTS, model_cfg.tie_embeddings)
    return model


# ---------------------------------------------------------------------------------------------------
# The plan: every check before any weight is loaded
# ---------------------------------------------------------------------------------------------------


@dataclass
class ExtendPlan:
    base_checkpoint: Path
    """The stage 4 step folder whose weights are extended."""
    base_cfg: C.ModelConfig
    base_step: int
    """Optimizer step of that checkpoint."""
    original_len: int
    """Sequence length stage 4 trained at."""
    model_cfg: C.ModelConfig
    """The extended config (new max_seq_len and rope_scaling)."""
    tokenizer: Any
    shards_dir: Path
    data: Any
    """The training windows (dante.pretrain_data.TieredMemmapDataset) at train.seq_len."""
    val_data: Any
    """Validation windows at train.seq_len, or None when validation is off or the shards are too short."""
    eval_rows: list[list[int]]
    """Held-out sequences of max(long_eval.lengths) + 1 tokens (BOS first) for perplexity by position."""
    eval_source: str
    eval_lengths: list[int]
    notes: list[str] = field(default_factory=list)

    @property
    def new_len(self) -> int:
        return self.model_cfg.max_seq_len

    def describe(self) -> list[str]:
        m = self.model_cfg
        lines = [f"base: {self.base_checkpoint} (step {self.base_step}, trained at {self.original_len} tokens)",
                 f"extended model: max_seq_len {self.original_len} -> {m.max_seq_len}, rope_scaling "
                 f"{m.rope_scaling or 'none (continued: plain RoPE)'}",
                 f"training data: {self.shards_dir} {self.data.summary()['tiers']}",
                 f"long-context evaluation: {len(self.eval_rows)} sequences of {len(self.eval_rows[0]) - 1} scored tokens "
                 f"from {self.eval_source}; passkey lengths {self.eval_lengths}"]
        return lines + [f"note: {n}" for n in self.notes]


def _eval_docs_from_heldout(heldout: dict, tokenizer, problems: list[str]) -> list[list[int]]:
    texts, found = read_heldout(C.EvalConfig(heldout=heldout))
    problems += [x.replace("eval.heldout", "extend.heldout", 1) for x in found]
    return [doc for lang in sorted(texts) for doc in encode_texts(tokenizer, texts[lang])]


def _eval_docs_from_val_shards(shards_dir: Path) -> list[np.ndarray]:
    specials = list(range(len(SPECIAL_TOKENS)))
    # open_split: headers, sizes, stage 3's checksums and the id range checked (once per file version)
    return [doc for readers in open_split(shards_dir, "val").values() for r in readers
            for doc in split_special(r.tokens, specials)]


def long_rows(docs: list, length: int, max_rows: int, bos_id: int, eos_id: int) -> tuple[list[list[int]], int]:
    """Up to ``max_rows`` rows of ``length`` tokens for perplexity by position, and how many are whole documents.

    Longest documents first, one row each (BOS + the document's first length - 1 tokens): distinct
    documents, so the rows vary in topic and language. When fewer documents are that long, the rest of the
    rows are concatenations of the remaining documents (``long_sequences``, stage 8's rule).
    """
    docs = sorted(docs, key=len, reverse=True)  # stable: equal lengths keep shard order
    rows = [[bos_id] + [int(t) for t in d[:length - 1]] for d in docs[:max_rows] if len(d) >= length - 1]
    whole = len(rows)
    if whole < max_rows:
        rest = ([int(t) for t in d] for d in docs[whole:])
        rows += lc.long_sequences(rest, length, max_rows - whole, bos_id=bos_id, eos_id=eos_id)
    return rows, whole


def make_plan(cfg: C.ExtendStageConfig) -> ExtendPlan:
    """Check inputs, config and data for stage 5 without loading weights; one UserError lists every problem."""
    for stage in (C.TOKENIZER, C.SHARDS, C.PRETRAIN):
        read_manifest(cfg.run, stage)  # StageError naming the script to run
    pretrain_dir = stage_dir(cfg.run, C.PRETRAIN)
    try:
        ref = checkpoint_ref(pretrain_dir, label=C.PRETRAIN)
        verify_checkpoint(ref.path, MODEL_FILES)  # load_weights_as reads the weights later, unchecked
    except UserError as e:
        raise StageError(f"04_pretrain has no usable checkpoint: {e}") from None
    base_checkpoint = ref.path
    base_cfg = read_model_config(base_checkpoint)
    base_meta = read_meta(base_checkpoint)
    original = trained_length(base_cfg, base_meta)
    model_cfg, problems = try_extend(base_cfg, cfg.extend, original)
    notes: list[str] = []
    # a failed extension leaves no new length to check against: the stage 4 length stands in
    new_len = model_cfg.max_seq_len if model_cfg else original
    t, le = cfg.train, cfg.long_eval
    if model_cfg and t.seq_len > new_len:
        problems.append(f"train.seq_len={t.seq_len} exceeds the new context {new_len}")
    elif t.seq_len <= original:
        notes.append(f"train.seq_len={t.seq_len} is not longer than the stage 4 length {original}: no position "
                     "beyond the original context is trained (YaRN's 'train short, test long' setting)")
    too_long = [n for n in le.lengths if n > new_len]
    if model_cfg and too_long:
        problems.append(f"long_eval.lengths {too_long} exceed the new context {new_len}")
    if max(le.lengths) < new_len:
        notes.append(f"perplexity by position stops at {max(le.lengths)} tokens (the longest long_eval length), "
                     f"short of the new context {new_len}")

    tok_path = tokenizer_path(cfg.run)
    tokenizer = load_tokenizer(tok_path)
    problems += tokenizer_problems(ref, base_cfg, tokenizer, tok_path)
    if not too_long:
        try:  # prompts too short for the passkey sentence are refused here, not after training
            lc.passkey_prompts(tokenizer, le.lengths, le.depths, 1, le.distractors, cfg.run.seed)
        except UserError as e:
            problems.append(f"long_eval: {e}")

    shards_dir = stage_dir(cfg.run, C.SHARDS)
    data = val_data = None
    try:
        data = TieredMemmapDataset.from_stage_dir(shards_dir, t.tier_weights, t.seq_len, t.micro_batch, cfg.run.seed,
                                                   vocab_size=model_cfg.vocab_size if model_cfg else None)
    except DataError as e:
        problems += e.problems
    if t.eval_every:
        val_data = ValidationWindows.from_stage_dir(shards_dir, t.seq_len, t.micro_batch, vocab_size=model_cfg.vocab_size if model_cfg else None)
        if len(val_data) == 0:
            notes.append(f"validation loss off: the validation shards hold no window of {t.seq_len + 1} tokens")
            val_data = None

    if cfg.extend.heldout:
        source = "held-out files " + ", ".join(f"{k}={v}" for k, v in sorted(cfg.extend.heldout.items()))
        all_docs = _eval_docs_from_heldout(cfg.extend.heldout, tokenizer, problems)
    else:
        source = f"validation shards of {shards_dir}"
        all_docs = _eval_docs_from_val_shards(shards_dir)
    row_len = max(le.lengths) + 1  # BOS + max(lengths) scored targets
    rows, whole = long_rows(all_docs, row_len, le.max_docs, BOS_ID, EOS_ID)
    if not rows:
        problems.append(f"long-context evaluation: {source} hold {sum(map(len, all_docs))} tokens, fewer than one "
                        f"sequence of {row_len}; set extend.heldout to longer held-out text or shorten long_eval.lengths")
    elif len(rows) < le.max_docs:
        notes.append(f"perplexity by position: {source} fill only {len(rows)} of long_eval.max_docs={le.max_docs} "
                     f"sequences of {row_len} tokens")
    if rows and whole < len(rows):
        notes.append(f"perplexity by position: {len(rows) - whole} of {len(rows)} sequences concatenate shorter "
                     f"documents (only {whole} held-out documents reach {row_len} tokens)")
    if problems or model_cfg is None or data is None:
        raise UserError(problems_message("stage 5 cannot start", problems))
    return ExtendPlan(base_checkpoint=base_checkpoint, base_cfg=base_cfg, base_step=int(base_meta.get("step", 0)),
                      original_len=original, model_cfg=model_cfg, tokenizer=tokenizer, shards_dir=shards_dir,
                      data=data, val_data=val_data, eval_rows=rows, eval_source=source,
                      eval_lengths=sorted(le.lengths), notes=notes)


# ---------------------------------------------------------------------------------------------------
# Long-context evaluation of the models compared
# ---------------------------------------------------------------------------------------------------


def before_variants(plan: ExtendPlan, mode: str) -> list[tuple[str, str, C.ModelConfig]]:
    """(key, label, model config) of the stage 4 weights measured before training."""
    out = [("stage4", "stage 4, original RoPE",
            dataclasses.replace(plan.base_cfg, max_seq_len=plan.new_len, rope_scaling={}))]
    if mode in SCALED_MODES:
        out.append(("stage4_scaled", f"stage 4 + {mode} x{plan.model_cfg.rope_scaling['factor']:g}, no training",
                    plan.model_cfg))
    return out


def evaluate(model, plan: ExtendPlan, cfg: C.ExtendStageConfig, key: str, label: str) -> dict:
    """Perplexity by position and passkey retrieval of one model, as one report entry."""
    le = cfg.long_eval
    autocast = resolve_autocast("auto", next(model.parameters()).device)
    batch = cfg.train.micro_batch  # what fits in training at this length fits in evaluation
    model.eval()
    prompts = lc.passkey_prompts(plan.tokenizer, plan.eval_lengths, le.depths, le.trials, le.distractors, cfg.run.seed,
                                 BOS_ID)
    result = {"position": lc.perplexity_by_position(model, plan.eval_rows, le.bucket_size, batch, autocast).to_dict(),
              "passkey": lc.evaluate_passkey(model, plan.tokenizer, prompts, batch, autocast)}
    return {"key": key, "label": label, "max_seq_len": model.cfg.max_seq_len, "rope_scaling": model.cfg.rope_scaling,
            "long_context": result, "summary": position_summary(result["position"], plan.original_len)}


def position_summary(position: dict, original_len: int) -> dict:
    """Perplexity over the positions inside the original context and beyond it (token-weighted)."""
    ends = [min(s + position["bucket_size"], position["length"]) for s in position["bucket_start"]]
    parts: dict[str, list[tuple[float, int]]] = {"within": [], "beyond": []}
    for start, end, nll in zip(position["bucket_start"], ends, position["nll"]):
        # a bucket straddling the original length counts as beyond: some of its targets are
        parts["within" if end <= original_len else "beyond"].append((nll, end - start))
    out = {}
    for name, items in parts.items():
        n = sum(w for _, w in items)
        out[f"ppl_{name}_original"] = math.exp(sum(x * w for x, w in items) / n) if n else None
    return out


# ---------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------


def write_report(out_dir: Path, report: dict) -> dict[str, str]:
    """long_context.json, long_context.md and long_context.png; returns {file name: path}."""
    evals, original = report["evaluations"], report["original_length"]
    plot_positions(evals, out_dir / REPORT_PNG)
    md = [f"# Stage 5: context extension ({report['mode']})", "",
          f"- stage 4 checkpoint: `{report['base_checkpoint']}` (trained at {original} tokens)",
          f"- extended context: {report['new_length']} tokens, rope_scaling `{report['rope_scaling'] or {}}`",
          f"- fine-tuning: {report['training']['steps']} steps, {report['training']['tokens_seen']:,} tokens at "
          f"{report['training']['seq_len']} tokens per sequence; final loss {report['training']['final_loss']:.4f}",
          f"- evaluation text: {report['eval_source']}", ""]
    md += ["## Perplexity inside and beyond the original context", ""]
    md += md_table(["model", f"ppl, positions < {original}", f"ppl, positions >= {original}", "passkey rank acc",
                    "passkey greedy acc"],
                   [[e["label"], e["summary"]["ppl_within_original"], e["summary"]["ppl_beyond_original"],
                     e["long_context"]["passkey"]["rank_accuracy"], e["long_context"]["passkey"]["greedy_accuracy"]]
                    for e in evals])
    first = evals[0]["long_context"]
    size = first["position"]["bucket_size"]
    md += ["", "## Perplexity by position", "", f"![loss by position]({REPORT_PNG})", "",
           f"{first['position']['sequences']} sequences of {first['position']['length']} scored tokens; mean "
           f"perplexity per bucket of {size} positions.", ""]
    md += md_table(["positions"] + [e["label"] for e in evals],
                   [[f"{s}-{s + size - 1}" + (" *" if s + size > original else "")]
                    + [e["long_context"]["position"]["ppl"][i] for e in evals]
                    for i, s in enumerate(first["position"]["bucket_start"])])
    md += ["", f"`*` the bucket reaches past the original context ({original} tokens).", ""]
    pk = first["passkey"]
    md += ["## Passkey retrieval", "",
           f"rank: the true 5-digit key scores above {pk['candidates'] - 1} random distractors by log-likelihood "
           f"(chance {pk['chance_rank_accuracy']:.2f}, a tie is a miss); greedy: greedy decoding outputs the key.", ""]
    cells = {(c["length"], c["depth"]): c for c in pk["cells"]}
    md += md_table(["length", "depth", "trials"] + [f"{e['label']} (rank / greedy)" for e in evals],
                   [[length, depth, cells[(length, depth)]["trials"]]
                    + [_cell(e["long_context"]["passkey"], length, depth) for e in evals]
                    for length, depth in cells])
    if report.get("notes"):
        md += ["", "## Notes", ""] + [f"- {n}" for n in report["notes"]]
    atomic_write_text(out_dir / REPORT_MD, "\n".join(md) + "\n")
    atomic_write_json(out_dir / REPORT_JSON, report)
    return {name: str(out_dir / name) for name in (REPORT_JSON, REPORT_MD, REPORT_PNG)}


def _cell(passkey: dict, length: int, depth: float) -> str:
    c = next(c for c in passkey["cells"] if c["length"] == length and c["depth"] == depth)
    return f"{c['rank_accuracy']:.2f} / {c['greedy_accuracy']:.2f}"
