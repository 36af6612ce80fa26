"""Test helper shared by the training-stage tests: a 03_shards stage folder written by the real
``dante.shards`` writer from lists of texts (one shard per (tier, split))."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dante.artifacts import Stage
from dante.shards import ShardHeader, shard_name, tokenizer_sha16, write_shard
from dante.tokenizer import EOS_ID


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
