"""Build the held-out next-sentence tasks (Italian, English) that the tiny profile and the tests run.

Each example: two consecutive lines of a held-out document (data/sample/heldout/<lang>.jsonl.gz, text in
no training file), and four candidate next lines: the true one and three length-matched lines from other
held-out documents. Deterministic (fixed seed): rerunning rewrites identical files, which
tests/test_eval_tasks.py checks. Logic: dante.evaluation.tasks.next_sentence_examples.

    python data/eval_tasks/build.py
"""

import json
from pathlib import Path

from dante.artifacts import atomic_write_text, load_texts
from dante.evaluation.tasks import next_sentence_examples

ROOT = Path(__file__).resolve().parents[2]

SEED = 1234
N_EXAMPLES = 64
LANGS = ("it", "en")


def build(root: Path = ROOT, out_dir: Path | None = None) -> dict[str, Path]:
    out_dir = out_dir or root / "data" / "eval_tasks"
    written = {}
    for lang in LANGS:
        rows = next_sentence_examples(load_texts(root / "data" / "sample" / "heldout" / f"{lang}.jsonl.gz"),
                                      n_examples=N_EXAMPLES, seed=SEED)
        path = out_dir / f"next_sentence_{lang}.jsonl"
        atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        written[lang] = path
    return written


if __name__ == "__main__":
    for lang, path in build().items():
        print(f"{lang}: {path}")
