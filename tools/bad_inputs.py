"""Run every bad input of issue 13 against a tiny run and write the table of docs/RELIABILITY.md.

Each case copies the stage folders it needs from one tiny run built once (stages 1-7 and 9 through the
real scripts, seconds each on CPU), damages or misconfigures something, runs the stage script as a
subprocess, and records: the exit code, the first line of the message (the ``[stage] ERROR:`` line, or
the exception line of a traceback), whether a traceback appeared, whether anything under the run folder
changed (a hash of every file before and after; the stage locks in ``.locks/`` aside) and whether a
manifest was written. A case passes when the command exits 2 with a message, no traceback, nothing
changed on disk and no manifest: a rejected command must leave the user's work as it was.

Run folders use the relative run.root ``runs`` with each case's own folder as the working directory, so a
copied stage folder is a complete run (manifests record paths under run.root) and cases run side by side.

Not simulated: a full disk. It needs a small file system (a loop device or tmpfs mount: root and a mount
this tool should not make); ``dante.cli.run_stage`` maps ENOSPC/EDQUOT to a clear error.

Example::

    DS_ACCELERATOR=cpu python tools/bad_inputs.py              # every case, rewrites docs/RELIABILITY.md
    DS_ACCELERATOR=cpu python tools/bad_inputs.py --quick      # the cases of stages 1-3 and 6 (no torch), no write
    DS_ACCELERATOR=cpu python tools/bad_inputs.py --only 4-force-vocab,2-changed-config --no-write
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import yaml

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "data"
RUN = "f"
DOC = REPO / "docs" / "RELIABILITY.md"
SCRIPTS = {"01_corpus": "1_download_corpus.py", "02_tokenizer": "2_train_tokenizer.py",
           "03_shards": "3_tokenize_shards.py", "04_pretrain": "4_pretrain.py", "05_extend": "5_extend_context.py",
           "06_sft_data": "6_build_sft.py", "07_sft": "7_sft.py", "08_eval": "8_eval.py", "09_export": "9_export_hf.py"}
CONFIG_OF = {"01_corpus": "corpus.yaml", "02_tokenizer": "tokenizer.yaml", "03_shards": "shards.yaml",
             "04_pretrain": "pretrain.yaml", "05_extend": "extend.yaml", "06_sft_data": "sft_data.yaml",
             "07_sft": "sft.yaml", "08_eval": "eval.yaml", "09_export": "export.yaml"}
BUILT = ("01_corpus", "02_tokenizer", "03_shards", "04_pretrain", "05_extend", "06_sft_data", "07_sft", "09_export")
TORCHLESS = {"01_corpus", "02_tokenizer", "03_shards", "06_sft_data"}

MODEL = {"dim": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "max_seq_len": 64, "multiple_of": 32}
TRAIN = {"seq_len": 64, "micro_batch": 2, "keep_last": 2, "log_every": 1, "precision": "fp32", "warmup_steps": 1,
         "loss_chunk_size": 64, "backend": "torch", "eval_batches": 2}
LONG_EVAL = {"lengths": [128], "depths": [0.5], "trials": 1, "bucket_size": 32, "max_docs": 1, "distractors": 1}


def tiny_configs(root: str | Path) -> dict[str, dict]:
    """The configs of the tiny run ``f`` under ``root``, one per stage config file name: seconds per stage on
    CPU (the held-out sample as corpus, a 512-token tokenizer, a 41k-parameter model, a few steps; stages 4,
    5, 7 on the torch backend, the same engine and checkpoints as DeepSpeed without its 15 s start-up)."""
    held, sft = DATA / "sample" / "heldout", DATA / "sft_sample"
    r = {"name": RUN, "root": str(root), "seed": 7}
    heldout = {"it": str(held / "it.jsonl.gz")}
    return {
        # 109 documents in 8-document shards: a dozen shards, so a kill lands between shards
        "corpus.yaml": {"run": r, "corpus": {"docs_per_shard": 8, "sources": [
            {"name": "it", "kind": "local", "path": str(held / "it.jsonl.gz"), "lang": "it", "tier": 1, "min_chars": 50},
            {"name": "en", "kind": "local", "path": str(held / "en.jsonl.gz"), "lang": "en", "tier": 1, "min_chars": 50},
            {"name": "code", "kind": "local", "path": str(held / "code.jsonl.gz"), "lang": "code", "tier": 2,
             "min_chars": 20}]}},
        "tokenizer.yaml": {"run": r, "tokenizer": {"vocab_size": 512, "pretokenizer": "llama3", "sample_chars": 300000,
                                                   "n_reserved": 8, "baseline": False, "heldout": heldout}},
        # ~230k tokens in 20k-token shards, two workers (a kill also hits the pool)
        "shards.yaml": {"run": r, "shards": {"shard_tokens": 20000, "val_fraction": 0.1, "workers": 2, "batch_docs": 8,
                                             "verify_samples": 4}},
        "pretrain.yaml": {"run": r, "model": {**MODEL, "vocab_size": 512},
                          "train": {**TRAIN, "max_steps": 6, "checkpoint_every": 2, "eval_every": 3, "lr": 3e-3,
                                    "min_lr": 3e-4, "tier_weights": {1: 2.0, 2: 1.0}}},
        "extend.yaml": {"run": r, "extend": {"mode": "yarn", "factor": 2.0, "new_max_seq_len": 128},
                        "train": {**TRAIN, "seq_len": 128, "micro_batch": 1, "max_steps": 2, "checkpoint_every": 2,
                                  "eval_every": 2, "lr": 3e-4, "min_lr": 3e-4, "weight_decay": 0.0,
                                  "tier_weights": {1: 2.0, 2: 1.0}},
                        "long_eval": LONG_EVAL},
        "sft_data.yaml": {"run": r, "sft_data": {"block_size": 64, "overlong": "truncate", "heldout_fraction": 0.2,
                                                 "sources": [
            {"name": "it-msg", "kind": "local", "path": str(sft / "it_messages.jsonl"), "format": "messages", "lang": "it"},
            {"name": "en-pr", "kind": "local", "path": str(sft / "en_prompt_response.jsonl"), "format": "prompt_response",
             "lang": "en"}]}},
        "sft.yaml": {"run": r, "sft": {"epochs": 1, "init_from": "04_pretrain"},
                     "train": {**TRAIN, "max_steps": 4, "checkpoint_every": 2, "eval_every": 2, "lr": 1e-3, "min_lr": 1e-4,
                               "weight_decay": 0.0}},
        "eval.yaml": {"run": r, "eval": {"checkpoints": ["04_pretrain"], "heldout": heldout, "shards": False, "tasks": [],
                                         "batch_size": 4, "max_eval_tokens": 2000, "device": "cpu", "dtype": "float32",
                                         "generation": {"prompts": ["Il futuro"], "max_new_tokens": 4, "chat_prompts": []},
                                         "long_eval": LONG_EVAL}},
        # verify: false in the shared state (the verification of a 64-token model is not what is tested here)
        "export.yaml": {"run": r, "export": {"checkpoint": "auto", "dtype": "float32", "verify": False, "heldout": heldout,
                                             "gguf": False}},
    }


def write_configs(root: str | Path, where: Path, docs: dict[str, dict] | None = None) -> dict[str, Path]:
    """``tiny_configs(root)`` (or ``docs``) as YAML files in ``where``; the paths by file name."""
    where.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, doc in (docs or tiny_configs(root)).items():
        out[name] = where / name
        out[name].write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    return out


#: what a launcher sets; a test process that ran a training stage in-process holds the single rank's values
#: (init_distributed sets them), and a script inheriting MASTER_PORT would reuse a port its killed
#: predecessor just left in TIME_WAIT (EADDRINUSE, seen in CI)
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def script_env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DANTE_FAULT") and k not in LAUNCHER_VARS}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", PYTHONPATH=str(REPO))
    return env


# ---------------------------------------------------------------------------------------------------
# One case: set-up, command, observation
# ---------------------------------------------------------------------------------------------------


@dataclass
class Ctx:
    """A case's folder: ``runs/f`` (the run) and its config files, all under ``dir`` (the working directory)."""

    dir: Path
    configs: dict[str, Path]

    @property
    def run(self) -> Path:
        return self.dir / "runs" / RUN

    def cfg(self, stage: str) -> str:
        return str(self.configs[CONFIG_OF[stage]])

    def variant(self, stage: str, edit: Callable[[dict], None]) -> str:
        """A copy of ``stage``'s config changed by ``edit(doc)``; its path."""
        doc = yaml.safe_load(self.configs[CONFIG_OF[stage]].read_text(encoding="utf-8"))
        edit(doc)
        path = self.dir / f"variant-{CONFIG_OF[stage]}"
        path.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
        return str(path)

    def checkpoint(self, stage: str) -> Path:
        """The newest step folder of a training stage's checkpoints."""
        root = self.run / stage / "checkpoints"
        return root / (root / "latest").read_text().strip()


@dataclass
class Case:
    id: str
    stage: str
    what: str
    needs: tuple[str, ...]
    argv: Callable[[Ctx], list[str]]
    prepare: Callable[[Ctx], None] | None = None
    expect: tuple[str, ...] = ()
    """Words the message must contain (issue 13 item 8: the file, or the command that fixes it)."""
    reject: tuple[str, ...] = ()
    """Words it must not contain (the misleading message the issue reported)."""
    keeps_work: bool = False
    """The problem shows only while working, and the finished parts are kept on purpose, for the rerun to
    resume (stage 1 keeps the sources that completed): a change on disk is then allowed, a manifest not."""


@dataclass
class Outcome:
    case: Case
    exit: int
    message: str
    traceback: bool
    changed: list[str] = field(default_factory=list)
    manifests: list[str] = field(default_factory=list)
    seconds: float = 0.0
    stderr: str = ""

    @property
    def problems(self) -> list[str]:
        """Why the case is not ok (empty: ok)."""
        out = [] if self.exit == 2 else [f"exit {self.exit}"]
        out += [] if self.message else ["no message"]
        out += ["traceback"] if self.traceback else []
        out += ["manifest written"] if self.manifests else []
        out += ["disk changed"] if self.changed and not self.case.keeps_work else []
        out += [f"message lacks {w!r}" for w in self.case.expect if w not in self.stderr]
        out += [f"message says {w!r}" for w in self.case.reject if w in self.stderr]
        return out

    @property
    def ok(self) -> bool:
        return not self.problems


def tree_hashes(run: Path) -> dict[str, str]:
    """sha256 of every file under ``run`` (the stage locks in ``.locks/`` aside: a lock file is the one thing a
    refused run may create, and it holds no data)."""
    out = {}
    if run.exists():
        for p in sorted(run.rglob("*")):
            rel = p.relative_to(run).as_posix()
            if rel.startswith(".locks") or not p.is_file():
                continue
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
        out.update({p.relative_to(run).as_posix() + "/": "dir" for p in run.rglob("*")
                    if p.is_dir() and not p.relative_to(run).as_posix().startswith(".locks")})
    return out


def first_message(stderr: str, stdout: str) -> str:
    """The ``ERROR:`` line, else the exception line that ends a traceback, else the first line of stderr
    that is not a library warning (torchao and torch print some at import)."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    for i, line in enumerate(lines):
        if "ERROR" in line:  # "... 2 problem(s):" says little without its first problem
            return f"{line} {lines[i + 1]}" if line.endswith(":") and i + 1 < len(lines) else line
    if "Traceback (most recent call last)" in stderr:
        return lines[-1]
    noise = ("Failed to load", "W1", "warnings.warn", "UserWarning", "FutureWarning")
    for line in lines:
        if not line.startswith(noise):
            return line
    return next((line.strip() for line in stdout.splitlines() if line.strip()), "")


def run_case(case: Case, base: Path, work: Path) -> Outcome:
    ctx = Ctx(dir=work / case.id, configs={})
    shutil.rmtree(ctx.dir, ignore_errors=True)
    ctx.dir.mkdir(parents=True)
    ctx.configs = write_configs("runs", ctx.dir / "configs")
    ctx.run.mkdir(parents=True)
    for stage in case.needs:
        shutil.copytree(base / "runs" / RUN / stage, ctx.run / stage, symlinks=True)
    if case.prepare is not None:
        case.prepare(ctx)
    before = tree_hashes(ctx.run)
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, str(REPO / SCRIPTS[case.stage]), *case.argv(ctx)], cwd=ctx.dir,
                          env=script_env(), capture_output=True, text=True, timeout=600)
    after = tree_hashes(ctx.run)
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    manifests = [k for k in changed if k.endswith("manifest.json") and k in after]
    return Outcome(case, proc.returncode, first_message(proc.stderr, proc.stdout),
                   "Traceback (most recent call last)" in proc.stderr, changed, manifests,
                   round(time.monotonic() - t0, 1), proc.stderr)


def build_base(base: Path, stages: tuple[str, ...] = BUILT) -> None:
    """The shared tiny run: ``stages`` (every one but 8) through their scripts, uninterrupted; a stage already
    finished there is kept."""
    configs = write_configs("runs", base / "configs")
    for stage in stages:
        if (base / "runs" / RUN / stage / "manifest.json").is_file():
            continue
        proc = subprocess.run([sys.executable, str(REPO / SCRIPTS[stage]), "--config", str(configs[CONFIG_OF[stage]])],
                              cwd=base, env=script_env(), capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            raise SystemExit(f"building the shared run failed at {stage}:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")


# ---------------------------------------------------------------------------------------------------
# Damage
# ---------------------------------------------------------------------------------------------------


def flip_bytes(path: Path, n: int = 64, start: int | None = None) -> None:
    """Invert ``n`` bytes in the middle of ``path`` (or from ``start``)."""
    data = bytearray(path.read_bytes())
    at = len(data) // 2 if start is None else start
    for i in range(at, min(at + n, len(data))):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def ids_beyond_vocab(ctx: Ctx) -> None:
    """Rewrite the first tier-1 train shard with ids >= the vocabulary and VALID checksums (as a tokenizer
    of another run would give): only a check of the ids against the vocabulary can find it."""
    sys.path.insert(0, str(REPO))
    from dante.shards import ShardReader, write_shard

    path = ctx.run / "03_shards" / "t1-train-00000.bin"
    r = ShardReader(path)
    tokens = r.tokens.copy()
    tokens[100:110] = r.header.vocab_size + 77
    starts, header = r.doc_starts.copy(), r.header
    del r
    write_shard(path, tokens, starts, header)


def break_jsonl(path: Path) -> None:
    rows = gzip.decompress(path.read_bytes()).decode("utf-8").splitlines(keepends=True) if path.suffix == ".gz" else \
        path.read_text(encoding="utf-8").splitlines(keepends=True)
    rows.insert(3, '{"text": "an unterminated line\n')
    path.write_bytes(gzip.compress("".join(rows).encode("utf-8"), mtime=0))


def broken_copy(ctx: Ctx) -> Path:
    """The held-out Italian sample with one unterminated JSON line."""
    path = ctx.dir / "broken.jsonl.gz"
    shutil.copy(DATA / "sample" / "heldout" / "it.jsonl.gz", path)
    break_jsonl(path)
    return path


def own_source(ctx: Ctx, name: str, write: Callable[[Path], None]) -> Path:
    path = ctx.dir / name
    write(path)
    return path


def corpus_with(ctx: Ctx, path: Path) -> str:
    def edit(doc):
        doc["corpus"]["sources"][0]["path"] = str(path)
    return ctx.variant("01_corpus", edit)


def sft_with(ctx: Ctx, path: Path) -> str:
    def edit(doc):
        doc["sft_data"]["sources"][0]["path"] = str(path)
    return ctx.variant("06_sft_data", edit)


# ---------------------------------------------------------------------------------------------------
# The cases
# ---------------------------------------------------------------------------------------------------

BEFORE = {s: BUILT[:i] for i, s in enumerate(BUILT)}  # the finished stages a stage's run starts from
BEFORE.update({"06_sft_data": ("02_tokenizer",), "07_sft": ("02_tokenizer", "03_shards", "04_pretrain", "06_sft_data"),
               "08_eval": ("02_tokenizer", "03_shards", "04_pretrain"),
               "09_export": ("02_tokenizer", "03_shards", "04_pretrain", "06_sft_data", "07_sft")})


def done(stage: str) -> tuple[str, ...]:
    return tuple(BEFORE[stage]) + (stage,)


def plain(stage: str, *extra: str) -> Callable[[Ctx], list[str]]:
    return lambda c: ["--config", c.cfg(stage), *extra]


def cases() -> list[Case]:
    S1, S2, S3, S4, S5, S6, S7, S8, S9 = ("01_corpus", "02_tokenizer", "03_shards", "04_pretrain", "05_extend",
                                          "06_sft_data", "07_sft", "08_eval", "09_export")
    return [
        # --- stage 1
        Case("1-malformed-jsonl", S1, "a corpus JSONL with a broken line", BEFORE[S1],
             lambda c: ["--config", corpus_with(c, broken_copy(c))], expect=("broken.jsonl.gz",), keeps_work=True),
        Case("1-missing-source", S1, "a local source file that does not exist", BEFORE[S1],
             lambda c: ["--config", corpus_with(c, c.dir / "nowhere.jsonl.gz")]),
        Case("1-dry-run-missing-source", S1, "`--dry-run` with a missing local source", BEFORE[S1],
             lambda c: ["--config", corpus_with(c, c.dir / "nowhere.jsonl.gz"), "--dry-run"]),
        Case("1-unknown-key", S1, "`--set corpus.docs_per_shrd=5` (unknown key)", BEFORE[S1],
             plain(S1, "--set", "corpus.docs_per_shrd=5")),
        Case("1-wrong-type", S1, "`--set corpus.docs_per_shard=many` (wrong type)", BEFORE[S1],
             plain(S1, "--set", "corpus.docs_per_shard=many")),
        Case("1-bad-enum", S1, "`--set corpus.non_utf8=maybe` (not an allowed value)", BEFORE[S1],
             plain(S1, "--set", "corpus.non_utf8=maybe")),
        Case("1-index-out-of-range", S1, "`--set corpus.sources.7.min_chars=50` (no source 7)", BEFORE[S1],
             plain(S1, "--set", "corpus.sources.7.min_chars=50"), reject=("expected a list, got dict",)),
        Case("1-index-wrong-type", S1, "`--set corpus.sources.0.min_chars=fifty`", BEFORE[S1],
             plain(S1, "--set", "corpus.sources.0.min_chars=fifty"), reject=("expected a list, got dict",)),
        Case("1-workers-negative", S1, "`--set corpus.workers=-1`", BEFORE[S1], plain(S1, "--set", "corpus.workers=-1")),
        Case("1-workers-too-many", S1, "`--set corpus.workers=999` (over twice the cores)", BEFORE[S1],
             plain(S1, "--set", "corpus.workers=999")),
        Case("1-no-config", S1, "no `--config`", BEFORE[S1], lambda c: []),
        Case("1-config-missing", S1, "`--config` names a file that does not exist", BEFORE[S1],
             lambda c: ["--config", str(c.dir / "nope.yaml")]),
        Case("1-yaml-syntax", S1, "a config file that is not valid YAML", BEFORE[S1],
             lambda c: ["--config", str(own_source(c, "broken.yaml", lambda p: p.write_text("run: {name: f\ncorpus: [")))]),
        Case("1-changed-finished", S1, "changed `corpus.docs_per_shard` on the finished stage 1", done(S1),
             plain(S1, "--set", "corpus.docs_per_shard=9")),
        # --- stage 2
        Case("2-changed-config", S2, "`--set tokenizer.vocab_size=4096` on the finished stage 2 (item 2)", done(S2),
             plain(S2, "--set", "tokenizer.vocab_size=4096")),
        Case("2-no-corpus", S2, "no 01_corpus", (), plain(S2)),
        Case("2-dry-run-no-corpus", S2, "`--dry-run` without 01_corpus (item 8)", (), plain(S2, "--dry-run")),
        Case("2-dry-run-missing-heldout", S2, "`--dry-run` with a missing held-out file (item 8)", BEFORE[S2],
             lambda c: ["--config", c.variant(S2, lambda d: d["tokenizer"].update(heldout={"it": str(c.dir / "no.jsonl.gz")})),
                        "--dry-run"]),
        Case("2-vocab-too-small", S2, "`--set tokenizer.vocab_size=10` (below the special tokens)", BEFORE[S2],
             plain(S2, "--set", "tokenizer.vocab_size=10")),
        Case("2-corpus-shard-truncated", S2, "a truncated 01_corpus shard", BEFORE[S2], plain(S2),
             lambda c: truncate(sorted((c.run / S1).rglob("shard-*.jsonl.*"))[0])),
        # --- stage 3
        Case("3-tokenizer-truncated", S3, "a truncated tokenizer.json (item 8)", BEFORE[S3], plain(S3),
             lambda c: truncate(c.run / S2 / "tokenizer.json"), expect=("2_train_tokenizer.py",)),
        Case("3-no-tokenizer", S3, "no 02_tokenizer", (S1,), plain(S3)),
        Case("3-corpus-shard-flipped", S3, "64 flipped bytes in a 01_corpus shard", BEFORE[S3], plain(S3),
             lambda c: flip_bytes(sorted((c.run / S1).rglob("shard-*.jsonl.*"))[0])),
        Case("3-bad-dtype", S3, "`--set shards.dtype=int8`", BEFORE[S3], plain(S3, "--set", "shards.dtype=int8")),
        Case("3-force-bad-config", S3, "`--force --set shards.shard_tokens=0` on the finished stage 3", done(S3),
             plain(S3, "--force", "--set", "shards.shard_tokens=0")),
        # --- stage 4
        Case("4-force-vocab", S4, "`--force --set model.vocab_size=1000` on the finished stage 4 (item 1)", done(S4),
             plain(S4, "--force", "--set", "model.vocab_size=1000")),
        Case("4-shard-flipped", S4, "64 flipped bytes in a shard (item 3)", BEFORE[S4], plain(S4),
             lambda c: flip_bytes(c.run / S3 / "t1-train-00000.bin")),
        Case("4-ids-beyond-vocab", S4, "a shard with ids >= the vocabulary, valid checksums (item 3)", BEFORE[S4],
             plain(S4), ids_beyond_vocab),
        Case("4-shard-truncated", S4, "a truncated shard", BEFORE[S4], plain(S4),
             lambda c: truncate(c.run / S3 / "t1-train-00001.bin")),
        Case("4-no-shards", S4, "no 03_shards", (S1, S2), plain(S4)),
        Case("4-changed-finished", S4, "changed `train.lr` on the finished stage 4", done(S4),
             plain(S4, "--set", "train.lr=0.01")),
        Case("4-seq-beyond-context", S4, "`train.seq_len` beyond `model.max_seq_len`", BEFORE[S4],
             plain(S4, "--set", "train.seq_len=128")),
        Case("4-bad-precision", S4, "`--set train.precision=fp16`", BEFORE[S4], plain(S4, "--set", "train.precision=fp16")),
        # --- stage 5
        Case("5-force-bad-length", S5, "`--force --set extend.new_max_seq_len=1024` on the finished stage 5 (item 1)",
             done(S5), plain(S5, "--force", "--set", "extend.new_max_seq_len=1024")),
        Case("5-weights-truncated", S5, "a truncated model.safetensors of stage 4 (item 3)", BEFORE[S5], plain(S5),
             lambda c: truncate(c.checkpoint(S4) / "model.safetensors")),
        Case("5-weights-flipped", S5, "64 flipped bytes in stage 4's model.safetensors (item 3)", BEFORE[S5], plain(S5),
             lambda c: flip_bytes(c.checkpoint(S4) / "model.safetensors")),
        Case("5-meta-truncated", S5, "a truncated meta.json of stage 4's checkpoint (item 3)", BEFORE[S5], plain(S5),
             lambda c: truncate(c.checkpoint(S4) / "meta.json")),
        Case("5-no-pretrain", S5, "no 04_pretrain", (S1, S2, S3), plain(S5)),
        # --- stage 6
        Case("6-empty-file", S6, "an empty SFT file (item 8)", BEFORE[S6],
             lambda c: ["--config", sft_with(c, own_source(c, "empty.jsonl", lambda p: p.write_text("")))]),
        Case("6-missing-file", S6, "an SFT source file that does not exist", BEFORE[S6],
             lambda c: ["--config", sft_with(c, c.dir / "none.jsonl")]),
        Case("6-not-jsonl", S6, "an SFT file that is not JSON Lines at all", BEFORE[S6],
             lambda c: ["--config", sft_with(c, own_source(c, "prose.jsonl", lambda p: p.write_text("just prose\n" * 20)))]),
        Case("6-bad-format", S6, "`--set sft_data.sources.0.format=xml`", BEFORE[S6],
             plain(S6, "--set", "sft_data.sources.0.format=xml")),
        Case("6-block-size-zero", S6, "`--set sft_data.block_size=0`", BEFORE[S6], plain(S6, "--set", "sft_data.block_size=0")),
        Case("6-tokenizer-truncated", S6, "a truncated tokenizer.json", BEFORE[S6], plain(S6),
             lambda c: truncate(c.run / S2 / "tokenizer.json")),
        # --- stage 7
        Case("7-meta-truncated", S7, "a truncated meta.json of the stage 4 checkpoint", BEFORE[S7], plain(S7),
             lambda c: truncate(c.checkpoint(S4) / "meta.json")),
        Case("7-weights-flipped", S7, "64 flipped bytes in stage 4's model.safetensors", BEFORE[S7], plain(S7),
             lambda c: flip_bytes(c.checkpoint(S4) / "model.safetensors")),
        Case("7-sft-data-flipped", S7, "64 flipped bytes in a 06_sft_data file", BEFORE[S7], plain(S7),
             lambda c: flip_bytes(sorted(p for p in (c.run / S6).iterdir() if p.suffix == ".bin")[0])),
        Case("7-no-sft-data", S7, "no 06_sft_data", (S2, S3, S4), plain(S7)),
        Case("7-bad-init", S7, "`--set sft.init_from=03_shards`", BEFORE[S7], plain(S7, "--set", "sft.init_from=03_shards")),
        # --- stage 8
        Case("8-weights-truncated", S8, "a truncated model.safetensors (item 3)", BEFORE[S8], plain(S8),
             lambda c: truncate(c.checkpoint(S4) / "model.safetensors")),
        Case("8-meta-truncated", S8, "a truncated meta.json (item 3)", BEFORE[S8], plain(S8),
             lambda c: truncate(c.checkpoint(S4) / "meta.json")),
        Case("8-unknown-checkpoint", S8, "`eval.checkpoints` names a stage that is not a checkpoint stage", BEFORE[S8],
             lambda c: ["--config", c.variant(S8, lambda d: d["eval"].update(checkpoints=["03_shards"]))]),
        Case("8-missing-heldout", S8, "a held-out file that does not exist", BEFORE[S8],
             lambda c: ["--config", c.variant(S8, lambda d: d["eval"].update(heldout={"it": str(c.dir / "no.jsonl.gz")}))]),
        # --- stage 9
        Case("9-force-missing-checkpoint", S9, "`--force --set export.checkpoint=<missing>` on the finished stage 9 "
             "(item 1)", done(S9), lambda c: ["--config", c.cfg(S9), "--force", "--set",
                                              f"export.checkpoint={c.dir / 'no-such-checkpoint'}"]),
        Case("9-weights-flipped", S9, "64 flipped bytes in the exported checkpoint's model.safetensors (item 3)", BEFORE[S9],
             plain(S9), lambda c: flip_bytes(c.checkpoint(S7) / "model.safetensors")),
        Case("9-weights-truncated", S9, "a truncated model.safetensors (item 3)", BEFORE[S9], plain(S9),
             lambda c: truncate(c.checkpoint(S7) / "model.safetensors")),
        Case("9-tokenizer-truncated", S9, "a truncated tokenizer.json (item 8)", BEFORE[S9], plain(S9),
             lambda c: truncate(c.run / S2 / "tokenizer.json"), expect=("2_train_tokenizer.py",)),
        Case("9-bad-checkpoint-name", S9, "`--set export.checkpoint=06_sft_data` (item 8: name the right key)",
             BEFORE[S9], plain(S9, "--set", "export.checkpoint=06_sft_data"), reject=("eval.checkpoints",)),
        Case("9-bad-dtype", S9, "`--set export.dtype=int4`", BEFORE[S9], plain(S9, "--set", "export.dtype=int4")),
    ]


# ---------------------------------------------------------------------------------------------------
# The document
# ---------------------------------------------------------------------------------------------------

INTRO = """# Reliability: what the pipeline guarantees, and what each bad input does

Every stage script follows one lifecycle (`dante/cli.py` `run_stage`, `dante/artifacts.py` `Stage`), and
these are its guarantees:

- **Atomic writes.** Every artifact is written to a temporary `.<name>.<random>.tmp` in its own folder,
  synced, and renamed into place (`atomic_path`): a reader sees the old file or the new one, never half.
- **The manifest last.** `manifest.json` is written after every other output of a stage: its presence
  means "complete". A later stage reads the manifests of its inputs before any work and refuses a missing
  or incompatible one, naming the script to run.
- **Check before touching.** The config (types, unknown keys, allowed values), a finished stage's recorded
  config, and every input the stage reads are checked before anything is written or deleted, `--force`
  included: a rejected command exits 2 with one message naming the file, the problem and the fix, and
  leaves the disk as it was. A finished stage rerun with a config that differs in a key that matters is
  refused with the keys and both values; an identical rerun is a no-op.
- **One process per stage.** An OS lock (`flock` on `<run>/.locks/<stage>.lock`, released by the kernel
  however the holder dies) makes a second run of a running stage exit 2 naming the holder's pid and host.
- **Verified reads.** Shards carry magic, version, sizes and CRC-32s of tokens and index; checkpoints are
  checked against what their `meta.json` records; token ids against the vocabulary.
- **Resume.** A killed stage keeps `progress.json` and its finished parts; rerunning the same command
  removes the killed run's temporaries and continues, and gives the files an uninterrupted run gives
  (`tests/test_faults.py` kills stages 1, 3, 4, 6 and 7 at seeded points and compares every file).

## Bad inputs

Each row: a tiny run state (`tools/bad_inputs.py`, stages built once by the real scripts), one damaged
file or bad command, the script run as a subprocess. *exit* is its exit code; *message* the first line
of its message (the `ERROR:` line, or the exception line of a traceback); *tb* whether a traceback was
printed; *disk* whether any file under the run folder changed (sha256 of every file before and after; the
lock files aside); *manifest* whether a manifest was written. A row is **ok** when the command exits 2
with a message, no traceback, nothing changed and no manifest (a case marked *keeps work* may leave the
finished parts of an interrupted run for the rerun to resume, never a manifest), and, where the issue
asked for particular words (the file, the fixing command) or against misleading ones, the message has
them; a failing row says why.

Not simulated: a full disk (it needs a small file system, i.e. a loop or tmpfs mount as root);
`run_stage` reports ENOSPC and EDQUOT as a clear error naming the path.
"""


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")[:180]


def render(outcomes: list[Outcome], command: str, seconds: float) -> str:
    ok = sum(o.ok for o in outcomes)
    rows = ["| case | stage | bad input | exit | message | tb | disk | manifest | verdict |",
            "|---|---|---|---|---|---|---|---|---|"]
    for o in outcomes:
        disk = "unchanged" if not o.changed else f"changed: {', '.join(o.changed[:3])}" + (
            f" (+{len(o.changed) - 3})" if len(o.changed) > 3 else "")
        what = o.case.what + (" (*keeps work*)" if o.case.keeps_work else "")
        rows.append(f"| `{o.case.id}` | {o.case.stage[:2]} | {_cell(what)} | {o.exit} | {_cell(o.message)} | "
                    f"{'yes' if o.traceback else 'no'} | {_cell(disk)} | {'yes' if o.manifests else 'no'} | "
                    f"{'ok' if o.ok else '**FAIL**: ' + ', '.join(o.problems)} |")
    return (INTRO + f"\n{ok} of {len(outcomes)} cases ok. Regenerate with `{command}` "
            f"({seconds:.0f} s on this machine).\n\n" + "\n".join(rows) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="only the cases of stages 1, 2, 3 and 6 (no torch); implies --no-write")
    ap.add_argument("--only", default="", help="comma-separated case ids; implies --no-write")
    ap.add_argument("--no-write", action="store_true", help=f"print the table instead of writing {DOC.relative_to(REPO)}")
    ap.add_argument("--work", default="", help="working folder (kept; the shared run there is reused); default: a temp folder")
    ap.add_argument("--jobs", type=int, default=2, help="cases run side by side")
    args = ap.parse_args(argv)
    selected = cases()
    if args.only:
        wanted = set(args.only.split(","))
        unknown = wanted - {c.id for c in selected}
        if unknown:
            ap.error(f"unknown case ids: {sorted(unknown)}")
        selected = [c for c in selected if c.id in wanted]
    if args.quick:
        selected = [c for c in selected if c.stage in TORCHLESS]
    write = not (args.no_write or args.quick or args.only)
    t0 = time.monotonic()
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="dante-bad-inputs-"))
    base = work / "base"
    build_base(base)
    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        outcomes = list(pool.map(lambda c: run_case(c, base, work / "cases"), selected))
    seconds = time.monotonic() - t0
    text = render(outcomes, "DS_ACCELERATOR=cpu python tools/bad_inputs.py", seconds)
    if write:
        DOC.write_text(text, encoding="utf-8")
        print(f"wrote {DOC}")
    else:
        print(text)
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    failed = [o.case.id for o in outcomes if not o.ok]
    print(f"{len(outcomes) - len(failed)} of {len(outcomes)} ok in {seconds:.0f} s" + (f"; failing: {', '.join(failed)}"
                                                                                       if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
