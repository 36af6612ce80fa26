"""Stage 9's model card (the folder's ``README.md``): every number read from the run's files.

``card_facts`` gathers what the card states from the run's manifests (data mix of stages 1 and 3, the
training stages behind the checkpoint, stage 6's instruction data), the checkpoints' ``meta.json``, stage
8's ``report.json`` and the export's own verification; ``render_model_card`` turns those facts into
Markdown with a Hub metadata header. The facts are also stored in the manifest, so a card can be checked
against its sources. Nothing on the card is typed in by hand except the license the config names.

Example::

    facts = card_facts(cfg, source, tokenizer, n_params, verification)
    atomic_write_text(out / "README.md", render_model_card(facts, "Dante 2B", "apache-2.0", str(out)))
"""

from __future__ import annotations

import importlib.metadata
from typing import Any

from dante import config as C
from dante import report_format
from dante.artifacts import read_json, stage_dir, stage_done
from dante.errors import UserError
from dante.export.gguf import refusal_lines
from dante.export.run_inputs import Source, finished_manifest, training_lineage
from dante.model import ffn_hidden_dim_of, head_dim_of
from dante.tokenizer import tokenizer_facts


def _fmt(n: Any) -> str:
    if isinstance(n, bool) or n is None:
        return str(n)
    if isinstance(n, float) and n.is_integer() and abs(n) < 1e15:
        n = int(n)
    if isinstance(n, int):
        return f"{n:,}"
    if isinstance(n, float):
        return f"{n:.4g}"
    return str(n)


def short_number(n: float) -> str:
    """1234567 -> '1.23M' (parameter counts, byte sizes)."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:g}"


def markdown_table(header: list[str], rows: list[list[Any]]) -> list[str]:
    """The one Markdown writer (``dante.report_format``) with the card's own number style."""
    return report_format.markdown_table(header, rows, cell=_fmt)


def runtime_versions() -> dict[str, str | None]:
    """Installed versions of the runtimes the card names (None: not installed here, so not verified here)."""
    out = {}
    for dist in ("transformers", "torch", "lm_eval", "vllm", "gguf", "llama_cpp_python"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    return out


def card_facts(cfg: C.ExportStageConfig, source: Source, tokenizer, n_params: int, verification: dict | None,
               gguf: dict | None = None) -> dict:
    """Everything the model card states, gathered from manifests, checkpoint metadata and report.json."""
    m = source.model_cfg
    tok_facts = tokenizer_facts(tokenizer)
    facts: dict[str, Any] = {
        "model": {
            "parameters": n_params, "dim": m.dim, "n_layers": m.n_layers, "n_heads": m.n_heads,
            "n_kv_heads": m.n_kv_heads, "head_dim": head_dim_of(m), "ffn_hidden_dim": ffn_hidden_dim_of(m),
            "vocab_size": m.vocab_size, "max_seq_len": m.max_seq_len, "rope_theta": m.rope_theta,
            "rope_scaling": dict(m.rope_scaling), "tie_embeddings": m.tie_embeddings, "norm_eps": m.norm_eps,
        },
        "checkpoint": {"path": str(source.path), "stage": source.stage, "step": source.meta.get("step"),
                       "chat": source.is_chat},
        "dtype": cfg.export.dtype,
        "tokenizer": tok_facts,
        "verification": verification,
        "gguf": gguf,
        "gguf_refusal": None if gguf or tok_facts["llama_cpp_pre"] else refusal_lines(tok_facts),
        "versions": runtime_versions(),
    }
    corpus, shards = finished_manifest(cfg, C.CORPUS), finished_manifest(cfg, C.SHARDS)
    tokens_by_source = (shards or {}).get("counts", {}).get("by_source", {})
    facts["data"] = [
        {"source": name, "lang": src.get("lang"), "tier": src.get("tier"), "origin": src.get("origin"),
         "docs": src.get("docs"), "chars": src.get("chars"),
         "train_tokens": tokens_by_source.get(name, {}).get("train", {}).get("tokens")}
        for name, src in ((corpus or {}).get("outputs", {}).get("sources", {})).items()
    ]
    training = []
    for stage, meta in training_lineage(cfg, source):
        stage_cfg = (finished_manifest(cfg, stage) or {}).get("config") or meta.get("config") or {}
        train = stage_cfg.get("train", {})
        training.append({
            "stage": stage, "step": meta.get("step"), "tokens": meta.get("tokens_seen"), "loss": meta.get("loss"),
            "world_size": meta.get("world_size"),
            "train": {k: train[k] for k in ("seq_len", "micro_batch", "grad_accum", "lr", "min_lr", "warmup_steps",
                                             "weight_decay", "precision", "fp8", "tier_weights") if k in train},
            "extend": stage_cfg.get("extend"),
        })
    facts["training"] = training
    sft_data = finished_manifest(cfg, C.SFT_DATA) if source.is_chat else None
    if sft_data:
        facts["sft_data"] = [{"name": s.get("name"), "format": s.get("format"), "lang": s.get("lang"),
                              "origin": s.get("hf_id") or s.get("path")} for s in sft_data["config"]["sft_data"]["sources"]]
    report = evaluation_report(cfg)
    facts["evaluation"] = None
    if report is not None:
        facts["evaluation"] = {
            "summary": report.get("summary", {}),
            "checkpoints": [{k: c.get(k) for k in ("label", "stage", "step", "max_seq_len")}
                            for c in report.get("checkpoints", [])],
        }
    return facts


def evaluation_report(cfg: C.ExportStageConfig) -> dict | None:
    """Stage 8's report.json when stage 8 finished (the card's results), else None; a damaged one is named."""
    path = stage_dir(cfg.run, C.EVAL) / "report.json"
    if not (stage_done(cfg.run, C.EVAL) and path.is_file()):
        return None
    try:
        report = read_json(path)
    except (OSError, ValueError) as e:
        report = e
    if not isinstance(report, dict):
        raise UserError(f"{path} is unreadable ({report if isinstance(report, Exception) else 'not a JSON object'}): "
                        "the model card takes its results from it.\n"
                        f"  HINT: rerun `python 8_eval.py --config configs/<profile>/eval.yaml --force`")
    return report


def _version(facts: dict, dist: str) -> str:
    v = facts.get("versions", {}).get(dist)
    return f"{dist} {v}" if v else f"{dist} (not installed where this card was written: not verified here)"


def run_elsewhere_lines(facts: dict, repo_hint: str) -> list[str]:
    """The card's "Run it" section: vLLM, llama.cpp / Ollama (or why there is no GGUF), lm-eval, the YaRN caveat."""
    m, ck = facts["model"], facts["checkpoint"]
    out = ["## Run it", "",
           f"Verified with {_version(facts, 'transformers')} and {_version(facts, 'torch')} (stage 9 loads this "
           "folder back and compares it with the training code, see *Export verification*).", "",
           f"**vLLM** ({_version(facts, 'vllm')}): `vllm serve {repo_hint}`"
           + (" (the chat template is in tokenizer_config.json; stop ids in generation_config.json)." if ck["chat"] else "."),
           "",
           f"**lm-eval** ({_version(facts, 'lm_eval')}): `lm_eval --model hf --model_args pretrained={repo_hint},dtype="
           f"{facts['dtype']} --tasks <tasks>` (stage 8, `8_eval.py`, runs the same harness on the native checkpoint).", ""]
    g = facts.get("gguf")
    if g:
        first = g["files"][0]["file"]
        out += [f"**llama.cpp / Ollama** ({_version(facts, 'gguf')} wrote "
                + ", ".join(f"`{f['file']}`" for f in g["files"]) + f"; `tokenizer.ggml.pre = {g['pre_tokenizer']}`):", "",
                "```sh", f"llama-cli -m {first} -p \"Il futuro della tecnologia\" -n 64"
                + (" -cnv  # chat: the template is in the GGUF" if ck["chat"] else ""),
                f"llama-server -m {first}", "```", ""]
        if ck["chat"]:
            out += ["Ollama (`ollama create dante -f Modelfile`), with the template written out for Ollama:", "", "```",
                    f"FROM ./{first}",
                    'TEMPLATE """<|begin_of_text|>{{ range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>',
                    "", '{{ .Content }}<|eot|>{{ end }}<|start_header_id|>assistant<|end_header_id|>', "", '"""',
                    "PARAMETER stop <|eot|>", "PARAMETER stop <|end_of_text|>", "```", ""]
        else:
            out += [f"Ollama: a Modelfile with `FROM ./{first}`, then `ollama create dante -f Modelfile`.", ""]
        if g["exact"]:
            out.append(f"The GGUF names llama.cpp's `{g['pre_tokenizer']}` pre-tokenizer, which splits text exactly as "
                       "this tokenizer does (same regex list and merge rule), so llama.cpp gives the training ids.")
        else:
            mm = g.get("forced_id_mismatch", {})
            out.append(f"**Forced pre-tokenizer**: this tokenizer has no llama.cpp equivalent; the GGUF names "
                       f"`{g['pre_tokenizer']}` (export.gguf_pre_tokenizer), so llama.cpp tokenizes some text differently "
                       "from training. Held-out lines tokenized differently: "
                       + ", ".join(f"{lang} {r['lines_differing']}/{r['lines']} ({r['line_mismatch_rate']:.1%})"
                                   for lang, r in mm.items()) + ".")
        lc = g.get("llama_cpp", {})
        for r in lc.get("results", []):
            lg = r["logits"]
            out.append(f"- `{r['file']}` in llama.cpp (llama-cpp-python {lc['version']}): {r['tokenizer']['identical_to_expected']}/"
                       f"{r['tokenizer']['documents']} held-out documents tokenized as expected, max |Δ logit| "
                       f"{lg['max_abs_diff']:.3g} vs the native model on {lg['windows']} x {lg['tokens_per_window']} tokens"
                       + (f" (bound {lg['bound']:.3g})" if "bound" in lg else " (quantized, not bounded)")
                       + f", top-1 agreement {lg['top1_agreement']:.2%}; token pieces give back the text on "
                       f"{r['tokenizer']['detokenized_exactly']}/{r['tokenizer']['documents']} documents.")
        res = lc.get("results") or []
        if res and res[0]["tokenizer"].get("python_detokenize_exact", 0) < res[0]["tokenizer"]["documents"]:
            out.append(f"- Note: `Llama.detokenize` of llama-cpp-python {lc['version']} truncates tokens longer than 32 bytes "
                       "(runs of spaces in code): it gave back the text on "
                       f"{res[0]['tokenizer']['python_detokenize_exact']}/{res[0]['tokenizer']['documents']} documents; "
                       "llama.cpp's own `llama_token_to_piece` (llama-cli, llama-server) is exact.")
        if lc.get("not_run"):
            out.append(f"- Not checked in llama.cpp: {lc['not_run']}.")
        out.append("")
    else:
        reasons = facts.get("gguf_refusal")
        out += ["**llama.cpp / Ollama**: no GGUF in this folder. " + (
            " ".join(reasons) if reasons else "export.gguf was off; rerun stage 9 with export.gguf: true."), ""]
    rope = m["rope_scaling"]
    if rope and rope.get("rope_type", rope.get("type")) == "yarn":
        out += [f"**YaRN caveat**: positions beyond {_fmt(rope.get('original_max_position_embeddings'))} tokens rely on YaRN "
                f"(factor {_fmt(rope.get('factor'))}, `rope_scaling` in config.json"
                + (", `llama.rope.scaling.*` in the GGUF" if g else "") + "). transformers, vLLM and llama.cpp implement "
                "it; a runtime that ignores `rope_scaling` silently computes other positions (only the first "
                f"{_fmt(rope.get('original_max_position_embeddings'))} tokens are then right), and some refuse it "
                "(ctranslate2: `rope_scaling` type `yarn` not implemented).", ""]
    return out


def render_model_card(facts: dict, model_name: str, license_id: str, repo_hint: str) -> str:
    m, ck = facts["model"], facts["checkpoint"]
    langs = sorted({d["lang"] for d in facts["data"]} - {None, "code"}) or ["it", "en"]
    lines = [
        "---",
        f"license: {license_id}",
        "language:", *[f"- {lang}" for lang in langs],
        "library_name: transformers",
        "pipeline_tag: text-generation",
        "tags:", "- dante", "- llama", "- italian",
        "---", "",
        f"# {model_name}", "",
        f"A {short_number(m['parameters'])}-parameter LLaMA-architecture language model trained from scratch with the Dante "
        f"pipeline on Italian, English and code. This folder is the {'instruction-tuned (SFT)' if ck['chat'] else 'base'} "
        f"checkpoint of stage `{ck['stage'] or 'external'}`, step {_fmt(ck['step'])}, in {facts['dtype']}. It loads in "
        "plain `transformers` (`LlamaForCausalLM`, no custom code).", "",
        "## Use", "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        f'model_id = "{repo_hint}"  # this folder, or its Hub id after --push-to-hub',
        "tok = AutoTokenizer.from_pretrained(model_id)",
        "model = AutoModelForCausalLM.from_pretrained(model_id)",
    ]
    if ck["chat"]:
        lines += ['ids = tok.apply_chat_template([{"role": "user", "content": "Ciao! Chi era Dante?"}],',
                  '                              add_generation_prompt=True, return_tensors="pt")',
                  "out = model.generate(ids, max_new_tokens=128)  # stops at <|eot|> (generation_config.json)",
                  "print(tok.decode(out[0, ids.shape[-1]:], skip_special_tokens=True))"]
    else:
        lines += ['ids = tok("Il futuro della tecnologia e della scienza", return_tensors="pt").input_ids',
                  "out = model.generate(ids, max_new_tokens=64)", "print(tok.decode(out[0]))"]
    lines += ["```", ""]
    lines += run_elsewhere_lines(facts, repo_hint)
    lines += ["## Architecture", ""]
    rope = m["rope_scaling"]
    rope_text = (f"RoPE θ={_fmt(m['rope_theta'])}" + (f", {rope.get('rope_type', rope.get('type'))} scaling ×{_fmt(rope.get('factor'))}"
                 f" from {_fmt(rope.get('original_max_position_embeddings'))} tokens" if rope else ""))
    lines += markdown_table(["", "value"], [
        ["parameters", m["parameters"]], ["d_model", m["dim"]], ["layers", m["n_layers"]],
        ["attention heads (query / key-value)", f"{m['n_heads']} / {m['n_kv_heads']}"], ["head dim", m["head_dim"]],
        ["SwiGLU hidden", m["ffn_hidden_dim"]], ["vocabulary", m["vocab_size"]], ["context", m["max_seq_len"]],
        ["positions", rope_text], ["norm", f"RMSNorm, eps {_fmt(m['norm_eps'])}"],
        ["tied input/output embeddings", m["tie_embeddings"]],
    ])
    tok = facts.get("tokenizer")
    if tok:
        lines += ["", f"Tokenizer: byte-level BPE, {_fmt(tok['vocab_size'])} tokens, `{tok['pretokenizer']}` pre-tokenization"
                  + (" (Italian contractions kept whole)." if tok["pretokenizer"] == "dante" else ".")]
    lines += ["", "## Training data", ""]
    data = facts["data"]
    if data:
        total = sum(d["train_tokens"] or 0 for d in data)
        rows = [[d["source"], d["lang"], d["tier"], d["origin"], d["docs"], d["chars"], d["train_tokens"],
                 f"{100 * d['train_tokens'] / total:.1f}%" if total and d["train_tokens"] else ""] for d in data]
        lines += markdown_table(["source", "language", "quality tier", "origin", "documents", "characters",
                         "training tokens", "share"], rows)
        weights = next((t["train"].get("tier_weights") for t in facts["training"] if t["stage"] == C.PRETRAIN), None)
        if weights:
            lines += ["", "Pretraining samples the tiers with weights "
                      + ", ".join(f"tier {k}: {_fmt(v)}" for k, v in weights.items()) + "."]
    else:
        lines.append("The corpus manifest (stage 1) is not part of this run's files: data mix not recorded.")
    if facts.get("sft_data"):
        lines += ["", "Instruction data (stage 6):", ""]
        lines += markdown_table(["source", "format", "language", "origin"],
                        [[s["name"], s["format"], s["lang"], s["origin"]] for s in facts["sft_data"]])
    lines += ["", "## Training", ""]
    if facts["training"]:
        rows = []
        for t in facts["training"]:
            tr = t["train"]
            batch = (tr.get("micro_batch") or 0) * (tr.get("grad_accum") or 0) * (t["world_size"] or 1)
            precision = (tr["precision"] + (" + FP8" if tr.get("fp8") else "")) if tr.get("precision") else None
            rows.append([t["stage"], t["step"], t["tokens"], t["loss"], tr.get("seq_len"), batch or None,
                         tr.get("lr"), tr.get("warmup_steps"), precision])
        lines += markdown_table(["stage", "steps", "tokens seen", "last loss", "sequence length", "sequences per step",
                         "peak lr", "warmup steps", "precision"], rows)
        ext = next((t["extend"] for t in facts["training"] if t["stage"] == C.EXTEND and t["extend"]), None)
        if ext:
            lines += ["", f"Context extension (stage 5): {ext.get('mode')} to {_fmt(ext.get('new_max_seq_len'))} tokens"
                      + (f", factor {_fmt(ext.get('factor'))}" if ext.get("mode") != "continued" else "") + "."]
        lines += ["", "AdamW with cosine decay to min_lr; numbers from each stage's checkpoint meta.json and manifest."]
    else:
        lines.append("No training metadata found beside the checkpoint.")
    lines += ["", "## Evaluation", ""]
    ev = facts.get("evaluation")
    if ev is None or not ev["summary"]:
        lines.append("Not evaluated: stage 8 (`8_eval.py`) has no report for this run.")
    else:
        labels = list(ev["summary"])
        info = {c["label"]: c for c in ev["checkpoints"]}

        def heading(label: str) -> str:
            c = info.get(label, {})
            this = c.get("stage") == ck["stage"] and c.get("step") == ck["step"]
            return f"{label} (step {_fmt(c.get('step'))}){' = this model' if this else ''}"

        metrics = sorted({k for s in ev["summary"].values() for k in s})
        lines += markdown_table(["metric", *[heading(lb) for lb in labels]],
                        [[k, *[ev["summary"][lb].get(k, "") for lb in labels]] for k in metrics])
        lines += ["", "From `08_eval/report.json` of this run (bpb = bits per byte, comparable across tokenizers; "
                  "ppl = perplexity per token of this tokenizer; acc = multiple-choice accuracy)."]
        if not any(c.get("stage") == ck["stage"] and c.get("step") == ck["step"] for c in ev["checkpoints"]):
            lines.append(f"This exact checkpoint ({ck['stage'] or ck['path']}, step {_fmt(ck['step'])}) was not part "
                         "of that evaluation: rerun `8_eval.py` to measure it.")
    v = facts.get("verification")
    lines += ["", "## Export verification", ""]
    if v:
        lg = v["logits"]
        lines.append(f"This folder was loaded back with `AutoModelForCausalLM`/`AutoTokenizer` and compared with the native "
                     f"Dante model in fp32 on {lg['windows']} windows of {lg['tokens_per_window']} held-out tokens: max |Δ logit| "
                     f"= {lg['max_abs_diff']:.3g} (bound {lg['bound']:.3g}); greedy continuations identical for "
                     f"{v['greedy']['identical']}/{v['greedy']['prompts']} prompts ({v['greedy']['tokens']} tokens); "
                     f"tokenizer ids identical on {v['tokenizer']['documents']} documents.")
        if "chat_template" in v:
            lines.append(f"The chat template gives the training ids on {v['chat_template']['identical']}/"
                         f"{v['chat_template']['conversations']} conversations.")
        if facts["dtype"] != "float32":
            lines.append(f"Rounding the weights to {facts['dtype']} changes the logits by at most "
                         f"{v['dtype_rounding_max_abs_logit_change']:.3g} on the first window.")
    else:
        lines.append("Not verified (export.verify was false).")
    lines += ["", "## Intended use", "",
              "Research on Italian/English language modelling and a starting point for fine-tuning. "
              + ("As an SFT model it follows the chat template in `tokenizer_config.json`; " if ck["chat"] else
                 "It is a base model: it continues text and does not follow instructions; ")
              + "it is not a product and has no safety tuning.", "",
              "## Limitations", "",
              "- Small models trained on limited data make factual errors and can produce fluent nonsense; check "
              "anything that matters.",
              "- Trained only on the sources listed above: other languages and domains are out of scope, and the "
              "style, era and biases of those texts carry over.",
              f"- Context is {_fmt(m['max_seq_len'])} tokens; longer inputs are not supported.",
              "- No safety alignment or content filtering.", "",
              "## License", "", f"{license_id} (as stated by the exporter; check the licenses of the training data above).", ""]
    return "\n".join(lines)
