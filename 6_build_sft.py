"""Stage 6: SFT conversations -> packed, loss-weighted blocks in 06_sft_data/.

Reads the sources of ``sft_data.sources`` (hub datasets or local JSONL, four formats), the stage 2
tokenizer, and writes ``{train,eval}.{tokens,weights,docs,pos}.bin`` (read them with
``dante.sft_data.load_packed``), ``chat_template.jinja`` (for the export) and a manifest with the statistics:
conversations kept and dropped by reason, tokens, weighted tokens, padding, truncations, token shares per
language and per source. The work is ``dante.sft_data.build_sft_stage``; this script is its command line.

Resume: each finished source is cached under ``work/`` and recorded in progress.json, so an interrupted
run redoes only the sources it had not finished (the cache is discarded if the tokenizer changed).

Example::

    python 6_build_sft.py --config configs/tiny/sft_data.yaml
"""

from __future__ import annotations

from dante import sft_data as sft
from dante.cli import run_stage

STAGE = "06_sft_data"


def log(msg: str) -> None:
    print(f"[{STAGE}] {msg}", flush=True)


def validate(stage, cfg, args):
    """Sources and tokenizer checked before anything is written; the encoder is ``stage.plan``."""
    return sft.check_sft_inputs(stage, cfg)


def dry_run(cfg, args) -> None:
    s = cfg.sft_data
    print(f"# {STAGE} plan: block_size {s.block_size}, overlong={s.overlong}, user_weight {s.user_weight}, "
          f"heldout {s.heldout_fraction}")
    for src in s.sources:
        where = src.path if src.kind == "local" else f"hub {src.hf_id} ({src.hf_config or 'default'}, {src.split})"
        print(f"  {src.name:<24} {src.lang:<4} {src.format:<16} weight {src.weight:<5} {where}")


def main(stage, cfg, args) -> None:
    sft.build_sft_stage(stage, cfg, log=log)


if __name__ == "__main__":
    raise SystemExit(run_stage(STAGE, __doc__.splitlines()[0], main, format_version=sft.FORMAT_VERSION,
                               validate=validate, dry_run=dry_run))
