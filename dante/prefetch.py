"""Background preparation of training steps: the next step's micro-batches are built while this one trains.

``StepPrefetcher(data, grad_accum, rank, world_size, pin)`` runs one thread that calls
``data.batch(step, micro_step, rank, world_size)`` for step after step, in exactly the order the engine
would, adds up each step's loss weight (``weight_of``), pins the tensors (when CUDA is available) and
queues the result; ``get(step)`` hands it over. The engine then copies each micro-batch with
``non_blocking=True``, which from pinned memory is an asynchronous DMA, so neither the host nor the GPU
waits for batch building or the copy.

Design choices
- Exact order, restartable anywhere: batches are a pure function of the step (the batch-source
  contract), so prefetching changes when a batch is built, never what it holds. ``get(step)`` for any
  step other than the next one queued (a resume, a bench that jumps) stops the thread, drops what it
  built and starts again at ``step``; nothing is saved in checkpoints.
- One thread, ``depth`` steps ahead (default 2): building is host work (memmap reads, numpy) that
  releases the GIL for its copies; more threads would reorder calls into a batch source that keeps a
  cursor (``SFTBatches``).
- Pinned memory from ``Tensor.pin_memory()`` per batch rather than hand-managed ring buffers: PyTorch's
  caching host allocator reuses pinned blocks and does not hand a block out again until the
  non-blocking copies recorded on it have finished, which a ring buffer would have to track with events.
- An error in the thread is raised by ``get`` of the step it happened in, with its own traceback.
- The thread is a daemon and ``close()`` stops it; a stop signal (SIGTERM) is handled by the main thread
  (dante.engine.StopFlag), which then simply stops asking.

Example::

    prefetch = StepPrefetcher(data, grad_accum=4, rank=0, world_size=1, pin=torch.cuda.is_available())
    prepared = prefetch.get(step)     # prepared.batches: grad_accum dicts of (B, T) tensors
    prefetch.close()
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class PreparedStep:
    step: int
    batches: list[dict[str, torch.Tensor]]
    """grad_accum micro-batches on the host (pinned when the prefetcher pins)."""
    local_weight: float
    """Sum of ``weight_of`` over the micro-batches (this rank's loss weight of the step)."""


class _Failed:
    def __init__(self, step: int, error: BaseException):
        self.step, self.error = step, error


class StepPrefetcher:
    def __init__(self, data, grad_accum: int, rank: int, world_size: int, pin: bool,
                 weight_of: Callable[[dict], float] | None = None, depth: int = 2, end: int | None = None):
        self.data, self.grad_accum, self.rank, self.world_size = data, grad_accum, rank, world_size
        self.pin, self.weight_of, self.depth, self.end = pin, weight_of, depth, end
        self._thread: threading.Thread | None = None
        self._queue: queue.Queue | None = None
        self._stop: threading.Event | None = None
        self._next: int | None = None  # the step the queue delivers next

    def prepare(self, step: int) -> PreparedStep:
        """Build one step in the calling thread (what the background thread does for each step)."""
        batches = []
        for m in range(self.grad_accum):
            batch = {k: v for k, v in self.data.batch(step, m, self.rank, self.world_size).items() if v is not None}
            if self.pin:
                batch = {k: v.pin_memory() for k, v in batch.items()}
            batches.append(batch)
        weight = sum(self.weight_of(b) for b in batches) if self.weight_of is not None else 0.0
        return PreparedStep(step, batches, weight)

    def _run(self, start: int, q: queue.Queue, stop: threading.Event) -> None:
        step = start
        while not stop.is_set() and (self.end is None or step < self.end):
            try:
                item = self.prepare(step)
            except BaseException as e:  # handed to get(), which raises it in the training thread
                item = _Failed(step, e)
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if isinstance(item, _Failed):
                return
            step += 1

    def start(self, step: int) -> None:
        """(Re)start building at ``step``; whatever was built for other steps is dropped."""
        self.close()
        self._queue, self._stop = queue.Queue(maxsize=self.depth), threading.Event()
        self._thread = threading.Thread(target=self._run, args=(step, self._queue, self._stop),
                                        name="dante-prefetch", daemon=True)
        self._next = step
        self._thread.start()

    def get(self, step: int) -> PreparedStep:
        """The prepared micro-batches of ``step`` (blocks until they are built)."""
        if self.end is not None and step >= self.end:  # past the planned steps: nothing was queued for it
            return self.prepare(step)
        if self._next != step or self._thread is None:
            self.start(step)
        item = self._queue.get()
        if isinstance(item, _Failed):
            self.close()
            raise item.error
        self._next = step + 1
        return item

    def close(self) -> None:
        """Stop the thread and drop the queue (safe to call twice)."""
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = self._queue = self._stop = None
        self._next = None


__all__ = ["StepPrefetcher", "PreparedStep"]
