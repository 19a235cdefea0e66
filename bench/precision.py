"""Which precision is fast where: fp32 and bf16 training steps on SmolLM2, on this CPU as it is and on
the same CPU limited to AVX2 (``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2``, which makes torch
and oneDNN run exactly the kernels an AVX2-only CPU runs), side by side in one run, with the matmul
peaks measured in each setting and what ``--precision auto`` picks there.

    python bench/precision.py [--steps 3] [--quick]

Writes bench/results/precision.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
AVX2 = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}


def child(precision: str, steps: int, batch_size: int) -> dict:
    """One setting, in this process: hardware report, what auto resolves to, timed training steps."""
    import warnings

    warnings.filterwarnings("ignore")
    from softprompt.base_model import load_base
    from softprompt.data.readers import read_examples
    from softprompt.hardware import hardware_report
    from softprompt.precision import resolve_precision
    from softprompt.train import TrainConfig, Trainer

    hw = hardware_report()
    base = load_base("smollm2", device="cpu")
    cfg = TrainConfig(tokens=8, init="text:Classify the topic of this text:", steps=steps + 1, batch_size=batch_size,
                      precision=precision, seed=0, device="cpu")
    t = Trainer(cfg, read_examples(REPO / "examples" / "topic" / "train.jsonl"), None, "/tmp/softprompt-precision-bench",
                base=base, progress=False)
    t.train_step()  # warm-up
    times = [t.train_step()["time_s"] for _ in range(steps)]
    return {"hardware": hw, "auto_resolves_to": resolve_precision("auto", "cpu", announce=False).dtype,
            "resolved": t.precision.to_meta(), "step_s": statistics.median(times), "step_times": times}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--quick", action="store_true", help="1 step each, nothing saved")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.quick:
        args.steps = 1
    if args.child:
        print("RESULT " + json.dumps(child(args.child, args.steps, args.batch_size)), flush=True)
        return
    rows, started = [], time.time()
    for cpu, extra in (("as is", {}), ("limited to AVX2", AVX2)):
        for precision in ("fp32", "bf16"):
            env = {**os.environ, **extra, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
            out = subprocess.run([sys.executable, __file__, "--child", precision, "--steps", str(args.steps),
                                  "--batch-size", str(args.batch_size)], env=env, capture_output=True, text=True)
            line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if line is None:
                raise SystemExit(f"child failed ({cpu}, {precision}):\n{out.stderr[-3000:]}")
            r = {"cpu": cpu, "precision": precision, **json.loads(line[7:])}
            rows.append(r)
            hw = r["hardware"]
            print(f"{cpu:<16} {precision}: {r['step_s']:.2f} s/step; matmul fp32 {hw['matmul_gflops']['fp32']} / bf16 "
                  f"{hw['matmul_gflops']['bf16']} GFLOP/s; auto -> {r['auto_resolves_to']}", flush=True)
    by = {(r["cpu"], r["precision"]): r for r in rows}
    md = ["# Precision by CPU: fp32 and bf16 training steps on SmolLM2-135M", "",
          f"Topic demo task, batch {args.batch_size}, 8 virtual tokens; median of {args.steps} steps after one warm-up. "
          "'limited to AVX2' is the same CPU with `ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2`: "
          "torch, oneDNN and MKL "
          "then run the kernels an AVX2-only CPU runs (bf16 matmuls emulated). All rows from one run "
          f"({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}).", "",
          "| CPU | ISA seen | precision | s/step | matmul fp32 GFLOP/s | matmul bf16 GFLOP/s | `auto` picks |",
          "|---|---|---|---:|---:|---:|---|"]
    for r in rows:
        hw = r["hardware"]
        md.append(f"| {hw['cpu_model']}, {r['cpu']} | {hw['isa']} (torch {hw['torch_cpu_capability']}) | {r['precision']} | "
                  f"{r['step_s']:.2f} | {hw['matmul_gflops']['fp32']} | {hw['matmul_gflops']['bf16']} | {r['auto_resolves_to']} |")
    for cpu in ("as is", "limited to AVX2"):
        f, b = by[cpu, "fp32"], by[cpu, "bf16"]
        auto = by[cpu, f["auto_resolves_to"]]
        md.append("")
        md.append(f"- {cpu}: bf16 steps take {b['step_s'] / f['step_s']:.2f}x the fp32 time; `auto` picks "
                  f"{f['auto_resolves_to']} ({auto['step_s']:.2f} s/step, the faster of the two: "
                  f"{'yes' if auto['step_s'] <= min(f['step_s'], b['step_s']) * 1.05 else 'no'}).")
    print("\n".join(md))
    if args.quick:
        return
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "precision.json").write_text(json.dumps({"steps": args.steps, "batch_size": args.batch_size, "rows": rows,
                                                        "wall_s": time.time() - started}, indent=2) + "\n")
    (RESULTS / "precision.md").write_text("\n".join(md) + "\n")
    print(f"saved {RESULTS}/precision.json, precision.md")


if __name__ == "__main__":
    main()
