"""Training checkpoints: layout, atomic completion, keep-last-K, resume, ``load_model`` for later stages, and
checkpoint identity: which checkpoint, from which stage, trained with which tokenizer.

One file (~700 lines) on purpose: the step folder is one contract, and its writer, its readers, the resume
rules and the identity checks change together; each has its own section below.

Layout (docs/DESIGN.md, "Checkpoints")::

    <stage>/checkpoints/step-0000100/
        model.safetensors      consolidated fp32 weights, Meta names, a tied matrix stored once
                               (as tok_embeddings.weight); what stages 5, 7, 8 and 9 load
        model_config.json      the ModelConfig as a dict (rope_scaling included)
        train_state/           the training backend's state: DeepSpeed ``save_checkpoint`` shards in
                               deepspeed/ (optimizer partitions per rank, module), or the torch optimizer;
                               universal/ once a resume on another rank count converted them; plus
                               rng-rank<r>.safetensors, the python/numpy/torch(/cuda) RNG states of every
                               rank as plain tensors (rng-rank<r>.pt, pickled, in older checkpoints)
        meta.json              step, tokens seen, loss, sampler state, stage config, the batch split
                               (micro_batch, grad_accum, ranks), past changes of rank count, and the size
                               and sha256 of every other file of the folder ("files"); written LAST
    <stage>/checkpoints/latest text file naming the newest complete step folder, replaced atomically

Design choices
- A checkpoint is complete iff its ``meta.json`` exists: every rank writes its part, a barrier, then
  rank 0 writes meta.json atomically (temp file + rename) and only then moves ``latest``. A crash or
  SIGKILL at any point leaves either the previous complete checkpoint or the new one, never a half.
- RNG states are per rank (each rank has its own torch generator), so they live in per-rank files in
  train_state/ rather than in meta.json, which rank 0 alone writes. Dante's training draws no random
  numbers itself (no dropout; the data sampler is counter-based, see dante/pretrain_data.py); the states are
  kept so that anything random added later resumes exactly too.
- Verified reads: meta.json records the size and sha256 of every file of the step folder when it is
  written; ``verify_checkpoint`` checks them before anything is loaded (the weights and model_config.json
  for ``load_model``, every file for a resume), and a damaged or truncated file, or a meta.json that is
  not valid JSON, is a CheckpointError naming the file and the fix, never a safetensors or JSON traceback.
  Checkpoints written before checksums are accepted with a note (not verified).
- Deterministic bytes: the same state saves to the same bytes (safetensors headers sorted, RNG states as
  plain tensors, torch.save through a buffer so that no temp-file name lands in the archive), so a run
  resumed after a kill ends with checkpoint files identical to an uninterrupted run's (meta.json differs
  in its "saved" time only).
- Consolidated fp32: under ZeRO the fp32 master weights are split across ranks; ``full_state_dict``
  (the backend's) gathers each parameter's fp32 master, so model.safetensors holds the optimizer's
  weights, not the bf16 copy used in forward.
- Resuming with a different config is refused, naming the differing keys; keys that do not change
  the computation (how often to log/save/evaluate, how many to keep) may differ.
- Rank 0 decides what to resume from (``plan_resume``) and broadcasts it: only rank 0 writes ``latest``
  and meta.json, so ranks reading them for themselves could disagree (node-local folders, a save cut
  short between two reads) and load a mix; every rank then confirms it sees the chosen folder.
- Another number of GPUs resumes the same run: the global batch (micro_batch x grad_accum x ranks) is
  kept by adjusting grad_accum (``resume_grad_accum``; the data order depends on the global batch only,
  see dante/pretrain_data.py and dante/sft_train.py), and stated in the log, meta.json and the manifest. A
  global batch that does not split into whole micro-batches on the new rank count is refused with the
  rank counts that work. DeepSpeed's per-rank optimizer partitions are re-cut through its universal
  checkpoint format (dante/engine.py ``to_universal``): on CPU/gloo with torch AdamW under ZeRO-1/2
  (fp32 and bf16) a 2 -> 1 and a 1 -> 2 resume restore the fp32 masters, exp_avg, exp_avg_sq and step
  exactly and continue the uninterrupted loss curve bit for bit (tests/test_reshard.py), so no
  format of our own is needed beside DeepSpeed's.

- Identity and lineage (the last section) are read from files, never from names: a checkpoint's stage is
  the stage folder it lies in, and what it was built from is followed through the manifests' recorded
  inputs (``stage_lineage``). Stages 5, 7, 8 and 9 ask these questions; they live here rather than in
  ``dante.evaluation`` so that training and export need not import the evaluation package.

Example::

    model, model_cfg, meta = load_model("runs/tiny/04_pretrain")     # newest complete checkpoint
    stage = newest_finished(run, CHECKPOINT_STAGES, setting="export.checkpoint")   # e.g. "07_sft"
"""

from __future__ import annotations

import io
import json
import os
import pickle
import random
import re
import shutil
import sys
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np
import torch
import torch.distributed as torch_dist
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from dante import config as C
from dante.artifacts import (
    MANIFEST,
    atomic_path,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    diff_configs,
    file_sha256,
    now_iso,
    read_json,
    read_manifest,
    script_for,
    stage_dir,
    stage_done,
)
from dante.errors import StageError, UserError, problems_message, raise_problems
from dante.model import Transformer
from dante.tokenizer import SPECIAL_TOKENS

FORMAT_VERSION = 1
CHECKPOINTS = "checkpoints"
LATEST = "latest"
META = "meta.json"
WEIGHTS = "model.safetensors"
MODEL_CONFIG = "model_config.json"
TRAIN_STATE = "train_state"
_STEP_DIR = re.compile(r"^step-(\d{7,})$")

#: config keys that may change between a checkpoint and its resume: they do not change the math.
RESUMABLE_KEYS = {"run.root"} | {f"train.{k}" for k in (
    "checkpoint_every", "keep_last", "eval_every", "eval_batches", "log_every", "assumed_tokens_per_sec",
    "peak_tflops", "expected_world_size")}
#: may change only so that micro_batch x grad_accum x ranks stays the checkpoint's (``resume_grad_accum``).
BATCH_SPLIT_KEY = "train.grad_accum"


def training_resume_check(old: dict, new: dict, state: dict) -> str | None:
    """``Stage.open`` hook shared by the training stages (4, 5, 7): an unfinished run may resume under a
    config that differs only in logging/saving cadence (RESUMABLE_KEYS), or in train.grad_accum when that
    keeps the global batch of its newest checkpoint on the launcher's number of ranks (WORLD_SIZE, as
    ``dante.distributed.init_distributed`` reads it); anything else changes the training itself, so the reason
    is returned and the stage refuses."""
    hard = [k for k in diff_configs(old, new) if k not in RESUMABLE_KEYS]
    if BATCH_SPLIT_KEY in hard:
        saved = state.get("checkpoint")
        if saved and is_complete(Path(saved)):
            train = new.get("train", {})
            try:
                resume_grad_accum(read_meta(Path(saved)), train.get("micro_batch"), train.get("grad_accum"),
                                  int(os.environ.get("WORLD_SIZE", "1")), Path(saved))
            except CheckpointError as e:
                return str(e)
        hard.remove(BATCH_SPLIT_KEY)  # kept the global batch, or nothing was checkpointed yet
    return None if not hard else f"these keys change the training itself: {', '.join(hard)}"


class CheckpointError(UserError):
    """A checkpoint cannot be used (missing, incomplete, or made with another config)."""


class TrainStateBackend(Protocol):
    """What the checkpoint code needs from a training backend (dante.engine provides two)."""

    rank: int
    world_size: int

    def barrier(self) -> None: ...
    def save_train_state(self, path: Path) -> None: ...
    def load_train_state(self, path: Path, saved_world_size: int | None = None) -> None: ...
    def full_state_dict(self) -> dict[str, torch.Tensor] | None: ...


def step_dir_name(step: int) -> str:
    return f"step-{step:07d}"


def is_complete(step_dir: Path) -> bool:
    return (step_dir / META).is_file()


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete step folders under ``root`` (a checkpoints/ folder), oldest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and is_complete(p)]
    return [p for _, p in sorted(found)]


def latest_checkpoint(root: Path) -> Path | None:
    """The folder named by ``latest`` if complete, else the newest complete one (``latest`` is written after
    meta.json, so a crash between the two leaves a newer complete folder that ``latest`` does not name yet)."""
    found = complete_checkpoints(root)
    pointer = root / LATEST
    if pointer.is_file():
        named = root / pointer.read_text(encoding="utf-8").strip()
        if is_complete(named) and (not found or named == found[-1]):
            return named
    return found[-1] if found else None


def remove_incomplete(root: Path) -> list[str]:
    """Delete the step folders without meta.json under ``root`` (saves cut short by a crash); their names."""
    removed = []
    if root.is_dir():
        for p in root.iterdir():
            if _STEP_DIR.match(p.name) and not is_complete(p):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p.name)
    return sorted(removed)


def resolve_checkpoint(path: str | Path) -> Path:
    """A step folder from a step folder, a checkpoints/ folder or a stage folder; newest complete one."""
    p = Path(path)
    if is_complete(p):
        return p
    for root in (p, p / CHECKPOINTS):
        found = latest_checkpoint(root)
        if found is not None:
            return found
    if _STEP_DIR.match(p.name) and p.is_dir():
        raise CheckpointError(f"{p} is an incomplete checkpoint (no {META}: the run stopped while saving it); "
                              f"use an earlier step folder or the stage folder {p.parent.parent}")
    raise CheckpointError(f"no complete checkpoint under {p}; HINT: run the training stage that writes it "
                          "(e.g. `python 4_pretrain.py --config configs/<profile>/pretrain.yaml`)")


# ---------------------------------------------------------------------------------------------------
# Deterministic bytes: safetensors with a sorted header, RNG states as plain tensors
# ---------------------------------------------------------------------------------------------------


def _sorted_header(path: Path) -> None:
    """Rewrite the JSON header of the safetensors file ``path`` in place with ``__metadata__`` first and its keys
    sorted, the tensors in file order: the writer keeps metadata in a hash map, so its order (and with it the
    file's bytes) changed from one save of the same tensors to the next. Same keys and values, so the same
    length; the header's padding (spaces, allowed by the format) fills any difference."""
    with open(path, "r+b") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        meta = header.pop("__metadata__", None)
        ordered = {"__metadata__": dict(sorted(meta.items()))} if meta else {}
        ordered.update(sorted(header.items(), key=lambda kv: (kv[1]["data_offsets"][0], kv[0])))
        text = json.dumps(ordered, separators=(",", ":"), ensure_ascii=True).encode("ascii")
        if len(text) > n:  # cannot happen with the same content; keep the writer's bytes rather than break the file
            return
        f.seek(8)
        f.write(text + b" " * (n - len(text)))


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """safetensors at ``path``, atomically, byte-identical for identical tensors and metadata."""
    with atomic_path(path) as tmp:
        mode = tmp.stat().st_mode  # the artifacts' mode (0666 & ~umask), which atomic_path gave the temp file
        save_file(tensors, str(tmp), metadata=metadata)  # replaces the file: it would end up 0600
        os.chmod(tmp, mode)
        _sorted_header(tmp)


def save_torch_object(path: Path, obj: Any) -> None:
    """``torch.save`` to ``path`` atomically with deterministic bytes: torch names the archive inside the file
    after the file it writes to, so saving straight to the temp file put its random name into the bytes;
    a buffer is always named "archive"."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


RNG_FILE = "rng-rank{rank}.safetensors"
_OLD_RNG_FILE = "rng-rank{rank}.pt"  # checkpoints written before the RNG states were plain tensors (pickled)


def seed_rngs(seed: int) -> None:
    """Seed Python's ``random``, NumPy's global generator and torch's (CPU and every GPU) with ``seed``.

    What the training stages call first: Python seeds ``random`` from the OS at start-up, so an unseeded
    generator made every run's RNG file (and so its checkpoint) differ although nothing drew from it."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def capture_rng() -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of every generator a rank has: Python ``random``, NumPy's global one, torch's CPU and
    CUDA ones. Plain integer tensors and strings, so the file is safetensors (no pickle) and its bytes depend
    on the states only."""
    version, py_state, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors = {"python.state": torch.tensor(py_state, dtype=torch.int64),
               "numpy.keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
               "torch.cpu": torch.get_rng_state().clone()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch.cuda.{i}"] = s.cpu().clone()
    metadata = {"python.version": str(version), "python.gauss": repr(gauss), "numpy.kind": str(kind),
                "numpy.pos": str(int(pos)), "numpy.has_gauss": str(int(has_gauss)), "numpy.cached": repr(float(cached))}
    return tensors, metadata


def restore_rng(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    gauss = metadata["python.gauss"]
    random.setstate((int(metadata["python.version"]), tuple(int(x) for x in tensors["python.state"].tolist()),
                     None if gauss == "None" else float(gauss)))
    np.random.set_state((metadata["numpy.kind"], tensors["numpy.keys"].numpy().astype(np.uint32),
                         int(metadata["numpy.pos"]), int(metadata["numpy.has_gauss"]), float(metadata["numpy.cached"])))
    torch.set_rng_state(tensors["torch.cpu"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("torch.cuda.")), key=lambda k: int(k.rsplit(".", 1)[1]))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def save_rng(path: Path) -> None:
    tensors, metadata = capture_rng()
    save_tensors(path, tensors, metadata)


def load_rng(path: Path) -> None:
    """Restore the RNG states of ``path`` (safetensors, or the pickled .pt of older checkpoints)."""
    if path.suffix == ".pt":
        state = torch.load(path, weights_only=False)
        random.setstate(state["python"])
        np.random.set_state(state["numpy"])
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
        return
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    restore_rng(tensors, metadata)


# ---------------------------------------------------------------------------------------------------
# Integrity: every file's size and sha256 recorded in meta.json, checked before anything is read
# ---------------------------------------------------------------------------------------------------

#: what a reader of the weights needs (load_model, stages 5, 7, 8, 9); a resume checks every recorded file
MODEL_FILES = (WEIGHTS, MODEL_CONFIG)


def _sha256_many(paths: list[Path]) -> list[str]:
    """sha256 of each path, several files at once: hashlib releases the GIL, and a checkpoint is a few large
    files (weights, one optimizer partition per rank) that one thread would hash one after the other."""
    if len(paths) < 2:
        return [file_sha256(p) for p in paths]
    with ThreadPoolExecutor(max_workers=min(8, len(paths))) as pool:
        return list(pool.map(file_sha256, paths))


def record_files(step_dir: Path) -> dict[str, dict]:
    """{relative path: {"bytes", "sha256"}} of every file of a step folder but meta.json, sorted: what meta.json
    records when the checkpoint is written (rank 0, after every rank's files are on disk). Cost: one read of
    the checkpoint (~36 GB for a 2B model with its AdamW state; seconds to a minute, by the disk)."""
    files = sorted(p for p in step_dir.rglob("*") if p.is_file() and p.name != META)
    return {p.relative_to(step_dir).as_posix(): {"bytes": p.stat().st_size, "sha256": digest}
            for p, digest in zip(files, _sha256_many(files))}


def _redo_hint(step_dir: Path) -> str:
    stage, _ = stage_of(step_dir.resolve())
    redo = f"`python {script_for(stage)} --config ... --force`" if stage else "its training stage with --force"
    return (f"  HINT: restore {step_dir} from a backup; or, if its stage is unfinished, delete the folder and rerun "
            f"the stage: it resumes from the checkpoint before it; or redo {redo}")


def read_meta(step_dir: Path) -> dict:
    """The meta.json of a complete step folder; CheckpointError (file, problem, fix) when it is unreadable."""
    path = Path(step_dir) / META
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing: {step_dir} is not a complete checkpoint.\n{_redo_hint(step_dir)}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is damaged: not valid JSON ({e}); truncated or overwritten since it was "
                              f"written.\n{_redo_hint(step_dir)}") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path} is damaged: not a checkpoint record (a JSON object).\n{_redo_hint(step_dir)}")
    return meta


def verify_checkpoint(step_dir: str | Path, files: Sequence[str] | None = None) -> list[str]:
    """Check the files of a checkpoint against the sizes and sha256 recorded in its meta.json; returns notes.

    ``files``: the relative paths to check (``MODEL_FILES`` for a reader of the weights), None for every
    recorded one (a resume). Raises CheckpointError listing every missing, truncated or changed file, with the
    ways out. Cost: one read of each file checked (sha256 at ~1-2 GB/s: a few seconds for a 2B model's fp32
    weights). A checkpoint written before checksums were recorded (no "files" in meta.json) is accepted with
    a note saying that it was not verified: refusing it would strand every older run, and its loaders still
    turn a truncated file into a CheckpointError.
    """
    step_dir = Path(step_dir)
    meta = read_meta(step_dir)
    recorded = meta.get("files")
    if not isinstance(recorded, dict):
        return [f"{step_dir} records no checksums (written before they were): its files were not verified"]
    problems, to_hash = [], []
    for name in (sorted(recorded) if files is None else files):
        want, path = recorded.get(name), step_dir / name
        if not isinstance(want, dict) or not {"bytes", "sha256"} <= set(want):
            problems.append(f"{name}: not listed in {META}")
        elif not path.is_file():
            problems.append(f"{name}: missing")
        elif path.stat().st_size != want["bytes"]:
            problems.append(f"{name}: {path.stat().st_size} bytes, {want['bytes']} when written (truncated or "
                            "partly copied)")
        else:
            to_hash.append((name, path, want["sha256"]))
    for (name, _, want), got in zip(to_hash, _sha256_many([p for _, p, _ in to_hash])):
        if got != want:
            problems.append(f"{name}: sha256 {got[:16]}..., {want[:16]}... when written "
                            "(changed since: a bit flip on disk, a bad copy or an edit)")
    if problems:
        raise CheckpointError(problems_message(f"checkpoint {step_dir} is damaged", problems) + "\n" + _redo_hint(step_dir))
    return []


# ---------------------------------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------------------------------


def save_weights(path: Path, state_dict: dict[str, torch.Tensor], tie_embeddings: bool) -> None:
    """fp32 safetensors, atomically; with tied embeddings the shared matrix is stored once."""
    tensors = {k: v.detach().float().contiguous().cpu() for k, v in state_dict.items()}
    if tie_embeddings:
        tensors.pop("output.weight", None)
    save_tensors(path, tensors, {"format": "pt", "dante_format_version": str(FORMAT_VERSION)})


def load_weights_into(model: torch.nn.Module, path: Path, tie_embeddings: bool) -> None:
    """Load model.safetensors into ``model`` strictly (only the stored-once tied matrix may be absent); a file
    that is not safetensors (truncated, overwritten) is a CheckpointError, not the reader's own error."""
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path} is unreadable ({e}): truncated or damaged.\n{_redo_hint(path.parent)}") from None
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not (tie_embeddings and k == "output.weight")]
    if missing or result.unexpected_keys:
        raise CheckpointError(f"{path} does not match the model: missing {missing[:8]}, unexpected "
                              f"{result.unexpected_keys[:8]}; was it written for another model_config.json?")


def load_model(path_or_stage_dir: str | Path, device: str | torch.device = "cpu"):
    """(Transformer in fp32, ModelConfig, meta dict) from the newest complete checkpoint of a path.

    ``path_or_stage_dir``: a stage folder (runs/x/04_pretrain), its checkpoints/ folder, or a step folder.
    The model is built on the meta device and filled from the file: no time spent on a throwaway init.
    Verified first (``verify_checkpoint`` of MODEL_FILES): a damaged file is a CheckpointError naming it.
    """
    step_dir = resolve_checkpoint(path_or_stage_dir)
    for note in verify_checkpoint(step_dir, MODEL_FILES):
        print(f"note: {note}", file=sys.stderr, flush=True)
    model_cfg = read_model_config(step_dir, verified=True)
    with torch.device("meta"):
        model = Transformer(model_cfg)
    model.to_empty(device=device)
    if model_cfg.tie_embeddings:  # to_empty gives each module its own new tensor: tie them again
        model.output.weight = model.tok_embeddings.weight
    model.init_rope()
    load_weights_into(model, step_dir / WEIGHTS, model_cfg.tie_embeddings)
    return model, model_cfg, read_meta(step_dir)


# ---------------------------------------------------------------------------------------------------
# The manager used by the training loop
# ---------------------------------------------------------------------------------------------------


class CheckpointManager:
    """Saves, prunes and finds checkpoints of one training stage (all ranks call save/load together)."""

    def __init__(self, stage_dir: str | Path, keep_last: int, backend: TrainStateBackend):
        self.root = Path(stage_dir) / CHECKPOINTS
        self.keep_last = keep_last
        self.backend = backend

    @property
    def is_main(self) -> bool:
        return self.backend.rank == 0

    def latest(self) -> Path | None:
        return latest_checkpoint(self.root)

    def save(self, step: int, model_cfg: C.ModelConfig, meta: dict) -> Path:
        """Write step-<step>/ (collective); returns its path once complete on every rank."""
        b = self.backend
        step_dir = self.root / step_dir_name(step)
        if self.is_main:
            if step_dir.exists():  # leftover of a save interrupted by a crash: never mix two saves
                shutil.rmtree(step_dir)
            (step_dir / TRAIN_STATE).mkdir(parents=True)
        b.barrier()
        b.save_train_state(step_dir / TRAIN_STATE)
        save_rng(step_dir / TRAIN_STATE / RNG_FILE.format(rank=b.rank))
        weights = b.full_state_dict()  # collective: every rank takes part in gathering the fp32 masters
        if self.is_main:
            save_weights(step_dir / WEIGHTS, weights, model_cfg.tie_embeddings)
            atomic_write_json(step_dir / MODEL_CONFIG, C.to_dict(model_cfg))
        b.barrier()  # every rank's shards are on disk before the checkpoint is declared complete
        if self.is_main:
            full_meta = {"format_version": FORMAT_VERSION, "step": step, "world_size": b.world_size,
                         "saved": now_iso(), **meta, "files": record_files(step_dir)}
            atomic_write_json(step_dir / META, full_meta)  # LAST: its presence means "complete"
            atomic_write_text(self.root / LATEST, step_dir.name + "\n")
            self._prune(keep=step_dir)
        b.barrier()
        return step_dir

    def _prune(self, keep: Path) -> None:
        complete = complete_checkpoints(self.root)
        for old in complete[: max(0, len(complete) - self.keep_last)]:
            if old != keep:
                shutil.rmtree(old, ignore_errors=True)

    def remove_incomplete(self) -> list[str]:
        """Delete step folders without meta.json (a save cut short by a crash); rank 0 only."""
        removed = remove_incomplete(self.root) if self.is_main else []
        self.backend.barrier()
        return removed

    def load(self, plan: "ResumePlan") -> dict:
        """Restore the backend state and RNG from the step folder of ``plan`` (``plan_resume`` checked that it
        belongs to this run and that every rank sees it); returns its meta.

        On another number of ranks than the checkpoint's the backend re-partitions the optimizer state
        (``saved_world_size``); a rank the checkpoint had no RNG file for keeps the state it started with
        (per-rank generators cannot be mapped onto another rank count, and training draws no random numbers).
        """
        step_dir, meta = plan.step_dir, plan.meta
        self.backend.load_train_state(step_dir / TRAIN_STATE, saved_world_size=plan.saved_world_size)
        rng_file = step_dir / TRAIN_STATE / RNG_FILE.format(rank=self.backend.rank)
        if not rng_file.is_file():
            rng_file = step_dir / TRAIN_STATE / _OLD_RNG_FILE.format(rank=self.backend.rank)
        if not rng_file.is_file() and self.backend.rank >= plan.saved_world_size:
            return meta
        try:
            load_rng(rng_file)
        except (OSError, pickle.UnpicklingError, KeyError, ValueError, SafetensorError) as e:
            raise CheckpointError(f"{rng_file} is unreadable ({e}); delete {step_dir} to resume from the one before") from None
        return meta


def check_resumable(meta: dict, stage_config: dict, where: Path) -> None:
    """Refuse a checkpoint whose stage config differs from ours in anything but RESUMABLE_KEYS."""
    saved = meta.get("config")
    if not isinstance(saved, dict):
        raise CheckpointError(f"{where / META} has no stage config; it was not written by this engine")
    ours = json.loads(json.dumps(stage_config, default=str))  # as saved: JSON turns int dict keys into strings
    # train.grad_accum: checked against the global batch by resume_grad_accum instead
    differing = [k for k in diff_configs(saved, ours) if k not in RESUMABLE_KEYS and k != BATCH_SPLIT_KEY]
    if differing:
        shown = ", ".join(f"{k} ({_lookup(saved, k)!r} -> {_lookup(ours, k)!r})" for k in differing[:10])
        raise CheckpointError(
            f"refusing to resume from {where}: it was made with a different config; differing keys: {shown}.\n"
            "  HINT: rerun with the checkpoint's config to resume, or pass --force to start this stage over.")


def _lookup(d: dict, dotted: str) -> Any:
    node: Any = d
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


# ---------------------------------------------------------------------------------------------------
# Identity and lineage: which checkpoint, from which stage, trained with which tokenizer
# ---------------------------------------------------------------------------------------------------

#: the stages that write checkpoints, in pipeline order (the oldest model first): the stage table's
CHECKPOINT_STAGES = C.CHECKPOINT_STAGES


@dataclass
class CheckpointRef:
    label: str
    """Name in reports and errors: the stage name, or the path as given."""
    path: Path
    """The step folder (checkpoints/step-NNNNNNN) that will be loaded."""
    stage: str | None
    """04_pretrain / 05_extend / 07_sft when the folder belongs to such a stage."""
    stage_dir: Path | None
    """The stage folder holding manifest.json, when known."""

    @property
    def is_chat(self) -> bool:
        return self.stage == C.SFT


def stage_of(path: Path) -> tuple[str | None, Path | None]:
    """(stage, stage folder) of the nearest folder at or above ``path`` named like a checkpoint stage."""
    for parent in [path, *path.parents]:
        if parent.name in CHECKPOINT_STAGES:
            return parent.name, parent
    return None, None


def checkpoint_ref(path: str | Path, label: str | None = None) -> CheckpointRef:
    """The newest complete checkpoint at ``path`` (a step, checkpoints/ or stage folder) and its stage."""
    step_dir = resolve_checkpoint(path)
    stage, folder = stage_of(step_dir.resolve())
    return CheckpointRef(label=str(path) if label is None else label, path=step_dir, stage=stage, stage_dir=folder)


def read_model_config(step_dir: Path, verified: bool = False) -> C.ModelConfig:
    """The ModelConfig a checkpoint was saved with (model_config.json, checked against its recorded checksum
    unless the caller just ``verify_checkpoint``-ed it; no weights read)."""
    step_dir = Path(step_dir)
    if not verified:
        verify_checkpoint(step_dir, [MODEL_CONFIG])
    path = step_dir / MODEL_CONFIG
    try:
        return C.from_dict(C.ModelConfig, read_json(path))
    except (OSError, ValueError, TypeError) as e:  # ValueError: bad JSON (old checkpoints: nothing recorded)
        raise CheckpointError(f"{path} is unreadable ({e}).\n{_redo_hint(step_dir)}") from None


def find_checkpoints(run: C.RunConfig, entries: list[str], setting: str = "eval.checkpoints"
                     ) -> tuple[list[CheckpointRef], list[str]]:
    """Checkpoints named by stage (e.g. ``04_pretrain``) or path; returns (refs, notes about skipped stages).

    A stage of this run that has not run is skipped with a note (stage 8 lists all three and evaluates what
    exists); a path that does not exist, or holds no complete checkpoint, is an error. ``setting`` is the
    config key the entries came from, for the messages. One UserError lists every bad entry.
    """
    refs, notes, problems = [], [], []
    for entry in entries:
        if entry in C.STAGES:
            if entry not in CHECKPOINT_STAGES:
                problems.append(f"{setting}: {entry} is not a checkpoint stage (use {', '.join(CHECKPOINT_STAGES)} or a path)")
                continue
            if not stage_done(run, entry):
                notes.append(f"{entry}: skipped, the stage has not run for run {run.name!r} "
                             f"(no {stage_dir(run, entry) / MANIFEST})")
                continue
            where = stage_dir(run, entry)
        else:
            where = Path(entry)
            if not where.exists():
                problems.append(f"{setting}: {entry} is neither a stage name ({', '.join(CHECKPOINT_STAGES)}) "
                                f"nor an existing checkpoint folder")
                continue
        try:
            refs.append(checkpoint_ref(where, label=entry))
        except UserError as e:
            problems.append(f"{setting}: {entry}: {e}")
    raise_problems(UserError, f"{setting} names checkpoints that cannot be used", problems)
    return refs, notes


def newest_finished(run: C.RunConfig, stages: Sequence[str] = CHECKPOINT_STAGES, setting: str | None = None) -> str:
    """The newest of ``stages`` (given in pipeline order) that has finished, i.e. has its manifest.

    A newer stage that started but never finished is an error, not a silent fall back to an older model:
    SFT from the short-context stage 4 while stage 5 is half done, or exporting stage 5 while SFT is still
    running, is never what "the newest" meant. ``setting`` (e.g. ``sft.init_from``) is the option that
    picks a stage explicitly, named in the hint. No finished stage: StageError naming the oldest's script.
    """
    for i in range(len(stages) - 1, 0, -1):
        stage = stages[i]
        if stage_done(run, stage):
            return stage
        folder = stage_dir(run, stage)
        if folder.is_dir():
            older = next((s for s in reversed(stages[:i]) if stage_done(run, s)), stages[i - 1])
            pick = f"--set {setting}={older}" if setting else f"the stage {older} explicitly"
            raise StageError(f"{folder} exists but {stage} never finished: finish it (`python {script_for(stage)} "
                             f"--config ...` resumes it) or start from {older} with {pick}")
    try:
        read_manifest(run, stages[0])
    except StageError as e:
        raise StageError(f"no finished checkpoint stage ({', '.join(stages)}) for run {run.name!r}: {e}") from None
    return stages[0]


@dataclass(frozen=True)
class LineageStep:
    stage: str
    """The stage's name (a key of config.STAGES)."""
    folder: Path
    """Its folder, as recorded by the stage that read it (the starting folder as given)."""
    manifest_sha256: str | None
    """sha256 of its manifest.json when it was read as an input (None for the starting folder)."""
    used_by: str | None
    """The stage that recorded it as an input (None for the starting folder)."""


def stage_lineage(stage_folder: str | Path) -> list[LineageStep]:
    """The stage at ``stage_folder`` and every stage behind it, nearest first, from the manifests' inputs.

    Every finished stage records, per input stage, the path and sha256 of that stage's manifest
    (``Stage.require``), so following the records back tells what a checkpoint was built from: 07_sft ->
    the stage it started from (05_extend or 04_pretrain) -> ... -> 02_tokenizer. Breadth-first, so the first
    record of a stage is the nearest (the one the starting stage itself read); each (stage, folder) is
    listed once. A folder without a manifest (unfinished, or moved away since) ends its branch.
    """
    start = Path(stage_folder)
    first = LineageStep(stage=start.name, folder=start, manifest_sha256=None, used_by=None)
    found, queue, seen = [first], deque([first]), {(first.stage, first.folder)}
    while queue:
        step = queue.popleft()
        manifest = step.folder / MANIFEST
        if not manifest.is_file():
            continue
        for name, info in read_json(manifest).get("inputs", {}).items():
            if name not in C.STAGES or not isinstance(info, dict) or not info.get("manifest"):
                continue  # add_input records of plain files (no manifest behind them)
            folder = Path(info["manifest"]).parent
            if (name, folder) in seen:
                continue
            seen.add((name, folder))
            found.append(LineageStep(stage=name, folder=folder, manifest_sha256=info.get("manifest_sha256"),
                                     used_by=step.stage))
            queue.append(found[-1])
    return found


def recorded_tokenizer_manifest(stage_folder: str | Path) -> str | None:
    """The 02_tokenizer manifest hash a stage was built from (the nearest record in its lineage)."""
    return next((s.manifest_sha256 for s in stage_lineage(stage_folder)[1:]
                 if s.stage == C.TOKENIZER and s.manifest_sha256), None)


def check_vocab(tokenizer, model_cfg: C.ModelConfig, tokenizer_path: str | Path | None = None,
                trained: bool = True) -> list[str]:
    """Why ``tokenizer`` cannot feed a model of ``model_cfg`` (empty when it can).

    The embedding has one row per token id, so the sizes must agree; and the six named specials must sit at
    ids 0..5 (docs/DESIGN.md), where the data, the chat template and the export expect BOS, EOS and pad.
    The fix of a size mismatch depends on whether the model exists: before training (``trained=False``,
    stage 4) the config changes; a trained checkpoint's embedding is fixed, so the tokenizer is the wrong one.
    """
    where = f" {tokenizer_path}" if tokenizer_path is not None else ""
    problems = []
    n, m = tokenizer.get_vocab_size(with_added_tokens=True), model_cfg.vocab_size
    if n != m and trained:
        problems.append(f"the checkpoint's embedding has model.vocab_size={m} rows but the tokenizer{where} has {n} ids")
    elif n != m:
        at = f" ({tokenizer_path})" if tokenizer_path is not None else ""
        problems.append(f"model.vocab_size={m} but the tokenizer has {n} tokens{at}; set model.vocab_size={n} "
                        f"(or retrain the tokenizer with tokenizer.vocab_size={m})")
    wrong = [t for i, t in enumerate(SPECIAL_TOKENS) if tokenizer.token_to_id(t) != i]
    if wrong:
        problems.append(f"tokenizer{where}: special tokens {wrong} are not at the ids of docs/DESIGN.md")
    return problems


def tokenizer_problems(ref: CheckpointRef, model_cfg: C.ModelConfig, tokenizer, tokenizer_path: Path) -> list[str]:
    """Reasons why ``tokenizer`` (at ``tokenizer_path``) is not the tokenizer the checkpoint was trained with.

    ``check_vocab``, then lineage: following the checkpoint stage's inputs back to ``02_tokenizer`` gives the
    tokenizer manifest it was trained with; if that differs from the manifest beside ``tokenizer_path``
    (another run's tokenizer, or stage 2 rebuilt since), the token ids mean different strings even when the
    sizes agree.
    """
    p = [f"{ref.label}: {x}" for x in check_vocab(tokenizer, model_cfg, tokenizer_path)]
    tok_manifest = Path(tokenizer_path).parent / MANIFEST
    if ref.stage_dir is not None and tok_manifest.is_file():
        recorded = recorded_tokenizer_manifest(ref.stage_dir)
        current = file_sha256(tok_manifest)
        if recorded and recorded != current:
            p.append(f"{ref.label}: the checkpoint was trained with another tokenizer: its stage inputs record "
                     f"02_tokenizer manifest {recorded[:12]}, but {tok_manifest} is {current[:12]} (another run's "
                     f"tokenizer, or stage 2 rebuilt since)")
    if p:
        p.append("HINT: checkpoint and tokenizer do not belong together: use the checkpoint with the run that "
                 "trained it (same run.name), or retrain from stage 3 with this tokenizer")
    return p


# ---------------------------------------------------------------------------------------------------
# Resuming: which checkpoint (decided by rank 0), and the batch split on this number of ranks
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ResumePlan:
    """What a training run resumes from; identical on every rank (rank 0 decides, ``plan_resume``)."""

    step_dir: Path | None
    """The complete step folder to load, or None: start at step 0."""
    meta: dict | None
    """Its meta.json as rank 0 read it."""
    grad_accum: int
    """The accumulation to train with: train.grad_accum, or the one that keeps the checkpoint's global batch."""
    world_size: int
    saved_world_size: int | None = None
    note: str | None = None
    """The batch adjustment in words (log and manifest), None when nothing changed."""
    removed: list[str] = field(default_factory=list)
    """Incomplete step folders rank 0 deleted."""

    @property
    def resharded(self) -> bool:
        """Resuming on another number of ranks than the checkpoint was written by."""
        return self.step_dir is not None and self.saved_world_size != self.world_size


def saved_batch(meta: dict) -> tuple[int, int, int]:
    """(micro_batch, grad_accum, ranks) a checkpoint trained with: its ``batch`` record, or for checkpoints
    written before it existed, the config's train.* and the world size (grad_accum was never adjusted then)."""
    batch, train = meta.get("batch") or {}, (meta.get("config") or {}).get("train") or {}
    return (int(batch.get("micro_batch", train.get("micro_batch", 0))),
            int(batch.get("grad_accum", train.get("grad_accum", 0))), int(meta.get("world_size") or 0))


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def resume_grad_accum(meta: dict, micro_batch: int, grad_accum: int, world_size: int, where: Path) -> tuple[int, str | None]:
    """The grad_accum that resumes ``meta``'s run on ``world_size`` ranks with its global batch unchanged.

    The global batch (sequences per optimizer step, micro_batch x grad_accum x ranks) is part of the run:
    the data order (``dante.pretrain_data``, ``dante.sft_train``) and the LR schedule are functions of it. So a
    resume on another number of ranks keeps it by changing grad_accum: train.grad_accum as the checkpoint's
    config had it is adjusted, one the user set that already keeps the batch is taken, anything else is
    refused, as is a batch that does not split into whole micro-batches on this many ranks.
    Returns (grad_accum, note for the log, or None when nothing changed); raises CheckpointError.
    """
    b0, a0, w0 = saved_batch(meta)
    g0 = b0 * a0 * w0
    configured = ((meta.get("config") or {}).get("train") or {}).get("grad_accum", a0)
    was = f"{g0} sequences per step ({b0} micro-batch x {a0} accumulation x {w0} rank(s))"
    if micro_batch * grad_accum * world_size == g0:
        if world_size == w0 and grad_accum == a0:
            return grad_accum, None
        return grad_accum, (f"resuming on {world_size} rank(s), the checkpoint's run had {w0}: grad_accum {a0} -> "
                            f"{grad_accum} keeps the global batch of {was}")
    if micro_batch != b0 or grad_accum != configured:
        raise CheckpointError(
            f"cannot resume from {where} with train.micro_batch={micro_batch} x train.grad_accum={grad_accum} x "
            f"{world_size} rank(s) = {micro_batch * grad_accum * world_size} sequences per step: the checkpoint's run "
            f"trained with a global batch of {was}.\n"
            f"  HINT: keep train.micro_batch={b0}"
            + (f" and set train.grad_accum={g0 // (b0 * world_size)} (or leave it at {configured}: the engine "
               f"adjusts it)" if g0 % (b0 * world_size) == 0 else "")
            + ", or pass --force to start the stage over with the new batch")
    if g0 % (micro_batch * world_size):
        fits = [str(w) for w in _divisors(g0 // micro_batch)]
        raise CheckpointError(
            f"cannot resume from {where} on {world_size} rank(s): its global batch of {was} does not split into "
            f"whole micro-batches of {micro_batch} on {world_size} ranks ({g0} / ({micro_batch} x {world_size}) = "
            f"{g0 / (micro_batch * world_size):g} accumulation steps).\n"
            f"  HINT: launch {', '.join(fits)} rank(s) to continue this run, or pass --force to start the stage over "
            "with a new global batch")
    adjusted = g0 // (micro_batch * world_size)
    return adjusted, (f"resuming on {world_size} rank(s), the checkpoint's run had {w0}: grad_accum {grad_accum} -> "
                      f"{adjusted} keeps the global batch of {was}")


def from_rank0(obj: Any, world_size: int) -> Any:
    """``obj`` as rank 0 has it, on every rank (the other ranks' argument is ignored)."""
    if world_size == 1:
        return obj
    box = [obj]
    torch_dist.broadcast_object_list(box, src=0)
    return box[0]


def plan_resume(stage_dir: str | Path, stage_config: dict, micro_batch: int, grad_accum: int, rank: int,
                world_size: int) -> ResumePlan:
    """Rank 0 removes incomplete step folders, picks the newest complete checkpoint, checks its config and
    the batch split, and broadcasts the decision; every rank then confirms that it sees that folder.

    Why rank 0 alone: only rank 0 writes ``latest`` and meta.json, so with folders that are not shared
    (node-local disks) other ranks would read another, older or no checkpoint and load a mix. A problem
    found on rank 0 is broadcast too, so every rank raises the same CheckpointError instead of waiting
    forever for a peer in the next collective. Collective: every rank calls it, before the backend exists.
    """
    root = Path(stage_dir) / CHECKPOINTS
    decision: dict[str, Any] = {}
    if rank == 0:
        try:
            removed = remove_incomplete(root)
            latest = latest_checkpoint(root)
            decision = {"name": None, "grad_accum": grad_accum, "removed": removed}
            if latest is not None:
                meta = read_meta(latest)
                for note in verify_checkpoint(latest):  # every recorded file, before any rank reads one
                    print(f"note: {note}", file=sys.stderr, flush=True)
                check_resumable(meta, stage_config, latest)
                accum, note = resume_grad_accum(meta, micro_batch, grad_accum, world_size, latest)
                decision.update(name=latest.name, meta=meta, grad_accum=accum, note=note)
        except (CheckpointError, OSError, ValueError) as e:  # ValueError: an unreadable meta.json
            decision = {"error": str(e) if isinstance(e, CheckpointError) else f"cannot resume from {root}: {e}"}
    decision = from_rank0(decision, world_size)
    if "error" in decision:
        raise CheckpointError(decision["error"])
    if decision["name"] is None:
        return ResumePlan(None, None, grad_accum, world_size, removed=decision["removed"])
    step_dir = root / decision["name"]
    seen = [is_complete(step_dir)]
    if world_size > 1:
        seen = [None] * world_size
        torch_dist.all_gather_object(seen, is_complete(step_dir))
    blind = [r for r, ok in enumerate(seen) if not ok]
    if blind:
        raise CheckpointError(
            f"rank(s) {blind} cannot see {step_dir}, the checkpoint rank 0 resumes from: the checkpoint folder is "
            "not shared by every rank (node-local disk?).\n"
            "  HINT: put run.root on storage every node mounts at the same path (NFS, Lustre, ...)")
    meta = decision["meta"]
    return ResumePlan(step_dir, meta, decision["grad_accum"], world_size, saved_world_size=int(meta["world_size"]),
                      note=decision["note"], removed=decision["removed"])
