"""The import graph has no cycle and no upward edge between layers, every module has a layer, and
docs/architecture.md shows the graph the code has (scripts/import_graph.py)."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "import_graph.py"


def _tool():
    spec = importlib.util.spec_from_file_location("import_graph", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_no_cycle_no_upward_edge_and_the_diagram_is_current():
    r = subprocess.run([sys.executable, str(SCRIPT), "--check"], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "no cycle, no upward edge" in r.stdout


def test_the_checker_finds_cycles_and_upward_edges():
    tool = _tool()
    g = tool.graph()
    assert "softprompt.train" in g["softprompt.cli.train"] or any(d.startswith("softprompt.train") for d in g["softprompt.cli.train"])
    bad = {k: set(v) for k, v in g.items()}
    bad["softprompt.errors"].add("softprompt.train")  # foundation importing a job: upward, and a cycle
    unplaced, upward, cycles = tool.violations(bad)
    assert ("softprompt.errors", "softprompt.train") in upward
    assert any("softprompt.errors" in c and "softprompt.train" in c for c in cycles)
    bad = {k: set(v) for k, v in g.items()}
    bad["softprompt.foo"] = set()
    assert tool.violations(bad)[0] == ["softprompt.foo"]


def test_lazy_imports_count(tmp_path):
    tool = _tool()
    path = REPO / "src" / "softprompt" / "cli" / "serve.py"
    deps = tool.imports("softprompt.cli.serve", path, set(tool.modules()))
    assert "softprompt.serve.app" in deps  # imported inside run(), still a dependency
