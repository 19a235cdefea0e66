"""Reading a real soft prompt: train a 20-token SST-2 prompt on SmolLM2 (from sampled-vocabulary and
from text initialization), then report its nearest tokens, projection fidelity and hardened prompts
beside a hand-written prompt. Saves bench/results/inspect_sst2.{json,md}.

    python bench/inspect_sst2.py [--steps 60] [--dev 100] [--harden-steps 20] [--quick]
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
DATA = REPO.parent / "shared" / "data"
BODY = "Review: {sentence}\nSentiment:"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--dev", type=int, default=100)
    ap.add_argument("--search", type=int, default=16, help="examples the hardening searches on")
    ap.add_argument("--harden-steps", type=int, default=20)
    ap.add_argument("--data-dir", type=Path, default=DATA)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.steps, args.dev, args.search, args.harden_steps = 2, 8, 4, 2

    from softprompt.base_model import load_base
    from softprompt.data import load_recipe, load_split
    from softprompt.encoding import PromptFormat
    from softprompt.hardware import hardware_line, hardware_report
    from softprompt.interpret.fidelity import divergence, hard_prompt, next_token_logits, projection_fidelity, task_score
    from softprompt.interpret.harden import harden
    from softprompt.interpret.report import fidelity_warning, nearest_report
    from softprompt.template import parse_template
    from softprompt.train import TrainConfig, Trainer

    base = load_base("smollm2", device="cpu")
    recipe = load_recipe("sst2")
    train = load_split(recipe, str(args.data_dir), "train", limit=960, seed=0)
    dev = load_split(recipe, str(args.data_dir), "dev", limit=args.dev + args.search, seed=0)
    search, held = dev[: args.search], dev[args.search:]
    labels = recipe.label_words
    hand = PromptFormat(base.tokenizer, parse_template(recipe.hard_prompt), chat=recipe.chat)
    hand_logits_score = task_score(base.model, None, hand, held, labels, bf16=True)
    out: dict = {"setup": {"steps": args.steps, "dev": len(held), "search": len(search), "harden_steps": args.harden_steps,
                           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())},
                 "hand_written": {"template": recipe.hard_prompt, **hand_logits_score}, "prompts": [],
           "hardware": hardware_report()}
    md = ["# Reading SST-2 soft prompts on SmolLM2-135M", "", hardware_line(out["hardware"]), ""]
    for init in ("vocab", "text:Is the sentiment of this movie review positive or negative? Answer"):
        t0 = time.time()
        cfg = TrainConfig(model="smollm2", template=f"[soft:20] {BODY}", init=init, steps=args.steps, lr=0.03,
                          precision="bf16", seed=0)
        with tempfile.TemporaryDirectory() as tmp:
            tr = Trainer(cfg, train, None, Path(tmp) / "p", base=base, progress=False)
            tr.run()
        prompt, fmt = tr.prompt.eval(), tr.fmt
        near = nearest_report(prompt.vectors().detach(), base.embedding.weight, base.tokenizer, 5)
        fid = projection_fidelity(base, prompt, fmt, held, labels, bf16=True)
        soft_logits = next_token_logits(base.model, prompt, fmt, held, bf16=True)
        hardened = []
        for method in ("greedy", "pez"):
            res = harden(base, prompt, fmt, search, method, steps=args.harden_steps, lr=0.05)
            hp = hard_prompt(res.ids, base.embedding)
            d = divergence(soft_logits, next_token_logits(base.model, hp, fmt, held, bf16=True))
            hardened.append({"method": method, "text": base.tokenizer.decode(res.ids), "search_start": res.start_loss,
                             "search_end": res.loss, "held_out_kl": d["kl"], "held_out_top1": d["top1_agreement"],
                             **task_score(base.model, hp, fmt, held, labels, bf16=True)})
        row = {"init": init, "seconds": time.time() - t0, "nearest": near, "fidelity": fid, "hardened": hardened}
        out["prompts"].append(row)
        norms = [t["norm_percentile"] for t in near["tokens"]]
        md += [f"## Prompt initialized from `{init[:40]}`", "",
               "Nearest tokens by cosine (first 8 virtual tokens): "
               + ", ".join(f"`{t['cosine'][0]['token']}`" for t in near["tokens"][:8]),
               f"; norm percentiles among the vocabulary: median {sorted(norms)[len(norms) // 2]:.0f}, max {max(norms):.0f}.", "",
               fidelity_warning(fid), "",
               "| Prompt | Text in the slots | Held-out KL | Top-1 agreement | Accuracy |", "|---|---|---|---|---|",
               f"| soft prompt | (20 vectors) | (reference) | (reference) | {fid['soft']['value']:.3f} |",
               f"| nearest-token projection | `{''.join(fid['projected_tokens'])!r}` | {fid['kl']:.3f} | {fid['top1_agreement']:.3f} | "
               f"{fid['projected']['value']:.3f} |"]
        md += [f"| hardened ({h['method']}) | `{h['text']!r}` | {h['held_out_kl']:.3f} | {h['held_out_top1']:.3f} | {h['value']:.3f} |"
               for h in hardened]
        md += [f"| hand-written (no slots) | `{recipe.hard_prompt!r}` | — | — | {hand_logits_score['value']:.3f} |", ""]
        print("\n".join(md[-12:]), flush=True)
    if args.quick:
        return
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "inspect_sst2.json").write_text(json.dumps(out, indent=2))
    (RESULTS / "inspect_sst2.md").write_text("\n".join(md) + "\n")
    print(f"saved {RESULTS / 'inspect_sst2.json'} and .md")


if __name__ == "__main__":
    main()
