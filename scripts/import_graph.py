#!/usr/bin/env python3
"""The package's import graph, read from the code: checks that it has no cycle and no upward edge
between layers, and draws the layers for docs/architecture.md.

    python scripts/import_graph.py            # print the layers, the edges between them, and any violation
    python scripts/import_graph.py --write    # also rewrite the diagram in docs/architecture.md
    python scripts/import_graph.py --check    # exit 1 on a cycle, an upward edge, an unplaced module or a stale diagram

Every import of a ``softprompt`` module counts, at module level or inside a function (a lazy import is
still a dependency). A module may import modules of its own layer or of layers below it.
"""
from __future__ import annotations

import argparse
import ast
import sys
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"
DOC = REPO / "docs" / "architecture.md"
BEGIN, END = "<!-- import-graph:begin -->", "<!-- import-graph:end -->"

# bottom to top: (layer, what it holds, module prefixes)
LAYERS: list[tuple[str, str, tuple[str, ...]]] = [
    ("foundation", "errors, atomic files, precision and hardware probes, the transformers cache name",
     ("errors", "atomic", "precision", "hardware", "hf_cache")),
    ("data", "templates, examples, readers, recipes", ("template", "data")),
    ("model", "base model, prompt kinds, the KV prefix, encoding, init, optimizer, prepacked frozen weights, plots, task metrics",
     ("base_model", "prompts", "kv_prefix", "encoding", "chat", "init", "batching", "optim", "distributed", "plots",
      "task_metrics", "onednn", "frozen")),
    ("operations", "objectives, scoring, generation, artifacts, PEFT, vLLM and TensorRT-LLM interchange",
     ("objectives", "scoring", "generate", "artifact", "peft_io", "export_formats")),
    ("jobs", "training, evaluation, compression, interpretation, the lm-eval harness model",
     ("train", "evaluate", "compress", "interpret", "harness")),
    ("serving", "registry, engine, HTTP API, web studio", ("serve",)),
    ("interface", "the command line", ("cli", "__main__")),
]


def module_name(path: Path) -> str:
    rel = path.relative_to(SRC).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted((SRC / "softprompt").rglob("*.py"))}


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The softprompt modules ``name`` imports (``from softprompt.x import y`` counts y when y is a module)."""
    out: set[str] = set()
    pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(pkg.split(".")[: len(pkg.split(".")) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t.startswith("softprompt") and t != name and t != "softprompt":
                out.add(t)
    return out


def layer_of(name: str) -> int | None:
    short = name.removeprefix("softprompt.")
    for i, (_, _, prefixes) in enumerate(LAYERS):
        if any(short == p or short.startswith(p + ".") for p in prefixes):
            return i
    return None


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    g = {m: imports(m, p, known) for m, p in mods.items()}
    # a package's __init__ importing its own submodules is how a package exposes them, not a cycle:
    # the edge that matters is the submodule importing the package (or a sibling through it).
    return {m: {t for t in deps if not t.startswith(m + ".")} for m, deps in g.items()}


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def violations(g: dict[str, set[str]]) -> tuple[list[str], list[tuple[str, str]], list[list[str]]]:
    unplaced = [m for m in g if m != "softprompt" and layer_of(m) is None]
    upward = [(a, b) for a, deps in g.items() for b in deps
              if layer_of(a) is not None and layer_of(b) is not None and layer_of(b) > layer_of(a)]
    return unplaced, sorted(upward), cycles(g)


def diagram(g: dict[str, set[str]]) -> str:
    """A Mermaid flowchart: one box per layer listing its modules, an arrow per layer pair that imports."""
    by_layer: dict[int, list[str]] = defaultdict(list)
    for m in g:
        if layer_of(m) is not None:
            by_layer[layer_of(m)].append(m.removeprefix("softprompt."))
    edges: dict[tuple[int, int], int] = defaultdict(int)
    for a, deps in g.items():
        for b in deps:
            la, lb = layer_of(a), layer_of(b)
            if la is not None and lb is not None and la != lb:
                edges[la, lb] += 1
    lines = ["```mermaid", "flowchart TB"]
    for i in reversed(range(len(LAYERS))):
        name, what, _ = LAYERS[i]
        packages = {m.split(".")[0] for m in by_layer[i] if "." in m}
        mods = sorted({m.split(".")[0] + ("/" if m.split(".")[0] in packages else "") for m in by_layer[i]})
        lines.append(f'  L{i}["<b>{name}</b>: {what}<br/>{", ".join(mods)}"]')
    for (a, b), n in sorted(edges.items(), reverse=True):
        lines.append(f"  L{a} -->|{n}| L{b}")
    lines.append("```")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--write", action="store_true", help="rewrite the diagram in docs/architecture.md")
    ap.add_argument("--check", action="store_true", help="exit 1 on any violation or a stale diagram")
    args = ap.parse_args()
    g = graph()
    unplaced, upward, cyc = violations(g)
    text = diagram(g)
    print(text)
    print(f"\n{len(g)} modules, {sum(len(d) for d in g.values())} import edges")
    for m in unplaced:
        print(f"unplaced module (add it to a layer in scripts/import_graph.py): {m}")
    for a, b in upward:
        print(f"upward edge: {a} ({LAYERS[layer_of(a)][0]}) imports {b} ({LAYERS[layer_of(b)][0]})")
    for c in cyc:
        print("cycle: " + " -> ".join(c))
    doc = DOC.read_text()
    block = f"{BEGIN}\n{text}\n{END}"
    stale = BEGIN not in doc or doc[doc.index(BEGIN): doc.index(END) + len(END)] != block
    if args.write and stale:
        if BEGIN in doc:
            doc = doc[: doc.index(BEGIN)] + block + doc[doc.index(END) + len(END):]
        else:
            doc = doc.rstrip("\n") + "\n\n" + block + "\n"
        DOC.write_text(doc)
        stale = False
        print(f"wrote the diagram into {DOC.relative_to(REPO)}")
    if stale:
        print(f"{DOC.relative_to(REPO)}: the diagram is not the code's (run scripts/import_graph.py --write)")
    bad = bool(unplaced or upward or cyc)
    if not bad:
        print("no cycle, no upward edge")
    return 1 if args.check and (bad or stale) else 0


if __name__ == "__main__":
    sys.exit(main())
