"""The softprompt demo: learn a soft prompt for topic classification on the embedded SmolLM2,
compare it with a hand-written prompt on held-out examples, save it, reload it and generate.

Run it with scripts/demo.sh (which bootstraps everything), or directly once installed.
"""
from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

from softprompt.artifact import load_artifact
from softprompt.base_model import load_base
from softprompt.data.readers import read_examples
from softprompt.encoding import PromptFormat
from softprompt.generate import SamplingParams, generate
from softprompt.scoring import label_accuracy
from softprompt.template import parse_template
from softprompt.train import TrainConfig, train

HERE = Path(__file__).resolve().parent
LABELS = ["food", "sports", "weather", "technology"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="runs/topic-prompt", help="where to save the prompt")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=8)
    ap.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                    help="auto (default): bf16 where the CPU runs it natively (AMX, AVX-512-BF16), else fp32")
    args = ap.parse_args()
    warnings.filterwarnings("ignore", message=".*past_key_values.* is deprecated")  # transformers 5.x renaming

    t0 = time.time()
    base = load_base("smollm2")
    print(f"base model: SmolLM2-135M-Instruct on {base.device} ({time.time() - t0:.1f}s to load)")
    train_set = read_examples(HERE / "train.jsonl")
    dev_set = read_examples(HERE / "dev.jsonl")
    test_set = read_examples(HERE / "test.jsonl")

    # 1. The hand-written prompt, scored by ranking the label words (no training).
    hard = PromptFormat(base.tokenizer, parse_template((HERE / "hard_prompt.txt").read_text()), max_length=base.max_positions)
    hard_acc = label_accuracy(base.model, None, hard, test_set, LABELS)

    # 2. Learn a soft prompt: 8 virtual tokens, initialized from a short instruction.
    cfg = TrainConfig(model="smollm2", tokens=args.tokens, init="text:Classify the topic of this text:",
                      steps=args.steps, batch_size=args.batch_size, lr=0.03, eval_every=10, seed=0, precision=args.precision)
    res = train(cfg, train_set, dev_set, args.out, base=base)
    prec = res.metrics.get("precision") or load_artifact(res.out, base=base).meta["precision"]
    print(f"trained {res.steps_done} steps in {prec['dtype']} ({prec['setting']}: {prec['reason']}; {prec['hardware']})")

    # 3. Reload it from disk (checked against the base model's fingerprint) and score held-out examples.
    art = load_artifact(res.out, base=base)
    fmt = art.prompt_format(base)
    soft_acc = label_accuracy(base.model, art.prompt, fmt, test_set, LABELS)

    print()
    print(f"held-out accuracy on {len(test_set)} examples (label ranking, 4 classes, chance 0.25):")
    print(f"  hand-written prompt ({len(hard.prompt_ids(test_set[0]))} prompt tokens with the first input): {hard_acc:.3f}")
    print(f"  soft prompt ({art.prompt.n_virtual} virtual tokens, {sum(p.numel() for p in art.prompt.parameters())} parameters): {soft_acc:.3f}")
    print(f"  saved to {res.out} (prompt.safetensors, prompt.json, metrics.jsonl, loss.png)")

    # 4. Generate with it, streamed.
    print("\ngeneration with the soft prompt (greedy):")
    for text in ["The striker scored twice before half-time.", "Add the garlic once the onions turn golden.",
                 "Expect heavy snow across the north tonight."]:
        print(f"  {text!r} -> ", end="", flush=True)
        generate(base, art.prompt, fmt, [text], SamplingParams(max_new_tokens=8), stream=lambda i, s: print(s, end="", flush=True))
        print()
    print(f"\ndone in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
