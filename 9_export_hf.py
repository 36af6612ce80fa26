"""Stage 9: export a Dante checkpoint as a Hugging Face model folder, verify it, optionally upload it.

Reads a checkpoint (export.checkpoint: auto = the latest finished of 07_sft, 05_extend, 04_pretrain), the
stage 2 tokenizer, stage 6's sources (chat template check) and stage 8's report (model card); writes
runs/<name>/09_export/, a folder that `AutoModelForCausalLM.from_pretrained` loads without custom code.
Verification (on by default) loads it back with transformers and compares logits, greedy continuations,
tokenizer ids and chat-template ids with the native model; any difference fails the stage (no manifest).
Every input is checked before anything is written (``validate``: a rejected --force leaves a finished
09_export as it was); the checkpoint's files are verified against the sha256 recorded in its meta.json.
All logic is in dante/export/ (stage.py orchestrates).

Examples:
    python 9_export_hf.py --config configs/tiny/export.yaml
    python 9_export_hf.py --config configs/tiny/export.yaml --dry-run                  # the plan, no work
    python 9_export_hf.py --config configs/tiny/export.yaml --push-to-hub me/dante-tiny --dry-run
    python 9_export_hf.py --config configs/dante-2b/export.yaml --push-to-hub me/dante-2b --private
"""

from __future__ import annotations

import sys

from dante import config as C
from dante import export
from dante.cli import run_command, run_stage

STAGE = "09_export"
DESCRIPTION = __doc__.split("\n\n")[0]


def add_args(ap) -> None:
    ap.add_argument("--push-to-hub", metavar="REPO", default="",
                    help="after exporting, upload the folder to this Hugging Face repo (e.g. me/dante-2b)")
    ap.add_argument("--private", action="store_true", help="create the hub repository as private")


def validate(stage, cfg: C.ExportStageConfig, args):
    """Every check of config and inputs, read-only (run_stage calls it before --force resets 09_export)."""
    plan = export.preflight(cfg)
    export.record_inputs(stage, plan)
    args.export_plan = plan  # --dry-run describes this plan rather than redoing every check
    return plan


def main(stage, cfg: C.ExportStageConfig, args) -> None:
    manifest = export.export_stage(stage, cfg, stage.plan)
    counts = manifest["counts"]
    print(f"[{STAGE}] done: {counts['files']} files, {counts['bytes']:,} bytes, {counts['parameters']:,} parameters "
          f"in {stage.dir}", flush=True)


def dry_run(cfg: C.ExportStageConfig, args) -> None:
    if args.push_to_hub:
        lines = export.push_to_hub(cfg, args.push_to_hub, args.private, dry_run=True)
    else:
        lines = export.plan_lines(cfg, getattr(args, "export_plan", None))
    print("\n".join(f"[{STAGE}] {line}" for line in lines))


def push(cfg: C.ExportStageConfig, args) -> int:
    """The upload step, after run_stage (which returns without calling main when the export is complete)."""
    if not args.push_to_hub or args.dry_run or args.print_config:
        return 0
    for line in export.push_to_hub(cfg, args.push_to_hub, args.private):
        print(f"[{STAGE}] {line}", flush=True)
    return 0


def cli(argv: list[str] | None = None) -> int:
    """The whole command line: the stage, then the upload when asked (what ``__main__`` runs)."""
    rc = run_stage(STAGE, DESCRIPTION, main, format_version=export.FORMAT_VERSION, extra_args=add_args,
                   validate=validate, dry_run=dry_run, argv=argv)
    if rc == 0:
        rc = run_command(STAGE, DESCRIPTION, push, extra_args=add_args, argv=argv)
    return rc


if __name__ == "__main__":
    sys.exit(cli())
