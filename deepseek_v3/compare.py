"""The controls side by side: bias balancing against none and against a balance loss, MTP against none, simulated
FP8 against fp32, all at the same budget (`make demo-deepseek` trains them). Prints the README's table, draws the
expert loads of every MoE layer over training for each balancing mode (doc/deepseek_v3_loads.png) and the
held-out MaxVio and loss curves (doc/deepseek_v3_balance.png), and writes the records for doc/results.json.

    python -m deepseek_v3.compare
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from common.cli import run_main
from common.errors import UserError
from common.log import read_metrics
from common.results import command_line, make_record

RUNS = {"bias": "train", "none": "none", "aux": "aux", "no_mtp": "no_mtp", "fp8_sim": "fp8"}


@dataclass
class CompareConfig:
    """Compare the runs under --root (train.py's output folders)."""

    root: str = "runs/deepseek_v3"  # holds train/ (bias, MTP, fp32), none/, aux/, no_mtp/, fp8/
    doc: str = "doc"  # where the two pictures go
    out: str = "runs/deepseek_v3/compare"  # the table and results.json
    tokenizer_dir: str = "runs/deepseek_v3/tokenizer"  # the runs' tokens: the counting baselines read them
    data_file: str = ""  # the runs' --data-file (empty: the default corpus)
    baselines: bool = True  # also score unigram and bigram tables on the same held-out blocks


def counting_baselines(tokenizer_dir: str, data_file: str, block: int, n_blocks: int, vocab: int,
                       alpha: float = 0.1) -> dict:
    """Held-out loss (nats/token) of counting tables built on the training tokens, on the blocks the runs are
    scored on: unigram (add-0.01), and bigram smoothed towards the unigram (add alpha * V * p_unigram)."""
    from .dataset import as_long, eval_blocks, load_tokens

    streams, _ = load_tokens(tokenizer_dir, data_file, vocab_size=vocab)
    streams = as_long(streams)
    train = streams["train"]
    x, y = (t.flatten() for t in eval_blocks(streams["valid"], block, n_blocks))
    uni = torch.bincount(train, minlength=vocab).double() + 0.01
    uni /= uni.sum()
    pairs = torch.zeros(vocab * vocab, dtype=torch.float64)
    pairs.index_add_(0, train[:-1] * vocab + train[1:], torch.ones(len(train) - 1, dtype=torch.float64))
    pairs = pairs.view(vocab, vocab)
    bigram = (pairs[x, y] + alpha * vocab * uni[y]) / (pairs[x].sum(1) + alpha * vocab)
    return {"unigram": -uni[y].log().mean().item(), "bigram": -bigram.log().mean().item()}


def load_run(path: Path) -> dict:
    summary = path / "train_summary.json"
    if not summary.is_file():
        raise UserError(f"{path}: no train_summary.json; train it first (make demo-deepseek lists the commands)")
    return {"summary": json.loads(summary.read_text()), "metrics": read_metrics(path / "metrics.jsonl")}


def draw_loads(runs: dict[str, dict], png: Path) -> None:
    """Rows: balancing modes; columns: MoE layers; each panel: expert (y) by evaluation step (x), load / mean."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = [m for m in ("none", "aux", "bias") if m in runs]
    evals = {m: [r for r in runs[m]["metrics"] if "loads" in r] for m in modes}
    layers = [k for k in evals[modes[0]][0]["loads"] if k.startswith("layer")]
    fig, axes = plt.subplots(len(modes), len(layers), figsize=(2.3 * len(layers) + 1, 1.9 * len(modes)), dpi=100,
                             squeeze=False)
    for i, mode in enumerate(modes):
        steps = [r["step"] for r in evals[mode]]
        for j, layer in enumerate(layers):
            shares = torch.tensor([r["loads"][layer] for r in evals[mode]]).T  # (E, evaluations)
            ax = axes[i][j]
            im = ax.imshow(shares * shares.shape[0], aspect="auto", cmap="magma", vmin=0, vmax=3, origin="lower",
                           extent=(steps[0], steps[-1], -0.5, shares.shape[0] - 0.5))
            ax.set_title(f"{mode}, {layer}: MaxVio {evals[mode][-1]['maxvio'][layer]:.2f}", fontsize=7)
            ax.tick_params(labelsize=6)
            if j == 0:
                ax.set_ylabel("expert", fontsize=7)
            if i == len(modes) - 1:
                ax.set_xlabel("step", fontsize=7)
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8, label="load / mean load")
    fig.savefig(png)
    plt.close(fig)


def draw_curves(runs: dict[str, dict], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(8, 3), dpi=100)
    for mode in ("none", "aux", "bias"):
        if mode not in runs:
            continue
        ev = [r for r in runs[mode]["metrics"] if "maxvio_mean" in r]
        a.plot([r["step"] for r in ev], [r["maxvio_mean"] for r in ev], marker="o", ms=3, label=mode)
        b.plot([r["step"] for r in ev][1:], [r["valid_loss"] for r in ev][1:], marker="o", ms=3, label=mode)
    a.set(xlabel="step", ylabel="held-out MaxVio (mean of layers)", title="expert load imbalance")
    b.set(xlabel="step", ylabel="held-out loss (nats/token)", title="main-head loss")
    for ax in (a, b):
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)


def seed_table(root: Path, s: dict[str, dict]) -> str:
    """The runs repeated with other seeds (root/seeds/<run>_<seed>/, same flags plus --seed), beside the default
    seed's run: held-out loss and MaxVio per seed, the mean, and each run's difference from the bias run of the
    same seed (paired: same initialisation, same batches)."""
    folder = {"bias": "bias", "none": "none", "no_mtp": "no_mtp", "fp8_sim": "fp8"}
    found: dict[str, dict[str, dict]] = {}
    for name, prefix in folder.items():
        if name in s:
            found[name] = {"default": s[name]}
        for d in sorted((root / "seeds").glob(f"{prefix}_*")):
            seed = d.name[len(prefix) + 1:]
            if (d / "train_summary.json").is_file() and seed.isdigit():
                found.setdefault(name, {})[seed] = json.loads((d / "train_summary.json").read_text())
    seeds = sorted({k for runs in found.values() for k in runs if k != "default"})
    if not seeds:
        return ""
    cols = ["default", *seeds]
    names = ["the default seed" if c == "default" else f"seed {c}" for c in cols]
    head = "| run | " + " | ".join(f"loss, {c}" for c in names) + " | mean loss | mean diff. from bias | " \
           + " | ".join(f"MaxVio, {c}" for c in names) + " | mean MaxVio |"
    rows = [head, "|" + "---|" * (2 * len(cols) + 4)]
    bias = found.get("bias", {})
    for name, runs in found.items():
        loss = [runs[c]["valid_loss"] if c in runs else None for c in cols]
        vio = [runs[c]["maxvio_mean"] if c in runs else None for c in cols]
        have = [x for x in loss if x is not None]
        diffs = [runs[c]["valid_loss"] - bias[c]["valid_loss"] for c in cols if c in runs and c in bias]
        fmt = lambda v, f: "" if v is None else format(v, f)  # noqa: E731
        rows.append(f"| {name} | " + " | ".join(fmt(x, ".3f") for x in loss)
                    + f" | {sum(have) / len(have):.3f} | "
                    + (f"{sum(diffs) / len(diffs):+.3f} ({len(diffs)} seeds)" if name != "bias" and diffs else "")
                    + " | " + " | ".join(fmt(x, ".2f") for x in vio)
                    + f" | {sum(v for v in vio if v is not None) / len(have):.2f} |")
    return "\n".join(rows)


def main(cfg: CompareConfig) -> dict:
    root = Path(cfg.root)
    done = {name: root / folder for name, folder in RUNS.items() if (root / folder / "train_summary.json").is_file()}
    for name, folder in RUNS.items():
        if name not in done:
            print(f"note: {root / folder}: no finished run there; left out of the table")
    runs = {name: load_run(path) for name, path in done.items()}
    if "bias" not in runs:
        raise UserError(f"{root / 'train'}: the default run is missing; python -m deepseek_v3.train first")
    s = {k: v["summary"] for k, v in runs.items()}
    rows = ["| run | held-out loss | MTP depth-1 loss | MaxVio (mean of layers) | per layer | train s |",
            "|---|---|---|---|---|---|"]
    for name, x in s.items():
        per = ", ".join(f"{v:.2f}" for k, v in x["maxvio"].items() if k.startswith("layer"))
        mtp = f"{x['valid_mtp_losses'][0]:.3f}" if x["valid_mtp_losses"] else "-"
        rows.append(f"| {name} | {x['valid_loss']:.3f} | {mtp} | {x['maxvio_mean']:.2f} | {per} | "
                    f"{x['train_wall_s']:.0f} |")
    if cfg.baselines and not Path(cfg.tokenizer_dir).is_dir():
        print(f"note: --tokenizer-dir {cfg.tokenizer_dir}: not there; no counting baselines")
    elif cfg.baselines:
        model = json.loads((root / RUNS["bias"] / "final" / "config.json").read_text())  # the scored blocks' size
        block = model["max_position_embeddings"]
        counts = counting_baselines(cfg.tokenizer_dir, cfg.data_file, block, s["bias"]["valid_tokens"] // block,
                                    model["vocab_size"])
        for name, v in counts.items():
            rows.append(f"| {name} counts (reference) | {v:.3f} | | | | |")
    table = "\n".join(rows)
    seeds = seed_table(root, s)
    if seeds:
        table += "\n\nOther seeds (the same flags plus --seed):\n\n" + seeds
    print(table)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(table + "\n")
    doc = Path(cfg.doc)
    doc.mkdir(parents=True, exist_ok=True)
    draw_loads(runs, doc / "deepseek_v3_loads.png")
    draw_curves(runs, doc / "deepseek_v3_balance.png")
    cmd, b = command_line("deepseek_v3.compare"), s["bias"]
    records = []
    if "none" in s:
        records.append(make_record("deepseek_v3", "balance_bias_vs_none_cpu", "maxvio_ratio_none_over_bias",
                                   s["none"]["maxvio_mean"] / max(b["maxvio_mean"], 1e-9), "goal", 3.0,
                                   b["train_wall_s"], cmd))
    if "no_mtp" in s:
        records.append(make_record("deepseek_v3", "mtp_vs_no_mtp_cpu", "valid_loss_change_with_mtp_pct",
                                   100 * (b["valid_loss"] / s["no_mtp"]["valid_loss"] - 1), "goal", 2.0,
                                   b["train_wall_s"], cmd))
    if "fp8_sim" in s:
        records.append(make_record("deepseek_v3", "fp8_sim_vs_fp32_cpu", "valid_loss_change_with_fp8_pct",
                                   100 * (s["fp8_sim"]["valid_loss"] / b["valid_loss"] - 1), "goal", 1.0,
                                   s["fp8_sim"]["train_wall_s"], cmd))
    (out / "results.json").write_text(json.dumps(records, indent=2) + "\n")
    return {"table": table, "summaries": s, "records": records}


if __name__ == "__main__":
    run_main(main, CompareConfig)
