"""lm-evaluation-harness adapter: a Dante model as an lm-eval ``LM`` (registered as ``"dante"``), and the
task runner stage 8 uses. Any lm-eval task runs: multiple choice, rolling log-likelihood, generation.

``DanteLM`` extends lm-eval's ``TemplateLM``, so request encoding is lm-eval's own (trailing context
spaces move into the continuation; the pair is encoded whole and split, exactly as for HF models). What
Dante adds:
- every request starts with ``<|begin_of_text|>`` (documents were trained that way; an empty context is
  BOS alone, lm-eval's ``prefix_token_id``);
- scoring goes through ``dante.evaluation.scoring.score_requests``: right padding, per-request length
  buckets, so results are bit-identical at any batch size (tests check 1 vs 8 and a plain loop);
- a context longer than the model's window is cut on the left (the continuation is kept whole), as
  lm-eval's HF model does; a continuation longer than the window is an error;
- ``loglikelihood_rolling`` uses the perplexity module's windows with stride = context (lm-eval's
  definition: each token scored once, the last window right-aligned);
- ``generate_until``: KV-cache decoding, greedy unless ``do_sample`` is set; stops at EOS, <|eot|> or any
  ``until`` string (the text is cut before it).

acc / acc_norm are computed by lm-eval from these log-likelihoods (acc_norm divides each choice's
log-likelihood by its length in characters; ``acc_bytes`` by UTF-8 bytes).

Example (offline, local task)::

    lm = DanteLM(model=model, tokenizer=tokenizer, batch_size=8)
    results = run_tasks(lm, ["data/eval_tasks/next_sentence_it.yaml"], include_paths=[], limit=None,
                        num_fewshot=None, seed=1234)
"""

from __future__ import annotations

import logging
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Sequence

from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from dante.errors import UserError, raise_problems
from dante.evaluation.generation import GREEDY, SamplingParams, generate
from dante.evaluation.loading import load_for_eval
from dante.evaluation.perplexity import window_requests
from dante.evaluation.scoring import ScoreRequest, score_requests
from dante.evaluation.tasks import is_task_file, read_task_yaml, validate_task_file
from dante.tokenizer import BOS_ID, EOS_ID, EOT_ID

DEFAULT_MAX_GEN_TOKS = 256


@register_model("dante")
class DanteLM(TemplateLM):
    """A Dante Transformer + tokenizer behind lm-eval's LM interface.

    Build it from objects (``model=``, ``tokenizer=``) or, from lm-eval's ``model_args`` string, from
    paths: ``checkpoint=runs/tiny/04_pretrain,tokenizer=runs/tiny/02_tokenizer/tokenizer.json``.
    """

    def __init__(self, model=None, tokenizer=None, checkpoint: str | None = None, batch_size: int | str | None = 8,
                 max_gen_toks: int = DEFAULT_MAX_GEN_TOKS, device: str | None = None, dtype: str = "auto",
                 autocast_dtype=None, max_batch_size: int | None = None, **unknown: Any):
        super().__init__()
        if unknown:
            raise UserError(f"DanteLM: unknown model_args {sorted(unknown)}; known: checkpoint, tokenizer, batch_size, "
                            "max_gen_toks, device, dtype")
        if tokenizer is None or (model is None and checkpoint is None):
            raise UserError("DanteLM needs model= and tokenizer= objects, or checkpoint= and tokenizer= paths")
        if model is None:
            loaded = load_for_eval(checkpoint, tokenizer, device=device or "auto", dtype=dtype)
            model, tokenizer, autocast_dtype = loaded.model, loaded.tokenizer, loaded.autocast_dtype
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.autocast_dtype = autocast_dtype
        # lm-eval may pass None or "auto" (its HF model's batch-size search): scores do not depend on it here
        self.batch_size = int(batch_size) if str(batch_size).isdigit() and int(batch_size) > 0 else 8
        self.max_gen_toks = int(max_gen_toks)

    # -- what TemplateLM asks for -------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return EOS_ID

    @property
    def prefix_token_id(self) -> int:
        return BOS_ID

    @property
    def max_length(self) -> int:
        return self.model.cfg.max_seq_len

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tokenizer.encode(string, add_special_tokens=False).ids

    def tok_decode(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.decode(list(tokens), skip_special_tokens=True)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        score_reqs = []
        for (_context, _continuation), context_enc, continuation_enc in requests:
            score_reqs.append(self._pair_request(list(context_enc), list(continuation_enc)))
        scores = score_requests(self.model, score_reqs, self.batch_size, self.autocast_dtype)
        out = []
        for (pair, _, _), s in zip(requests, scores):
            result = (s.total, s.all_greedy)
            self.cache_hook.add_partial("loglikelihood", pair, result)
            out.append(result)
        return out

    def _pair_request(self, context_enc: list[int], continuation_enc: list[int]) -> ScoreRequest:
        if not continuation_enc:
            raise UserError("an lm-eval request has an empty continuation: the task's choices/targets must be non-empty")
        if len(continuation_enc) > self.max_length:
            raise UserError(f"a continuation of {len(continuation_enc)} tokens does not fit the model's context "
                            f"({self.max_length}); this task needs a longer-context model")
        if not context_enc or context_enc[0] != BOS_ID:
            context_enc = [BOS_ID] + context_enc
        tokens = (context_enc + continuation_enc)[-(self.max_length + 1):]  # keep the window's last tokens
        return ScoreRequest(tokens=tokens, score_from=len(tokens) - len(continuation_enc))

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owners = [], []
        for i, req in enumerate(requests):
            (text,) = req.args
            for w in window_requests([BOS_ID] + self.tok_encode(text), self.max_length, self.max_length):
                windows.append(w)
                owners.append(i)
        totals = [0.0] * len(requests)
        for i, s in zip(owners, score_requests(self.model, windows, self.batch_size, self.autocast_dtype)):
            totals[i] += s.total
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        for req in requests:
            context, gen_kwargs = req.args
            gen_kwargs = dict(gen_kwargs or {})
            until = gen_kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(gen_kwargs.pop("max_gen_toks", self.max_gen_toks))
            params = GREEDY
            if gen_kwargs.get("do_sample") and float(gen_kwargs.get("temperature", 1.0)) > 0:
                params = SamplingParams(temperature=float(gen_kwargs.get("temperature", 1.0)),
                                        top_p=float(gen_kwargs.get("top_p", 1.0)), top_k=int(gen_kwargs.get("top_k", 0)))
            max_new = max(1, min(max_new, self.max_length - 2))
            prompt = ([BOS_ID] + self.tok_encode(context))[-(self.max_length - max_new):]
            gen = generate(self.model, prompt, max_new_tokens=max_new, params=params, stop_ids={EOS_ID, EOT_ID},
                           decode=self.tok_decode, stop_strings=until, autocast_dtype=self.autocast_dtype)
            self.cache_hook.add_partial("generate_until", (context, req.args[1]), gen.text)
            out.append(gen.text)
        return out


# ---------------------------------------------------------------------------------------------------
# Running tasks
# ---------------------------------------------------------------------------------------------------


def check_task_specs(specs: Sequence[str], include_paths: Sequence[str]) -> list[str]:
    """Problems of the task list that can be found without a model: missing/invalid local files and
    include folders. (Whether a task *name* exists is checked by ``task_manager``.)"""
    problems = [f"eval.task_include_paths: {p} is not a folder" for p in include_paths if not Path(p).is_dir()]
    for spec in specs:
        if is_task_file(spec):
            problems += validate_task_file(spec)
    return problems


def lm_eval_names(specs: Sequence[str], include_paths: Sequence[str]) -> tuple[list[str], list[str]]:
    """(task/group names, include folders) for lm-eval: a local task file is named by its ``task:`` (or
    ``group:``) and its folder is added to the include paths, exactly what ``lm_eval --include_path`` does."""
    names, folders = [], list(include_paths)
    for spec in specs:
        if is_task_file(spec):
            cfg = read_task_yaml(Path(spec))
            names.append(cfg.get("task") if isinstance(cfg.get("task"), str) else cfg["group"])
            folder = str(Path(spec).resolve().parent)
            if folder not in folders:
                folders.append(folder)
        else:
            names.append(spec)
    return names, folders


def task_manager(specs: Sequence[str], include_paths: Sequence[str]):
    """An lm-eval TaskManager over the include folders; lm-eval's built-in tasks (thousands, slow to index:
    docs/PERFORMANCE.md) are indexed only when a spec is a name, not a file. Raises UserError for a name it
    does not know."""
    from lm_eval.tasks import TaskManager

    _, folders = lm_eval_names(specs, include_paths)
    names = [s for s in specs if not is_task_file(s)]
    manager = TaskManager(include_path=folders or None, include_defaults=bool(names))
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        raise UserError(f"unknown lm-eval task(s) {unknown}: not built into lm-eval and not found in "
                        f"eval.task_include_paths {list(include_paths)}. HINT: `lm_eval ls tasks` lists names; "
                        f"ITA-Bench tasks need a clone of github.com/SapienzaNLP/ita-bench and its tasks/ "
                        f"folder in eval.task_include_paths.")
    return manager


def run_tasks(lm: DanteLM, specs: Sequence[str], include_paths: Sequence[str], *, limit: int | None,
              num_fewshot: int | None, seed: int, log_samples: bool = False, manager=None) -> dict:
    """Evaluate ``lm`` on the tasks; returns {"tasks": {name: metrics}, "samples": ... (if asked)}."""
    from lm_eval import simple_evaluate

    raise_problems(UserError, "bad benchmark task(s)", check_task_specs(specs, include_paths))
    manager = manager or task_manager(specs, include_paths)
    names, _ = lm_eval_names(specs, include_paths)
    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    res = simple_evaluate(model=lm, tasks=names, task_manager=manager, limit=limit, num_fewshot=num_fewshot,
                          batch_size=lm.batch_size, log_samples=log_samples, bootstrap_iters=100,
                          random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed)
    tasks = {}
    for name, metrics in res["results"].items():
        row = {}
        for key, value in metrics.items():
            if "," in key and isinstance(value, (int, float)):
                metric, _filter = key.split(",", 1)
                row[metric] = float(value)
        n = res.get("n-samples", {}).get(name, {})
        row["n"] = int(n.get("effective", 0)) if n else None
        tasks[name] = row
    out: dict = {"tasks": tasks, "lm_eval_version": _lm_eval_version()}
    if log_samples:
        out["samples"] = res.get("samples", {})
    return out


def _lm_eval_version() -> str:
    try:
        return version("lm_eval")
    except PackageNotFoundError:
        return "?"
