"""Assembling and writing inspection reports: JSON, Markdown and a heatmap PNG."""
from __future__ import annotations

from pathlib import Path

import torch

from softprompt.atomic import atomic_write_json, atomic_write_text
from softprompt.interpret.nearest import METRICS, nearest_tokens, norm_percentiles

LOW_FIDELITY_KL = 0.1  # nats per position: above this a projection is a poor stand-in for the prompt


def _tok(tokenizer, i: int) -> str:
    return tokenizer.decode([i]).replace("\n", "\\n")


def nearest_report(vectors: torch.Tensor, embedding: torch.Tensor, tokenizer, k: int) -> dict:
    """Per virtual token: k nearest tokens under each metric, its norm and norm percentile."""
    norms, pct, vocab_stats = norm_percentiles(vectors, embedding)
    per_metric = {m: nearest_tokens(vectors, embedding, k, m) for m in METRICS}
    tokens = []
    for j in range(vectors.shape[0]):
        row = {"index": j, "norm": float(norms[j]), "norm_percentile": float(pct[j])}
        for m, nb in per_metric.items():
            row[m] = [{"id": int(i), "token": _tok(tokenizer, int(i)), "score": float(s)}
                      for i, s in zip(nb.ids[j], nb.scores[j])]
        tokens.append(row)
    return {"k": k, "vocab_norms": vocab_stats, "tokens": tokens}


def heatmap(report: dict, path: Path, metric: str = "cosine", title: str = "") -> None:
    from softprompt.plots import _plt, save_figure

    plt = _plt()
    rows = report["tokens"]
    k = report["k"]
    data = [[c["score"] for c in r[metric]] for r in rows]
    fig, ax = plt.subplots(figsize=(min(2 + 1.1 * k, 20), min(1.5 + 0.45 * len(rows), 30)))
    im = ax.imshow(data, aspect="auto", cmap="viridis")
    for y, r in enumerate(rows):
        for x, c in enumerate(r[metric]):
            ax.text(x, y, c["token"][:10], ha="center", va="center", fontsize=7, color="white")
    ax.set_yticks(range(len(rows)), [f"v{r['index']}" for r in rows])
    ax.set_xticks(range(k), [f"#{i + 1}" for i in range(k)])
    ax.set_xlabel(f"nearest vocabulary tokens ({metric})")
    ax.set_ylabel("virtual token")
    fig.colorbar(im, ax=ax, label=f"{metric} similarity")
    ax.set_title(title or f"Nearest tokens by {metric}")
    fig.tight_layout()
    save_figure(fig, path)


def fidelity_warning(fid: dict) -> str:
    if fid["kl"] > LOW_FIDELITY_KL or fid["projected"]["value"] != fid["soft"]["value"]:
        return ("The projection does NOT behave like the soft prompt (KL {kl:.3f} nats/position, top-1 agreement "
                "{top1:.1%}): the nearest tokens are not the prompt's meaning.").format(kl=fid["kl"], top1=fid["top1_agreement"])
    return "The projection behaves like the soft prompt on these inputs (KL {kl:.3f} nats/position).".format(kl=fid["kl"])


def to_markdown(report: dict) -> str:
    lines = [f"# Inspection of `{report['prompt']}`", "",
             f"Kind {report['kind']}, {report['n_virtual']} virtual tokens, base {report['base']}.", ""]
    nb = report.get("nearest")
    if nb:
        v = nb["vocab_norms"]
        lines += [f"Vocabulary embedding norms: median {v['median']:.3f}, 1st-99th percentile {v['p1']:.3f}-{v['p99']:.3f}.", "",
                  "| Virtual token | Norm (percentile) | Nearest by cosine | Nearest by dot product | Nearest by L2 |",
                  "|---|---|---|---|---|"]
        for r in nb["tokens"]:
            cells = [", ".join(f"`{c['token']}` {c['score']:.2f}" for c in r[m][:5]) for m in METRICS]
            lines.append(f"| v{r['index']} | {r['norm']:.3f} ({r['norm_percentile']:.0f}%) | " + " | ".join(cells) + " |")
        lines.append("")
    fid = report.get("fidelity")
    if fid:
        lines += ["## Projection fidelity", "", fidelity_warning(fid), "",
                  f"Projected prompt (nearest by {fid['projection_metric']}): `{''.join(fid['projected_tokens'])}`", "",
                  "| | " + fid["soft"]["metric"] + " |", "|---|---|",
                  f"| soft prompt | {fid['soft']['value']:.4f} |", f"| projection | {fid['projected']['value']:.4f} |", "",
                  f"KL(soft || projected) {fid['kl']:.4f} nats per position (max {fid['kl_max']:.4f}), top-1 agreement "
                  f"{fid['top1_agreement']:.3f}, over {fid['positions']} positions of {report.get('n_examples')} examples.", ""]
    cmp = report.get("comparison")
    if cmp:
        lines += ["## Similarity to " + f"`{report['other']}`", "",
                  f"- mean best-match cosine: {cmp['mean_best_match']:.3f}",
                  f"- cosine of the mean vectors: {cmp['mean_vector_cosine']:.3f}"]
        if "mean_positionwise_cosine" in cmp:
            lines += [f"- mean position-wise cosine: {cmp['mean_positionwise_cosine']:.3f}",
                      f"- relative L2 difference: {cmp['relative_l2']:.3f}"]
        lines.append("")
    cov = report.get("coverage")
    if cov:
        lines += ["## Context coverage", "", "| Context part | Queries | Mean top-1 agreement with the teacher |", "|---|---|---|"]
        lines += [f"| {r['part']} | {r['queries']} | {r['mean_agreement']:.3f} |" for r in cov]
        lines.append("")
    return "\n".join(lines)


def write_report(report: dict, out: Path, heat: bool = True) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "inspect.json", report)
    atomic_write_text(out / "inspect.md", to_markdown(report))
    written = [out / "inspect.json", out / "inspect.md"]
    if heat and report.get("nearest"):
        heatmap(report["nearest"], out / "nearest.png", title=f"{report['prompt']}: nearest tokens by cosine")
        written.append(out / "nearest.png")
    return written
