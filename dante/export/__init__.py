"""Stage 9: a Dante checkpoint as a Hugging Face model folder that loads in plain ``transformers``, and the proof that it is our model.

One file per reason to change:

- ``hf_format``: the one name table Dante (Meta-LLaMA) <-> Hugging Face, ModelConfig -> LlamaConfig,
  ``config.json`` / ``generation_config.json``, and what a Llama cannot express (refused before any work).
- ``hf_folder``: the folder's files: weights (safetensors, shards + index), tokenizer files, which files
  belong to the folder.
- ``run_inputs``: what stage 9 reads from the run: the checkpoint, its tokenizer, its training lineage,
  stage 8's sampling defaults, the held-out text.
- ``verify``: the comparisons against transformers (logits, greedy, tokenizer, chat template).
- ``gguf``: the GGUF files for llama.cpp / Ollama (``export.gguf``), what a GGUF can carry, the cost of a
  forced pre-tokenizer type.
- ``gguf_verify``: the proof in llama.cpp itself (ids and logits), when ``llama_cpp`` is importable.
- ``model_card``: the folder's ``README.md``, every number read from the run's files.
- ``hub``: the upload (``--push-to-hub``).
- ``stage``: the stage itself: ``preflight`` (every check, the ``validate`` hook), ``export_stage``, the
  ``--dry-run`` plan, ``FORMAT_VERSION``.

Example::

    python 9_export_hf.py --config configs/tiny/export.yaml
    python 9_export_hf.py --config configs/tiny/export.yaml --push-to-hub me/dante-tiny --dry-run
"""

from __future__ import annotations

from dante.export.hub import push_to_hub
from dante.export.stage import (
    FORMAT_VERSION,
    ExportPlan,
    config_problems,
    export_stage,
    plan_lines,
    preflight,
    record_inputs,
)
from dante.export.verify import BUILTIN_CONVERSATIONS, VerificationError

__all__ = ["FORMAT_VERSION", "ExportPlan", "preflight", "record_inputs", "export_stage", "plan_lines", "config_problems",
           "push_to_hub", "VerificationError", "BUILTIN_CONVERSATIONS"]
