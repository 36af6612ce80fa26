"""Stage 6: SFT conversations -> packed, loss-weighted blocks in 06_sft_data/.

Reads the sources of ``sft_data.sources`` (hub datasets or local JSONL, four formats), the stage 2
tokenizer, and writes ``{train,eval}.{tokens,weights,docs,pos}.bin`` (read them with
``dante.sft.load_packed``), ``chat_template.jinja`` (for the export) and a manifest with the statistics:
conversations kept and dropped by reason, tokens, weighted tokens, padding, truncations, token shares per
language and per source. Everything is in ``dante/sft.py``; this script orders the work.

Resume: each finished source is cached under ``work/`` and recorded in progress.json, so an interrupted
run redoes only the sources it had not finished (the cache is discarded if the tokenizer changed).

Example::

    python 6_build_sft.py --config configs/tiny/sft_data.yaml
"""

from __future__ import annotations

import shutil
import time

from dante import sft
from dante.artifacts import atomic_write_text, file_sha256, tokenizer_path
from dante.cli import run_stage
from dante.errors import UserError
from dante.tokenizer import load_tokenizer


def _fail_early(cfg) -> None:
    problems = sft.check_sources(cfg.sft_data.sources, cfg.sft_data.block_size)
    if problems:
        raise UserError("the SFT sources cannot be read:\n" + "\n".join(f"  - {p}" for p in problems))


def dry_run(cfg, args) -> None:
    _fail_early(cfg)
    s = cfg.sft_data
    print(f"# 06_sft_data plan: block_size {s.block_size}, overlong={s.overlong}, user_weight {s.user_weight}, "
          f"heldout {s.heldout_fraction}")
    for src in s.sources:
        where = src.path if src.kind == "local" else f"hub {src.hf_id} ({src.hf_config or 'default'}, {src.split})"
        print(f"  {src.name:<24} {src.lang:<4} {src.format:<16} weight {src.weight:<5} {where}")


def main(stage, cfg, args) -> None:
    s = cfg.sft_data
    _fail_early(cfg)
    stage.require("02_tokenizer")
    tok_path = tokenizer_path(cfg.run)
    stage.add_input("tokenizer", tok_path)
    encoder = sft.ChatEncoder(load_tokenizer(tok_path))

    state = stage.load_progress()
    tok_hash = file_sha256(tok_path)
    done = state.get("sources", {}) if state.get("tokenizer_sha256") == tok_hash else {}
    work = stage.dir / "work"
    encoded = []
    for src in s.sources:
        cache = work / f"{src.name}.npz"
        if src.name in done and cache.is_file():
            encoded.append(sft.EncodedSource.load(cache, src.name, src.lang, done[src.name]))
            print(f"[06_sft_data] {src.name}: reusing the encoded source from the interrupted run", flush=True)
            continue
        t0 = time.time()
        es = sft.encode_source(src, sft.iter_source_rows(src), encoder, s, cfg.run.seed)
        es.save(cache)
        done[src.name] = es.stats
        stage.save_progress({"tokenizer_sha256": tok_hash, "sources": done})
        st = es.stats
        print(f"[06_sft_data] {src.name}: {st['rows_read']} rows, kept {st['kept']}, dropped {st['dropped']} "
              f"{st['dropped_by_reason'] or ''} ({time.time() - t0:.1f}s)", flush=True)
        encoded.append(es)

    outputs, split_stats = sft.pack_splits(stage.dir, encoded, s.block_size, s.user_weight, encoder.vocab_size, cfg.run.seed)
    atomic_write_text(stage.dir / "chat_template.jinja", sft.CHAT_TEMPLATE)
    shutil.rmtree(work, ignore_errors=True)

    per_source = {es.name: es.stats for es in encoded}
    dropped_by_reason = {r: sum(st["dropped_by_reason"].get(r, 0) for st in per_source.values()) for r in sft.DROP_REASONS}
    counts = {
        "rows_read": sum(st["rows_read"] for st in per_source.values()),
        "conversations_kept": sum(st["kept"] for st in per_source.values()),
        "conversations_dropped": sum(dropped_by_reason.values()),
        "dropped_by_reason": {r: n for r, n in dropped_by_reason.items() if n},
        **{k: sum(st[k] for st in per_source.values())
           for k in ("truncated_turns", "truncated_mid_turn", "trailing_user_trimmed", "system_prompt_added")},
        "train": split_stats["train"],
        "eval": split_stats["eval"],
    }
    for split in ("train", "eval"):
        x = split_stats[split]
        print(f"[06_sft_data] {split}: {x['conversations']} conversations, {x['tokens']} tokens "
              f"({x['weighted_tokens']:.0f} weighted), {x['blocks']} blocks of {s.block_size} "
              f"(next-fit would use {x['next_fit_blocks']}), padding {x['padding_pct']:.2f}%, "
              f"langs {x['token_share_by_lang']}", flush=True)
    overlong = dropped_by_reason["overlong"] + counts["truncated_turns"] + counts["truncated_mid_turn"]
    if counts["conversations_kept"] and overlong > 0.05 * (counts["conversations_kept"] + dropped_by_reason["overlong"]):
        print(f"[06_sft_data] WARNING: {overlong} conversations were longer than block_size {s.block_size} "
              f"(policy {s.overlong}); consider a larger block.", flush=True)
    outputs["chat_template"] = "chat_template.jinja"
    stage.finish(
        outputs=outputs,
        counts=counts,
        extra={
            "sources": per_source,
            "block_size": s.block_size,
            "vocab_size": encoder.vocab_size,
            "special_ids": sft.SPECIAL_IDS,
            "pad_doc_id": sft.PAD_DOC_ID,
            "chat_template": sft.CHAT_TEMPLATE,
            "weights": {"assistant_and_eot": 1.0, "final_end_of_text": 1.0, "headers_and_bos": 0.0,
                        "user_and_system": s.user_weight},
            "special_token_text_policy": "conversations containing special-token strings are dropped (special_token_text)",
        },
    )


if __name__ == "__main__":
    raise SystemExit(run_stage("06_sft_data", __doc__.splitlines()[0], main, format_version=sft.FORMAT_VERSION,
                               dry_run=dry_run))
