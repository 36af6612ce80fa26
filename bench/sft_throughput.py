"""Packed-SFT training throughput with the document mask against plain causal attention (issue 6 goal:
masked >= 0.9 x unmasked).

Both arms run the same packed blocks through the same training forward + backward (dante.engine's
LossModule: the model, then the chunked loss, then backward; no optimizer step, which costs the same in
both arms): "masked" passes the document ids, so attention stays inside each conversation, as stage 7
does; "causal" passes none (plain causal attention across the block, what a packer without masking
does). The kernel is what stage 7 would use (dante.kernels.choose_attention): on a GPU, FlexAttention with a
block mask (inside per-block torch.compile with --compile, as the engine compiles, else compiled on its
own); on CPU, SDPA with a dense boolean mask, against SDPA's is_causal path.

Blocks: a stage 6 folder (--data runs/<name>/06_sft_data) or synthetic conversations with log-normal
lengths (median --median-len, sigma 1; SFT conversations are roughly log-normal) packed by stage 6's own
best-fit packer. Time is the median over --steps measured steps after --warmup (compile happens there).

Examples::

    python bench/sft_throughput.py                                    # CPU, the tiny model
    python bench/sft_throughput.py --preset dante-2b --seq-len 4096 --micro-batch 4 --compile   # one GPU
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch

from dante.config import ModelConfig
from dante.engine import LossModule
from dante.kernels import apply_attention_choice, choose_attention
from dante.model import Transformer
from dante.sft_packing import PAD_DOC_ID, load_packed, pack_best_fit, shifted_targets
from dante.tokenizer import PAD_ID
from dante.transforms import apply_compile

PRESETS = {
    "tiny": dict(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=8192, multiple_of=64),
    "dante-2b": dict(dim=2560, n_layers=28, n_heads=20, n_kv_heads=4, head_dim=128, vocab_size=65536,
                     rope_theta=500000.0),
}


def synthetic_blocks(n_blocks: int, seq_len: int, median_len: int, vocab: int, seed: int) -> dict[str, np.ndarray]:
    """Packed blocks of random tokens: conversation lengths ~ log-normal, packed by dante.sft_data.pack_best_fit."""
    rng = np.random.default_rng(seed)
    lengths = np.zeros(0, np.int64)
    while lengths.sum() < 3 * n_blocks * seq_len:  # enough for a realistic packing, then a random sample of it
        drawn = rng.lognormal(np.log(median_len), 1.0, 4 * n_blocks).astype(np.int64)
        lengths = np.concatenate([lengths, drawn[(drawn >= 16) & (drawn <= seq_len)]])  # stage 6 drops over-long ones
    packed = pack_best_fit(lengths, seq_len)
    blocks = [packed[i] for i in rng.choice(len(packed), n_blocks, replace=False)]
    tokens = rng.integers(6, vocab, (n_blocks, seq_len))
    docs = np.full((n_blocks, seq_len), PAD_DOC_ID, np.int64)
    pos = np.zeros((n_blocks, seq_len), np.int64)
    for r, block in enumerate(blocks):
        at = 0
        for d, i in enumerate(block):
            docs[r, at:at + lengths[i]] = d
            pos[r, at:at + lengths[i]] = np.arange(lengths[i])
            at += lengths[i]
    weights = (docs >= 0).astype(np.float32)
    return {"tokens": tokens, "weights": weights, "docs": docs, "pos": pos}


def stage6_blocks(path: str, n_blocks: int) -> dict[str, np.ndarray]:
    p = load_packed(path, "train")
    n = min(n_blocks, p.n_blocks)
    return {"tokens": np.asarray(p.tokens[:n], np.int64), "weights": np.asarray(p.weights[:n]),
            "docs": np.asarray(p.doc_ids[:n], np.int64), "pos": np.asarray(p.positions[:n], np.int64)}


def batches(blocks: dict[str, np.ndarray], micro_batch: int, device) -> list[dict[str, torch.Tensor]]:
    out = []
    for lo in range(0, len(blocks["tokens"]) - micro_batch + 1, micro_batch):
        sl = slice(lo, lo + micro_batch)
        targets, w = shifted_targets(blocks["tokens"][sl], blocks["weights"][sl], blocks["docs"][sl], PAD_ID)
        out.append({k: torch.from_numpy(np.ascontiguousarray(v)).to(device) for k, v in
                    {"tokens": blocks["tokens"][sl], "targets": targets, "weights": w, "positions": blocks["pos"][sl],
                     "doc_ids": blocks["docs"][sl]}.items()})
    return out


def measure(module: LossModule, data: list[dict], masked: bool, steps: int, warmup: int, dtype, device) -> list[float]:
    times = []
    for i in range(warmup + steps):
        b = data[i % len(data)]
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss_sum, weight_sum = module(b["tokens"], b["targets"], b["weights"], b["positions"],
                                          b["doc_ids"] if masked else None)
        (loss_sum / weight_sum).backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    module.zero_grad(set_to_none=True)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    ap.add_argument("--n-layers", type=int, default=0, help="override the preset's depth (e.g. to fit one GPU)")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--median-len", type=int, default=300, help="median synthetic conversation length in tokens")
    ap.add_argument("--data", default="", help="a 06_sft_data folder to take blocks from instead of synthetic ones")
    ap.add_argument("--compile", action="store_true", help="per-block torch.compile, as train.compile does")
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default="")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    args = ap.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    cfg = ModelConfig(**{**PRESETS[args.preset], "max_seq_len": args.seq_len,
                         **({"n_layers": args.n_layers} if args.n_layers else {})})
    torch.manual_seed(0)
    model = Transformer(cfg).to(device)
    if args.compile:
        apply_compile(model, "default")
    choice = choose_attention(device.type, document_mask=True, gqa=cfg.n_heads != cfg.n_kv_heads, compiled=args.compile)
    apply_attention_choice(model, choice)  # the "causal" arm passes no doc_ids, so SDPA is_causal runs there
    kernel = choice.kernel
    module = LossModule(model, chunk_size=4096)
    n_blocks = args.micro_batch * (args.steps + args.warmup)
    blocks = stage6_blocks(args.data, n_blocks) if args.data else \
        synthetic_blocks(n_blocks, args.seq_len, args.median_len, cfg.vocab_size, seed=0)
    data = batches(blocks, args.micro_batch, device)
    docs_per_block = float(np.mean([len(set(r[r >= 0].tolist())) for r in blocks["docs"]]))
    fill = float((blocks["docs"] >= 0).mean())

    result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else f"cpu x {torch.get_num_threads()} threads",
              "preset": args.preset, "n_layers": cfg.n_layers, "seq_len": args.seq_len, "micro_batch": args.micro_batch,
              "dtype": str(dtype).replace("torch.", ""), "compile": args.compile, "mask_kernel": kernel,
              "blocks": "stage 6: " + args.data if args.data else f"synthetic, median {args.median_len} tokens",
              "conversations_per_block": round(docs_per_block, 2), "fill": round(fill, 4)}
    tokens = args.micro_batch * args.seq_len
    # alternate the arms so that a slow phase of a shared machine hits both
    causal_s, masked_s = [], []
    for _ in range(2):
        causal_s += measure(module, data, False, args.steps, args.warmup, dtype, device)
        masked_s += measure(module, data, True, args.steps, args.warmup, dtype, device)
    result["causal_tokens_per_s"] = round(tokens / statistics.median(causal_s), 1)
    result["masked_tokens_per_s"] = round(tokens / statistics.median(masked_s), 1)
    result["masked_over_causal"] = round(result["masked_tokens_per_s"] / result["causal_tokens_per_s"], 3)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
