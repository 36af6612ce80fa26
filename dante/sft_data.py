"""Stage 6: SFT conversations -> chat-format token ids with loss weights -> packed blocks (and their reader).

Flow (``build_sft_stage`` drives it, one source at a time, then packs everything)::

    rows (hub dataset via `datasets` streaming, or local JSONL)
      -> normalize_row       one of four formats -> [{"role", "content"}, ...]   (or a counted drop)
      -> check_conversation  roles, order, emptiness, special-token text          (or a counted drop)
      -> ChatEncoder         token ids + a weight class per token
      -> fit_to_block        over-long policy: drop, or truncate at a turn boundary
      -> split_and_copies    held-out split by content hash; source weight -> copies
      -> pack_best_fit       best-fit decreasing into fixed blocks
      -> write_packed        06_sft_data/{train,eval}.{tokens,weights,docs,pos}.bin
    load_packed / sft_batches: what stage 7 reads.

The chat format itself (ids, weight classes, the Jinja template) lives in ``dante.chat_format``.

Design choices
- Special tokens are placed structurally; role names and content are encoded with the tokenizer's
  ``encode_special_tokens`` switched on, so "<|eot|>" typed by a user is plain bytes, never id 4.
  ``apply_chat_template`` cannot do that: it renders one string and re-tokenizes it, and the literal becomes
  the special id (tested). So a conversation whose text contains any special-token string is dropped and
  counted (``special_token_text``): on everything we train on, both paths give identical ids, and the
  model never sees a control token where the exported template would put text.
- Loss weights, ``weights[t]`` = weight of predicting token t (from tokens < t):
  assistant content and its closing <|eot|>: 1 (this is how the model learns to stop);
  user/system content and their <|eot|>: ``user_weight`` (0 by default);
  <|begin_of_text|>, the header tokens and the "\\n\\n" after <|end_header_id|>: 0;
  the final <|end_of_text|>: 1. It always follows the last assistant <|eot|>, so weighting it teaches
  "after my closing <|eot|> the conversation is over": a runtime that only stops on <|end_of_text|> then
  stops one token later instead of inventing a user turn (stage 9 should list both ids as eos).
- Weight classes, not floats, are kept per token until writing (1 byte a token in memory).
- Packing is best-fit decreasing over a segment tree of remaining capacities: O(n log block_size).
  Every block row has per-token document ids (0..k-1 in placement order; padding ``PAD_DOC_ID`` = -1,
  which never equals a conversation) and positions restarting at 0 per conversation (padding 0).
- Held-out split: a hash of the conversation's content (``dante.artifacts.stable_unit``, the hash of
  stages 1-3, without the seed), so an exact duplicate can never sit on both sides,
  and the split does not move when sources are reordered or the seed changes. Eval conversations appear
  once, unweighted; source weight w gives each training conversation floor(w) copies plus one more with
  probability frac(w), decided by a seeded hash (deterministic).
- Local JSONL is read line by line, not through datasets' json builder: one undecodable line makes that
  builder abort the whole file (seen with the datasets version named in docs/PERFORMANCE.md), which
  would break "never crash on one bad row".
  Hub rows go through ``datasets.load_dataset(..., streaming=True)``; both meet at ``normalize_row``.

Binary files: a 64-byte header (magic ``DANTESFT``, version, array kind, dtype code, pad id, n_blocks,
block_size) then a C-order (n_blocks, block_size) array: tokens uint16 (uint32 when the vocabulary exceeds
65536), weights float32 (exact for 0, 1 and the configured user weight as float32), docs int32, pos uint16
(int32 for blocks longer than 65536).

Example::

    python 6_build_sft.py --config configs/tiny/sft_data.yaml
"""

from __future__ import annotations

import gzip
import json
import math
import re
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from glob import glob
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from dante import config as C
from dante.artifacts import Stage, atomic_path, atomic_write_text, file_sha256, stable_unit, tokenizer_path
from dante.chat_format import CHAT_TEMPLATE, HEADER_SEPARATOR, SPECIAL_IDS, ChatEncoder, EncodedConversation
from dante.errors import StageError, UserError, problems_message, raise_problems
from dante.sft_packing import (
    CLS_ASSISTANT,
    CLS_PROMPT,
    PAD_DOC_ID,
    next_fit_blocks,
    pack_best_fit,
    write_packed,
)
from dante.sft_packing import FORMAT_VERSION as PACKED_FORMAT_VERSION
from dante.tokenizer import EOS, load_tokenizer

#: stage 6's manifest format is that of its packed block files (``dante.sft_packing``)
FORMAT_VERSION = PACKED_FORMAT_VERSION

# -- drops --------------------------------------------------------------------------------------------
DROP_REASONS = (
    "invalid_json",  # a local line that is not JSON
    "bad_structure",  # not an object, a required field missing, a list that is not a list ...
    "unknown_role",
    "non_string_content",
    "empty_conversation",
    "empty_content",
    "roles_out_of_order",  # must be: optional system, then user/assistant alternating from user
    "no_assistant_turn",
    "special_token_text",  # content contains a special-token string (see the module docstring)
    "overlong",  # longer than block_size and the policy could not keep it
)


class DroppedRow(Exception):
    """One row that is not kept; ``reason`` is one of DROP_REASONS."""

    def __init__(self, reason: str, detail: str):
        assert reason in DROP_REASONS, reason  # a bug here, not user input
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


# -- formats ------------------------------------------------------------------------------------------
#: per format: the field names it reads (each renamable with a source's `columns`)
FORMAT_FIELDS: dict[str, tuple[str, ...]] = {
    "messages": ("messages", "role", "content"),
    "sharegpt": ("conversations", "from", "value"),
    "alpaca": ("instruction", "input", "output", "system"),
    "prompt_response": ("prompt", "response", "system"),
}
MESSAGES_ROLES = {"system": "system", "user": "user", "assistant": "assistant"}
# ShareGPT dumps use human/gpt; some converted sets already say user/assistant.
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


def _field(row: dict, columns: dict, name: str, required: bool = True) -> Any:
    key = columns.get(name, name)
    if row.get(key) is None:  # hub datasets fill a column absent from a row with None: same thing
        if required:
            state = "null" if key in row else f"missing (has: {', '.join(map(str, row)) or 'nothing'})"
            raise DroppedRow("bad_structure", f"field {key!r} is {state}")
        return None
    return row[key]


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise DroppedRow("non_string_content", f"{what} is {type(value).__name__}, not a string")
    return value


def _turn_list(row: dict, columns: dict, list_field: str, role_key: str, text_key: str, roles: dict) -> list[dict]:
    turns = _field(row, columns, list_field)
    if not isinstance(turns, list):
        raise DroppedRow("bad_structure", f"{columns.get(list_field, list_field)!r} is {type(turns).__name__}, not a list")
    role_key, text_key = columns.get(role_key, role_key), columns.get(text_key, text_key)
    out = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise DroppedRow("bad_structure", f"turn {i} is {type(turn).__name__}, not an object")
        role = turn.get(role_key)
        if role not in roles:
            raise DroppedRow("unknown_role", f"turn {i} has role {role!r} (accepted: {', '.join(roles)})")
        out.append({"role": roles[role], "content": _text(turn.get(text_key), f"turn {i} {text_key!r}")})
    return out


def _single_exchange(system: Any, prompt: str, answer: str) -> list[dict]:
    out = []
    if system is not None and _text(system, "'system'").strip():
        out.append({"role": "system", "content": system})
    out += [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
    return out


def normalize_row(row: Any, fmt: str, columns: dict | None = None) -> list[dict]:
    """One dataset row -> [{"role", "content"}] (roles mapped to system/user/assistant), or DroppedRow."""
    columns = columns or {}
    if not isinstance(row, dict):
        raise DroppedRow("bad_structure", f"row is {type(row).__name__}, not an object")
    if fmt == "messages":
        return _turn_list(row, columns, "messages", "role", "content", MESSAGES_ROLES)
    if fmt == "sharegpt":
        return _turn_list(row, columns, "conversations", "from", "value", SHAREGPT_ROLES)
    if fmt == "alpaca":
        instruction = _text(_field(row, columns, "instruction"), "'instruction'")
        extra = _field(row, columns, "input", required=False)
        extra = "" if extra is None else _text(extra, "'input'")
        prompt = instruction.strip() + (HEADER_SEPARATOR + extra.strip() if extra.strip() else "")
        output = _text(_field(row, columns, "output"), "'output'")
        return _single_exchange(_field(row, columns, "system", required=False), prompt, output)
    if fmt == "prompt_response":
        prompt = _text(_field(row, columns, "prompt"), "'prompt'")
        response = _text(_field(row, columns, "response"), "'response'")
        return _single_exchange(_field(row, columns, "system", required=False), prompt, response)
    raise UserError(f"unknown SFT format {fmt!r}; supported: {', '.join(FORMAT_FIELDS)}")


@dataclass
class ConversationNotes:
    """What check_conversation changed without dropping (counted in the manifest)."""

    trailing_user_trimmed: bool = False
    system_prompt_added: bool = False


def check_conversation(
    messages: list[dict], special_re: re.Pattern | None = None, system_prompt: str = ""
) -> tuple[list[dict], ConversationNotes]:
    """Validate and tidy one conversation; raise DroppedRow with the first problem found.

    Kept shape: an optional system message, then user/assistant alternating from user, ending with an
    assistant turn (a trailing user turn with no answer is trimmed and noted). Contents are stripped.
    """
    notes = ConversationNotes()
    if not messages:
        raise DroppedRow("empty_conversation", "no messages")
    messages = [{"role": m["role"], "content": m["content"].strip()} for m in messages]
    for i, m in enumerate(messages):
        if not m["content"]:
            raise DroppedRow("empty_content", f"message {i} ({m['role']}) is empty")
    body = messages[1:] if messages[0]["role"] == "system" else messages
    for i, m in enumerate(body):
        expected = "user" if i % 2 == 0 else "assistant"
        if m["role"] != expected:
            at = i + len(messages) - len(body)
            raise DroppedRow("roles_out_of_order", f"message {at} is {m['role']!r}, expected {expected!r}")
    if body and body[-1]["role"] == "user":
        messages, body = messages[:-1], body[:-1]
        notes.trailing_user_trimmed = True
    if not body:
        raise DroppedRow("no_assistant_turn", "no assistant message to learn from")
    if special_re is not None:
        for i, m in enumerate(messages):
            hit = special_re.search(m["content"])
            if hit:
                raise DroppedRow("special_token_text", f"message {i} ({m['role']}) contains {hit.group(0)!r}")
    if system_prompt and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system_prompt.strip()}] + messages
        notes.system_prompt_added = True
    return messages, notes


# -- over-long conversations ----------------------------------------------------------------------
def fit_to_block(enc: EncodedConversation, block_size: int, policy: str) -> tuple[np.ndarray, np.ndarray, str]:
    """Apply the over-long policy. Returns (ids, classes, status), status in ok/truncated_turns/truncated_mid_turn.

    'truncate' first keeps the longest prefix of whole turns that ends with an assistant turn (exactly the
    encoding of that shorter conversation, <|end_of_text|> included); if not even the first answer fits,
    it cuts at block_size, provided at least one assistant token survives. Otherwise: DroppedRow('overlong').
    """
    n = len(enc.ids)
    if n <= block_size:
        return enc.ids, enc.classes, "ok"
    if policy == "drop":
        raise DroppedRow("overlong", f"{n} tokens > block_size {block_size} (policy drop)")
    best = 0
    for end, role in zip(enc.turn_ends, enc.roles):
        if role == "assistant" and end + 1 <= block_size:
            best = end
    if best:
        ids = np.concatenate([enc.ids[:best], np.array([SPECIAL_IDS[EOS]], np.int32)])
        classes = np.concatenate([enc.classes[:best], np.array([CLS_ASSISTANT], np.uint8)])
        return ids, classes, "truncated_turns"
    if (enc.classes[:block_size] == CLS_ASSISTANT).any():
        return enc.ids[:block_size], enc.classes[:block_size], "truncated_mid_turn"
    raise DroppedRow("overlong", f"{n} tokens > block_size {block_size} and no assistant token fits before the cut")


# -- sources ------------------------------------------------------------------------------------------
def local_files(pattern: str) -> list[Path]:
    return [Path(p) for p in sorted(glob(pattern))] if any(c in pattern for c in "*?[") else [Path(pattern)]


def _first_line(path: Path) -> bool:
    """True if the file holds a non-blank line (reads only up to it)."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        return any(line.strip() for line in f)


def _empty_source_problems(key: str, pattern: str, files: list[Path]) -> list[str]:
    """A local source none of whose files holds a line (an empty file in a glob of others is harmless), or
    a file that cannot even be opened (a gzip that is not one)."""
    problems, any_rows = [], False
    for f in files:
        try:
            any_rows = _first_line(f) or any_rows
        except (OSError, EOFError) as e:
            problems.append(f"{key}.path: {f} cannot be read ({e}); fix or replace the file")
        if any_rows:
            break
    if not any_rows and not problems:
        what = str(files[0]) if len(files) == 1 else f"all {len(files)} files matching {pattern!r}"
        problems.append(f"{key}.path: {what} is empty (no JSON lines): the source would contribute nothing; "
                        f"fill it or remove the source from sft_data.sources")
    return problems


def check_sources(sources: list, block_size: int) -> list[str]:
    """Problems found before any work: missing local files, `columns` keys the format does not have."""
    problems = []
    for i, src in enumerate(sources):
        key = f"sft_data.sources[{i}] ({src.name})"
        unknown = set(src.columns) - set(FORMAT_FIELDS[src.format])
        if unknown:
            problems.append(f"{key}.columns: {sorted(unknown)} are not fields of format {src.format} "
                            f"(its fields: {', '.join(FORMAT_FIELDS[src.format])})")
        if src.kind == "local":
            files = local_files(src.path)
            if not files or not all(f.is_file() for f in files):
                problems.append(f"{key}.path: no file matches {src.path!r} (relative paths start at the working directory)")
            else:
                problems += _empty_source_problems(key, src.path, files)
    if block_size < 16:
        problems.append(f"sft_data.block_size={block_size}: shorter than the chat template's own tokens; use >= 16")
    return problems


def iter_source_rows(src: Any) -> Iterator[Any]:
    """Rows of one source: dicts, or a DroppedRow('invalid_json') for a local line that is not UTF-8 JSON."""
    n = 0
    if src.kind == "local":
        for path in local_files(src.path):
            opener = gzip.open if path.suffix == ".gz" else open
            lineno = 0
            try:
                with opener(path, "rb") as f:
                    for lineno, raw in enumerate(f, 1):
                        if not raw.strip():
                            continue
                        if src.max_rows and n >= src.max_rows:
                            return
                        n += 1
                        try:
                            yield json.loads(raw.decode("utf-8"))
                        except UnicodeDecodeError as e:
                            yield DroppedRow("invalid_json", f"{path.name}:{lineno}: not UTF-8 ({e.reason} at byte {e.start})")
                        except json.JSONDecodeError as e:
                            yield DroppedRow("invalid_json", f"{path.name}:{lineno}: {e.msg}")
            except (OSError, EOFError) as e:  # a gzip cut short or damaged: one bad row cannot be told from the rest
                raise UserError(f"source {src.name!r}: {path} cannot be read after line {lineno} ({e}).\n"
                                "  HINT: replace the file with a complete copy (`gzip -t` checks one), then rerun: "
                                "the sources finished before it are kept.") from None
        return
    import datasets  # only hub sources need it (slow import)

    try:
        ds = datasets.load_dataset(src.hf_id, src.hf_config or None, split=src.split, streaming=True)
        for row in ds:
            if src.max_rows and n >= src.max_rows:
                return
            n += 1
            yield row
    except (OSError, ValueError, ConnectionError) as e:  # network, auth, unknown config/split
        raise UserError(
            f"source {src.name!r}: cannot stream {src.hf_id} (config {src.hf_config or 'default'}, split {src.split}): {e}\n"
            "  HINT: check the id/config/split on the hub, log in for gated sets, or use a local JSONL copy (kind: local)."
        ) from None


def split_and_copies(messages: list[dict], source: str, weight: float, heldout_fraction: float, seed: int) -> tuple[bool, int]:
    """(held out?, training copies). Held-out by content; copies = floor(w) + [hash < frac(w)]."""
    key = json.dumps(messages, ensure_ascii=False, sort_keys=True)
    if stable_unit("heldout", key) < heldout_fraction:  # no seed: the split stays when run.seed changes
        return True, 0
    base = math.floor(weight)
    extra = stable_unit("copies", seed, source, key) < weight - base
    return False, base + int(extra)


@dataclass
class EncodedSource:
    """All kept conversations of one source: flat ids/classes plus per-conversation facts."""

    name: str
    lang: str
    tokens: np.ndarray  # (N,) int32
    classes: np.ndarray  # (N,) uint8
    offsets: np.ndarray  # (n+1,) int64
    heldout: np.ndarray  # (n,) bool
    copies: np.ndarray  # (n,) int32, 0 for held-out
    stats: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def save(self, path: Path) -> None:
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, tokens=self.tokens, classes=self.classes, offsets=self.offsets, heldout=self.heldout, copies=self.copies)

    @classmethod
    def load(cls, path: Path, name: str, lang: str, stats: dict) -> "EncodedSource":
        with np.load(path) as z:
            return cls(name, lang, z["tokens"], z["classes"], z["offsets"], z["heldout"], z["copies"], stats)


def encode_source(src: Any, rows: Iterable[Any], encoder: ChatEncoder, cfg: Any, seed: int, batch: int = 256) -> EncodedSource:
    """Normalize, check, encode, fit and split every row of one source; count every drop by reason."""
    dropped: Counter = Counter()
    examples: dict[str, list[str]] = {}
    notes: Counter = Counter()
    ids_parts, cls_parts, lengths, heldout, copies = [], [], [], [], []

    def drop(e: DroppedRow, row_index: int) -> None:
        dropped[e.reason] += 1
        ex = examples.setdefault(e.reason, [])
        if len(ex) < 3:
            ex.append(f"row {row_index + 1}: {e.detail}"[:200])

    def flush(pending: list[tuple[int, list[dict]]]) -> None:
        for (row_index, messages), enc in zip(pending, encoder.encode_many([m for _, m in pending])):
            try:
                ids, classes, status = fit_to_block(enc, cfg.block_size, cfg.overlong)
            except DroppedRow as e:
                drop(e, row_index)
                continue
            if status != "ok":
                notes[status] += 1
            is_eval, n_copies = split_and_copies(messages, src.name, src.weight, cfg.heldout_fraction, seed)
            ids_parts.append(ids)
            cls_parts.append(classes)
            lengths.append(len(ids))
            heldout.append(is_eval)
            copies.append(n_copies)
        pending.clear()

    pending: list[tuple[int, list[dict]]] = []
    rows_read = 0
    for row_index, row in enumerate(rows):
        rows_read += 1
        try:
            if isinstance(row, DroppedRow):
                raise row
            messages, conv_notes = check_conversation(
                normalize_row(row, src.format, src.columns), encoder.special_re, cfg.system_prompt
            )
        except DroppedRow as e:
            drop(e, row_index)
            continue
        notes["trailing_user_trimmed"] += conv_notes.trailing_user_trimmed
        notes["system_prompt_added"] += conv_notes.system_prompt_added
        pending.append((row_index, messages))
        if len(pending) >= batch:
            flush(pending)
    flush(pending)

    offsets = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    stats = {
        "rows_read": rows_read,
        "kept": len(lengths),
        "dropped": sum(dropped.values()),
        "dropped_by_reason": {r: dropped[r] for r in DROP_REASONS if dropped[r]},
        "drop_examples": examples,
        "truncated_turns": notes["truncated_turns"],
        "truncated_mid_turn": notes["truncated_mid_turn"],
        "trailing_user_trimmed": notes["trailing_user_trimmed"],
        "system_prompt_added": notes["system_prompt_added"],
    }
    return EncodedSource(
        src.name, src.lang,
        np.concatenate(ids_parts) if ids_parts else np.zeros(0, np.int32),
        np.concatenate(cls_parts) if cls_parts else np.zeros(0, np.uint8),
        offsets, np.array(heldout, bool), np.array(copies, np.int32), stats,
    )


def _per_conversation_sum(mask: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    cs = np.concatenate([[0], np.cumsum(mask, dtype=np.int64)])
    return cs[offsets[1:]] - cs[offsets[:-1]]


def _shares(values: dict[str, float]) -> dict[str, float]:
    total = sum(values.values())
    return {k: round(v / total, 6) if total else 0.0 for k, v in values.items()}


def _drop_hint(reasons: Counter, block_size: int) -> str:
    """The fix for a source (or run) whose every conversation was dropped, from the commonest reason."""
    if reasons and reasons.most_common(1)[0][0] == "overlong":
        return f"raise sft_data.block_size (now {block_size}) or set sft_data.overlong: truncate"
    return "check the source's format and columns against its rows"


def pack_splits(directory: str | Path, sources: list[EncodedSource], block_size: int, user_weight: float,
                vocab_size: int, seed: int) -> tuple[dict, dict]:
    """Pack and write the train and eval splits; return (outputs, statistics) for the manifest."""
    if not any(len(es) for es in sources):
        reasons: Counter = Counter()
        examples = {}
        for es in sources:
            reasons.update(es.stats.get("dropped_by_reason", {}))
            for reason, ex in es.stats.get("drop_examples", {}).items():
                examples.setdefault(reason, f"{es.name} {ex[0]}")
        if not reasons:  # hub sources that streamed nothing (an empty local file is refused before the work)
            raise UserError(f"no conversation in any source: the sources {[es.name for es in sources]} yielded no rows.\n"
                            "  HINT: check each source's hf_id/hf_config/split (or path) and max_rows.")
        raise UserError(problems_message("no conversation survived in any source; dropped by reason",
                                         [f"{r}: {n}, e.g. {examples.get(r, '')}" for r, n in reasons.most_common()])
                        + f"\n  HINT: {_drop_hint(reasons, block_size)}.")
    outputs, stats = {}, {}
    for split_no, split in enumerate(("train", "eval")):
        parts = []
        lang_tokens, lang_weighted, src_tokens, src_weighted = Counter(), Counter(), Counter(), Counter()
        unique = 0
        for si, es in enumerate(sources):
            count = es.heldout.astype(np.int64) if split == "eval" else es.copies.astype(np.int64)
            idx = np.repeat(np.arange(len(es)), count)
            parts.append(np.stack([np.full(len(idx), si), es.offsets[idx], es.offsets[idx + 1]], axis=1))
            unique += int((count > 0).sum())
            lengths = es.lengths()
            weighted = (_per_conversation_sum(es.classes == CLS_ASSISTANT, es.offsets)
                        + float(np.float32(user_weight)) * _per_conversation_sum(es.classes == CLS_PROMPT, es.offsets))
            for key, table_tokens, table_weighted in ((es.lang, lang_tokens, lang_weighted), (es.name, src_tokens, src_weighted)):
                table_tokens[key] += int((lengths * count).sum())
                table_weighted[key] += float((weighted * count).sum())
        items_N3 = np.concatenate(parts) if parts else np.zeros((0, 3), np.int64)
        lengths = items_N3[:, 2] - items_N3[:, 1]
        blocks = pack_best_fit(lengths, block_size)
        order = np.random.default_rng([seed, split_no]).permutation(len(blocks))  # mixes sources/lengths on disk
        blocks = [blocks[i] for i in order]
        outputs[split] = write_packed(directory, split, sources, items_N3, blocks, block_size, vocab_size, user_weight)
        n_tokens = int(lengths.sum())
        capacity = len(blocks) * block_size
        langs = sorted({es.lang for es in sources})
        names = [es.name for es in sources]
        stats[split] = {
            "conversations": len(items_N3),
            "unique_conversations": unique,
            "tokens": n_tokens,
            "weighted_tokens": round(sum(lang_weighted.values()), 3),
            "blocks": len(blocks),
            "padding_tokens": capacity - n_tokens,
            "padding_pct": round(100.0 * (capacity - n_tokens) / capacity, 3) if capacity else 0.0,
            "next_fit_blocks": next_fit_blocks(lengths.tolist(), block_size),
            "length": {
                "max": int(lengths.max()) if len(lengths) else 0,
                "mean": round(float(lengths.mean()), 2) if len(lengths) else 0.0,
                "p50": int(np.percentile(lengths, 50)) if len(lengths) else 0,
                "p95": int(np.percentile(lengths, 95)) if len(lengths) else 0,
            },
            "tokens_by_lang": {k: lang_tokens[k] for k in langs},
            "token_share_by_lang": _shares({k: lang_tokens[k] for k in langs}),
            "weighted_token_share_by_lang": _shares({k: lang_weighted[k] for k in langs}),
            "tokens_by_source": {k: src_tokens[k] for k in names},
            "token_share_by_source": _shares({k: src_tokens[k] for k in names}),
            "weighted_token_share_by_source": _shares({k: src_weighted[k] for k in names}),
        }
    return outputs, stats


# -- the stage (6_build_sft.py parses the command line and prints) --------------------------------------------
def check_sft_inputs(stage: Stage, cfg: C.SFTDataStageConfig) -> ChatEncoder:
    """Every read-only check of stage 6, all problems in one UserError: the sources (files exist and hold
    rows, columns, block size) and stage 2 (its manifest and a loadable tokenizer). Returns the encoder;
    ``6_build_sft.py`` runs it as the ``validate`` hook, before anything is written (and in --dry-run)."""
    problems = check_sources(cfg.sft_data.sources, cfg.sft_data.block_size)
    encoder = None
    try:
        stage.require(C.TOKENIZER)
        tok_path = tokenizer_path(cfg.run)
        stage.add_input("tokenizer", tok_path)
        encoder = ChatEncoder(load_tokenizer(tok_path))
    except (StageError, UserError) as e:
        problems.append(str(e))
    raise_problems(UserError, "stage 6 cannot start", problems)
    return encoder


def build_sft_stage(stage: Stage, cfg: C.SFTDataStageConfig, log: Callable[[str], None] = print) -> dict:
    """Run stage 6 into ``stage.dir``: encode each source (reusing those an interrupted run finished),
    pack both splits, write the chat template and the manifest (returned). The inputs are checked by
    ``check_sft_inputs`` (its result is ``stage.plan`` when the script's validate hook ran it)."""
    s = cfg.sft_data
    encoder = stage.plan if isinstance(stage.plan, ChatEncoder) else check_sft_inputs(stage, cfg)
    tok_path = tokenizer_path(cfg.run)

    state = stage.load_progress()
    tok_hash = file_sha256(tok_path)
    done = state.get("sources", {}) if state.get("tokenizer_sha256") == tok_hash else {}
    work = stage.dir / "work"
    encoded = []
    for src in s.sources:
        cache = work / f"{src.name}.npz"
        if src.name in done and cache.is_file():
            encoded.append(EncodedSource.load(cache, src.name, src.lang, done[src.name]))
            log(f"{src.name}: reusing the encoded source from the interrupted run")
            continue
        t0 = time.time()
        es = encode_source(src, iter_source_rows(src), encoder, s, cfg.run.seed)
        if es.stats["rows_read"] and not es.stats["kept"]:
            # as stage 1 refuses a source that kept no document: a declared source that contributes nothing is
            # a wrong format, column, path or block size, not data to train on (checked before its cache is recorded)
            st = es.stats
            examples = {r: ex[0] for r, ex in st.get("drop_examples", {}).items()}
            reasons = Counter(st["dropped_by_reason"])
            raise UserError(problems_message(
                f"source {src.name!r}: no conversation survived of its {st['rows_read']} rows; dropped by reason",
                [f"{r}: {n}" + (f", e.g. {examples[r]}" if r in examples else "") for r, n in reasons.most_common()])
                + f"\n  HINT: {_drop_hint(reasons, s.block_size)} (sft_data.sources[{s.sources.index(src)}]), "
                  f"or remove the source.")
        es.save(cache)
        done[src.name] = es.stats
        stage.save_progress({"tokenizer_sha256": tok_hash, "sources": done})
        st = es.stats
        log(f"{src.name}: {st['rows_read']} rows, kept {st['kept']}, dropped {st['dropped']} "
            f"{st['dropped_by_reason'] or ''} ({time.time() - t0:.1f}s)")
        encoded.append(es)

    outputs, split_stats = pack_splits(stage.dir, encoded, s.block_size, s.user_weight, encoder.vocab_size, cfg.run.seed)
    atomic_write_text(stage.dir / "chat_template.jinja", CHAT_TEMPLATE)
    shutil.rmtree(work, ignore_errors=True)

    per_source = {es.name: es.stats for es in encoded}
    dropped_by_reason = {r: sum(st["dropped_by_reason"].get(r, 0) for st in per_source.values()) for r in DROP_REASONS}
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
        log(f"{split}: {x['conversations']} conversations, {x['tokens']} tokens "
            f"({x['weighted_tokens']:.0f} weighted), {x['blocks']} blocks of {s.block_size} "
            f"(next-fit would use {x['next_fit_blocks']}), padding {x['padding_pct']:.2f}%, "
            f"langs {x['token_share_by_lang']}")
    overlong = dropped_by_reason["overlong"] + counts["truncated_turns"] + counts["truncated_mid_turn"]
    if counts["conversations_kept"] and overlong > 0.05 * (counts["conversations_kept"] + dropped_by_reason["overlong"]):
        log(f"WARNING: {overlong} conversations were longer than block_size {s.block_size} "
            f"(policy {s.overlong}); consider a larger block.")
    outputs["chat_template"] = "chat_template.jinja"
    return stage.finish(
        outputs=outputs,
        counts=counts,
        extra={
            "sources": per_source,
            "block_size": s.block_size,
            "vocab_size": encoder.vocab_size,
            "special_ids": SPECIAL_IDS,
            "pad_doc_id": PAD_DOC_ID,
            "chat_template": CHAT_TEMPLATE,
            "weights": {"assistant_and_eot": 1.0, "final_end_of_text": 1.0, "headers_and_bos": 0.0,
                        "user_and_system": s.user_weight},
            "special_token_text_policy": "conversations containing special-token strings are dropped (special_token_text)",
        },
    )
