"""The command line shared by every numbered script.

Each script calls ``parse_stage_args`` and ``run_stage``; this gives all of them the same flags
(``--config``, repeated ``--set``, ``--print-config``, ``--help-config``, ``--force``, ``--dry-run``)
and the same exit behaviour: a config, input or stage problem prints one clear message and exits 2,
and an already complete stage prints that it is a no-op and exits 0.

Example::

    python 3_tokenize_shards.py --config configs/tiny/shards.yaml --set shards.workers=2
"""

from __future__ import annotations

import argparse
import errno
import sys
from typing import Any, Callable

from dante import config as C
from dante.artifacts import Stage, StageAlreadyDone, check_writable, is_main_process, run_dir
from dante.errors import ConfigError, StageError, UserError


def build_parser(stage: str, description: str) -> argparse.ArgumentParser:
    script, _ = C.STAGES[stage]
    ap = argparse.ArgumentParser(
        prog=script,
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"example: python {script} --config configs/tiny/{C.PROFILE_FILES[stage]}",
    )
    ap.add_argument("--config", required=False, help=f"YAML config (e.g. configs/tiny/{C.PROFILE_FILES[stage]})")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a dotted config key, e.g. --set run.name=exp1 (repeatable)")
    ap.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    ap.add_argument("--help-config", action="store_true", help="list every config key with its default and doc")
    ap.add_argument("--force", action="store_true", help="redo the stage even if complete (deletes its folder)")
    ap.add_argument("--dry-run", action="store_true", help="validate and print the plan; do no work")
    # The DeepSpeed launcher appends --local_rank=N to every rank's argv (torch.distributed.launch spelled it
    # --local-rank). LOCAL_RANK in the environment stays the source of truth (dante.distributed.init_distributed);
    # the flag is accepted so that `deepspeed --num_gpus 2 4_pretrain.py ...` starts at all.
    ap.add_argument("--local_rank", "--local-rank", dest="local_rank", type=int, default=None,
                    help=argparse.SUPPRESS)
    return ap


def load_stage_config(stage: str, args: argparse.Namespace) -> Any:
    _, cls = C.STAGES[stage]
    if args.help_config:
        print("\n".join(C.describe(cls)))
        raise SystemExit(0)
    if not args.config:
        raise ConfigError([f"--config is required (e.g. --config configs/tiny/{C.PROFILE_FILES[stage]})"], "<command line>")
    return C.load_config(cls, args.config, args.overrides)


def parse_args(stage: str, description: str, extra_args: Callable[[argparse.ArgumentParser], None] | None,
               argv: list[str] | None) -> argparse.Namespace:
    """The shared flags plus the script's own (``extra_args``), parsed from ``argv`` (default sys.argv)."""
    ap = build_parser(stage, description)
    if extra_args:
        extra_args(ap)
    return ap.parse_args(argv)


def _report(stage: str, e: Exception) -> int:
    print(f"[{stage}] ERROR: {e}", file=sys.stderr)
    return 2


def run_command(
    stage: str,
    description: str,
    command: Callable[[Any, argparse.Namespace], int | None],
    *,
    extra_args: Callable[[argparse.ArgumentParser], None] | None = None,
    argv: list[str] | None = None,
) -> int:
    """A command beside the stage (``--verify``, ``--chat``, a hub push): same flags, config and errors as
    ``run_stage``, but no stage folder is opened and nothing is marked done. ``command(cfg, args)`` returns
    the exit code (None = 0)."""
    args = parse_args(stage, description, extra_args, argv)
    try:
        cfg = load_stage_config(stage, args)
        return command(cfg, args) or 0
    except (ConfigError, StageError, UserError) as e:
        return _report(stage, e)


def run_stage(
    stage: str,
    description: str,
    main: Callable[[Stage, Any, argparse.Namespace], dict | None],
    *,
    format_version: int = 1,
    extra_args: Callable[[argparse.ArgumentParser], None] | None = None,
    validate: Callable[[Stage, Any, argparse.Namespace], Any] | None = None,
    dry_run: Callable[[Any, argparse.Namespace], None] | None = None,
    resume_check: Callable[[dict, dict, dict], str | None] | None = None,
    setup: Callable[[Any], Any] | None = None,
    argv: list[str] | None = None,
) -> int:
    """Parse args, validate, open the stage, call ``main(stage, cfg, args)``; map errors to exit codes.

    The order is the guarantee that a rejected command changes nothing on disk:

    1. the config (``load_config``: types, unknown keys, the stage's own checks);
    2. a finished stage: same config -> no-op (exit 0); a config that differs in a key that matters ->
       refused (exit 2) naming the keys; --force goes on;
    3. ``setup(cfg)`` (not in a dry run): the training stages start their ranks; a wrong world size is
       refused here;
    4. ``validate(stage, cfg, args)``: every input the stage reads (manifests, files, vocabulary, the
       checkpoint), read-only, all problems in one error; what it returns is ``stage.plan`` for ``main``;
    5. ``--dry-run`` prints the plan (``dry_run(cfg, args)``) and stops;
    6. ``Stage.open``: the stage lock, then --force resets the folder, debris is removed, resume decided;
    7. ``main`` does the work and calls ``stage.finish(...)`` itself (the manifest last).

    A start refused in ``main`` before it recorded any work removes the folder it created. A full disk is
    reported as such (exit 2), naming the path and the way out; rerunning resumes.
    """
    args = parse_args(stage, description, extra_args, argv)
    st = planned = None
    try:
        cfg = load_stage_config(stage, args)
        if args.print_config:
            print(C.to_yaml(cfg), end="")
            return 0
        planned = Stage.prepare(cfg, stage, format_version)
        if not args.dry_run:
            planned.check_not_finished(args.force)
            if setup is not None:  # the launch itself first: a wrong world size is named before any input
                setup(cfg)
        if validate is not None:
            planned.plan = validate(planned, cfg, args)
        if args.dry_run:
            if planned.dir.joinpath("manifest.json").is_file():
                print(f"# {stage} is complete for run {cfg.run.name!r}: a run would be a no-op unless --force")
            if dry_run is None:
                print(C.to_yaml(cfg), end="")
                print(f"# dry run: config valid; {stage} would write to {planned.dir}")
            else:
                dry_run(cfg, args)
            return 0
        problems = check_writable(run_dir(cfg.run))
        if problems:
            raise UserError("\n".join(problems))
        st = Stage.open(cfg, stage, format_version=format_version, force=args.force, resume_check=resume_check,
                        prepared=planned)
        if st.resumed:
            print(f"[{stage}] resuming unfinished run in {st.dir}", flush=True)
        main(st, cfg, args)
        return 0
    except StageAlreadyDone as e:
        if is_main_process():  # every rank of a launch finds it done; one line is enough
            print(f"[{stage}] {e}")
            planned.tidy_finished()
        return 0
    except (ConfigError, StageError, UserError) as e:
        if st is not None:
            st.discard_if_untouched()
        return _report(stage, e)
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        where = e.filename or (st.dir if st is not None else "the run folder")
        return _report(stage, UserError(
            f"no space left on the device (or quota exceeded) while writing {where}.\n"
            f"  HINT: free space there (`df -h {where}`) or set run.root to a larger disk (copy the earlier stages' "
            f"folders); then rerun the same command: finished work is kept and the stage resumes."))
