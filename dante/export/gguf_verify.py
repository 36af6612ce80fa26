"""Stage 9's proof that a GGUF is our model in llama.cpp: ids and logits through ``llama-cpp-python``.

Runs when ``llama_cpp`` is importable (it is optional: a C++ build, see docs/PERFORMANCE.md for the
command); otherwise the manifest says it did not run and why. For each GGUF file:

- tokenizer: every held-out document tokenized by llama.cpp (``Llama.tokenize``, no BOS, specials as
  text) against the ids llama.cpp should give: ours when the GGUF's type reproduces the tokenizer, the
  ``llama_cpp_equivalent`` ids when a type was forced (then the mismatch with ours is the recorded cost);
  and llama.cpp's token pieces back to the text (``llama_token_to_piece``; llama-cpp-python's own
  ``detokenize`` is counted separately: it truncates tokens longer than 32 bytes);
- logits: the verification windows evaluated by llama.cpp against the native model in fp32 with the same
  weights. The bound is per type: f32/f16/bf16 files must agree within ``GGUF_LOGIT_RTOL`` x max(1, max
  |logit|); q8_0 is quantized, so its difference and its top-1 agreement are recorded, not bounded.

Why that bound: llama.cpp keeps the KV cache in f16 and, on CPU, rounds activations to the weight type
before each matmul. Measured with llama-cpp-python 0.3.36 on CPU (dim 128, 2 layers, noised random
weights, 256 Italian held-out tokens), max |Δ logit| / max |logit|: f32 file 4.3e-4, f16 1.1e-3 (YaRN x4
at 256 positions: 1.1e-3), bf16 5.1e-3, q8_0 2.9e-2 (top-1 agreement 94%). A wrong export is two orders
above: wq/wk left in rotate-half order 0.50, the YaRN keys left out 0.47. The bounds sit between, with
room for the rounding of a deeper model (not measured here: no 2B checkpoint on this machine).

Example::

    result = verify_gguf(path, "f16", expected_encoder, tokenizer, texts_by_lang, windows, reference_logits)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import numpy as np

from dante.errors import StageError

#: Relative logit bound for unquantized GGUF files (module docstring). bf16 keeps 8 mantissa bits.
GGUF_LOGIT_RTOL = {"f32": 5e-3, "f16": 1e-2, "bf16": 5e-2}


class GGUFVerificationError(StageError):
    """llama.cpp does not reproduce the exported model; nothing is marked done."""


def llama_cpp_version() -> str | None:
    """llama-cpp-python's version, or None when it is not installed (optional: it is a C++ build)."""
    try:
        import llama_cpp  # optional and heavy (loads libllama); only stage 9's proof needs it
    except ImportError:
        return None
    return getattr(llama_cpp, "__version__", "unknown")


def _piece(llm, token: int) -> bytes:
    """llama.cpp's text of one token (``llama_token_to_piece``), with a buffer as large as the piece needs.

    ``Llama.detokenize`` of llama-cpp-python 0.3.36 passes a 32-byte buffer and keeps the truncated bytes, so
    a longer token (a run of 37 spaces of indentation, in our vocabularies) comes back cut; llama.cpp returns
    the needed size as a negative number, which is used here."""
    import ctypes

    import llama_cpp  # optional (see llama_cpp_version)

    size = 64
    while True:
        buf = (ctypes.c_char * size)()
        n = llama_cpp.llama_token_to_piece(llm._model.vocab, llama_cpp.llama_token(token), buf, size, 0, False)
        if n >= 0:
            return bytes(buf[:n])
        size = -n


def verify_gguf(path: Path, gtype: str, expected_ids: Callable[[str], list[int]], ours: Callable[[str], list[int]],
                texts: list[str], windows: list[list[int]], reference_logits: Callable[[list[int]], np.ndarray]) -> dict:
    """Tokenize ``texts`` and evaluate ``windows`` with llama.cpp; raise GGUFVerificationError on a difference."""
    from llama_cpp import Llama  # optional (see llama_cpp_version)

    seq_len = max(len(w) for w in windows) if windows else 64
    llm = Llama(model_path=str(path), n_ctx=seq_len, n_batch=seq_len, n_ubatch=seq_len, logits_all=True,
                n_threads=os.cpu_count() or 1, verbose=False)
    failures: list[str] = []
    try:
        tok = {"documents": len(texts), "identical_to_expected": 0, "identical_to_ours": 0, "detokenized_exactly": 0,
               "python_detokenize_exact": 0, "tokens": 0}
        for text in texts:
            got = llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
            tok["tokens"] += len(got)
            tok["identical_to_expected"] += got == expected_ids(text)
            tok["identical_to_ours"] += got == ours(text)
            tok["detokenized_exactly"] += b"".join(_piece(llm, t) for t in got) == text.encode("utf-8")
            tok["python_detokenize_exact"] += llm.detokenize(got) == text.encode("utf-8")
        if tok["identical_to_expected"] != len(texts):
            failures.append(f"llama.cpp tokenizes {len(texts) - tok['identical_to_expected']} of {len(texts)} held-out "
                            "documents differently from the ids its pre-tokenizer type should give")
        if tok["detokenized_exactly"] != len(texts):
            failures.append(f"llama.cpp's token pieces do not give back {len(texts) - tok['detokenized_exactly']} of "
                            f"{len(texts)} held-out documents")
        worst, top, agree, n_pos = 0.0, 0.0, 0, 0
        for w in windows:
            llm.reset()
            llm.eval(w)
            got = np.asarray(llm.scores[: len(w)], dtype=np.float32)
            ref = reference_logits(w)
            worst = max(worst, float(np.abs(got - ref).max()))
            top = max(top, float(np.abs(ref).max()))
            agree += int((got.argmax(-1) == ref.argmax(-1)).sum())
            n_pos += len(w)
        logits = {"windows": len(windows), "tokens_per_window": seq_len, "max_abs_diff": worst, "max_abs_logit": top,
                  "top1_agreement": agree / max(n_pos, 1)}
        if gtype in GGUF_LOGIT_RTOL:
            logits["bound"] = GGUF_LOGIT_RTOL[gtype] * max(1.0, top)
            if worst > logits["bound"]:
                failures.append(f"{path.name}: llama.cpp logits differ from the native model by {worst:.3g} > bound "
                                f"{logits['bound']:.3g}")
    finally:
        llm.close()
    if failures:
        raise GGUFVerificationError("the GGUF export does not reproduce the model in llama.cpp:\n  - "
                                    + "\n  - ".join(failures) + "\n  Nothing was marked done.")
    return {"file": path.name, "type": gtype, "tokenizer": tok, "logits": logits}
