"""``8_eval.py --chat``: talk to a checkpoint in the terminal, the answer streaming as it is generated.

Each input line is a user turn, encoded with stage 6's chat format (``dante.sft_data.ChatEncoder``), and the
answer is sampled with ``eval.generation``'s settings until <|eot|> or <|end_of_text|>. The loop takes
its input and output as functions (``read_line``, ``write``), so tests drive it with lists, and the
script passes ``stdin_line()`` / ``stdout_write``. Nothing is written to the run folder.

Example::

    python 8_eval.py --config configs/tiny/eval.yaml --chat
    chat_loop(loaded_model, cfg.eval.generation, cfg.run.seed, stdin_line(), stdout_write)
"""

from __future__ import annotations

import sys
from typing import Callable

from dante import config as C
from dante.chat_format import ChatEncoder
from dante.evaluation.generation import SamplingParams, generate
from dante.evaluation.loading import LoadedModel
from dante.tokenizer import EOS_ID, EOT_ID


class TextStreamer:
    """Writes the decoded answer as tokens arrive; a byte-level token can end inside a UTF-8 character,
    which decodes to U+FFFD until its next byte arrives, so such a tail is held back."""

    def __init__(self, decode: Callable[[list[int]], str], write: Callable[[str], None]):
        self.decode, self.write, self.shown = decode, write, ""

    def __call__(self, new_ids: list[int]) -> None:
        text = self.decode(new_ids)
        if not text.endswith("\ufffd"):
            self.write(text[len(self.shown):])
            self.shown = text

    def finish(self, text: str) -> None:
        self.write(text[len(self.shown):] + "\n")


def chat_loop(loaded: LoadedModel, g: C.GenerationConfig, seed: int, read_line: Callable[[], str | None],
              write: Callable[[str], None]) -> int:
    """Interactive conversation: each line is a user turn; the answer streams until <|eot|>.

    ``/reset`` starts a new conversation, ``/exit`` or end of input stops. When the conversation no
    longer fits the context, the oldest turns are dropped (said once per drop). Returns the turn count.
    """
    enc, tok = ChatEncoder(loaded.tokenizer), loaded.tokenizer
    ctx = loaded.model_cfg.max_seq_len
    if not loaded.ref.is_chat:
        write(f"(note: {loaded.ref.label} is not an SFT checkpoint; it was not trained on the chat format)\n")
    messages: list[dict] = []
    turns = 0
    while True:
        line = read_line()
        if line is None or line.strip() == "/exit":
            return turns
        if line.strip() == "/reset":
            messages = []
            write("(new conversation)\n")
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line.strip()})
        budget = max(1, min(g.max_new_tokens or ctx, ctx // 2))
        ids = enc.encode(messages, add_generation_prompt=True).ids.tolist()
        while len(ids) + budget > ctx and len(messages) > 1:
            messages = messages[2:] if len(messages) > 2 else messages[1:]
            write("(oldest turn dropped: the conversation exceeds the context)\n")
            ids = enc.encode(messages, add_generation_prompt=True).ids.tolist()
        ids = ids[-(ctx - 1):]
        decode = lambda x: tok.decode(x, skip_special_tokens=True)  # noqa: E731
        stream = TextStreamer(decode, write)
        gen = generate(loaded.model, ids, max_new_tokens=budget, params=SamplingParams.from_config(g), stop_ids={EOT_ID, EOS_ID},
                       seed=seed + turns, decode=decode, autocast_dtype=loaded.autocast_dtype, on_token=stream)
        stream.finish(gen.text)
        messages.append({"role": "assistant", "content": gen.text})
        turns += 1


def stdin_line(prompt: str = "> ") -> Callable[[], str | None]:
    def read() -> str | None:
        try:
            return input(prompt)
        except EOFError:
            return None

    return read


def stdout_write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


__all__ = ["TextStreamer", "chat_loop", "stdin_line", "stdout_write"]
