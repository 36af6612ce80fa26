"""The training engine shared by stage 4 (pretraining), stage 5 (context extension) and stage 7 (SFT).

A stage builds a model (fresh, or from ``dante.checkpoint.load_model``), a batch source and a
``TrainConfig``, then calls ``Trainer(...).fit()``. The engine owns everything else: the distributed
setup, the optimizer and schedule, the step, validation, checkpoints and metrics.
Its parts live beside it: ``dante.distributed`` (ranks, devices, launch refusals), ``dante.backends``
(DeepSpeed and torch optimizers, the DeepSpeed config and precision), ``dante.transforms`` (FP8,
activation checkpointing, compile), ``dante.kernels`` (the attention kernel), ``dante.prefetch``.

    batch source   anything with ``batch(step, micro_step, rank, world_size) -> dict`` of (B, T) tensors:
                   ``tokens``, ``targets`` (-100 = no loss), optional ``weights`` (float per target; SFT),
                   ``positions`` and ``doc_ids`` (packed documents; passed to the model), and
                   ``state_dict()``/``load_state_dict()`` (checked on resume). Random access by step
                   makes resume exact with no data-loader state (``dante.pretrain_data`` for the pretraining one),
                   and lets ``dante.prefetch`` build the next step in a background thread. An optional
                   ``document_mask`` attribute (True when batches carry ``doc_ids``) feeds the kernel choice.
    val source     optional; ``batches(rank, world_size, max_batches)`` yields the same kind of dicts.

Design choices
- Loss normalization: the model returns (weighted loss SUM, weight sum) per micro-batch
  (``dante.loss``). Before the forward passes of a step, the engine adds up the target weights of all
  micro-batches of the step on all ranks (one all-reduce); each micro-batch then back-propagates
  ``loss_sum * world_size / total_weight``. DeepSpeed averages gradients over ranks (the / world_size
  cancels the * world_size), so the update equals one big batch's mean loss over every weighted token,
  whatever the split into micro-batches and ranks (tested: 1 rank x accumulation 2 == 2 ranks x 1, and
  weighted accumulation == one batch). Per-micro-batch means would overweight tokens of sparsely
  weighted micro-batches (SFT) and short ones.
- Backends: ``deepspeed`` (ZeRO stage 0-2: optimizer states, and with 2 gradients, partitioned over
  ranks; bf16 weights with fp32 masters in the optimizer; gradients accumulated and reduced in fp32 by the
  built-in config, and the dtypes actually in use read back from the live engine into the log and the
  manifest; ZeRO-1 by default: one gradient all-reduce per optimizer step, bench/zero_comm.py) and ``torch`` (one process, fp32 weights with
  bf16 autocast, torch AdamW; needs no DeepSpeed: the fallback where it is missing). DeepSpeed on CPU
  (``DS_ACCELERATOR=cpu``) runs with gloo; bf16 works there too, but the tiny CPU profile trains in fp32
  because this machine's CPUs have no bf16 matmul units (bf16 is emulated, i.e. slower) and because
  the resume test compares losses bit for bit.
- AdamW (torch's, fused kernel on CUDA) with betas/eps/weight decay from the config. No weight decay on
  norms (1-D weights), biases, and the embedding matrix (and so the tied lm_head): decaying them pulls
  per-channel gains and rare-token rows towards zero without regularising anything (the GPT-3 /
  LLaMA practice). An untied lm_head is a projection like the others and decays.
- LR: linear warmup to ``lr`` over ``warmup_steps``, then cosine to ``min_lr`` at the last step
  (``lr_at``). A pure function of the step: nothing to save, and stage 5/7 get a fresh schedule simply
  by starting at step 0 in their own stage folder.
- Model transforms are applied here, never in model.py: torchao float8 (all linears except ``output``,
  the lm_head, whose logits feed the softmax and stay bf16), activation checkpointing (per block,
  non-reentrant), torch.compile of each block's forward (one graph reused by every block, the
  checkpoint inside it: ``apply_compile`` says why), and the attention kernel chosen by
  ``dante.kernels.choose_attention`` (logged, and in the manifest under ``transforms.attention``).
  Parameter names never change.
- The GPU does not wait for the host: micro-batches are built ahead in a background thread into
  pinned memory and copied with ``non_blocking=True``; one host sync per optimizer step (the loss, read
  before the update so that a non-finite one never reaches the weights); gradient norms are read once
  per log interval and before each checkpoint; ``torch.cuda.synchronize()`` only at log steps, where
  the interval's tokens/s is measured.
- Launch: ``python 4_pretrain.py`` runs one process (RANK/WORLD_SIZE/MASTER_* default to a single rank
  on a free port); ``deepspeed`` or ``torchrun`` launch many ranks / nodes, one per GPU (device
  ``LOCAL_RANK % visible GPUs``). The stages start their ranks (``start_ranks``) before opening their
  folder, so a world size other than train.expected_world_size or FP8 without fp8 units is refused
  before anything is written.
- Resume (``dante.checkpoint``): rank 0 picks the checkpoint before the backend is built, because a
  resume on another number of ranks changes grad_accum (the global batch stays the checkpoint's) and
  makes DeepSpeed load the optimizer state through its universal format (``to_universal``, converted
  once by rank 0 into the checkpoint's train_state/universal/). Every DeepSpeed checkpoint carries the
  ``universal_checkpoint_info`` that ``ds_to_universal`` requires.
- DANTE_DATA_TRACE=<folder> makes every rank record the windows it is served (``TracedBatches``), for
  tests that compare what runs split or resumed differently trained on; off by default.
- Failure: a non-finite loss stops the run before the optimizer step, so the weights and the last
  checkpoint stay good, and the error names the step. A non-finite gradient norm is found at the next
  log step or checkpoint, whichever comes first, and names its step; no checkpoint is written after it.
  SIGTERM/SIGINT set a flag checked between steps (with several ranks it travels in the next loss
  all-reduce, so all ranks stop after the same step): the engine saves a checkpoint and returns
  ``stopped_by_signal``; a second SIGINT aborts at once.

Example::

    dist = init_distributed(cfg.train.backend)
    trainer = Trainer(model=model, model_cfg=cfg.model, train_cfg=cfg.train, stage_dir=stage.dir,
                      data=TieredMemmapDataset.from_stage_dir(...), val_data=ValidationWindows.from_stage_dir(...),
                      stage_config=to_dict(cfg), dist=dist, desc="04_pretrain")
    result = trainer.fit()
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

import torch
from torch import nn

from dante.backends import BACKENDS
from dante.checkpoint import TRAIN_STATE, CheckpointError, CheckpointManager, ResumePlan, plan_resume
from dante.config import ModelConfig, TrainConfig
from dante.distributed import DistInfo
from dante.errors import UserError
from dante.flops import mfu_fields, planned_steps, tokens_per_step, training_flops_per_token, training_peaks
from dante.kernels import apply_attention_choice, choose_attention
from dante.loss import chunked_cross_entropy
from dante.metrics import MetricsLogger
from dante.model import Transformer
from dante.prefetch import StepPrefetcher
from dante.transforms import (
    COMPILE_MODES_VALIDATED,
    apply_activation_checkpointing,
    apply_compile,
    apply_fp8,
    compile_mode_problem,
)

IGNORE_INDEX = -100


class TrainingDiverged(UserError):
    """The loss or the gradient norm became NaN/inf."""


class BatchSource(Protocol):
    def batch(self, step: int, micro_step: int, rank: int, world_size: int) -> dict[str, torch.Tensor]: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


class ValSource(Protocol):
    def batches(self, rank: int, world_size: int, max_batches: int) -> Iterator[dict[str, torch.Tensor]]: ...


# ---------------------------------------------------------------------------------------------------
# Schedule, optimizer groups, step plan
# ---------------------------------------------------------------------------------------------------


def lr_at(step: int, cfg: TrainConfig, total_steps: int) -> float:
    """LR of optimizer step ``step`` (0-based): linear warmup to cfg.lr, then cosine down to cfg.min_lr."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    decay_steps = max(1, total_steps - 1 - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / decay_steps)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)




class LossModule(nn.Module):
    """Transformer + chunked cross-entropy: forward(batch) -> (weighted loss sum, weight sum)."""

    def __init__(self, model: Transformer, chunk_size: int):
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size

    def forward(self, tokens, targets, weights=None, positions=None, doc_ids=None):
        hidden_BTD = self.model(tokens, positions_BT=positions, doc_ids_BT=doc_ids)
        return chunked_cross_entropy(hidden_BTD, self.model.output.weight, targets, weights,
                                     chunk_size=self.chunk_size, ignore_index=IGNORE_INDEX)


def batch_weight(batch: dict[str, torch.Tensor]) -> float:
    """Total loss weight of a micro-batch (what chunked_cross_entropy will return as weight sum)."""
    keep = batch["targets"] != IGNORE_INDEX
    if batch.get("weights") is None:
        return float(keep.sum())
    return float((batch["weights"].double() * keep).sum())


# ---------------------------------------------------------------------------------------------------
# Signals
# ---------------------------------------------------------------------------------------------------


class StopFlag:
    """SIGTERM/SIGINT -> a flag the loop checks between steps (a second SIGINT aborts at once)."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self) -> "StopFlag":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


# ---------------------------------------------------------------------------------------------------
# Data trace (tests and debugging)
# ---------------------------------------------------------------------------------------------------

TRACE_ENV = "DANTE_DATA_TRACE"
"""A folder: when set, every rank records the micro-batches it is served (``TracedBatches``)."""


class TracedBatches:
    """A batch source that appends, for every micro-batch it serves, one JSON line to
    ``<folder>/rank<r>-pid<p>.jsonl``: step, micro_step, rank, world_size and a short sha256 of every row
    (its tokens and targets). Tests read it to check that runs split over other rank counts or resumed
    elsewhere train on the same windows. Only with DANTE_DATA_TRACE set: it costs a hash per row."""

    def __init__(self, inner: BatchSource, folder: Path, rank: int):
        self.inner = inner
        folder.mkdir(parents=True, exist_ok=True)
        self._file = open(folder / f"rank{rank}-pid{os.getpid()}.jsonl", "a", encoding="utf-8")
        self._lock = threading.Lock()  # a prefetching loader may call batch() from another thread
        self.document_mask = bool(getattr(inner, "document_mask", False))  # the kernel choice reads it

    def batch(self, step: int, micro_step: int, rank: int, world_size: int) -> dict[str, torch.Tensor]:
        out = self.inner.batch(step, micro_step, rank, world_size)
        rows = [hashlib.sha256(t.numpy().tobytes() + y.numpy().tobytes()).hexdigest()[:16]
                for t, y in zip(out["tokens"], out["targets"])]
        line = json.dumps({"step": step, "micro_step": micro_step, "rank": rank, "world_size": world_size,
                           "rows": rows})
        with self._lock:
            self._file.write(line + "\n")
            self._file.flush()
        return out

    def state_dict(self) -> dict:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state)


# ---------------------------------------------------------------------------------------------------
# The trainer
# ---------------------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    steps: int
    tokens_seen: int
    final_loss: float | None
    final_val_loss: float | None
    checkpoint: str | None
    stopped_by_signal: int | None = None
    resumed_from: int = 0
    train_seconds: float = 0.0
    extra: dict = field(default_factory=dict)


def _device_scalars(values: list[float], device: torch.device) -> torch.Tensor:
    """float64 values on ``device`` without a host sync: a copy from pageable memory would wait for the
    GPU's queue, one from pinned memory with non_blocking=True does not."""
    host = torch.tensor(values, dtype=torch.float64, pin_memory=device.type == "cuda")
    return host.to(device, non_blocking=True)


class Trainer:
    """The training loop: one readable ``fit``; checkpoints, metrics and validation are helpers it calls."""

    def __init__(self, *, model: Transformer, model_cfg: ModelConfig, train_cfg: TrainConfig, stage_dir: str | Path,
                 data: BatchSource, stage_config: dict, dist: DistInfo, val_data: ValSource | None = None,
                 desc: str = "train", on_checkpoint: Callable[[int, Path], None] | None = None,
                 resume: ResumePlan | None = None):
        """``resume``: what to resume from, when the stage needed it before building its data (stage 7: the
        SFT order and step count depend on the accumulation); by default decided here (``plan_resume``)."""
        self.stage_dir = Path(stage_dir)
        self.resume_plan = resume or plan_resume(self.stage_dir, stage_config, train_cfg.micro_batch,
                                                 train_cfg.grad_accum, dist.rank, dist.world_size)
        if self.resume_plan.grad_accum != train_cfg.grad_accum:  # the checkpoint's global batch on this many ranks
            train_cfg = replace(train_cfg, grad_accum=self.resume_plan.grad_accum)
        self.cfg, self.model_cfg, self.dist, self.desc = train_cfg, model_cfg, dist, desc
        if os.environ.get(TRACE_ENV):
            data = TracedBatches(data, Path(os.environ[TRACE_ENV]), dist.rank)
        self.data, self.val_data = data, val_data
        self.stage_config = stage_config
        self.on_checkpoint = on_checkpoint  # rank 0, after each complete checkpoint (e.g. Stage.save_progress)
        self.total_steps = planned_steps(train_cfg, dist.world_size)
        self.tokens_per_step = tokens_per_step(train_cfg, dist.world_size)
        self.flops_per_token = training_flops_per_token(model_cfg, train_cfg.seq_len)
        self.peaks = training_peaks(train_cfg.fp8, train_cfg.peak_tflops)  # MFU vs bf16, and vs fp8 with train.fp8
        self.transforms = self._prepare(model)
        reshard = self.resume_plan.step_dir / TRAIN_STATE if self.resume_plan.resharded else None
        self.backend = BACKENDS[train_cfg.backend](LossModule(model, train_cfg.loss_chunk_size), train_cfg, dist,
                                                   reshard=reshard)
        if dist.is_main:
            p = self.backend.precision
            print(f"[{desc}] precision: compute {p['compute']}, master weights {p['master_weights']}, gradient "
                  f"accumulation {p['grad_accumulation']}, gradient reduction {p['grad_reduction']} "
                  f"({train_cfg.backend}, optimizer wrapper {p['optimizer_wrapper']})", flush=True)
        self.checkpoints = CheckpointManager(self.stage_dir, train_cfg.keep_last, self.backend)
        self.saved_step: int | None = None  # step of the checkpoint last written or loaded, the same on every rank
        self.reshards: list[dict] = []  # every change of rank count of this run, carried from checkpoint to checkpoint
        self.step = 0
        self.tokens_seen = 0
        self.last_loss: float | None = None
        self.last_val_loss: float | None = None
        # the next steps' micro-batches are built in a background thread (dante/prefetch.py)
        self.prefetcher = StepPrefetcher(data, train_cfg.grad_accum, dist.rank, dist.world_size,
                                         pin=dist.device.type == "cuda", weight_of=batch_weight, end=self.total_steps)
        self._pending_norms: list[tuple[int, torch.Tensor | float]] = []  # (step, grad norm) not read yet
        self._stop_agreed = False  # some rank asked to stop (learnt from the last step's all-reduce)

    def _prepare(self, model: Transformer) -> dict:
        cfg, applied = self.cfg, {}
        if cfg.compile and cfg.compile_mode not in COMPILE_MODES_VALIDATED:  # before any work
            raise UserError(compile_mode_problem(cfg.compile_mode))
        model.to(self.dist.device)
        if cfg.fp8:
            applied["fp8_linears"] = apply_fp8(model, self.dist.device)
        if cfg.activation_checkpointing:
            apply_activation_checkpointing(model)
            applied["activation_checkpointing"] = True
        if cfg.compile:
            apply_compile(model, cfg.compile_mode)
            applied["compile"] = cfg.compile_mode
        # batch sources of packed documents (SFTBatches) say so with a ``document_mask`` attribute
        choice = choose_attention(self.dist.device.type, document_mask=bool(getattr(self.data, "document_mask", False)),
                                  gqa=self.model_cfg.n_heads != self.model_cfg.n_kv_heads, compiled=cfg.compile)
        apply_attention_choice(model, choice)
        applied["attention"] = choice.to_dict()
        return applied

    # -- resume -------------------------------------------------------------------------------------
    def resume(self) -> int:
        """Load the checkpoint ``plan_resume`` chose (the same on every rank), if any; returns the step to continue from."""
        plan = self.resume_plan
        if plan.step_dir is None:
            return 0
        meta = self.checkpoints.load(plan)
        try:
            self.data.load_state_dict(meta["data"])
        except ValueError as e:
            raise CheckpointError(f"cannot resume from {plan.step_dir}: {e}") from None
        self.step, self.tokens_seen = int(meta["step"]), int(meta["tokens_seen"])
        self.last_loss, self.last_val_loss = meta.get("loss"), meta.get("val_loss")
        self.saved_step = self.step
        self.reshards = list(meta.get("reshards", []))
        if plan.resharded:
            self.reshards.append({"step": self.step, "from_world_size": plan.saved_world_size,
                                  "to_world_size": self.dist.world_size, "grad_accum": self.cfg.grad_accum,
                                  "optimizer_state": "universal" if getattr(self.backend, "universal", False) else "as saved"})
        if plan.removed and self.dist.is_main:
            print(f"[{self.desc}] removed incomplete checkpoint folder(s) {plan.removed}", flush=True)
        return self.step

    def save_checkpoint(self) -> Path:
        meta = {"tokens_seen": self.tokens_seen, "loss": self.last_loss, "val_loss": self.last_val_loss,
                "data": self.data.state_dict(), "config": self.stage_config, "stage": self.desc,
                "backend": self.backend.name, "transforms": self.transforms,
                "batch": {"micro_batch": self.cfg.micro_batch, "grad_accum": self.cfg.grad_accum,
                          "world_size": self.dist.world_size,
                          "global_batch": self.cfg.micro_batch * self.cfg.grad_accum * self.dist.world_size},
                "reshards": self.reshards}
        path = self.checkpoints.save(self.step, self.model_cfg, meta)
        self.saved_step = self.step
        if self.on_checkpoint is not None and self.dist.is_main:
            self.on_checkpoint(self.step, path)
        return path

    # -- one optimizer step ---------------------------------------------------------------------------
    def train_step(self, step: int, stop_requested: bool | Callable[[], bool] = False) -> dict | None:
        """Forward/backward over all micro-batches of ``step`` and one optimizer update.

        Returns None (and changes nothing) when a stop was asked: with one rank, ``stop_requested`` now;
        with several, a request of any rank carried by the previous step's loss all-reduce (every rank
        reads the same sum, so all stop at the same step). Raises TrainingDiverged on a non-finite loss,
        before the update. The gradient norm is returned unread (a device tensor on GPU): ``fit`` reads
        the norms of a whole log interval at once and before every checkpoint (``_read_grad_norms``).

        Host syncs: one per step, reading the loss (with several ranks, together with the stop flags and
        the weight total, in one tensor) before the update. That read must precede the update for the
        non-finite check to keep bad weights out, and it costs one idle gap of the GPU per optimizer step
        (the host then queues the update and the next step's forwards, a few ms against a Dante-2B step
        of ~0.5 s per micro-batch, an estimate: not measured on a GPU yet); the micro-steps in between
        never wait for the host, and their batches were built by the prefetcher while the last step ran.
        """
        cfg, dist, b = self.cfg, self.dist, self.backend
        asked = stop_requested() if callable(stop_requested) else stop_requested
        if self._stop_agreed or (dist.world_size == 1 and asked):
            return None
        prepared = self.prefetcher.get(step)
        if dist.world_size == 1:
            total_weight, total_t = prepared.local_weight, None
            if total_weight <= 0:
                raise UserError(f"step {step + 1}: no target has a loss weight > 0 in the whole batch; check the data")
            scale = 1.0 / total_weight
        else:  # the weight total stays on the device (no sync); checked with the loss below, before the update
            total_t = b.all_reduce_sum_(_device_scalars([prepared.local_weight], dist.device))
            scale = (dist.world_size / total_t[0]).float()
        loss_sum = torch.zeros((), dtype=torch.float64, device=dist.device)
        for m, batch in enumerate(prepared.batches):
            batch = {k: v.to(dist.device, non_blocking=True) for k, v in batch.items()}  # pinned on GPU: async
            micro_loss_sum, _ = b.forward(batch)
            b.backward(micro_loss_sum * scale, boundary=m == len(prepared.batches) - 1)
            loss_sum += micro_loss_sum.detach().double()
        if dist.world_size == 1:
            global_loss_sum = float(loss_sum)  # the step's one host sync
        else:
            summed = b.all_reduce_sum_(torch.cat([loss_sum.reshape(1), _device_scalars([float(asked)], dist.device)]))
            global_loss_sum, stop, total_weight = torch.cat([summed, total_t]).tolist()  # the step's one host sync
            self._stop_agreed = stop > 0
            if total_weight <= 0:
                raise UserError(f"step {step + 1}: no target has a loss weight > 0 in the whole batch; check the data")
        loss = global_loss_sum / total_weight
        if not math.isfinite(loss):
            raise TrainingDiverged(self._diverged_message(step + 1, f"loss is {loss}"))
        lr = lr_at(step, cfg, self.total_steps)
        grad_norm = b.step(lr)
        return {"loss": loss, "lr": lr, "grad_norm": grad_norm}

    def _read_grad_norms(self, pending: list[tuple[int, Any]]) -> dict[int, float]:
        """{step: gradient norm} of the steps not read yet, in one host sync; empties ``pending``.

        Raises TrainingDiverged naming the first step whose norm is not finite. The torch backend and
        DeepSpeed in fp32 skipped that update; DeepSpeed in bf16 applied it. Either way no checkpoint has
        been written since, because ``fit`` calls this before every checkpoint.
        """
        if not pending:
            return {}
        values = [v if isinstance(v, torch.Tensor) else torch.tensor(float(v)) for _, v in pending]
        read = torch.stack([v.detach().double().reshape(()).cpu() for v in values]).tolist()
        norms = {step: value for (step, _), value in zip(pending, read)}
        pending.clear()
        for step, value in norms.items():
            if not math.isfinite(value):
                raise TrainingDiverged(self._diverged_message(step, f"gradient norm is {value}"))
        return norms

    def _diverged_message(self, step: int, what: str) -> str:
        latest = self.checkpoints.latest()
        keep = f"the last good checkpoint is {latest}" if latest else "no checkpoint was written yet"
        return (f"training diverged at step {step}: {what}. Stopped; {keep}.\n"
                "  HINT: lower train.lr or raise train.warmup_steps, keep train.grad_clip > 0, and check the data "
                "around this step (it is reproducible: the sampler is a pure function of the step).")

    # -- validation ---------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict | None:
        if self.val_data is None:
            return None
        b, dist = self.backend, self.dist
        b.train_mode(False)
        sums = torch.zeros(2, dtype=torch.float64, device=dist.device)  # (loss sum, weight sum), read once
        for batch in self.val_data.batches(dist.rank, dist.world_size, self.cfg.eval_batches):
            batch = {k: v.to(dist.device) for k, v in batch.items() if v is not None}
            ls, ws = b.forward(batch)
            sums += torch.stack([ls.detach().double(), torch.as_tensor(ws, device=dist.device).double()])
        b.train_mode(True)
        loss_sum, weight_sum = b.all_reduce_sum_(sums).tolist()
        if weight_sum <= 0:
            return None
        val_loss = loss_sum / weight_sum
        return {"kind": "val", "step": self.step, "val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0)),
                "val_tokens": int(weight_sum)}

    # -- the loop -----------------------------------------------------------------------------------
    def fit(self) -> TrainResult:
        cfg, dist = self.cfg, self.dist
        start = self.resume()
        log = MetricsLogger(self.stage_dir, dist.is_main, start, self.total_steps, self.desc)
        if start:
            log.note(f"resumed from checkpoint step {start} ({self.tokens_seen:,} tokens seen)")
        if start and self.resume_plan.note:
            log.note(self.resume_plan.note)
        if start >= self.total_steps:
            log.close()
            return self._result(start, None)
        self.backend.train_mode(True)
        log.note(f"attention kernel {self.transforms['attention']['kernel']}: {self.transforms['attention']['reason']}")
        recent_step_s: list[float] = []
        train_seconds, stopped = 0.0, None
        interval_steps, interval_s = 0, 0.0  # since the last written record: its tokens/s
        pending_norms: list[tuple[int, Any]] = []  # gradient norms not read yet (read per log interval)
        with StopFlag() as flag:
            try:
                while self.step < self.total_steps:
                    t0 = time.perf_counter()
                    out = self.train_step(self.step, stop_requested=lambda: flag.signum is not None)
                    if out is None:  # a rank got SIGTERM/SIGINT: save where we are and leave cleanly
                        stopped = flag.signum or signal.SIGTERM
                        log.note(f"stop signal received: saving a checkpoint at step {self.step}")
                        self._read_grad_norms(pending_norms)  # a checkpoint never holds a diverged update
                        if self.saved_step != self.step:  # not just saved (or resumed from)
                            self.save_checkpoint()
                        break
                    self.step += 1
                    self.tokens_seen += self.tokens_per_step
                    self.last_loss = out["loss"]
                    pending_norms.append((self.step, out["grad_norm"]))
                    last = self.step == self.total_steps
                    write = self.step % cfg.log_every == 0 or last
                    save = self.step % cfg.checkpoint_every == 0 or last
                    if write and dist.device.type == "cuda":
                        torch.cuda.synchronize()  # the interval's time then covers finished GPU work
                    step_s = time.perf_counter() - t0
                    train_seconds += step_s
                    interval_steps, interval_s = interval_steps + 1, interval_s + step_s
                    recent_step_s = (recent_step_s + [step_s])[-20:]
                    mean_step_s = sum(recent_step_s) / len(recent_step_s)
                    norms = self._read_grad_norms(pending_norms) if write or save else {}
                    tok_s = self.tokens_per_step * interval_steps / interval_s if write else self.tokens_per_step / mean_step_s
                    record = {"kind": "train", "step": self.step, "loss": out["loss"], "lr": out["lr"],
                              "grad_norm": norms.get(self.step), "tokens": self.tokens_seen, "tokens_per_sec": tok_s,
                              **mfu_fields(tok_s, self.flops_per_token, self.peaks, dist.world_size),
                              "step_time_s": interval_s / interval_steps if write else step_s,
                              "elapsed_s": train_seconds}
                    log.train(record, write=write, eta_s=(self.total_steps - self.step) * mean_step_s)
                    if write:
                        interval_steps, interval_s = 0, 0.0
                    if cfg.eval_every and (self.step % cfg.eval_every == 0 or last):
                        val = self.evaluate()
                        if val is not None:
                            self.last_val_loss = val["val_loss"]
                            log.val(val)
                    if save:
                        self.save_checkpoint()
            finally:
                self.prefetcher.close()
                log.close()
        return self._result(start, stopped, train_seconds)

    def _result(self, start: int, stopped: int | None, seconds: float = 0.0) -> TrainResult:
        latest = self.checkpoints.latest()
        return TrainResult(steps=self.step, tokens_seen=self.tokens_seen, final_loss=self.last_loss,
                           final_val_loss=self.last_val_loss, checkpoint=str(latest) if latest else None,
                           stopped_by_signal=stopped, resumed_from=start, train_seconds=seconds,
                           extra={"transforms": self.transforms, "backend": self.backend.name,
                                  "world_size": self.dist.world_size, "total_steps": self.total_steps,
                                  "flops_per_token": self.flops_per_token,
                                  "peak": {k: p.label if p else None for k, p in self.peaks.items()},
                                  "precision": self.backend.precision,
                                  "optimizer_groups": self.backend.param_summary,
                                  "batch": {"micro_batch": self.cfg.micro_batch, "grad_accum": self.cfg.grad_accum,
                                            "global_batch": self.tokens_per_step // self.cfg.seq_len},
                                  "reshards": self.reshards})


__all__ = ["Trainer", "TrainResult", "TrainingDiverged", "LossModule", "batch_weight", "lr_at", "StopFlag",
           "TracedBatches", "IGNORE_INDEX"]
