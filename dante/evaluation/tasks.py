"""Benchmark task specs for lm-eval: validation of local task files, and the held-out next-sentence task.

A task spec in ``eval.tasks`` is either an lm-eval task/group name (``xcopa_it``, ``itabench_trans_it-it``
with the ITA-Bench task folder in ``eval.task_include_paths``) or the path of a local lm-eval task YAML.
Local task files use lm-eval's own format (``dataset_path: json`` and ``dataset_kwargs.data_files``
pointing at JSON Lines), so the very same file also runs with the ``lm_eval`` command line. Paths inside
them are relative to the working directory (the repository root), like every path in Dante's configs.

``validate_task_file`` checks a local task before any model is loaded and reports every problem at
once: required keys, known output type, data files that exist, at least one example in the evaluated
split, and every row having the fields the ``doc_to_*`` entries name (plain field names or ``{{ field }}``
inside a Jinja template). ``!function`` entries are left to lm-eval.

``next_sentence_examples`` builds a real-text multiple-choice task from held-out documents: a context of
``context_lines`` consecutive lines (Bible verses, help-page paragraphs), the true next line, and
distractor lines drawn from *other* documents of the same language whose length is within a factor 2 of
the true line (so a length prior cannot solve it). Deterministic for a seed; ``data/eval_tasks/build.py``
writes the files the tiny profile uses.

Example::

    problems = validate_task_file("data/eval_tasks/next_sentence_it.yaml")
    rows = next_sentence_examples(load_texts("data/sample/heldout/it.jsonl.gz"), n_examples=64, seed=1234)
"""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any, Sequence

import yaml

from dante.artifacts import read_jsonl

OUTPUT_TYPES = ("multiple_choice", "loglikelihood", "loglikelihood_rolling", "generate_until")
REQUIRED_KEYS = ("task", "dataset_path", "output_type")
LOCAL_BUILDERS = ("json", "csv", "parquet", "text")


def is_task_file(spec: str) -> bool:
    return spec.endswith((".yaml", ".yml"))


class _TaskLoader(yaml.SafeLoader):
    """Safe YAML plus lm-eval's ``!function module.name`` tag (kept as a marker string)."""


_TaskLoader.add_constructor("!function", lambda loader, node: f"!function {loader.construct_scalar(node)}")


def read_task_yaml(path: Path, _seen: frozenset = frozenset()) -> dict:
    """The task config with ``include:`` files merged underneath (local keys win), as lm-eval does."""
    path = path.resolve()
    if path in _seen:
        raise ValueError(f"include cycle at {path}")
    cfg = yaml.load(path.read_text(encoding="utf-8"), Loader=_TaskLoader)  # noqa: S506 - SafeLoader subclass
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: expected a mapping of task settings, got {type(cfg).__name__}")
    includes = cfg.pop("include", None)
    if includes is None:
        return cfg
    merged: dict = {}
    for inc in includes if isinstance(includes, list) else [includes]:
        merged.update(read_task_yaml(path.parent / inc, _seen | {path}))
    merged.update(cfg)
    return merged


def _referenced_fields(entry: Any) -> list[str]:
    """Document fields that a doc_to_* entry needs: a bare identifier, or the roots used in Jinja."""
    if not isinstance(entry, str) or entry.startswith("!function"):
        return []
    if re.fullmatch(r"[A-Za-z_]\w*", entry):
        return [entry]
    return sorted(set(re.findall(r"{{\s*([A-Za-z_]\w*)", entry)))


def validate_task_file(path: str | Path) -> list[str]:
    """Problems of a local lm-eval task YAML (empty list: it is fine). Never raises on user input."""
    p = Path(path)
    if not p.is_file():
        return [f"task file not found: {p} (eval.tasks lists lm-eval task names or paths of task YAML files)"]
    try:
        cfg = read_task_yaml(p)
    except (OSError, ValueError, yaml.YAMLError) as e:
        return [f"{p}: cannot read the task config ({e})"]
    if "group" in cfg and "task" not in cfg:
        return []  # a group file: its member tasks are checked by lm-eval
    problems = [f"{p}: missing required key {k!r}" for k in REQUIRED_KEYS if k not in cfg]
    output_type = cfg.get("output_type")
    if output_type is not None and output_type not in OUTPUT_TYPES:
        problems.append(f"{p}: output_type {output_type!r} is not one of {list(OUTPUT_TYPES)}")
    needed = ["doc_to_target"] + (["doc_to_text"] if output_type != "loglikelihood_rolling" else [])
    if output_type == "multiple_choice":
        needed.append("doc_to_choice")
    problems += [f"{p}: missing required key {k!r} for output_type {output_type}" for k in needed if k not in cfg]
    if problems or cfg.get("dataset_path") not in LOCAL_BUILDERS:
        return problems  # a hub dataset is fetched (and checked) by lm-eval itself
    data_files = (cfg.get("dataset_kwargs") or {}).get("data_files")
    if not data_files:
        return [f"{p}: dataset_path {cfg['dataset_path']!r} needs dataset_kwargs.data_files (a split -> file mapping)"]
    if isinstance(data_files, (str, list)):
        data_files = {"train": data_files}
    split = cfg.get("test_split") or cfg.get("validation_split") or cfg.get("training_split")
    if split is None:
        return [f"{p}: set test_split (or validation_split) to the split to evaluate"]
    if split not in data_files:
        return [f"{p}: split {split!r} has no entry in dataset_kwargs.data_files ({sorted(data_files)})"]
    files = data_files[split] if isinstance(data_files[split], list) else [data_files[split]]
    rows: list[dict] = []
    for f in files:
        fp = Path(f)
        if not fp.is_file():
            problems.append(f"{p}: data file {fp} (split {split!r}) not found; paths are relative to the working directory")
        elif cfg["dataset_path"] == "json":
            try:
                rows += read_jsonl(fp)
            except ValueError as e:
                problems.append(f"{p}: {e}")
    if problems or cfg["dataset_path"] != "json":
        return problems
    if not rows:
        return [f"{p}: empty evaluation set: split {split!r} ({', '.join(map(str, files))}) has no example"]
    fields = sorted({f for k in ("doc_to_text", "doc_to_target", "doc_to_choice") for f in _referenced_fields(cfg.get(k))})
    for i, row in enumerate(rows):
        missing = [f for f in fields if f not in row]
        if missing:
            problems.append(f"{p}: example {i} of split {split!r} lacks field(s) {missing} named by doc_to_text/doc_to_target/doc_to_choice")
            if len(problems) >= 5:
                problems.append(f"{p}: (further rows not checked)")
                break
    return problems


# ---------------------------------------------------------------------------------------------------
# The held-out next-sentence task
# ---------------------------------------------------------------------------------------------------

MIN_LINE_CHARS, MAX_LINE_CHARS = 30, 300


def _usable_lines(text: str) -> list[str]:
    return [ln.strip() for ln in text.split("\n") if MIN_LINE_CHARS <= len(ln.strip()) <= MAX_LINE_CHARS]


def next_sentence_examples(texts: Sequence[str], n_examples: int, seed: int, n_choices: int = 4,
                           context_lines: int = 2) -> list[dict]:
    """Rows {"context", "choices", "gold", "doc"}: which line follows the context in the same document?

    Needs documents with at least ``context_lines + 1`` consecutive usable lines; raises ValueError when
    the texts cannot give ``n_examples`` distinct examples.
    """
    rng = random.Random(seed)
    docs = [_usable_lines(t) for t in texts]
    slots = [(d, i) for d, lines in enumerate(docs) for i in range(context_lines, len(lines))]
    if len(slots) < n_examples or sum(1 for lines in docs if lines) < 2:
        raise ValueError(f"held-out text gives {len(slots)} candidate positions in {len(docs)} documents; "
                         f"{n_examples} examples from at least 2 documents are needed")
    rows = []
    for d, i in rng.sample(slots, len(slots)):
        true = docs[d][i]
        pool = [ln for e, lines in enumerate(docs) if e != d for ln in lines
                if 0.5 <= len(ln) / len(true) <= 2.0 and ln != true]
        if len(pool) < n_choices - 1:
            continue
        choices = rng.sample(pool, n_choices - 1)
        gold = rng.randrange(n_choices)
        choices.insert(gold, true)
        rows.append({"context": "\n".join(docs[d][i - context_lines:i]), "choices": choices, "gold": gold, "doc": d})
        if len(rows) == n_examples:
            return rows
    raise ValueError(f"only {len(rows)} of {n_examples} next-sentence examples have {n_choices - 1} length-matched distractors")
