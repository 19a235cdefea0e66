"""KV form vs projector form of the amortized compressor on a tiny random llama (2 layers, hidden 32,
the SmolLM2 tokenizer), same contexts, queries, steps and seed: dev KL (held-out contexts) before and
after training. A smoke-level comparison: a random model says little about a real one.

    python bench/compressor_forms_tiny.py
Results: bench/results/compressor_forms_tiny.{json,md}.
"""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "tests"))


def main() -> int:
    import torch

    from softprompt.atomic import atomic_write_json, atomic_write_text
    from softprompt.base_model import ensure_embedded, load_base
    from softprompt.compress.amortized import TrainConfig, Trainer
    from softprompt.compress.amortized.contexts import filter_length, read_shared, split_contexts

    torch.set_num_threads(1)
    from conftest import make_tiny_model

    tmp = Path(tempfile.mkdtemp())
    tiny = load_base(str(make_tiny_model(tmp / "tiny", ensure_embedded("smollm2"))), device="cpu")
    sp = split_contexts(read_shared(REPO.parent / "shared" / "data", ("squad",)))
    train = filter_length(sorted(sp["train"], key=lambda c: c.sha)[:60], tiny.tokenizer, 60, 200)[:24]
    dev = filter_length(sorted(sp["dev"], key=lambda c: c.sha)[:30], tiny.tokenizer, 60, 200)[:6]
    rows = {}
    for form in ("kv", "projector"):
        cfg = TrainConfig(memory=8, form=form, queries_per_context=4, query_source="dataset", max_new_tokens=8, steps=60,
                          contexts_per_step=4, lr=0.03, projector_lr=3e-3, eval_every=10, patience=0, precision="fp32",
                          cache_dir=str(tmp / "cache"))
        tr = Trainer(cfg, train, dev, tmp / form, base=tiny, progress=False)
        tr.prepare()
        dev0 = tr.dev_kl()
        t0 = time.perf_counter()
        tr.train()
        rows[form] = {"dev_kl_start": dev0, "dev_kl_best": tr.best_dev, "best_step": tr.best_step,
                      "train_s": time.perf_counter() - t0, "trainable": sum(p.numel() for p in tr.encoder().parameters()),
                      "curve": [h["dev_kl"] for h in tr.history if h["type"] == "eval"]}
        rows[form]["dev_kl_drop"] = 1 - rows[form]["dev_kl_best"] / dev0
        print(form, rows[form], flush=True)
    res = {"model": "tiny random llama (2 layers, hidden 32, 4 heads, 2 kv heads)", "train_contexts": len(train),
           "dev_contexts": len(dev), "settings": {"memory": 8, "queries_per_context": 4, "steps": 60, "contexts_per_step": 4},
           "forms": rows}
    out = REPO / "bench" / "results" / "compressor_forms_tiny"
    atomic_write_json(out.with_suffix(".json"), res)
    lines = ["# Compressor forms on a tiny random llama", "", f"{len(train)} training / {len(dev)} dev SQuAD paragraphs "
             "(60-200 tokens), 8 memory tokens, 4 SQuAD questions per paragraph, 60 steps of 4 contexts, seed 0.", "",
             "| form | trainable | dev KL start | dev KL best (step) | drop | train s |", "| --- | --- | --- | --- | --- | --- |"]
    for f, r in rows.items():
        lines.append(f"| {f} | {r['trainable']} | {r['dev_kl_start']:.4f} | {r['dev_kl_best']:.4f} ({r['best_step']}) | "
                     f"{100 * r['dev_kl_drop']:.1f} % | {r['train_s']:.0f} |")
    atomic_write_text(out.with_suffix(".md"), "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
