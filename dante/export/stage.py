"""Stage 9 end to end: check everything, write the Hugging Face folder, verify it, write the card and the manifest.

``9_export_hf.py`` calls ``export_stage`` (or ``plan_lines`` for ``--dry-run``); it writes
``runs/<name>/09_export/``, a folder that ``AutoModelForCausalLM`` and ``AutoTokenizer`` read with no
custom code:

- ``config.json`` (``LlamaForCausalLM``), ``generation_config.json`` (eos = <|eot|> and <|end_of_text|>,
  the sampling defaults of stage 8), ``model.safetensors`` (or shards + ``model.safetensors.index.json``);
- ``tokenizer.json`` (stage 2's file, byte for byte), ``tokenizer_config.json`` (bos/eos/pad, context
  length, the chat template of ``dante.chat_format.CHAT_TEMPLATE`` for an SFT checkpoint), ``special_tokens_map.json``;
- with ``export.gguf``, ``<run>-<type>.gguf`` per ``export.gguf_types`` (``dante/export/gguf.py``), checked in
  llama.cpp when ``llama_cpp`` is importable (``dante/export/gguf_verify.py``);
- ``README.md``, the model card (``dante/export/model_card.py``);
- ``manifest.json`` last, with the verification results (it is never uploaded).

Design choices
- ``preflight`` runs every check before any weight is loaded and reports all problems in one error: the
  export config, the checkpoint (its files readable), what Llama can express (``hf_format``), the
  tokenizer (stage 2's recorded sha256, its vocabulary), the held-out text, stage 6's sources of the
  chat-template check, the card's inputs (stage 8's report, the training lineage). ``9_export_hf.py`` runs
  it as ``run_stage``'s ``validate`` hook, so a rejected ``--force`` leaves a finished 09_export as it was;
  ``export_stage`` uses the plan it returns.
- Deterministic bytes: the same run exported twice gives identical files but for the manifest's
  ``started``/``finished`` (measured with GGUF and sharded bf16: tests/test_export.py); no timestamp is
  written into a model file or the card.
- eos: an SFT checkpoint ends its turns with <|eot|> (stage 6 teaches exactly that), so its tokenizer eos
  is <|eot|>, as Llama 3 Instruct does, for tools that stop on ``tokenizer.eos_token``; a base model ends
  documents with <|end_of_text|>. ``generation_config.json`` lists both ids either way.
- GGUF: refused in ``preflight`` (before any work) when llama.cpp cannot reproduce the tokenizer's
  pre-tokenizer and no ``export.gguf_pre_tokenizer`` forces a type; the error says why and lists the options.
- A failed verification raises before ``stage.finish``: no manifest, and a rerun with the same config
  resumes (redoes) the export in the same folder.

Example::

    python 9_export_hf.py --config configs/tiny/export.yaml
    python 9_export_hf.py --config configs/tiny/export.yaml --dry-run
"""

from __future__ import annotations

import math
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dante import checkpoint as ckpt
from dante import config as C
from dante.artifacts import PROGRESS, Stage, atomic_write_json, atomic_write_text, stage_dir
from dante.chat_format import CHAT_TEMPLATE
from dante.checkpoint import tokenizer_problems
from dante.errors import StageError, UserError, problems_message
from dante.evaluation.loading import resolve_device, run_tokenizer
from dante.export.gguf import (
    carried_pre_type,
    gguf_config_problems,
    gguf_problems,
    id_mismatch,
    llama_cpp_equivalent,
    write_gguf,
)
from dante.export.gguf_verify import llama_cpp_version, verify_gguf
from dante.export.hf_folder import hf_folder_files, parse_size, write_tokenizer_files, write_weights
from dante.export.hf_format import (
    expected_hf_shapes,
    generation_config_dict,
    hf_config_dict,
    llama_problems,
    to_hf_state_dict,
    weight_problems,
)
from dante.export.model_card import card_facts, evaluation_report, render_model_card, short_number
from dante.export.run_inputs import (
    Source,
    generation_defaults,
    load_heldout,
    resolve_checkpoint,
    sft_source_problems,
    training_lineage,
)
from dante.export.verify import verification_windows, verify_export
from dante.tokenizer import EOS, EOS_ID, EOT, EOT_ID

FORMAT_VERSION = 1


def config_problems(cfg: C.ExportStageConfig) -> list[str]:
    """Problems of the export config itself (the rest of ``validate`` for this stage)."""
    e = cfg.export
    p = []
    try:
        if parse_size(e.max_shard_size) < 1:
            p.append(f"export.max_shard_size={e.max_shard_size!r}: must be > 0")
    except ValueError as err:
        p.append(f"export.max_shard_size: {err}")
    if e.verify_tokens < 1:
        p.append(f"export.verify_tokens={e.verify_tokens}: must be >= 1")
    if e.verify_windows < 1:
        p.append(f"export.verify_windows={e.verify_windows}: must be >= 1")
    if e.verify_seq_len < 0:
        p.append(f"export.verify_seq_len={e.verify_seq_len}: must be >= 0 (0 means the model's context)")
    if e.verify and not e.heldout:
        p.append("export.heldout: empty, but verification needs real text; set e.g. "
                 "{it: data/sample/heldout/it.jsonl.gz} (or export.verify: false)")
    for lang, path in e.heldout.items():
        if not isinstance(path, str) or not Path(path).is_file():
            p.append(f"export.heldout.{lang}: file not found: {path!r}")
    if not e.license.strip():
        p.append("export.license: required (an SPDX id such as apache-2.0, shown in the model card)")
    return p + gguf_config_problems(e)


def _refuse_foreign_files(stage: Stage) -> None:
    """A fresh export must start in an empty folder; a resumed one owns what is there (same config)."""
    if stage.resumed:
        for f in stage.dir.iterdir():  # our own partial files of the same config: start them over
            if f.name != PROGRESS:
                shutil.rmtree(f) if f.is_dir() else f.unlink()
        return
    foreign = sorted(f.name for f in stage.dir.iterdir() if f.name != PROGRESS)
    if foreign:
        (stage.dir / PROGRESS).unlink(missing_ok=True)  # Stage.open just wrote it: do not adopt these files
        raise UserError(f"the output folder {stage.dir} is not empty ({', '.join(foreign[:6])}"
                        f"{' ...' if len(foreign) > 6 else ''}) and was not written by this export.\n"
                        "  HINT: pass --force to delete it and export again, or choose another run.name.")


@dataclass
class ExportPlan:
    """What ``preflight`` checked and read: the inputs ``export_stage`` works on."""

    source: Source
    tokenizer_path: Path
    tokenizer: Any
    texts_by_lang: dict[str, list[str]]
    """export.heldout's documents by language (empty when neither the verification nor a forced GGUF needs them)."""


def preflight(cfg: C.ExportStageConfig) -> ExportPlan:
    """Every check before the work (no weights loaded), read-only: config, checkpoint files, Llama
    expressibility of the config and of the file's tensors, tokenizer (recorded sha256, vocabulary, special
    ids, lineage), held-out text, stage 6's sources, the card's inputs. One error listing everything."""
    problems = config_problems(cfg)
    tok_path = tokenizer = source = None
    for read in ("tokenizer", "checkpoint"):
        try:
            if read == "tokenizer":
                tok_path, tokenizer = run_tokenizer(cfg.run)
            else:
                source = resolve_checkpoint(cfg)
        except (UserError, StageError) as e:
            problems += _problems_of(e)
    if cfg.export.verify:
        try:
            resolve_device(cfg.export.verify_device)  # cuda asked for but absent: say so now
        except UserError as e:
            problems.append(str(e))
    texts_by_lang = {}
    needs_text = cfg.export.verify or (cfg.export.gguf and bool(cfg.export.gguf_pre_tokenizer))
    if needs_text and not any("export.heldout" in p for p in problems):
        try:
            texts_by_lang = load_heldout(cfg)
        except UserError as e:
            problems.append(str(e))
    if source is not None:
        llama = llama_problems(source.model_cfg)
        problems += llama
        if not llama:  # the tensors, from the file's header (a Llama config is needed to know what to expect)
            problems += weight_problems(source.path / ckpt.WEIGHTS, source.model_cfg)
        if tokenizer is not None:
            problems += tokenizer_problems(source.ref, source.model_cfg, tokenizer, tok_path)
            problems += gguf_problems(cfg.export, source.model_cfg, tokenizer)
        problems += sft_source_problems(cfg, source)
        try:  # what the model card reads at the end: a damaged file must not stop a finished export there
            training_lineage(cfg, source)
            evaluation_report(cfg)
        except UserError as e:
            problems.append(str(e))
    if problems:
        what = source.path if source is not None else f"the checkpoint of export.checkpoint={cfg.export.checkpoint!r}"
        raise UserError(problems_message(f"cannot export {what} as a Hugging Face Llama model", problems))
    return ExportPlan(source=source, tokenizer_path=tok_path, tokenizer=tokenizer, texts_by_lang=texts_by_lang)


def _problems_of(e: Exception) -> list[str]:
    """The problems of an error to list among others: its bullets when it is a ``problems_message`` (one
    list, not a list inside a list; a bullet keeps its indented continuation lines), else the whole message."""
    headline, _, body = str(e).partition("\n")
    if not (headline.endswith(":") and body.startswith("  - ")):
        return [str(e)]
    return [item.rstrip("\n") for item in re.split(r"^  - ", body, flags=re.MULTILINE) if item.strip()]


def record_inputs(stage: Stage, plan: ExportPlan) -> None:
    """The manifests and files the export reads, as the manifest lists them (read-only: ``validate`` may call it)."""
    stage.require(C.TOKENIZER)
    if plan.source.stage:
        stage.require(plan.source.stage)
    stage.add_input("checkpoint", plan.source.path / ckpt.WEIGHTS)
    stage.add_input("tokenizer", plan.tokenizer_path)


def export_stage(stage: Stage, cfg: C.ExportStageConfig, plan: ExportPlan | None = None) -> dict:
    """Stage 9 end to end: checks (``plan``: what ``preflight`` returned in ``validate``; run here when None),
    files, verification, model card, manifest (last)."""
    if plan is None:
        plan = preflight(cfg)
        record_inputs(stage, plan)
    source, tok_path, tokenizer, texts_by_lang = plan.source, plan.tokenizer_path, plan.tokenizer, plan.texts_by_lang
    _refuse_foreign_files(stage)
    # from here on the folder holds our files: a rerun with this config resumes (redoes) the export
    stage.save_progress({"checkpoint": str(source.path), "writing": True})

    model, m, _ = ckpt.load_model(source.path)
    out = stage.dir
    print(f"[09_export] {source.path} -> {out} ({cfg.export.dtype})", flush=True)
    hf_sd = to_hf_state_dict(model.state_dict(), tie_embeddings=m.tie_embeddings)
    weights = write_weights(out, hf_sd, cfg.export.dtype, cfg.export.max_shard_size)
    n_params = sum(t.numel() for t in hf_sd.values())
    del hf_sd

    eos_token = EOT if source.is_chat else EOS
    eos_id = EOT_ID if source.is_chat else EOS_ID
    atomic_write_json(out / "config.json", hf_config_dict(m, eos_id, cfg.export.dtype))
    gen = generation_defaults(cfg)
    stop_ids = [i for i in (tokenizer.token_to_id(t) for t in gen.stop_tokens) if i is not None]
    atomic_write_json(out / "generation_config.json", generation_config_dict(gen, eos_id, stop_ids))
    write_tokenizer_files(out, tok_path, tokenizer, eos_token, CHAT_TEMPLATE if source.is_chat else None, m.max_seq_len)

    verification = None
    if cfg.export.verify:
        verification = verify_export(cfg, out, model, tokenizer, source, texts_by_lang)
        lg = verification["logits"]
        print(f"[09_export] verified: max |Δ logit| {lg['max_abs_diff']:.3g} <= {lg['bound']:.3g} on {lg['windows']} x "
              f"{lg['tokens_per_window']} tokens; greedy {verification['greedy']['identical']}/{verification['greedy']['prompts']} "
              f"identical; tokenizer {verification['tokenizer']['documents']} docs identical", flush=True)
    gguf_result = export_gguf(cfg, out, model, source, tokenizer, texts_by_lang) if cfg.export.gguf else None
    facts = card_facts(cfg, source, tokenizer, n_params, verification, gguf_result)
    name = cfg.export.model_name or f"Dante ({cfg.run.name})"
    atomic_write_text(out / "README.md", render_model_card(facts, name, cfg.export.license, str(out)))
    files = {f.name: f.stat().st_size for f in hf_folder_files(out)}
    return stage.finish(
        outputs={"folder": str(out), "files": files, "weights": weights},
        counts={"parameters": n_params, "files": len(files), "bytes": sum(files.values())},
        extra={"checkpoint": {"path": str(source.path), "stage": source.stage, "step": source.meta.get("step")},
               "verification": verification, "gguf": gguf_result, "card_facts": facts},
    )


def export_gguf(cfg: C.ExportStageConfig, out: Path, model, source: Source, tokenizer, texts_by_lang: dict) -> dict:
    """The GGUF files, the forced-type mismatch (if a type was forced) and llama.cpp's proof (if importable).

    Written from the weights the Hugging Face verification compared (rounded to export.dtype), so the llama.cpp
    comparison tests the GGUF conversion, not the HF rounding."""
    e, m = cfg.export, source.model_cfg
    exact = carried_pre_type(tokenizer)
    pre = e.gguf_pre_tokenizer or exact
    expected = llama_cpp_equivalent(tokenizer, pre) if pre != exact else tokenizer
    result: dict[str, Any] = {"pre_tokenizer": pre, "exact": pre == exact, "carried_type": exact, "files": []}
    if pre != exact:
        result["forced_id_mismatch"] = id_mismatch(tokenizer, expected, texts_by_lang or load_heldout(cfg))
        for lang, r in result["forced_id_mismatch"].items():
            print(f"[09_export] GGUF forced to {pre!r}: {lang} {r['lines_differing']}/{r['lines']} held-out lines "
                  f"tokenize differently ({r['line_mismatch_rate']:.1%})", flush=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    template = CHAT_TEMPLATE if source.is_chat else None
    name = e.model_name or f"Dante ({cfg.run.name})"
    for gtype in e.gguf_types:
        path = out / f"{cfg.run.name}-{gtype}.gguf"
        info = write_gguf(path, state, m, tokenizer, gtype, pre, template, name)
        print(f"[09_export] {path.name}: {info['bytes']:,} bytes, tokenizer.ggml.pre={pre}", flush=True)
        result["files"].append(info)
    version = llama_cpp_version()
    result["llama_cpp"] = {"version": version, "results": []}
    if version is None or not e.verify:
        result["llama_cpp"]["not_run"] = ("export.verify is false" if not e.verify else
                                          "llama_cpp (llama-cpp-python) is not importable; docs/PERFORMANCE.md shows how "
                                          "to build it and rerun stage 9 with --force")
        print(f"[09_export] llama.cpp check not run: {result['llama_cpp']['not_run']}", flush=True)
        return result
    texts = [t for lang in sorted(texts_by_lang) for t in texts_by_lang[lang]]
    seq_len = min(e.verify_seq_len or m.max_seq_len, m.max_seq_len)
    windows = verification_windows(tokenizer, texts_by_lang, e.verify_windows, seq_len)
    model = model.float().eval()
    device = next(model.parameters()).device

    def reference(w):
        with torch.inference_mode():
            return model.logits(model(torch.tensor([w], device=device)))[0].float().cpu().numpy()

    def encoder(tok):
        return lambda text: tok.encode(text, add_special_tokens=False).ids

    for info in result["files"]:
        r = verify_gguf(out / info["file"], info["type"], encoder(expected), encoder(tokenizer), texts, windows, reference)
        lg = r["logits"]
        print(f"[09_export] llama.cpp {version}: {info['file']}: {r['tokenizer']['identical_to_expected']}/"
              f"{r['tokenizer']['documents']} documents tokenized as expected; max |Δ logit| {lg['max_abs_diff']:.3g}"
              + (f" <= {lg['bound']:.3g}" if "bound" in lg else " (quantized: not bounded)")
              + f", top-1 agreement {lg['top1_agreement']:.2%}", flush=True)
        result["llama_cpp"]["results"].append(r)
    return result


def plan_lines(cfg: C.ExportStageConfig, plan: ExportPlan | None = None) -> list[str]:
    """What the export would write, from the checkpoint's config alone (no weights loaded)."""
    plan = plan or preflight(cfg)
    source, tok_path = plan.source, plan.tokenizer_path
    shapes = expected_hf_shapes(source.model_cfg)
    n_params = sum(math.prod(s) for s in shapes.values())
    nbytes = n_params * {"float32": 4, "bfloat16": 2, "float16": 2}[cfg.export.dtype]
    n_shards = max(1, math.ceil(nbytes / parse_size(cfg.export.max_shard_size)))
    lines = [f"checkpoint: {source.path} (stage {source.stage or 'external'}, step {source.meta.get('step')})",
             f"model: {n_params:,} parameters, {'SFT (chat template, eos <|eot|>)' if source.is_chat else 'base'}",
             f"tokenizer: {tok_path}",
             f"would write to {stage_dir(cfg.run, '09_export')}:"]
    names = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
             "special_tokens_map.json", "README.md"]
    if n_shards == 1:
        lines.append(f"  model.safetensors  ~{short_number(nbytes)}B ({cfg.export.dtype})")
    else:
        lines.append(f"  model-0000k-of-{n_shards:05d}.safetensors x{n_shards} (about; ~{short_number(nbytes)}B in "
                     f"{cfg.export.dtype}, shards <= {cfg.export.max_shard_size}) + model.safetensors.index.json")
    lines += [f"  {n}" for n in names]
    if cfg.export.gguf:
        pre = cfg.export.gguf_pre_tokenizer or carried_pre_type(plan.tokenizer)
        lines += [f"  {cfg.run.name}-{t}.gguf  (llama.cpp / Ollama, tokenizer.ggml.pre={pre}"
                  + (", forced: mismatch measured)" if cfg.export.gguf_pre_tokenizer else ")") for t in cfg.export.gguf_types]
    lines.append("verification: " + ("on (logits, greedy, tokenizer" + (", chat template)" if source.is_chat else ")")
                                     if cfg.export.verify else "off"))
    return lines
