"""Stage 7 (SFT training) around the shared engine: packed SFT blocks as the engine's batch sources, the
choice of the init checkpoint, and every cross-stage check, done before any weight is loaded.

``7_sft.py`` calls ``plan_sft`` (pick the checkpoint, read stage 6, check stages 2/4-5/6 against each
other and the config), then runs ``dante.engine.Trainer`` over ``SFTBatches`` (training blocks) and
``SFTEvalBatches`` (held-out conversations). The math lives elsewhere: document-masked attention and
positions in dante/model.py, the weighted loss in dante/loss.py, its normalization in dante/engine.py.

Design choices
- Epochs by counting, random access by step. A run is one stream of micro-batches numbered
  g = (step * grad_accum + micro_step) * world_size + rank; g is micro-batch g % per_epoch of epoch
  g // per_epoch, where per_epoch = ceil(blocks / micro_batch) is one pass in micro-batches
  (``dante.sft_data.num_sft_batches`` of one rank). Every epoch is a new permutation of the blocks seeded by
  (run.seed, epoch) (``dante.sft_data.epoch_order``), so a resumed run asks for step s and gets what the
  uninterrupted run trained on at s, with no loader state to save. A step covers the micro-batches
  g in [s * A * W, (s + 1) * A * W) (A = grad_accum, W = ranks): the same blocks however the global
  batch A * W is split, so 2 ranks x accumulation A train on what 1 rank x 2A does, and a run can resume
  on another number of GPUs (the engine adjusts A, ``dante.checkpoint.resume_grad_accum``). Dealing
  the blocks of an epoch round-robin to ranks instead would pad each epoch to a multiple of
  micro_batch * W and move the epoch boundaries with W.
- Steps = ceil(epochs * per_epoch / (grad_accum * W)). When that does not divide evenly, the last step is
  completed with micro-batches whose weights are all 0 (shape-true batches of the next permutation):
  they add nothing to the loss or the gradient, because the engine divides by the weight total of the
  step, and every rank still runs grad_accum forwards, which the collectives need.
  ``train.max_steps > 0`` stops earlier (smoke tests) and may not exceed the epochs' steps.
- Loss normalization is the engine's: sum(w * ce) over the whole accumulation window and all ranks,
  divided by the total weight of that window, so an answer token counts the same whatever micro-batch
  or rank it lands in (tests/test_sft_train.py checks accumulation 2 == one batch of both). Targets that
  must not count (prompt tokens, conversation ends, padding) hold the pad id with weight 0
  (``dante.sft_data.shifted_targets``), never -100 alone.
- Attention: document ids go to the model (causal AND same-conversation mask) unless
  ``sft.document_mask`` is off; positions always come from the packed arrays (0 at each conversation).
  ``SFTBatches.document_mask`` tells the engine, whose one kernel choice (``dante.kernels``) picks how
  the mask runs (FlexAttention on CUDA, SDPA with a dense mask on CPU) and records it.
- Init checkpoint: ``sft.init_from: auto`` takes 05_extend when it is complete, else 04_pretrain; a
  05_extend folder that exists but never finished is an error, not a silent fall back to the
  short-context model (``dante.checkpoint.newest_finished``, the rule of every "newest checkpoint"). The model config (rope_scaling included) is the checkpoint's and is what every
  SFT checkpoint records; there is no model section in the SFT config to disagree with it.

Example::

    plan = plan_sft(cfg, world_size=1, require=stage.require)
    data = SFTBatches(plan.train, cfg.train.micro_batch, cfg.train.grad_accum, cfg.sft.epochs, cfg.run.seed,
                      cfg.sft.document_mask, plan.data_id)
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from dante import config as C
from dante.artifacts import MANIFEST, file_sha256, stage_dir, tokenizer_path
from dante.checkpoint import (
    META,
    MODEL_FILES,
    checkpoint_ref,
    newest_finished,
    read_model_config,
    tokenizer_problems,
    verify_checkpoint,
)
from dante.errors import StageError, UserError, raise_problems
from dante.sft_packing import PackedSFT, epoch_order, load_packed, num_sft_batches, sft_batches, sft_micro_batch
from dante.tokenizer import load_tokenizer

# ---------------------------------------------------------------------------------------------------
# Batch sources for dante.engine.Trainer
# ---------------------------------------------------------------------------------------------------


def _to_torch(batch: dict[str, np.ndarray], document_mask: bool) -> dict[str, torch.Tensor]:
    """numpy micro-batch of dante.sft_data.sft_batches -> tensors for LossModule (doc_ids dropped when unmasked)."""
    return {k: torch.from_numpy(v) for k, v in batch.items() if document_mask or k != "doc_ids"}


def epoch_steps(n_blocks: int, micro_batch: int, grad_accum: int, epochs: int, world_size: int) -> int:
    """Optimizer steps that cover ``epochs`` passes over ``n_blocks`` (the last one padded, see above)."""
    return -(-epochs * num_sft_batches(n_blocks, micro_batch) // (grad_accum * world_size))


class SFTBatches:
    """Training micro-batches by (step, micro_step): epochs of per-epoch shuffled packed blocks."""

    def __init__(self, packed: PackedSFT, micro_batch: int, grad_accum: int, epochs: int, seed: int,
                 document_mask: bool = True, data_id: str = ""):
        if packed.n_blocks == 0:
            raise UserError("the SFT training split has no blocks; rebuild stage 6 with more conversations")
        self.packed, self.micro_batch, self.grad_accum = packed, micro_batch, grad_accum
        self.epochs, self.seed, self.document_mask, self.data_id = epochs, seed, document_mask, data_id
        self._order: tuple[int, np.ndarray] | None = None  # (epoch, its block order): the epoch asked for last

    def locate(self, step: int, micro_step: int, world_size: int, rank: int = 0) -> tuple[int, int]:
        """(epoch, micro-batch index in that epoch) of a micro-step; epoch == epochs means padding."""
        per_epoch = num_sft_batches(self.packed.n_blocks, self.micro_batch)
        return divmod((step * self.grad_accum + micro_step) * world_size + rank, per_epoch)

    def batch(self, step: int, micro_step: int, rank: int, world_size: int) -> dict[str, torch.Tensor]:
        epoch, index = self.locate(step, micro_step, world_size, rank)
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, epoch_order(self.packed.n_blocks, self.seed, epoch))
        b = self.micro_batch
        batch = sft_micro_batch(self.packed, self._order[1][index * b:(index + 1) * b], b)
        if epoch >= self.epochs:  # completes the last step only: contributes nothing (see module docstring)
            batch["weights"][:] = 0.0
        return _to_torch(batch, self.document_mask)

    def state_dict(self) -> dict:
        """What determines the micro-batch stream; the position in it is the trainer's step."""
        return {"kind": "SFTBatches", "seed": self.seed, "epochs": self.epochs, "micro_batch": self.micro_batch,
                "grad_accum": self.grad_accum, "n_blocks": self.packed.n_blocks,
                "block_size": self.packed.block_size, "document_mask": self.document_mask, "data": self.data_id}

    def load_state_dict(self, state: dict) -> None:
        # grad_accum may differ: the order depends on the global batch, which the engine keeps on resume
        mine = self.state_dict()
        differing = [k for k in mine if k != "grad_accum" and state.get(k) != mine[k]]
        if differing:
            raise ValueError(f"the SFT data or its order differ from the checkpoint's in {', '.join(differing)} "
                             "(was 06_sft_data rebuilt?); resuming would not continue the same run. Restore it, "
                             "or start stage 7 over with --force")


class SFTEvalBatches:
    """Held-out blocks: the first ``max_batches * micro_batch`` of the eval split (stage 6 wrote them in a
    seeded random order), dealt round-robin to ranks, so an eval loss means the same at any world size."""

    def __init__(self, packed: PackedSFT, micro_batch: int, document_mask: bool = True):
        self.packed, self.micro_batch, self.document_mask = packed, micro_batch, document_mask

    def batches(self, rank: int, world_size: int, max_batches: int) -> Iterator[dict[str, torch.Tensor]]:
        n = min(self.packed.n_blocks, max_batches * self.micro_batch)
        if n == 0:
            return
        p = self.packed
        head = PackedSFT(p.tokens[:n], p.weights[:n], p.doc_ids[:n], p.positions[:n], p.pad_id)
        for batch in sft_batches(head, self.micro_batch, shuffle=False, rank=rank, world_size=world_size):
            yield _to_torch(batch, self.document_mask)


# ---------------------------------------------------------------------------------------------------
# Planning: inputs and checks
# ---------------------------------------------------------------------------------------------------


#: the stages SFT may start from, in pipeline order (``sft.init_from: auto`` takes the newest finished one)
INIT_STAGES = (C.PRETRAIN, C.EXTEND)


@dataclass
class SFTPlan:
    init_stage: str
    checkpoint: Path
    model_cfg: C.ModelConfig
    tokenizer_path: Path
    sft_data_dir: Path
    train: PackedSFT
    eval: PackedSFT
    data_id: str
    """sha256 of 06_sft_data/manifest.json: identifies the packed data a checkpoint was trained on."""
    weighted_tokens: float
    """Loss-weighted (answer) tokens in one epoch, from stage 6's manifest."""
    steps_per_epoch: float
    total_steps: int
    world_size: int

    def describe(self, cfg: C.SFTStageConfig) -> list[str]:
        t, m = cfg.train, self.model_cfg
        rope = f", rope_scaling {m.rope_scaling}" if m.rope_scaling else ""
        return [
            f"init       {self.init_stage}: {self.checkpoint} (max_seq_len {m.max_seq_len}{rope})",
            f"data       {self.sft_data_dir}: {self.train.n_blocks} training blocks, {self.eval.n_blocks} held-out "
            f"blocks of {self.train.block_size} tokens; {self.weighted_tokens:,.0f} weighted tokens per epoch",
            f"plan       {cfg.sft.epochs} epoch(s) x {self.steps_per_epoch:g} steps/epoch -> {self.total_steps} "
            f"steps ({'train.max_steps' if t.max_steps else 'all epochs'}); {t.micro_batch * t.grad_accum * self.world_size} "
            f"blocks per step ({t.micro_batch} x accumulation {t.grad_accum} x {self.world_size} rank(s))",
            f"attention  {'causal within each conversation (document mask)' if cfg.sft.document_mask else 'plain causal across the block (document_mask off)'}",
        ]


def plan_sft(cfg: C.SFTStageConfig, world_size: int, require: Callable[[str], dict], verify: bool = True) -> SFTPlan:
    """Resolve and check every input of stage 7; one UserError lists all problems.

    ``verify``: check the init checkpoint's weights and config against the checksums of its meta.json (one
    read of the weights; CheckpointError naming a damaged file); off where ``load_model`` follows at once.

    ``require(stage)`` returns a completed stage's manifest or raises StageError (``Stage.require`` in the
    stage, ``artifacts.read_manifest`` in --dry-run).
    """
    manifests, missing = {}, []
    init_stage: str | None = cfg.sft.init_from
    if init_stage == "auto":
        try:
            init_stage = newest_finished(cfg.run, INIT_STAGES, setting="sft.init_from")
        except StageError as e:
            missing.append(str(e))
            init_stage = None
    for stage in (C.TOKENIZER, C.SFT_DATA, *([init_stage] if init_stage else [])):
        try:
            manifests[stage] = require(stage)
        except StageError as e:
            missing.append(str(e))
    raise_problems(UserError, "stage 7 inputs are missing", missing)
    ref = checkpoint_ref(stage_dir(cfg.run, init_stage), label=init_stage)
    if verify:  # every file load_model reads, against the checksums in its meta.json
        for note in verify_checkpoint(ref.path, MODEL_FILES):
            print(f"note: {note}", file=sys.stderr, flush=True)
    checkpoint, model_cfg = ref.path, read_model_config(ref.path)
    tok_path = tokenizer_path(cfg.run)
    tokenizer = load_tokenizer(tok_path)
    vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    sft_dir = stage_dir(cfg.run, C.SFT_DATA)
    m6 = manifests[C.SFT_DATA]

    t, problems = cfg.train, []
    block = m6.get("block_size")
    if t.seq_len != block:
        problems.append(f"train.seq_len={t.seq_len} but 06_sft_data packs blocks of {block} tokens: set "
                        f"train.seq_len={block} (or rebuild stage 6 with sft_data.block_size={t.seq_len})")
    if t.seq_len > model_cfg.max_seq_len:
        rope = f" (rope_scaling {model_cfg.rope_scaling})" if model_cfg.rope_scaling else " (no RoPE scaling)"
        problems.append(f"train.seq_len={t.seq_len} exceeds the context of {checkpoint}: max_seq_len "
                        f"{model_cfg.max_seq_len}{rope}; extend it first (5_extend_context.py) or pack shorter blocks")
    problems += tokenizer_problems(ref, model_cfg, tokenizer, tok_path)
    if m6.get("vocab_size") != vocab:
        problems.append(f"06_sft_data has vocab_size {m6.get('vocab_size')} but {tok_path} has {vocab} tokens: "
                        "it was built with another tokenizer; rebuild it with `python 6_build_sft.py --force`")
    built_with = m6.get("inputs", {}).get("tokenizer", {}).get("sha256")
    if built_with and built_with != file_sha256(tok_path):
        problems.append(f"06_sft_data was built with another tokenizer file than {tok_path} (sha256 "
                        f"{built_with[:12]}...): rebuild it with `python 6_build_sft.py --force`")
    raise_problems(UserError, "stage 7 cannot start", problems)  # the arrays are not worth opening otherwise

    outs = m6.get("outputs") or {}
    train, held_out = load_packed(sft_dir, "train", outs.get("train")), load_packed(sft_dir, "eval", outs.get("eval"))
    weighted = float(m6.get("counts", {}).get("train", {}).get("weighted_tokens", 0.0))
    if train.n_blocks == 0 or weighted <= 0:
        raise UserError(f"{sft_dir}: the training split has no weighted tokens; check stage 6's sources")
    per_epoch = num_sft_batches(train.n_blocks, t.micro_batch) / world_size
    planned = epoch_steps(train.n_blocks, t.micro_batch, t.grad_accum, cfg.sft.epochs, world_size)
    if t.max_steps > planned:
        raise UserError(f"train.max_steps={t.max_steps} exceeds the {planned} steps of sft.epochs={cfg.sft.epochs} "
                        f"({train.n_blocks} blocks): raise sft.epochs, or set train.max_steps=0 to train all epochs")
    return SFTPlan(init_stage=init_stage, checkpoint=checkpoint, model_cfg=model_cfg, tokenizer_path=tok_path,
                   sft_data_dir=sft_dir, train=train, eval=held_out, data_id=file_sha256(sft_dir / MANIFEST),
                   weighted_tokens=weighted,
                   steps_per_epoch=per_epoch / t.grad_accum, total_steps=t.max_steps or planned,
                   world_size=world_size)


def check_same_init(saved: dict, plan: SFTPlan) -> None:
    """Refuse to resume a stage 7 folder that was started from another init checkpoint."""
    was, now = saved.get("init_checkpoint"), init_identity(plan)
    if was and was != now:
        raise UserError(f"this unfinished 07_sft was started from {was['path']}, but the init checkpoint is now "
                        f"{now['path']} (or it was rewritten); pass --force to start SFT over from it")


def init_identity(plan: SFTPlan) -> dict:
    """The init checkpoint's path and the hash of its meta.json (written last, so it names one save)."""
    return {"path": str(plan.checkpoint), "meta_sha256": file_sha256(plan.checkpoint / META)}


__all__ = ["SFTBatches", "SFTEvalBatches", "SFTPlan", "plan_sft", "INIT_STAGES", "check_same_init",
           "init_identity", "epoch_steps"]
