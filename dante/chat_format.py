"""The Dante chat format: how a conversation becomes token ids with loss-weight classes (stage 6 writes
it, stage 7 trains on it, stage 8 chats in it, stage 9 exports it as a Jinja template).

Chat format (special-token ids 0..5 are fixed by docs/DESIGN.md). A conversation of messages m_1..m_n is::

    <|begin_of_text|>
    <|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot|>     once per message, role in system/user/assistant
    <|end_of_text|>                                                    once, after the last message

``content`` is stripped of surrounding whitespace (Jinja ``trim`` does the same). With
``add_generation_prompt`` the conversation ends with ``<|start_header_id|>assistant<|end_header_id|>\\n\\n``
instead of ``<|end_of_text|>``: that is the prompt a model completes. ``CHAT_TEMPLATE`` is this format as a
Jinja string for the Hugging Face export (stage 9); a test checks that ``apply_chat_template`` gives the
very ids of ``ChatEncoder``.

Example::

    enc = ChatEncoder(load_tokenizer("runs/tiny/02_tokenizer/tokenizer.json"))
    conv = enc.encode([{"role": "user", "content": "Ciao!"}, {"role": "assistant", "content": "Ciao, come stai?"}])
    conv.ids, conv.classes          # (L,) int32 ids, (L,) uint8 weight classes (dante.sft_packing.CLS_*)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from dante.errors import UserError, problems_message
from dante.sft_packing import CLS_ASSISTANT, CLS_NONE, CLS_PROMPT
from dante.tokenizer import BOS, END_HEADER, EOS, EOT, SPECIAL_TOKENS, START_HEADER

#: special-token string -> id, fixed by docs/DESIGN.md for every Dante tokenizer
SPECIAL_IDS = {text: i for i, text in enumerate(SPECIAL_TOKENS)}
HEADER_SEPARATOR = "\n\n"

ROLES = ("system", "user", "assistant")

# The same format as a Jinja chat template (transformers' apply_chat_template, stage 9 export).
# Literal special strings rather than bos_token/eos_token variables: the format must not depend on how an
# exported tokenizer_config names its bos/eos. Filters bind tighter than "+": only the content is trimmed.
CHAT_TEMPLATE = (
    "{{- '<|begin_of_text|>' -}}"
    "{%- for message in messages -%}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot|>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}"
    "{%- else -%}"
    "{{- '<|end_of_text|>' -}}"
    "{%- endif -%}"
)


@dataclass
class EncodedConversation:
    ids: np.ndarray  # (L,) int32
    classes: np.ndarray  # (L,) uint8, CLS_*
    turn_ends: list[int]  # token index just after each message's <|eot|>
    roles: list[str]


class ChatEncoder:
    """Token ids and weight classes of conversations in the Dante chat format (see module docstring)."""

    def __init__(self, tokenizer: Any):
        problems = []
        for text, want in SPECIAL_IDS.items():
            got = tokenizer.token_to_id(text)
            if got != want:
                problems.append(f"{text} has id {got}, expected {want}")
        if problems:
            raise UserError(problems_message("the tokenizer does not follow docs/DESIGN.md's special tokens", problems)
                            + "\n  HINT: retrain it with `python 2_train_tokenizer.py --force`.")
        self.vocab_size = tokenizer.get_vocab_size()
        # A private copy that treats special-token text as plain text (the original stays untouched).
        self._text_tok = type(tokenizer).from_str(tokenizer.to_str())
        self._text_tok.encode_special_tokens = True
        added = [t.content for t in tokenizer.get_added_tokens_decoder().values()]
        self.special_strings = sorted(set(added) | set(SPECIAL_IDS), key=len, reverse=True)
        self.special_re = re.compile("|".join(re.escape(s) for s in self.special_strings))
        self._role_ids = {r: np.array(self._text_tok.encode(r, add_special_tokens=False).ids, np.int32) for r in ROLES}

    def encode_many(self, conversations: list[list[dict]], add_generation_prompt: bool = False) -> list[EncodedConversation]:
        """Encode several conversations with one batched tokenizer call (the tokenizer is the cost)."""
        segments = [HEADER_SEPARATOR + m["content"].strip() for conv in conversations for m in conv]
        encodings = self._text_tok.encode_batch(segments, add_special_tokens=False) if segments else []
        out, k = [], 0
        for conv in conversations:
            ids_parts, cls_parts, turn_ends, n = [np.array([SPECIAL_IDS[BOS]], np.int32)], [np.zeros(1, np.uint8)], [], 1
            for m in conv:
                enc = encodings[k]
                k += 1
                role = m["role"]
                role_ids = self._role_ids[role]
                content_ids = np.array(enc.ids, np.int32)
                cls = CLS_ASSISTANT if role == "assistant" else CLS_PROMPT
                # tokens that end inside the "\n\n" separator belong to the header (weight 0)
                content_cls = np.full(len(content_ids), cls, np.uint8)
                for j, (_, end) in enumerate(enc.offsets):
                    if end > len(HEADER_SEPARATOR):
                        break
                    content_cls[j] = CLS_NONE
                header = np.concatenate([[SPECIAL_IDS[START_HEADER]], role_ids, [SPECIAL_IDS[END_HEADER]]]).astype(np.int32)
                ids_parts += [header, content_ids, np.array([SPECIAL_IDS[EOT]], np.int32)]
                cls_parts += [np.zeros(len(header), np.uint8), content_cls, np.array([cls], np.uint8)]
                n += len(header) + len(content_ids) + 1
                turn_ends.append(n)
            if add_generation_prompt:
                sep = np.array(self._text_tok.encode(HEADER_SEPARATOR, add_special_tokens=False).ids, np.int32)
                tail = np.concatenate([[SPECIAL_IDS[START_HEADER]], self._role_ids["assistant"], [SPECIAL_IDS[END_HEADER]], sep])
                ids_parts.append(tail.astype(np.int32))
                cls_parts.append(np.zeros(len(tail), np.uint8))
            else:
                # the final <|end_of_text|> takes the class of the last turn (assistant for kept data)
                last_cls = CLS_ASSISTANT if conv and conv[-1]["role"] == "assistant" else CLS_PROMPT
                ids_parts.append(np.array([SPECIAL_IDS[EOS]], np.int32))
                cls_parts.append(np.array([last_cls], np.uint8))
            out.append(EncodedConversation(np.concatenate(ids_parts), np.concatenate(cls_parts), turn_ends, [m["role"] for m in conv]))
        return out

    def encode(self, messages: list[dict], add_generation_prompt: bool = False) -> EncodedConversation:
        return self.encode_many([messages], add_generation_prompt)[0]
