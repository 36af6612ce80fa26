"""Stage 8: evaluate checkpoints: perplexity and bits per byte, benchmarks (lm-eval), generation, long
context; one report (report.json, report.md, PNG plots) comparing them.

Reads runs/<name>/02_tokenizer/ and the checkpoints of eval.checkpoints (stage names such as 04_pretrain,
05_extend, 07_sft: absent stages are skipped with a note; or checkpoint folders), held-out text
(eval.heldout), stage 3's validation shards when present, and lm-eval tasks (eval.tasks). Writes
runs/<name>/08_eval/. Each finished checkpoint is kept in progress.json, so an interrupted run resumes
with the next one. Every input is checked before anything is written (``validate``; the checkpoints'
files against the sha256 recorded in their meta.json), so a rejected --force changes nothing. All logic
is in dante/evaluation/.

Examples:
    python 8_eval.py --config configs/tiny/eval.yaml
    python 8_eval.py --config configs/tiny/eval.yaml --checkpoints 04_pretrain 05_extend 07_sft
    python 8_eval.py --config configs/tiny/eval.yaml --dry-run            # checks and plan, no model loaded
    python 8_eval.py --config configs/tiny/eval.yaml --chat               # talk to 07_sft in the terminal
"""

from __future__ import annotations

import sys

from dante import config as C
from dante.cli import run_command, run_stage
from dante.evaluation import report as eval_report
from dante.evaluation import stage as eval_stage
from dante.evaluation.chat import chat_loop, stdin_line, stdout_write
from dante.evaluation.loading import load_for_eval

STAGE = "08_eval"
DESCRIPTION = __doc__.split("\n\n")[0]


def add_args(ap) -> None:
    ap.add_argument("--checkpoints", nargs="+", metavar="CKPT",
                    help="stage names or checkpoint folders to compare (same as --set eval.checkpoints=[...])")
    ap.add_argument("--chat", action="store_true",
                    help="interactive chat with one checkpoint (the first of --checkpoints, else 07_sft, else the "
                         "last one found); reads stdin lines, /reset starts over, /exit or Ctrl-D quits; writes nothing")


def log(msg: str) -> None:
    print(f"[{STAGE}] {msg}", flush=True)


def validate(stage, cfg: C.EvalStageConfig, args) -> eval_stage.EvalPlan:
    """Every check of config and inputs, read-only (run_stage calls it before --force resets 08_eval): the
    plan (tokenizer, checkpoint files, held-out text, tasks, lengths) and the manifests of the stages read."""
    plan = eval_stage.make_plan(cfg)  # every check before the first model is loaded
    stage.require(C.TOKENIZER)
    for ref in plan.refs:
        if ref.label in C.STAGES:  # a stage of this run (a checkpoint given by path may be from a running stage)
            stage.require(ref.label)
    args.eval_plan = plan  # --dry-run describes this plan rather than redoing every check
    return plan


def main(stage, cfg: C.EvalStageConfig, args) -> None:
    plan = stage.plan
    for ref in plan.refs:
        stage.add_input(f"checkpoint:{ref.label}", ref.path / "model.safetensors")
    for note in plan.notes:
        log(f"note: {note}")
    done = stage.load_progress().get("results", {})
    for ref in plan.refs:
        if ref.label in done:
            log(f"{ref.label}: already evaluated (resumed)")
            continue
        loaded = load_for_eval(ref, plan.tokenizer, cfg.eval.device, cfg.eval.dtype)
        done[ref.label] = eval_stage.evaluate_checkpoint(loaded, cfg, plan, log=lambda m: log(m))
        del loaded
        stage.save_progress({"results": done})
    results = [done[ref.label] for ref in plan.refs]
    written = eval_report.write_report(stage.dir, cfg, results, plan.notes)
    stage.finish(outputs=written, counts={"checkpoints": len(results), "notes": len(plan.notes)},
                 extra={"summary": {r["label"]: eval_report.summarize(r) for r in results}})
    log(f"done: {stage.dir / 'report.md'}")


def dry_run(cfg: C.EvalStageConfig, args) -> None:
    plan = getattr(args, "eval_plan", None) or eval_stage.make_plan(cfg)
    for line in plan.describe():
        log(line)
    log("dry run: all checks passed; no model loaded")


def chat(argv: list[str]) -> int:
    """--chat: outside the stage lifecycle (no folder, no manifest), same config and error handling."""
    return run_command(STAGE, DESCRIPTION, chat_with_checkpoint, extra_args=add_args, argv=argv)


def chat_with_checkpoint(cfg: C.EvalStageConfig, args) -> int:
    if args.checkpoints:
        cfg.eval.checkpoints = list(args.checkpoints)
    plan = eval_stage.make_plan(cfg, with_tasks=False)
    ref = plan.refs[0] if args.checkpoints else next((r for r in plan.refs if r.is_chat), plan.refs[-1])
    loaded = load_for_eval(ref, plan.tokenizer, cfg.eval.device, cfg.eval.dtype)
    log(f"chatting with {ref.label} ({ref.path}); /reset starts over, /exit or Ctrl-D quits")
    chat_loop(loaded, cfg.eval.generation, cfg.run.seed, stdin_line(), stdout_write)
    return 0


def expand_checkpoints(argv: list[str]) -> list[str]:
    """``--checkpoints a b`` becomes ``--set eval.checkpoints=[a, b]``: part of the config, hence of the
    manifest and of the resume check."""
    if "--checkpoints" not in argv:
        return argv
    i = argv.index("--checkpoints")
    j = i + 1
    while j < len(argv) and not argv[j].startswith("--"):
        j += 1
    if j == i + 1:
        return argv  # argparse reports the missing value
    items = ", ".join(f'"{x}"' for x in argv[i + 1:j])
    return argv[:i] + ["--set", f"eval.checkpoints=[{items}]"] + argv[j:]


def cli(argv: list[str]) -> int:
    """The whole command line (what ``__main__`` runs; the tests call it in-process)."""
    if "--chat" in argv:
        return chat(argv)
    return run_stage(STAGE, DESCRIPTION, main, extra_args=add_args, validate=validate, dry_run=dry_run,
                     argv=expand_checkpoints(argv))


if __name__ == "__main__":
    raise SystemExit(cli(sys.argv[1:]))
