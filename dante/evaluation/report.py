"""Stage 8's report: report.json (machine-readable), report.md (for people) and PNG plots.

Sections, each skipped with a note when its inputs are absent: a summary table per checkpoint;
perplexity and bits per byte per held-out language and validation tier; benchmarks (lm-eval) per task;
generation samples with tokens/s; long context (perplexity by position plot, passkey accuracy by length
and depth); tokenizer fertility (stage 2's ``fertility.json``, redrawn by ``dante.fertility.write_report``);
training and validation loss curves from the ``metrics.jsonl`` of the training stages present.

report.json layout: ``summary`` is the only mapping of numbers at the top level ({checkpoint: {metric:
value}}), so a consumer that flattens numeric leaves (the stage 9 model card does) lists the headline
numbers; everything detailed sits in lists (``checkpoints``, ``training``, ``notes``).

Plots use matplotlib's Agg backend (no display needed).

Example::

    paths = write_report(stage_dir, cfg, results, notes)   # report.json, report.md, *.png
"""

from __future__ import annotations

from pathlib import Path

from dante import config as C
from dante import fertility
from dante.artifacts import atomic_path, atomic_write_json, atomic_write_text, read_json, stage_dir, stage_done
from dante.metrics import read_metrics
from dante.report_format import markdown_table

FORMAT_VERSION = 1


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    _pyplot().close(fig)


# ---------------------------------------------------------------------------------------------------
# Summary
# ---------------------------------------------------------------------------------------------------


def summarize(result: dict) -> dict:
    """The headline numbers of one checkpoint (flat {metric: value})."""
    s: dict = {}
    for lang, r in result.get("perplexity", {}).get("heldout", {}).items():
        s[f"bpb_{lang}"], s[f"ppl_{lang}"] = r["bpb"], r["ppl"]
    for tier, r in result.get("perplexity", {}).get("shards", {}).items():
        if "bpb" in r:
            s[f"bpb_val_{tier}"], s[f"ppl_val_{tier}"] = r["bpb"], r["ppl"]
    for task, m in result.get("benchmarks", {}).get("tasks", {}).items():
        for metric in ("acc", "acc_norm"):
            if metric in m:
                s[f"{task}_{metric}"] = m[metric]
    pk = result.get("long_context", {}).get("passkey")
    if pk:
        s["passkey_rank_accuracy"], s["passkey_greedy_accuracy"] = pk["rank_accuracy"], pk["greedy_accuracy"]
    gens = result.get("generation", [])
    if gens:
        s["generation_tokens_per_s"] = sum(g["tokens_per_s"] for g in gens) / len(gens)
    return s


# ---------------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------------


def training_curves(run: C.RunConfig) -> list[dict]:
    """Train/val loss records of the training stages present (stages without metrics are left out)."""
    curves = []
    for stage in C.CHECKPOINT_STAGES:
        d = stage_dir(run, stage)
        train, val = read_metrics(d, "train"), read_metrics(d, "val")
        if train or val:
            curves.append({"stage": stage, "done": stage_done(run, stage),
                           "train": [[r["step"], r["loss"]] for r in train if "loss" in r],
                           "val": [[r["step"], r["val_loss"]] for r in val if "val_loss" in r]})
    return curves


def plot_training(curves: list[dict], path: Path) -> None:
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(curves), figsize=(5 * len(curves), 3.6), squeeze=False)
    for ax, c in zip(axes[0], curves):
        if c["train"]:
            ax.plot(*zip(*c["train"]), lw=1, label="train")
        if c["val"]:
            ax.plot(*zip(*c["val"]), "o-", ms=3, label="validation")
        ax.set(title=c["stage"], xlabel="optimizer step", ylabel="loss (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend()
    _save(fig, path)


def plot_positions(results: list[dict], path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for r in results:
        pos = r.get("long_context", {}).get("position")
        if pos:
            centers = [b + pos["bucket_size"] / 2 for b in pos["bucket_start"]]
            line, = ax.plot(centers, pos["nll"], "o-", ms=3, label=f"{r['label']} (context {r['max_seq_len']})")
            original = (r.get("rope_scaling") or {}).get("original_max_position_embeddings")
            if original:  # where an extended model's pretraining context ended
                ax.axvline(original, color=line.get_color(), ls=":", lw=1)
    ax.set(xlabel="token position (bucket centre)", ylabel="mean loss (nats/token)",
           title="Loss by position (dotted: original context of a scaled model)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)


def plot_bpb(results: list[dict], path: Path) -> None:
    plt = _pyplot()
    sets = sorted({k for r in results for k in r.get("perplexity", {}).get("heldout", {})})
    fig, ax = plt.subplots(figsize=(1.8 + 1.3 * len(sets) * max(1, len(results)) / 2, 3.6))
    width = 0.8 / max(1, len(results))
    for i, r in enumerate(results):
        vals = [r["perplexity"]["heldout"].get(s, {}).get("bpb", 0.0) for s in sets]
        ax.bar([j + i * width for j in range(len(sets))], vals, width, label=r["label"])
    ax.set_xticks([j + width * (len(results) - 1) / 2 for j in range(len(sets))], sets)
    ax.set(ylabel="bits per byte (lower is better)", title="Held-out bits per byte")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=max(1, len(results)))
    _save(fig, path)


def fertility_section(run: C.RunConfig, out_dir: Path) -> tuple[list[str], dict | None, dict[str, str]]:
    """Markdown lines, the data and the files of the tokenizer fertility section: stage 2's report
    (02_tokenizer/fertility.json) redrawn here by stage 2's own writer (``dante.fertility.write_report``)."""
    path = stage_dir(run, C.TOKENIZER) / "fertility.json"
    if not path.is_file():
        return [f"Not available: {path} does not exist (stage 2 writes it when tokenizer.heldout is set)."], None, {}
    data = read_json(path)
    written = fertility.write_report(data, out_dir)
    table = Path(written["md"]).read_text(encoding="utf-8").splitlines()
    body = [line for line in table if not line.startswith("# ")]  # its own title; ours is the section header
    return ["![fertility](fertility.png)", "", f"From {path} (stage 2).", *body], data, \
        {f"fertility.{k}": v for k, v in written.items()}


# ---------------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------------


def write_report(out_dir: Path, cfg: C.EvalStageConfig, results: list[dict], notes: list[str]) -> dict[str, str]:
    """Write report.json, report.md and the plots into ``out_dir``; returns {name: path}."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, str] = {}
    md = [f"# Evaluation of run `{cfg.run.name}`", ""]
    summary = {r["label"]: summarize(r) for r in results}
    metrics = sorted({m for s in summary.values() for m in s})
    labels = [r["label"] for r in results]
    md += ["## Summary", "", *markdown_table(["", *labels],
                                     [["step", *[r.get("step") for r in results]],
                                      ["context (tokens)", *[r["max_seq_len"] for r in results]],
                                      *[[m, *[summary[k].get(m) for k in labels]] for m in metrics]]), ""]
    md += ["Bits per byte = total NLL / (ln 2 x UTF-8 bytes of the scored text): comparable across tokenizers; "
           "perplexity is per token of this run's tokenizer.", ""]

    md += ["## Perplexity and bits per byte", ""]
    rows = []
    for r in results:
        for kind, sets in (("held-out", r["perplexity"]["heldout"]), ("validation shard", r["perplexity"]["shards"])):
            for name, p in sets.items():
                rows.append([r["label"], kind, name, p.get("tokens"), p.get("bytes"), p.get("ppl"), p.get("bpb"),
                             p.get("stride"), p.get("skipped", "")])
    if rows:
        if any(r["perplexity"]["heldout"] for r in results):
            plot_bpb(results, out_dir / "bpb.png")
            written["bpb.png"] = str(out_dir / "bpb.png")
            md += ["![bits per byte](bpb.png)", ""]
        md += markdown_table(["checkpoint", "set", "name", "tokens", "bytes", "perplexity", "bits/byte", "stride", "note"], rows)
    else:
        md.append("No held-out text configured (eval.heldout) and no validation shards.")
    md.append("")

    md += ["## Benchmarks", ""]
    bench_rows = [[r["label"], task, m.get("n"), m.get("acc"), m.get("acc_stderr"), m.get("acc_norm"), m.get("acc_norm_stderr")]
                  for r in results for task, m in r.get("benchmarks", {}).get("tasks", {}).items()]
    if bench_rows:
        limit = next((r["benchmarks"].get("limit") for r in results if "benchmarks" in r), None)
        md += markdown_table(["checkpoint", "task", "examples", "acc", "± stderr", "acc_norm", "± stderr"], bench_rows)
        md += ["", "Log-likelihood multiple choice through lm-evaluation-harness "
               f"{next(r['benchmarks']['lm_eval_version'] for r in results if 'benchmarks' in r)}; acc_norm divides each "
               "choice's log-likelihood by its length in characters."
               + (f" Limited to {limit} examples per task: a smoke test, not comparable with published scores." if limit else "")]
    else:
        md.append("No benchmark task configured (eval.tasks).")
    md.append("")

    md += ["## Generation", ""]
    gen_rows = [[r["label"], "chat" if g["chat"] else "text", g["prompt"], g["text"][:400], g["new_tokens"],
                 g["tokens_per_s"], g["stop_reason"]] for r in results for g in r.get("generation", [])]
    if gen_rows:
        g0 = cfg.eval.generation
        md += [f"Sampling: temperature {g0.temperature}, top-p {g0.top_p}, top-k {g0.top_k or 'off'}, repetition "
               f"penalty {g0.repetition_penalty}, up to {g0.max_new_tokens} new tokens, seed {cfg.run.seed} + prompt index; "
               "tokens/s includes the prompt prefill.", ""]
        md += markdown_table(["checkpoint", "mode", "prompt", "output", "tokens", "tokens/s", "stop"], gen_rows)
    else:
        md.append("No generation (eval.generation.max_new_tokens is 0 or no prompt).")
    md.append("")

    md += ["## Long context", ""]
    if any("long_context" in r for r in results):
        plot_positions(results, out_dir / "perplexity_by_position.png")
        written["perplexity_by_position.png"] = str(out_dir / "perplexity_by_position.png")
        md += ["![perplexity by position](perplexity_by_position.png)", ""]
        pk_rows = [[r["label"], c["length"], c["depth"], c["trials"], c["rank_accuracy"], c["greedy_accuracy"]]
                   for r in results if "long_context" in r for c in r["long_context"]["passkey"]["cells"]]
        first = next(r["long_context"]["passkey"] for r in results if "long_context" in r)
        md += [f"Passkey retrieval: rank = the true 5-digit key scores above {first['candidates'] - 1} random distractor "
               f"keys by log-likelihood (chance {first['chance_rank_accuracy']:.2f}; a tie counts as a miss); greedy = "
               "greedy decoding outputs the key.", ""]
        md += markdown_table(["checkpoint", "length", "depth", "trials", "rank accuracy", "greedy accuracy"], pk_rows)
    else:
        md.append("Not measured (eval.long_eval.lengths empty or trials 0).")
    md.append("")

    md += ["## Tokenizer fertility", ""]
    fert_lines, fertility, fert_files = fertility_section(cfg.run, out_dir)
    written.update(fert_files)
    md += fert_lines + [""]

    md += ["## Training curves", ""]
    curves = training_curves(cfg.run)
    if curves:
        plot_training(curves, out_dir / "loss_curves.png")
        written["loss_curves.png"] = str(out_dir / "loss_curves.png")
        md += ["![loss curves](loss_curves.png)", "", "From the metrics.jsonl of " + ", ".join(c["stage"] for c in curves) + "."]
    else:
        md.append("No metrics.jsonl found for " + ", ".join(C.CHECKPOINT_STAGES) + ".")
    md.append("")
    if notes:
        md += ["## Notes", "", *[f"- {n}" for n in notes], ""]

    report = {"format_version": FORMAT_VERSION, "run": cfg.run.name, "summary": summary, "checkpoints": results,
              "training": curves, "fertility": [fertility] if fertility is not None else [], "notes": notes}
    atomic_write_json(out_dir / "report.json", report)
    atomic_write_text(out_dir / "report.md", "\n".join(md))
    written["report.json"], written["report.md"] = str(out_dir / "report.json"), str(out_dir / "report.md")
    return written
