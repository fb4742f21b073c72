"""The chapter's picture: held-out perplexity against sparsity, magnitude against Wanda (evaluate.py, report.py)."""

from __future__ import annotations

from pathlib import Path


def draw_curve(rows: list[dict], dense_ppl: float, title: str, png: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.2, 3.0), dpi=100)
    for method, colour in (("magnitude", "tab:red"), ("wanda", "tab:blue")):
        pts = sorted((r["sparsity"], r["ppl"]) for r in rows if r.get("pruner") == method and r["pattern"] == "u")
        if pts:
            ax.plot([0] + [p[0] * 100 for p in pts], [dense_ppl] + [p[1] for p in pts], "o-", color=colour,
                    label=method, ms=4)
    ax.set_yscale("log")
    ax.set_xlabel("unstructured sparsity of the decoder linears (%)")
    ax.set_ylabel("held-out perplexity")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)
    return png
