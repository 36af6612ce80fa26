"""Stage 2: train the Dante tokenizer, its A/B baseline and the A/B presets, then write the fertility report.

Reads ``01_corpus/`` (its manifest and document shards); writes ``02_tokenizer/``: ``tokenizer.json``,
``baseline/tokenizer.json``, ``ab/<preset>/tokenizer.json`` per ``tokenizer.ab_presets``,
``fertility.{json,md,png}`` and ``manifest.json`` (last). The training sample is drawn from stage 1 as a
stream, character-balanced by ``tokenizer.language_mix`` and proportional to size within a language (the
manifest lists target vs actual characters per source); every other tokenizer is trained on the very same
sample with the same vocabulary size. An interrupted run keeps
the tokenizers it finished (progress.json) and resumes after them. Every input is checked before anything
is written (``validate``: the config, 01_corpus's manifest and shards, enough text for the sample, the
held-out files); ``--dry-run`` runs those checks and states the sample, the expected time and the peak
memory from measured rates (``dante.tokenizer.preflight_lines``). Logic: dante/tokenizer.py, dante/fertility.py.

    python 2_train_tokenizer.py --config configs/tiny/tokenizer.yaml
"""

from __future__ import annotations

import sys
import time

from dante import fertility
from dante.artifacts import atomic_write_text, file_sha256, read_manifest, stage_dir
from dante.cli import run_stage
from dante.corpus import corpus_files
from dante.errors import StageError, UserError, raise_problems
from dante.pretokenizers import ab_specs, parse_spec
from dante.tokenizer import (
    as_spec,
    default_pinned,
    iter_training_sample,
    load_tokenizer,
    n_fixed_tokens,
    plan_sample,
    preflight_lines,
    sample_shortfalls,
    tokenizer_facts,
    train_tokenizer,
)

STAGE = "02_tokenizer"


def main_spec(t):
    """The run's pre-tokenizer: tokenizer.pretokenizer with the digits and accents switches."""
    return parse_spec(t.pretokenizer, t.digits, t.accents)


def validate(stage, cfg, args):
    """Every check that needs no training, before anything is written (also for --dry-run), reported
    together: the A/B and reference settings, ``01_corpus`` (its manifest, every shard it lists, enough text
    for the sample) and the held-out files. Returns what ``main`` trains from (``stage.plan``)."""
    t, refs = cfg.tokenizer, []
    base = parse_spec(t.baseline_pretokenizer) if t.baseline else None
    ab, problems, notes = ab_specs(t.ab_presets, main_spec(t), base)
    if base is not None and base.key == main_spec(t).key:
        problems.append(f"tokenizer.baseline_pretokenizer={t.baseline_pretokenizer!r} is the run's own pre-tokenizer "
                        f"({main_spec(t).name}): the A/B would compare it with itself; choose another or set baseline: false")
    fixed = max(n_fixed_tokens(t.n_reserved, len(default_pinned(s))) for s in [main_spec(t), *ab])
    if t.vocab_size <= fixed:
        problems.append(f"tokenizer.vocab_size={t.vocab_size} must exceed the {fixed} fixed ids (specials, reserved, bytes, pinned)")
    if len({r.name for r in t.references}) != len(t.references) or any(r.name in ("dante", "baseline") for r in t.references):
        problems.append("tokenizer.references: names must be unique and not 'dante' or 'baseline'")
    if {r.name for r in t.references} & {s.name for s in ab}:
        problems.append("tokenizer.references: a name equals an ab_presets entry; rename the reference")
    for r in t.references:
        missing = fertility.missing_reference_files(r)
        if missing and r.optional:
            notes.append(f"reference {r.name!r} skipped: {', '.join(missing) or 'path unset'} not found "
                         f"(run `python tools/fetch_reference_tokenizers.py`)")
        elif missing:
            problems.append(f"reference {r.name!r}: {', '.join(missing) or 'path unset'} not found "
                            f"(HINT: `python tools/fetch_reference_tokenizers.py`, or set optional: true)")
        else:
            refs.append(r)
    heldout, files, plan = {}, [], {}
    try:
        heldout = fertility.load_heldout(t.heldout)
    except UserError as e:
        problems.append(str(e))
    try:  # 01_corpus: manifest, the shards it lists, and enough characters per language for the sample
        corpus = stage.require("01_corpus")
        files = corpus_files(stage_dir(cfg.run, "01_corpus"), corpus)
        plan = plan_sample(corpus["outputs"]["sources"], t.language_mix, t.sample_chars)
        problems += sample_shortfalls(plan)
    except (StageError, UserError) as e:
        problems.append(str(e))
    raise_problems(UserError, "tokenizer stage cannot start", problems)
    return files, plan, refs, heldout, notes, ab


def train_or_resume(stage, key, path, pretokenizer, files, plan, cfg):
    """Train one tokenizer on the sample (or reuse the one an interrupted run finished)."""
    t, progress = cfg.tokenizer, stage.load_progress()
    if key in progress and path.is_file():
        print(f"[{STAGE}] {key}: reusing {path} from the interrupted run", flush=True)
        return load_tokenizer(path), progress[key]
    stats: dict = {}
    start = time.time()
    tok = train_tokenizer(iter_training_sample(files, plan, cfg.run.seed, stats), t.vocab_size, pretokenizer,
                          t.n_reserved, t.min_frequency)
    atomic_write_text(path, tok.to_str())
    info = {"sample": stats, "seconds": round(time.time() - start, 1), "facts": tokenizer_facts(tok)}
    stage.save_progress(stage.load_progress() | {key: info})
    print(f"[{STAGE}] {key}: {as_spec(pretokenizer).name} pre-tokenizer, {info['facts']['vocab_size']} ids, "
          f"{sum(s['chars'] for s in stats.values()):,} sample chars, {info['seconds']} s", flush=True)
    return load_tokenizer(path), info


def main(stage, cfg, args):
    t = cfg.tokenizer
    files, plan, refs, heldout, notes, ab = stage.plan
    spec = main_spec(t)
    dante, dante_info = train_or_resume(stage, "dante", stage.dir / "tokenizer.json", spec, files, plan, cfg)
    counters = [fertility.hf_counter("dante", spec.name, dante, spec.gguf_verdict())]
    outputs = {"tokenizer": "tokenizer.json", "tokenizer_sha256": file_sha256(stage.dir / "tokenizer.json"),
               **dante_info["facts"], "gguf": spec.gguf_verdict(), "sample": dante_info["sample"], "ab": {}}
    trained = [("baseline", "baseline", parse_spec(t.baseline_pretokenizer))] if t.baseline else []
    trained += [(f"ab:{s.name}", f"ab/{s.name}", s) for s in ab]
    for key, folder, s in trained:  # the same sample (same plan, same seed) and vocabulary size for each
        (stage.dir / folder).mkdir(parents=True, exist_ok=True)
        tok, info = train_or_resume(stage, key, stage.dir / folder / "tokenizer.json", s, files, plan, cfg)
        if info["sample"] != dante_info["sample"]:  # deterministic by construction; a difference would void the A/B
            raise RuntimeError(f"{key}: its training sample differs from the run tokenizer's; the A/B would be meaningless")
        name = "baseline" if key == "baseline" else s.name
        counters.append(fertility.hf_counter(name, s.name, tok, s.gguf_verdict()))
        if key == "baseline":
            outputs["baseline"] = "baseline/tokenizer.json"
        else:
            outputs["ab"][s.name] = {"tokenizer": f"{folder}/tokenizer.json", "gguf": s.gguf_verdict()}
    counters += [fertility.load_reference(r) for r in refs]
    for lang, st in dante_info["sample"].items():
        print(f"[{STAGE}] sample {lang}: " + ", ".join(f"{src} {v['chars']:,}/{v['target_chars']:,}"
                                                    for src, v in st["by_source"].items()) + " chars (actual/target)")
    if heldout:
        report = fertility.fertility_report(counters, heldout, notes)
        outputs["fertility"] = {k: v.split("/")[-1] for k, v in fertility.write_report(report, stage.dir).items()}
        outputs["fertility_summary"] = fertility.summary_lines(report)
        for line in outputs["fertility_summary"] + [f"note: {n}" for n in notes]:
            print(f"[{STAGE}] {line}")
    else:
        print(f"[{STAGE}] no tokenizer.heldout configured: fertility report skipped")
    stage.finish(outputs=outputs, counts={"sample_chars": sum(s["chars"] for s in dante_info["sample"].values())})


def dry_run(cfg, args):
    """The plan, the sample and the preflight: expected time and memory from measured rates (validate has
    already checked every input)."""
    t = cfg.tokenizer
    ab = ab_specs(t.ab_presets, main_spec(t), parse_spec(t.baseline_pretokenizer) if t.baseline else None)[0]
    n_tok = 1 + int(t.baseline) + len(ab)
    print(f"# dry run: {main_spec(t).name} tokenizer (GGUF: {main_spec(t).gguf_verdict()}), vocab {t.vocab_size}, "
          f"baseline {t.baseline_pretokenizer if t.baseline else 'off'}, A/B {', '.join(s.name for s in ab) or 'none'}, "
          f"{len(t.references)} reference(s)")
    plan = plan_sample(read_manifest(cfg.run, "01_corpus")["outputs"]["sources"], t.language_mix, t.sample_chars)
    print("\n".join(f"# {line}" for line in preflight_lines(t.sample_chars, plan, n_tok)))


if __name__ == "__main__":
    sys.exit(run_stage(STAGE, __doc__.split("\n")[0], main, validate=validate, dry_run=dry_run))
