"""Run folders, atomic writes and stage manifests.

Every stage writes under ``<run.root>/<run.name>/<NN>_<stage>/`` and writes ``manifest.json`` LAST
(atomically), so a manifest's presence means the stage completed. A stage reads the manifests of its
inputs before any work and refuses a missing or incompatible one with the script to run.

Lifecycle used by every numbered script::

    stage = Stage.open(cfg, C.SHARDS, force=args.force)   # lock; no-op exit if already complete
    corpus = stage.require(C.CORPUS)                        # input manifest or a clear error
    ... work, writing files with atomic_write_* / stage.progress ...
    stage.finish(outputs={...}, counts={...})                  # manifest.json, last

Resume: an interrupted stage leaves its partial outputs and ``progress.json`` (no manifest); the next
run reuses them when the resolved config is the same, and refuses (naming --force) when it differs.

A later stage finds an earlier stage's files through that stage's manifest, not by a file name of its
own: ``tokenizer_path(run)`` is stage 2's ``outputs.tokenizer``, for stages 3 to 9.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import fcntl
import gzip
import hashlib
import json
import os
import platform
import secrets
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from dante import config as C
from dante.errors import StageError, bullet_list

MANIFEST = "manifest.json"
PROGRESS = "progress.json"


class StageAlreadyDone(Exception):
    """Raised by Stage.open when the stage is complete and --force was not given."""


# ---------------------------------------------------------------------------------------------------
# Atomic writes
# ---------------------------------------------------------------------------------------------------


_UMASK = os.umask(0)
os.umask(_UMASK)  # read the process umask (the only portable way is to set it and restore it)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path in the same folder; rename onto ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    # mkstemp creates 0600; give the final file the permissions a plain open() would (0666 & ~umask),
    # or artifacts on a shared machine are unreadable to the rest of the team.
    os.fchmod(fd, 0o666 & ~_UMASK)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:  # durability: data on disk before the rename makes it visible
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "item"):
        return o.item()
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def read_jsonl(path: str | Path) -> list[dict]:
    """The objects of a JSON Lines file (optionally .gz); ValueError naming file and line when malformed."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    rows = []
    with opener(path, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object per line")
            rows.append(row)
    return rows


def load_texts(path: str | Path, field: str = "text") -> list[str]:
    """The non-empty ``field`` strings of a JSON Lines file (optionally .gz), one document per line."""
    texts = []
    for i, row in enumerate(read_jsonl(path)):
        if not isinstance(row.get(field), str):
            raise ValueError(f"{path}: document {i} has no string field {field!r}")
        if row[field]:
            texts.append(row[field])
    return texts


def file_sha256(path: str | Path, limit: int | None = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        remaining = limit
        while True:
            n = 1 << 20 if remaining is None else min(1 << 20, remaining)
            if n == 0:
                break
            chunk = f.read(n)
            if not chunk:
                break
            h.update(chunk)
            if remaining is not None:
                remaining -= len(chunk)
    return h.hexdigest()


def stable_hash64(*parts: str | int) -> int:
    """A 64-bit BLAKE2b of the parts joined by U+001F, as an int (same on every machine and run).

    The one hash behind every content-keyed data decision: stage 1's dedup keys (one part: the text),
    stage 2's sample, stage 3's train/val split, stage 6's held-out split and copies (``stable_unit``).
    Independent of PYTHONHASHSEED, order and worker count; pass ``run.seed`` as a part where the draw
    should follow the seed. U+001F (unit separator) is not in text that reaches these calls' fixed parts.
    """
    data = "\x1f".join(str(p) for p in parts).encode("utf-8", "surrogatepass")
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def stable_unit(*parts: str | int) -> float:
    """A deterministic number in [0, 1) from the parts: ``stable_hash64`` / 2**64."""
    return stable_hash64(*parts) / 2**64


def describe_path(path: str | Path, hash_limit: int = 64 << 20) -> dict:
    """Path with size and (for files up to hash_limit) sha256: for manifests' `inputs`."""
    p = Path(path)
    if p.is_dir():
        files = [f for f in sorted(p.rglob("*")) if f.is_file()]
        return {"path": str(p), "kind": "dir", "files": len(files), "bytes": sum(f.stat().st_size for f in files)}
    info = {"path": str(p), "kind": "file", "bytes": p.stat().st_size}
    if p.stat().st_size <= hash_limit:
        info["sha256"] = file_sha256(p)
    return info


# ---------------------------------------------------------------------------------------------------
# Environment facts for manifests
# ---------------------------------------------------------------------------------------------------


_PACKAGES = ("torch", "numpy", "tokenizers", "tiktoken", "zstandard", "transformers", "datasets", "deepspeed",
             "torchao", "safetensors")


def software_versions() -> dict[str, str]:
    """Installed versions of the packages the stages use, from their metadata (no import: stages 1-3 do not
    load torch). The same set in every manifest: listing only the modules a process happened to import
    made a resumed run's manifest differ from an uninterrupted one's."""
    from importlib import metadata

    out = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def git_commit() -> str:
    try:
        here = Path(__file__).resolve().parent.parent
        r = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        if r.returncode == 0:
            dirty = subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"], cwd=here, capture_output=True, text=True, timeout=5
            ).stdout.strip()
            return r.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown"


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------------------------------------------
# Stages
# ---------------------------------------------------------------------------------------------------


def is_main_process() -> bool:
    """True on global rank 0 (or without a launcher). Under `deepspeed`/`torchrun` every rank runs the
    stage script; only rank 0 may delete, write progress or write the manifest, or N ranks race on one
    folder (a --force on 8 GPUs would rmtree it 8 times while checkpoints are being written)."""
    return int(os.environ.get("RANK", "0")) == 0


def _process_group() -> Any:
    """``torch.distributed`` when a process group of several ranks is up, else None.

    Looked up in sys.modules, never imported: stages 1-3 do not use torch (importing it costs seconds),
    and a process group can only exist where a training stage has already imported and started it.
    """
    td = sys.modules.get("torch.distributed")
    if td is None or not td.is_available() or not td.is_initialized() or td.get_world_size() < 2:
        return None
    return td


def check_shared_folder(folder: Path, token: str, group: Any) -> None:
    """Refuse a stage folder that is not one folder seen by every rank (collective: all ranks call it).

    Every rank reads and writes the same checkpoints (DeepSpeed saves each rank's optimizer shard into the
    step folder, rank 0 writes the weights, ``latest`` and the manifest, and all ranks read them on
    resume), so node-local disks that merely share a path would split one checkpoint over several
    machines and make ranks resume from different steps. Rank 0 has just created ``folder``; each other
    rank writes ``.rank-<r>-<token>`` into it (the token is fresh per run, so a stale marker proves
    nothing), then rank 0 looks for all of them and tells every rank the verdict.
    """
    rank = group.get_rank()
    marker = folder / f".rank-{rank}-{token}"
    sees_folder = folder.is_dir()
    if rank != 0 and sees_folder:
        marker.write_text(platform.node() + "\n", encoding="utf-8")
    ranks: list[Any] = [None] * group.get_world_size()
    group.all_gather_object(ranks, (rank, platform.node(), sees_folder))  # also the barrier after the writes
    verdict: list[Any] = [None]
    if rank == 0:
        problems = []
        for r, host, seen in ranks[1:]:
            if not seen:
                problems.append(f"rank {r} (host {host}) does not see the folder at all")
            elif not (folder / f".rank-{r}-{token}").exists():
                problems.append(f"rank {r} (host {host}) wrote a marker into its {folder} that rank 0 cannot see")
        verdict = [problems]
    group.broadcast_object_list(verdict, src=0)
    if rank != 0 and sees_folder:
        marker.unlink(missing_ok=True)
    if verdict[0]:
        raise StageError(
            f"the stage folder {folder.absolute()} is not shared by all ranks (rank 0 is on host {ranks[0][1]}):\n"
            + bullet_list(verdict[0])
            + "\n  Every rank reads and writes the same checkpoints, so run.root must be one folder on storage that "
            "every node mounts at the same path (NFS, Lustre, a cloud file system), not a node-local disk.\n"
            "  HINT: --set run.root=/path/on/shared/storage (copy the earlier stages there), then relaunch.")


# ---------------------------------------------------------------------------------------------------
# One process per stage folder
# ---------------------------------------------------------------------------------------------------

LOCKS = ".locks"
_HELD: dict[str, Any] = {}  # lock path -> open file: this process holds it (kept open until exit)


def lock_path(run: C.RunConfig, stage: str) -> Path:
    """``<run>/.locks/<stage>.lock``: beside the stage folder, not in it, so --force can delete the folder
    while the lock is held."""
    return run_dir(run) / LOCKS / f"{stage}.lock"


def acquire_stage_lock(run: C.RunConfig, stage: str) -> None:
    """Hold an OS lock (``flock``) on the stage for the rest of this process, or a StageError naming the holder.

    The kernel releases the lock when the holder dies, however it dies (SIGKILL included), so a stale
    lock cannot exist and no cleanup is needed. Reentrant within one process (the tests open one stage
    several times). The holder writes ``pid host started`` into the file for the message of the next one.
    Two runs of stage 3 on one folder crashed on each other's temporaries, and two runs of stage 4 both
    wrote the manifest, before this lock.
    """
    path = lock_path(run, stage)
    key = str(path.absolute())
    if key in _HELD:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    f = open(path, "a+", encoding="utf-8")
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            f.close()
            raise
        f.seek(0)
        holder = f.read().strip() or "another process (no holder recorded yet)"
        f.close()
        raise StageError(
            f"{stage} of run {run.name!r} is being run by another process right now ({holder}; lock {path}).\n"
            f"  HINT: wait for it to finish (or stop it), or run this one under another run.name.") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on host {platform.node()} since {now_iso()}\n")
    f.flush()
    _HELD[key] = f


def release_stage_lock(run: C.RunConfig, stage: str) -> None:
    """Give the stage lock up (``Stage.finish`` does, once the manifest is written; a test process that opened
    a stage by hand does before a subprocess opens the same stage)."""
    f = _HELD.pop(str(lock_path(run, stage).absolute()), None)
    if f is not None:
        f.close()  # closing the only descriptor of the open file releases the flock


def release_all_stage_locks() -> None:
    """Every lock this process holds (tests that open stages in-process, then run the scripts)."""
    for f in _HELD.values():
        f.close()
    _HELD.clear()


def remove_debris(folder: Path) -> list[Path]:
    """Delete the stale temporaries a killed run left in ``folder`` (call with the stage lock held).

    Every temporary this package writes is ``.<name>.<random>.tmp`` (``atomic_path``) or a rank marker
    ``.rank-<r>-<token>`` (``check_shared_folder``); under the lock no live process owns one.
    """
    removed = []
    if folder.is_dir():
        for p in sorted(folder.rglob(".*")):
            if p.is_file() and (p.name.endswith(".tmp") or p.name.startswith(".rank-")):
                p.unlink(missing_ok=True)
                removed.append(p)
    return removed


_MISSING = object()


def _dotted(d: Any, key: str, default: Any = None) -> Any:
    """The value at a dotted key of nested dicts, or ``default`` when a part is missing."""
    for part in key.split("."):
        if not isinstance(d, dict) or part not in d:
            return default
        d = d[part]
    return d


def _has(d: Any, key: str) -> bool:
    return _dotted(d, key, _MISSING) is not _MISSING


def finished_config_changes(saved: dict, live: dict) -> list[str]:
    """``key: saved -> live`` for the keys that matter (not ``C.is_output_neutral``) where a finished stage's
    manifest config and the live config differ. A field the saved config lacks in one of its sections (a
    key added to the schema after the stage ran) is not compared: its default is what the stage ran with.
    Mappings the user fills (``train.tier_weights``) and lists are compared whole."""
    out = []
    saved, live = _str_keys(saved), _str_keys(live)
    for key in diff_configs(saved, live):
        if C.is_output_neutral(key):
            continue
        parent = key.rsplit(".", 1)[0] if "." in key else ""
        if not _has(saved, key) and (not parent or _is_schema_section(saved, parent)):
            continue
        out.append(f"{key}: {_short(_dotted(saved, key))} -> {_short(_dotted(live, key))}")
    return out


def _str_keys(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _str_keys(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_str_keys(v) for v in obj]
    return obj


def _is_schema_section(saved: dict, parent: str) -> bool:
    """A dataclass section (``train``, ``model``), not a user mapping such as ``train.tier_weights`` (whose
    keys are tier numbers): every key is an identifier."""
    node = _dotted(saved, parent)
    return isinstance(node, dict) and all(isinstance(k, str) and k.isidentifier() for k in node)


def _short(v: Any) -> str:
    text = json.dumps(v, ensure_ascii=False, default=str)
    return text if len(text) <= 60 else text[:57] + "..."



def run_dir(run: C.RunConfig) -> Path:
    return Path(run.root) / run.name


def stage_dir(run: C.RunConfig, stage: str) -> Path:
    if stage not in C.STAGES:
        raise KeyError(f"unknown stage {stage!r}; known: {list(C.STAGES)}")
    return run_dir(run) / stage


def script_for(stage: str) -> str:
    return C.STAGES[stage][0]


def read_manifest(run: C.RunConfig, stage: str, format_version: int | None = None) -> dict:
    """The manifest of a completed stage, or a StageError that names the script to run."""
    d = stage_dir(run, stage)
    path = d / MANIFEST
    script = script_for(stage)
    if not path.is_file():
        hint = " (it started but did not finish: rerun it to resume)" if d.exists() else ""
        raise StageError(
            f"{stage} is missing for run {run.name!r}: no {path}{hint}.\n"
            f"  HINT: run `python {script} --config configs/<profile>/{C.PROFILE_FILES[stage]}` first."
        )
    try:
        m = read_json(path)
    except (json.JSONDecodeError, OSError) as e:
        raise StageError(f"{path} is unreadable ({e}); rerun `python {script} --force`.") from None
    if m.get("stage") != stage:
        raise StageError(f"{path} describes stage {m.get('stage')!r}, expected {stage!r}; rerun {script} --force.")
    if format_version is not None and m.get("format_version") != format_version:
        raise StageError(
            f"{stage} output has format version {m.get('format_version')}, this code reads version "
            f"{format_version}; rerun `python {script} --force` to rebuild it."
        )
    return m


def tokenizer_path(run: C.RunConfig) -> Path:
    """The run's tokenizer file, as stage 2's manifest names it (``outputs.tokenizer``).

    Every later stage finds the tokenizer here, so the file name is stage 2's to choose and written once,
    in its manifest. StageError (naming 2_train_tokenizer.py) when stage 2 has not finished, its manifest
    names no tokenizer, or the file is gone.
    """
    outputs = read_manifest(run, C.TOKENIZER).get("outputs", {})
    name = outputs.get("tokenizer")
    folder = stage_dir(run, C.TOKENIZER)
    if not isinstance(name, str) or not name:
        raise StageError(f"{folder / MANIFEST} names no tokenizer file (outputs.tokenizer); "
                         f"rerun `python {script_for('02_tokenizer')} --force`.")
    path = folder / name
    if not path.is_file():
        raise StageError(f"{path} is missing although 02_tokenizer is complete; "
                         f"rerun `python {script_for('02_tokenizer')} --force`.")
    # A tokenizer damaged in a way that still parses (a flipped byte in a token) would silently change every
    # id: stage 2 records the file's sha256, checked at every read (~10 ms for a 64K-id file).
    want = outputs.get("tokenizer_sha256")
    if isinstance(want, str) and file_sha256(path) != want:
        raise StageError(f"{path} changed after 02_tokenizer finished (its sha256 differs from the one in "
                         f"{folder / MANIFEST}): every token id it gives may differ.\n"
                         f"  HINT: restore the file from a copy of this run; or retrain it with "
                         f"`python {script_for('02_tokenizer')} --force` and redo every stage after it "
                         f"(checkpoints trained with the old tokenizer do not fit a new one).")
    return path


def stage_done(run: C.RunConfig, stage: str) -> bool:
    return (stage_dir(run, stage) / MANIFEST).is_file()


@dataclass
class Stage:
    """One execution of a stage: its folder, its inputs, progress and its final manifest."""

    name: str
    dir: Path
    cfg: Any
    format_version: int
    started: str = field(default_factory=now_iso)
    inputs: dict = field(default_factory=dict)
    resumed: bool = False

    fresh: bool = False
    """This run created the folder (it did not exist, or --force just reset it): a start refused before any
    work removes it again (``discard_if_untouched``), so a refused command leaves nothing behind."""
    plan: Any = None
    """What the stage's ``validate`` hook returned (``cli.run_stage``): the checked inputs, for ``main``."""

    @classmethod
    def prepare(cls, cfg: Any, name: str, format_version: int = 1) -> "Stage":
        """The stage object without touching the disk: ``validate`` hooks record inputs on it
        (``require``) before ``open`` may reset the folder."""
        return cls(name=name, dir=stage_dir(cfg.run, name), cfg=cfg, format_version=format_version)

    @classmethod
    def open(cls, cfg: Any, name: str, format_version: int = 1, force: bool = False,
             resume_check: Callable[[dict, dict, dict], str | None] | None = None,
             prepared: "Stage | None" = None) -> "Stage":
        """Lock and prepare the stage folder. Raises StageAlreadyDone if complete with the same config
        (keys in ``C.OUTPUT_NEUTRAL_KEYS`` aside), StageError if complete with a different one (unless force).

        An unfinished folder from an earlier run is kept for resuming if its recorded config matches;
        a mismatch is refused, because mixing outputs of two configs would silently corrupt the result.
        A stage whose work splits into independent parts may pass ``resume_check(old_config, new_config,
        saved_state)``: it returns None when the saved work is still valid under the new config (e.g. only
        a failed corpus source was corrected), or the reason why not. Stale temporaries of a killed run are
        deleted (``remove_debris``), under the stage lock (``acquire_stage_lock``).

        Several ranks (a process group is up: the training stages start it before opening): rank 0 alone
        locks, inspects, resets (--force) and prepares the folder while the others wait, then broadcasts the
        outcome, so every rank resumes, refuses or finds the stage done together, and a reset never races
        with another rank reading the folder. Then ``check_shared_folder`` proves every rank sees it.
        """
        st = prepared or cls.prepare(cfg, name, format_version)
        group = _process_group()
        if group is None:
            st._open_here(force, resume_check)
            return st
        outcome: list[Any] = [None]
        failure = None
        if group.get_rank() == 0:
            try:
                st._open_here(force, resume_check)
                outcome = [("ok", st.resumed, secrets.token_hex(8))]
            except Exception as e:  # every rank must hear of it, or the others wait in the broadcast forever
                failure = e
                kind = "done" if isinstance(e, StageAlreadyDone) else "error"
                outcome = [(kind, str(e) if isinstance(e, (StageAlreadyDone, StageError)) else
                            f"rank 0 could not open the stage folder: {type(e).__name__}: {e}", None)]
        group.broadcast_object_list(outcome, src=0)
        kind, value, token = outcome[0]
        if failure is not None:
            raise failure
        if kind == "done":
            raise StageAlreadyDone(value)
        if kind == "error":
            raise StageError(value)
        if group.get_rank() != 0:
            st.resumed = value
        check_shared_folder(st.dir, token, group)
        return st

    def check_not_finished(self, force: bool) -> None:
        """StageAlreadyDone when complete with the same config, StageError naming the keys (both values) and
        the two ways out when complete with a different one; nothing when unfinished or ``force``.
        Read-only: ``cli.run_stage`` calls it before validating, ``open`` again under the lock."""
        manifest = self.dir / MANIFEST
        if force or not manifest.exists():
            return
        try:
            saved = read_json(manifest).get("config") or {}
        except (json.JSONDecodeError, OSError, UnicodeDecodeError) as e:
            raise StageError(f"{manifest} is unreadable ({e}): the finished {self.name} cannot be trusted.\n"
                             f"  HINT: rerun with --force to redo {self.name}.") from None
        changes = finished_config_changes(saved, C.to_dict(self.cfg))
        if not changes:
            raise StageAlreadyDone(
                f"{self.name} is already complete for run {self.cfg.run.name!r} ({manifest}); nothing to do. "
                f"Use --force to redo it.")
        raise StageError(
            f"{self.name} is already complete for run {self.cfg.run.name!r}, made with a different config; "
            f"this command would not apply the change:\n" + bullet_list(changes[:12])
            + (f"\n  ... and {len(changes) - 12} more" if len(changes) > 12 else "")
            + f"\n  HINT: --force redoes {self.name} with the new config (deleting {self.dir}), or "
            f"--set run.name=<new name> keeps both runs (copy the earlier stages' folders there first).")

    def _open_here(self, force: bool, resume_check: Callable[[dict, dict, dict], str | None] | None) -> None:
        d, name, cfg = self.dir, self.name, self.cfg
        acquire_stage_lock(cfg.run, name)
        self.check_not_finished(force)
        cfg_dict = C.to_dict(cfg)
        if is_main_process():  # a reset a kill interrupted: finish deleting it
            for old in d.parent.glob(f".{name}.deleting-*"):
                shutil.rmtree(old, ignore_errors=True)
        if force and d.exists():
            if is_main_process():
                # renamed away in one atomic step, then deleted: a kill part-way through the delete leaves
                # neither a "complete" stage with files missing nor stale files in a fresh folder
                trash = d.parent / f".{name}.deleting-{secrets.token_hex(4)}"
                os.replace(d, trash)
                shutil.rmtree(trash)
        self.fresh = not d.exists()
        remove_debris(d)
        resumed = False
        prog_path = d / PROGRESS
        if d.exists() and prog_path.exists():
            try:
                prog = read_json(prog_path)
            except (json.JSONDecodeError, OSError, UnicodeDecodeError) as e:
                raise StageError(f"{prog_path} is unreadable ({e}), so the unfinished {name} cannot be resumed.\n"
                                 f"  HINT: rerun with --force to start {name} over.") from None
            # An empty state means the earlier run stopped before recording any work (typically a bad
            # input found by the stage's own checks): nothing to protect, so a corrected config starts
            # fresh instead of demanding --force.
            did_work = bool(prog.get("state"))
            if did_work and _stable(prog.get("config")) != _stable(cfg_dict):
                diff = diff_configs(prog.get("config") or {}, cfg_dict)
                reason = resume_check(prog.get("config") or {}, cfg_dict, prog["state"]) if resume_check else ""
                if reason is not None:
                    raise StageError(
                        f"{d} holds an unfinished {name} run made with a different config "
                        f"(differs at: {', '.join(diff[:8]) or '?'}){': ' + reason if reason else ''}.\n"
                        f"  HINT: rerun with the same config to resume, or pass --force to start over."
                    )
                if is_main_process():  # accepted: record the corrected config
                    atomic_write_json(prog_path, {**prog, "config": cfg_dict, "updated": now_iso()})
            resumed = did_work
        d.mkdir(parents=True, exist_ok=True)
        self.resumed = resumed
        if not resumed:
            self.save_progress({})

    def tidy_finished(self) -> None:
        """On a finished stage's no-op rerun: remove what a kill between the manifest's rename and the end of
        ``finish`` left (``progress.json``) and stale temporaries, if no other process holds the stage."""
        try:
            acquire_stage_lock(self.cfg.run, self.name)
        except StageError:
            return  # another process is at work on it: leave everything alone
        try:
            if (self.dir / MANIFEST).is_file():
                (self.dir / PROGRESS).unlink(missing_ok=True)
                remove_debris(self.dir)
        finally:
            release_stage_lock(self.cfg.run, self.name)

    def discard_if_untouched(self) -> bool:
        """Remove the folder this run created when the stage stopped before recording any work (only an
        empty ``progress.json`` in it): a refused start leaves no folder behind. True if removed."""
        if not (self.fresh and is_main_process() and self.dir.is_dir()):
            return False
        entries = [p.name for p in self.dir.iterdir()]
        if entries not in ([], [PROGRESS]) or self.load_progress():
            return False
        shutil.rmtree(self.dir, ignore_errors=True)
        return True

    # -- inputs -------------------------------------------------------------------------------------
    def require(self, stage: str, format_version: int | None = None) -> dict:
        m = read_manifest(self.cfg.run, stage, format_version)
        self.inputs[stage] = {
            "manifest": str(stage_dir(self.cfg.run, stage) / MANIFEST),
            "manifest_sha256": file_sha256(stage_dir(self.cfg.run, stage) / MANIFEST),
            "finished": m.get("finished"),
        }
        return m

    def add_input(self, key: str, path: str | Path) -> None:
        self.inputs[key] = describe_path(path)

    # -- progress (resume state) --------------------------------------------------------------------
    def load_progress(self) -> dict:
        p = self.dir / PROGRESS
        return read_json(p).get("state", {}) if p.exists() else {}

    def save_progress(self, state: dict) -> None:
        if not is_main_process():
            return
        atomic_write_json(self.dir / PROGRESS, {"config": C.to_dict(self.cfg), "state": state, "updated": now_iso()})

    # -- completion ---------------------------------------------------------------------------------
    def finish(self, outputs: dict | None = None, counts: dict | None = None, extra: dict | None = None) -> dict:
        manifest = {
            "stage": self.name,
            "script": script_for(self.name),
            "format_version": self.format_version,
            "config": C.to_dict(self.cfg),
            "inputs": self.inputs,
            "outputs": outputs or {},
            "counts": counts or {},
            "software": software_versions(),
            "git_commit": git_commit(),
            "host": platform.node(),
            "started": self.started,
            "finished": now_iso(),
            "resumed": self.resumed,
        }
        if extra:
            manifest.update(extra)
        if not is_main_process():
            return manifest
        atomic_write_json(self.dir / MANIFEST, manifest)  # LAST: its presence means "complete"
        p = self.dir / PROGRESS
        if p.exists():
            p.unlink()
        release_stage_lock(self.cfg.run, self.name)
        return manifest


def _normal(obj: Any) -> Any:
    """A config value as its saved JSON form compares: mapping keys as strings (a live ``{1: 3.0}`` is the
    saved ``{"1": 3.0}``), tuples as lists, and numbers by value (``3`` equals ``3.0``)."""
    if isinstance(obj, dict):
        return {str(k): _normal(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_normal(v) for v in obj]
    if isinstance(obj, (int, float)) and not isinstance(obj, bool):
        return float(obj)
    return obj


def _stable(obj: Any) -> str:
    return json.dumps(_normal(obj), sort_keys=True, default=str)


def diff_configs(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two config dicts (saved or live: compared normalised)."""
    a, b = _normal(a), _normal(b)
    out = []
    for k in sorted(set(a) | set(b), key=str):
        key = f"{prefix}{k}"
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += diff_configs(va, vb, key + ".")
        elif _stable(va) != _stable(vb):
            out.append(key)
    return out


def check_writable(path: str | Path) -> list[str]:
    """Problems (as messages) if ``path`` cannot be created/written. Probes for real: root ignores
    permission bits, so os.access would say yes where a read-only mount or a file in the way says no."""
    p = Path(path).absolute()
    probe = p
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        return [f"output folder {p} cannot be created: {probe} is a file; choose another run.root / run.name"]
    try:
        fd, tmp = tempfile.mkstemp(prefix=".dante-write-probe-", dir=probe)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        return [f"output folder {p} is not writable ({probe}: {e.strerror}); choose another run.root"]
    return []
