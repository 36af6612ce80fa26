"""Helpers shared by several test files: stage folders written through the real Stage lifecycle and
writers (02_tokenizer, 03_shards from lists of texts, or both from the held-out sample for stage 4),
and the SFT sample's raw lines."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np

from dante.artifacts import Stage, stage_dir
from dante.config import RunConfig, ShardsStageConfig, TokenizerStageConfig
from dante.shards import ShardHeader, shard_name, tokenizer_sha16, write_shard
from dante.tokenizer import EOS_ID

ROOT = Path(__file__).resolve().parent.parent
SFT_SAMPLE = ROOT / "data" / "sft_sample"


def sft_sample_texts() -> list[str]:
    """Every raw JSONL line of data/sft_sample: enough text to train a throwaway tokenizer."""
    return [line for f in sorted(SFT_SAMPLE.glob("*.jsonl")) for line in f.read_text(encoding="utf-8").splitlines()]


def write_tokenizer_stage(run: RunConfig, tokenizer) -> None:
    """A complete 02_tokenizer folder holding ``tokenizer`` (redone if it exists)."""
    st = Stage.open(TokenizerStageConfig(run=run), "02_tokenizer", force=True)
    tokenizer.save(str(st.dir / "tokenizer.json"))
    st.finish(outputs={"tokenizer": "tokenizer.json"})


def write_text_shards(st: Stage, tokenizer, tokenizer_path: Path, streams: dict[tuple[int, str], list[str]]) -> None:
    """Encode each (tier, split) stream, end every document with EOS, write it and finish the stage."""
    names: dict = {"train": {}, "val": {}}
    for (tier, split), texts in streams.items():
        tokens, starts = [], []
        for enc in tokenizer.encode_batch(texts, add_special_tokens=False):
            starts.append(len(tokens))
            tokens += enc.ids + [EOS_ID]
        header = ShardHeader(itemsize=2, vocab_size=tokenizer.get_vocab_size(), n_tokens=0, n_doc_starts=0,
                             tokens_crc32=0, index_crc32=0, tier=tier, split=split, shard_index=0, eos_id=EOS_ID,
                             tokenizer_sha16=tokenizer_sha16(tokenizer_path))
        write_shard(st.dir / shard_name(tier, split, 0), np.array(tokens, dtype=np.uint16), np.array(starts), header)
        names[split][str(tier)] = [shard_name(tier, split, 0)]
    st.finish(outputs={"shards": names, "dtype": "uint16", "eos_id": EOS_ID})


def _sample_texts(path: Path) -> list[str]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


def write_pretrain_inputs(run: RunConfig) -> int:
    """02_tokenizer (a 600-token tokenizer trained here) and 03_shards (tier 1 Italian, tier 2 code, a val
    split) from data/sample/heldout: what stage 4 needs. Returns the vocabulary size."""
    from dante.tokenizer import train_tokenizer

    heldout = ROOT / "data" / "sample" / "heldout"
    it, code = _sample_texts(heldout / "it.jsonl.gz"), _sample_texts(heldout / "code.jsonl.gz")
    tokenizer = train_tokenizer(it + code, vocab_size=600, n_reserved=8, pinned_chars=[])
    write_tokenizer_stage(run, tokenizer)
    st = Stage.open(ShardsStageConfig(run=run), "03_shards")
    write_text_shards(st, tokenizer, stage_dir(run, "02_tokenizer") / "tokenizer.json",
                      {(1, "train"): it[:-4], (2, "train"): code[:-1], (1, "val"): it[-4:] + code[-1:]})
    return tokenizer.get_vocab_size()


#: manifest fields that describe one execution (when, whether resumed), not the outputs
EXECUTION_FIELDS = ("started", "finished", "resumed")


def stage_files(folder: Path, drop: tuple[str, ...] = EXECUTION_FIELDS, drop_config: tuple[str, ...] = ()) -> dict[str, bytes]:
    """Every file under ``folder`` by relative path, for byte-for-byte comparisons of two runs; manifest.json
    without the ``drop`` fields and the dotted ``drop_config`` keys of its config (output-neutral keys)."""
    out = {}
    for p in sorted(x for x in folder.rglob("*") if x.is_file()):
        data = p.read_bytes()
        if p.name == "manifest.json":
            m = {k: v for k, v in json.loads(data).items() if k not in drop}
            for key in drop_config:
                *parents, last = key.split(".")
                node = m.get("config", {})
                for part in parents:
                    node = node.get(part, {})
                node.pop(last, None)
            data = json.dumps(m, sort_keys=True).encode()
        out[p.relative_to(folder).as_posix()] = data
    return out
