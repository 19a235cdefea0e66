"""Same numbers before and after a refactor: trains each kind for a few fp32 steps on SmolLM2 with the
code at this checkout, records the prompt tensors, dev loss, label accuracy and greedy outputs, and
(with --compare OTHER.json) checks that another checkout produced exactly the same.

    PYTHONPATH=<checkout>/src python bench/refactor_equivalence.py --out A.json
    PYTHONPATH=<other>/src   python bench/refactor_equivalence.py --out B.json --compare A.json

Works with the API before the architecture refactor too (records/examples modules, bf16 flag).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import warnings
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
TOPIC = REPO / "examples" / "topic"
LABELS = ["food", "sports", "weather", "technology"]


def api():
    try:
        from softprompt.data.readers import read_examples
        from softprompt.scoring import label_accuracy as accuracy
        precision = {"precision": "fp32"}
    except ImportError:  # before the refactor
        from softprompt.records import read_examples
        from softprompt.scoring import accuracy
        precision = {"bf16": False}
    return read_examples, accuracy, precision


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--compare")
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(2)
    try:
        from softprompt.base_model import load_base
    except ImportError:
        from softprompt.base import load_base
    from softprompt.artifact import load_artifact
    from softprompt.generate import SamplingParams, generate
    from softprompt.train import TrainConfig, Trainer

    read_examples, accuracy, precision = api()
    base = load_base("smollm2", device="cpu")
    train, dev, test = (read_examples(TOPIC / f"{s}.jsonl") for s in ("train", "dev", "test"))
    out = {}
    for kind in ("prompt-tuning", "p-tuning", "prefix"):
        cfg = TrainConfig(kind=kind, tokens=8, init="text:Classify the topic of this text:", steps=args.steps, batch_size=8,
                          seed=0, device="cpu", **precision)
        res = Trainer(cfg, train, dev[:8], f"/tmp/refactor-equivalence/{kind}", base=base, progress=False).run()
        art = load_artifact(res.out, base=base)
        fmt = art.prompt_format(base)
        tensors = {k: hashlib.sha256(v.contiguous().numpy().tobytes()).hexdigest()
                   for k, v in sorted(art.prompt.export_tensors().items())}
        out[kind] = {"losses": [h["loss"] for h in json_lines(res.out / "metrics.jsonl")],
                     "tensors_sha256": tensors, "accuracy": accuracy(base.model, art.prompt, fmt, test[:16], LABELS),
                     "greedy": generate(base, art.prompt, fmt, [e.fields["input"] for e in test[:3]], SamplingParams(6))}
        print(kind, out[kind]["accuracy"], out[kind]["greedy"], flush=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    if args.compare:
        other = json.loads(Path(args.compare).read_text())
        same = other == out
        print("identical to", args.compare, ":", same)
        if not same:
            for kind in out:
                for k in out[kind]:
                    if out[kind][k] != other.get(kind, {}).get(k):
                        print(f"  differs: {kind} {k}: {other.get(kind, {}).get(k)} vs {out[kind][k]}")
            raise SystemExit(1)


def json_lines(path: Path) -> list[dict]:
    return [json.loads(ln) for ln in path.read_text().splitlines() if '"train"' in ln]


if __name__ == "__main__":
    main()
