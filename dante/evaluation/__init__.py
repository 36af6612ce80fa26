"""Evaluation (stage 8; stage 5 uses the long-context part): one module per concern.

- ``scoring``: batched log-likelihood of token sequences (right padding, batch-size independent), the one
  scorer behind everything below.
- ``perplexity``: perplexity and bits per byte on held-out text, sliding windows.
- ``generation``: KV-cache sampling (temperature, top-k, top-p, repetition penalty, stops), tokens/s.
- ``long_context``: perplexity by position, passkey retrieval.
- ``tasks`` / ``lm_eval_adapter``: benchmark task files, the Dante model as an lm-eval ``LM``, the runner.
- ``loading``: a checkpoint loaded for evaluation (device, autocast), after ``dante.checkpoint``'s checks.
- ``stage`` / ``report``: the stage-8 plan, per-checkpoint evaluation, chat, and report.json/md/PNG.
- ``chat``: the interactive ``--chat`` loop (streamed answers in the chat format of stage 6).

Modules import lm-eval and matplotlib only where used, so stage 5 can use ``long_context`` alone.

Example::

    python 8_eval.py --config configs/tiny/eval.yaml
"""
