"""The demo's wall time on this CPU as it is and limited to AVX2 kernels (what torch, oneDNN and MKL
run on an AVX2-only CPU: ``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2``),
one after the other in one run, with the precision ``--precision auto`` chose and the accuracies.

    python bench/demo_by_cpu.py [--name demo_by_cpu]

Writes bench/results/NAME.{json,md}. On a CPU whose torch already runs AVX2 kernels only, the limited
run would repeat the first, so it runs once.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
AVX2 = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}


def run(extra: dict) -> dict:
    env = {**os.environ, **extra, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("SOFTPROMPT_PRECISION", None)
    hw = subprocess.run([sys.executable, "-c", "import json; from softprompt.hardware import hardware_report; "
                         "print(json.dumps(hardware_report(measure=False)))"], env=env, capture_output=True, text=True, check=True)
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, str(REPO / "examples" / "topic" / "demo.py"), "--out", f"/tmp/softprompt-demo-bench{len(extra)}"],
                         env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if out.returncode:
        raise SystemExit(f"demo failed:\n{out.stderr[-3000:]}")
    text = out.stdout

    def grab(pattern: str) -> str:
        m = re.search(pattern, text)
        return m.group(1) if m else ""

    return {"kernels": "limited to AVX2" if extra else "as is", "hardware": json.loads(hw.stdout), "wall_s": round(wall, 1),
            "precision": grab(r"trained \d+ steps in (\w+)"), "reason": grab(r"trained \d+ steps in \w+ \((.*)\)\n"),
            "hand_written": float(grab(r"hand-written prompt .*: ([0-9.]+)") or "nan"),
            "soft": float(grab(r"soft prompt \(.*\): ([0-9.]+)") or "nan"), "env": extra}


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--name", default="demo_by_cpu", help="results file name under bench/results/")
    args = ap.parse_args()
    rows = [run({})]
    if rows[0]["hardware"]["torch_cpu_capability"] != "AVX2":  # on an AVX2-only CPU the limited run is the same run
        rows.append(run(AVX2))
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    md = ["# The demo on one CPU, as it is and limited to AVX2 kernels", "",
          f"`scripts/demo.sh` (examples/topic/demo.py, 30 steps of batch 8, `--precision auto`), once set up (model cached), "
          f"the two runs one after the other ({stamp}). Wall time includes loading the model, training, the held-out "
          "evaluation and generation.", "",
          "| CPU | torch kernels | `auto` chose | wall time | hand-written | soft prompt |", "|---|---|---|---:|---:|---:|"]
    for r in rows:
        hw = r["hardware"]
        md.append(f"| {hw['cpu_model']} [{hw['isa']}], {r['kernels']} | {hw['torch_cpu_capability']} | {r['precision']} | "
                  f"{r['wall_s']:.0f} s | {r['hand_written']:.3f} | {r['soft']:.3f} |")
    print("\n".join(md))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps({"date": stamp, "rows": rows}, indent=2) + "\n")
    (RESULTS / f"{args.name}.md").write_text("\n".join(md) + "\n")


if __name__ == "__main__":
    main()
