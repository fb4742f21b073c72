"""The chapter README's figures: the architecture, drawn from a model config (so it shows the real sizes),
and PPO runs side by side, drawn from their metrics.jsonl.

    python -m gpt_minimind.figures --out doc/gpt_minimind_architecture.png
    python -m gpt_minimind.figures --ppo-runs "adaptive beta=runs/gpt_minimind/ppo" \
        "fixed beta 0.05=runs/gpt_minimind/ppo_fixed_beta" --out doc/gpt_minimind_ppo.png
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from common.cli import UserError, run_main
from common.log import read_metrics

from .model import MODEL_PRESETS, MiniMindConfig


def save_figure(fig, path: str | Path) -> Path:
    """Write ``fig`` to ``path`` (folders made) and free it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def draw_architecture(cfg: MiniMindConfig, path: str | Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

    C, H, H_kv, D = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    ffn = (f"MoE: router -> top-{cfg.num_experts_per_tok} of {cfg.num_experts} SwiGLU experts"
           + (" + shared expert" if cfg.shared_expert_intermediate_size else "")) if cfg.use_moe else \
        f"SwiGLU FFN: down(silu(gate(x)) * up(x)), {C} -> {cfg.intermediate_size} -> {C}"
    boxes = [  # (y, text, colour); drawn bottom to top
        (0.3, "token ids (B, T)", "#eeeeee"),
        (1.2, f"embed_tokens: {cfg.vocab_size} x {C}", "#cfe2f3"),
        (2.3, "RMSNorm (input_layernorm)", "#fff2cc"),
        (3.2, f"grouped-query attention: {H} query heads, {H_kv} key/value heads, D = {D}\n"
              f"RoPE on q and k (theta {cfg.rope_theta:g}), causal, KV cache", "#f4cccc"),
        (4.3, "RMSNorm (post_attention_layernorm)", "#fff2cc"),
        (5.2, ffn, "#d9ead3"),
        (6.3, "RMSNorm (norm)", "#fff2cc"),
        (7.2, f"lm_head: {C} -> {cfg.vocab_size}" + (" (tied to embed_tokens)" if cfg.tie_word_embeddings else ""),
         "#cfe2f3"),
        (8.1, "next-token logits (B, T, V)", "#eeeeee"),
    ]
    fig, ax = plt.subplots(figsize=(7.2, 6.4), dpi=90)
    for y, text, colour in boxes:
        ax.add_patch(FancyBboxPatch((0.5, y - 0.3), 6.0, 0.6, boxstyle="round,pad=0.05", fc=colour, ec="#555555"))
        ax.text(3.5, y, text, ha="center", va="center", fontsize=8.5)
    for (y0, _, _), (y1, _, _) in zip(boxes, boxes[1:]):
        ax.add_patch(FancyArrowPatch((3.5, y0 + 0.35), (3.5, y1 - 0.35), arrowstyle="-|>", mutation_scale=10))
    # residual connections around the two sub-blocks
    for y_from, y_to in ((1.75, 3.75), (3.75, 5.75)):
        ax.add_patch(FancyArrowPatch((6.55, y_from), (6.55, y_to), connectionstyle="arc3,rad=-0.4",
                                     arrowstyle="-|>", mutation_scale=10, color="#1155cc"))
        ax.text(7.25, (y_from + y_to) / 2, "+ residual", color="#1155cc", fontsize=8, va="center")
    ax.add_patch(FancyBboxPatch((0.2, 1.85), 7.6, 3.85, boxstyle="round,pad=0.05", fc="none", ec="#999999", ls="--"))
    ax.text(0.3, 5.9, f"x {cfg.num_hidden_layers} decoder layers", fontsize=9, color="#666666")
    ax.set_xlim(0, 8.4)
    ax.set_ylim(-0.2, 8.6)
    ax.axis("off")
    ax.set_title(title or "MiniMind (Llama-style decoder)", fontsize=10)
    return save_figure(fig, path)


def draw_ppo_runs(runs: dict[str, Path], path: str | Path) -> Path:
    """Three panels against the PPO step: the reward model's score of the rollouts (a running mean of 5),
    their KL to the SFT model (nats per answer), and the held-out accuracy of greedy answers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(10, 3.0), dpi=90)
    for name, run in runs.items():
        rows = read_metrics(Path(run) / "metrics.jsonl")
        steps = [r for r in rows if "score" in r]
        evals = [r for r in rows if "valid_accuracy" in r]
        x = [r["step"] for r in steps]
        smooth = [sum(r["score"] for r in steps[max(0, i - 4):i + 1]) / len(steps[max(0, i - 4):i + 1])
                  for i in range(len(steps))]
        axes[0].plot(x, smooth, label=name)
        axes[1].plot(x, [r["kl_to_ref"] for r in steps], label=name)
        axes[2].plot([r["step"] for r in evals], [100 * r["valid_accuracy"] for r in evals], marker="o", label=name)
    for ax, title in zip(axes, ["reward-model score of the rollouts", "KL to the SFT model (nats / answer)",
                                "held-out accuracy, greedy (%)"]):
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("PPO step", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
    axes[2].legend(fontsize=8)
    return save_figure(fig, path)


@dataclass
class FigureConfig:
    """Draw the architecture of a preset, or PPO runs side by side."""

    preset: str = "cpu"  # model preset: cpu, gpu4gb or full
    ppo_runs: list[str] = field(default_factory=list)  # NAME=DIR of train_ppo runs: draw them instead
    out: str = "doc/gpt_minimind_architecture.png"  # where the PNG goes


if __name__ == "__main__":
    def _main(fc: FigureConfig) -> None:
        if fc.ppo_runs:
            runs = dict(r.split("=", 1) for r in fc.ppo_runs)
            missing = [d for d in runs.values() if not (Path(d) / "metrics.jsonl").is_file()]
            if missing:
                raise UserError(f"--ppo-runs: no metrics.jsonl in {missing[0]} (train_ppo.py writes one)")
            print(draw_ppo_runs(runs, fc.out))
            return
        mc = MiniMindConfig(**MODEL_PRESETS[fc.preset])
        print(draw_architecture(mc, fc.out, f"MiniMind, {fc.preset} preset"))

    run_main(_main, FigureConfig)
