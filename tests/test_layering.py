"""The package's import direction (docs/DESIGN.md, "The package"): no circle, no upward import.

Every module of ``dante/`` has a layer below; a module may import modules of its own layer or lower,
never higher, and the import graph (module-level and in-function imports alike, read with ``ast``)
has no circle. A new module must be given a layer here, which is the moment to think about where it
belongs. ``model.py``, ``rope.py`` and ``loss.py`` are pure math: torch and the standard library only.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "dante"

# layer: modules. A package's entry covers its modules too ("config" covers config.schema ...). Same as the
# table "The package" in docs/DESIGN.md: keep both in step.
LAYERS: dict[int, list[str]] = {
    0: ["errors", "report_format"],                       # stdlib only
    1: ["config"],                                        # typed config: errors, yaml
    2: ["artifacts", "rope", "loss", "dedup"],            # run folders/manifests; pure math; stage 1's key set
    3: ["model", "cli", "metrics", "corpus", "corpus_chunks", "pretokenizers"],  # transformer; CLI; logs; stage 1, its chunks; regexes
    4: ["tokenizer", "flops"],                            # stage 2; FLOP/memory model and --dry-run plan
    5: ["shards", "fast_encode", "sft_packing", "chat_format", "sft_data", "fertility", "checkpoint"],  # stages 3 (+ its tiktoken path), 6; checkpoints
    6: ["pretrain_data", "kernels", "transforms", "distributed", "prefetch", "backends", "engine", "sft_train",
        "evaluation"],  # training (stages 4, 5, 7); stage 8
    7: ["export", "extend"],                              # stage 9; stage 5 (uses stage 8's measurements)
}

# pure math: torch, the standard library, the typed ModelConfig (dataclasses, no I/O) and each other
PURE_MATH = {"model", "rope", "loss"}
PURE_MATH_MAY_USE = PURE_MATH | {"config"}


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts) or "__init__"


def project_imports(path: Path) -> set[str]:
    """The dante modules ``path`` imports (``from dante.x import y`` counts dante.x and, when y is a
    module, dante.x.y), anywhere in the file."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    out: set[str] = set()
    known = {module_name(p) for p in PACKAGE.rglob("*.py")}
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for n in names:
            if n == "dante" or not n.startswith("dante."):
                continue
            mod = n[len("dante."):]
            if mod in known:
                out.add(mod)
    return out


def layer_of() -> dict[str, int]:
    """Every module's layer (a package's entry gives its submodules the same layer)."""
    entries = {m: layer for layer, mods in LAYERS.items() for m in mods}
    out = {}
    for mod in graph():
        parts = mod.split(".")
        for i in range(len(parts), 0, -1):
            if ".".join(parts[:i]) in entries:
                out[mod] = entries[".".join(parts[:i])]
                break
    return out


def graph() -> dict[str, set[str]]:
    return {module_name(p): project_imports(p) - {module_name(p)} for p in PACKAGE.rglob("*.py")}


def test_every_module_has_a_layer():
    missing = sorted(set(graph()) - set(layer_of()) - {"__init__"})
    stale = sorted({m for mods in LAYERS.values() for m in mods} - {m.split(".")[0] for m in graph()})
    assert not stale, f"tests/test_layering.py names modules that no longer exist: {stale}"
    assert not missing, f"give these modules a layer in tests/test_layering.py (and docs/DESIGN.md): {missing}"


def test_no_upward_import():
    layers, bad = layer_of(), []
    for mod, deps in graph().items():
        for dep in deps:
            if mod in layers and dep in layers and layers[dep] > layers[mod]:
                bad.append(f"dante.{mod} (layer {layers[mod]}) imports dante.{dep} (layer {layers[dep]})")
    assert not bad, "upward imports:\n" + "\n".join(sorted(bad))


def test_no_import_circle():
    g = graph()
    state: dict[str, int] = {}
    stack: list[str] = []
    circles: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(g.get(m, ())):
            # a package's __init__ re-exporting its own modules is not a circle through the package
            if d.startswith(m + ".") or m.startswith(d + "."):
                continue
            if state.get(d) == 1:
                circles.append(" -> ".join(stack[stack.index(d):] + [d]))
            elif d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m)
    assert not circles, "import circles:\n" + "\n".join(circles)


def test_pure_math_modules_import_only_torch():
    bad = []
    for name in PURE_MATH:
        tree = ast.parse((PACKAGE / f"{name}.py").read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            for m in mods:
                top = m.split(".")[0]
                allowed = top in {"torch", "__future__", "dante"} or top in sys.stdlib_module_names
                if not allowed or (top == "dante" and m.split(".")[1] not in PURE_MATH_MAY_USE):
                    bad.append(f"dante/{name}.py imports {m}")
    assert not bad, "\n".join(bad)


def test_no_script_imported():
    scripts = {p.stem for p in ROOT.glob("[0-9]_*.py")}
    bad = []
    for p in list(PACKAGE.rglob("*.py")) + list(ROOT.glob("[0-9]_*.py")):
        text = p.read_text(encoding="utf-8")
        bad += [f"{p.relative_to(ROOT)} imports {s}" for s in scripts if f"import_module(\"{s}\")" in text
                or f"import {s}" in text]
    assert not bad, "\n".join(bad)
