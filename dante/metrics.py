"""Training metrics: metrics.jsonl, TensorBoard, and the progress display (rank 0 only).

``metrics.jsonl`` has one JSON object per line, ``{"kind": "train", "step", "loss", "lr", "grad_norm",
"tokens", "tokens_per_sec", "mfu", "step_time_s", "elapsed_s"}`` every ``log_every`` steps and
``{"kind": "val", "step", "val_loss", "val_ppl", "val_tokens"}`` after each validation; TensorBoard gets
the same scalars under ``<stage>/tensorboard``. On resume both are cut back to the resumed step (TensorBoard
through ``purge_step``; a start from step 0 removes earlier events), so the files always describe one
continuous run with no step twice (the lines of steps that were trained but never checkpointed before a
crash are replaced by their re-run).

Display: a tqdm bar with loss, lr, tok/s, MFU and ETA when stderr is a terminal; otherwise (a log file,
a cluster job) one plain line per ``log_every`` steps, which greps better than carriage-return updates.

Example::

    log = MetricsLogger("runs/tiny/04_pretrain", enabled=True, start_step=0, total_steps=300, desc="04_pretrain")
    log.train({"step": 1, "loss": 9.1, ...}, write=True)
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from pathlib import Path

from dante.artifacts import atomic_write_text

METRICS = "metrics.jsonl"
TENSORBOARD = "tensorboard"


def read_metrics(path: str | Path, kind: str | None = None) -> list[dict]:
    """Records of a metrics.jsonl (optionally only one kind)."""
    p = Path(path)
    if p.is_dir():
        p = p / METRICS
    if not p.is_file():
        return []
    lines = [line for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:  # a run killed mid-write leaves a partial last line: not a record
                break
            raise
    return [r for r in rows if kind is None or r.get("kind") == kind]


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s"


class MetricsLogger:
    def __init__(self, stage_dir: str | Path, enabled: bool, start_step: int, total_steps: int, desc: str):
        self.enabled = enabled
        self.path = Path(stage_dir) / METRICS
        self.total_steps = total_steps
        self.started = time.time()
        self._bar = None
        self._tb = None
        if not enabled:
            return
        kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= start_step] if start_step else []
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        self._file = open(self.path, "a", encoding="utf-8")
        try:
            from torch.utils.tensorboard import SummaryWriter

            tb_dir = Path(stage_dir) / TENSORBOARD
            if not start_step:  # a start from step 0: events of an earlier attempt describe nothing that is kept
                shutil.rmtree(tb_dir, ignore_errors=True)
            # purge_step: readers drop the events of steps past the resume point that a killed run had written
            self._tb = SummaryWriter(str(tb_dir), purge_step=start_step + 1 if start_step else None)
        except ImportError:  # tensorboard is a listed dependency; without it only metrics.jsonl is written
            print(f"[{desc}] tensorboard is not installed: writing metrics.jsonl only", file=sys.stderr)
        if sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, desc=desc, dynamic_ncols=True, file=sys.stderr)
        self.desc = desc

    def _write(self, record: dict) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def train(self, record: dict, write: bool, eta_s: float) -> None:
        """Show one step; ``write`` also appends it to metrics.jsonl and TensorBoard."""
        if not self.enabled:
            return
        mfu = record.get("mfu")
        mfu_text = f"{100 * mfu:.1f}%" if mfu is not None else "n/a"
        if self._bar is not None:
            self._bar.update(record["step"] - self._bar.n)
            self._bar.set_postfix_str(f"loss {record['loss']:.4f} lr {record['lr']:.2e} "
                                      f"tok/s {record['tokens_per_sec']:,.0f} MFU {mfu_text} ETA {format_duration(eta_s)}")
        elif write:
            print(f"[{self.desc}] step {record['step']}/{self.total_steps} loss {record['loss']:.4f} "
                  f"lr {record['lr']:.2e} tok/s {record['tokens_per_sec']:,.0f} MFU {mfu_text} "
                  f"ETA {format_duration(eta_s)}", flush=True)
        if write:
            self._write(record)
            if self._tb is not None:
                for key in ("loss", "lr", "grad_norm", "tokens_per_sec", "mfu"):
                    if record.get(key) is not None:
                        self._tb.add_scalar(f"train/{key}", record[key], record["step"])

    def val(self, record: dict) -> None:
        if not self.enabled:
            return
        self._write(record)
        message = f"[{self.desc}] step {record['step']}: val loss {record['val_loss']:.4f} (ppl {record['val_ppl']:.2f})"
        if self._bar is not None:
            self._bar.write(message)
        else:
            print(message, flush=True)
        if self._tb is not None:
            self._tb.add_scalar("val/loss", record["val_loss"], record["step"])

    def note(self, message: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(f"[{self.desc}] {message}")
        else:
            print(f"[{self.desc}] {message}", flush=True)

    def close(self) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        self._file.close()
