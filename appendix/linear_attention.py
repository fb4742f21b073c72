"""Linear attention (Katharopoulos et al. 2020, "Transformers are RNNs", arXiv:2006.16236): replace
softmax(q k^T) by a kernel phi(q) phi(k)^T and regroup the product, so the cost grows with T, not T^2.

    python -m appendix.linear_attention          # the checks, then time and memory vs sequence length
    python -m appendix.linear_attention --png doc/appendix_linear_attention.png

    softmax   y_i = sum_j exp(q_i.k_j) v_j / sum_j exp(q_i.k_j)          builds the (T, T) matrix: O(T^2 D)
    linear    y_i = phi(q_i)^T (sum_j phi(k_j) v_j^T) / phi(q_i)^T (sum_j phi(k_j))
              the bracket is one (D, D) matrix shared by every query: O(T D^2), memory O(D^2)
    causal    the sums run over j <= i. As a recurrence (the RNN view, eq. 18-20):
              S_i = S_{i-1} + phi(k_i) v_i^T,  z_i = z_{i-1} + phi(k_i),  y_i = phi(q_i)^T S_i / phi(q_i)^T z_i
              constant memory per generated token, like an RNN's state.

phi(x) = elu(x) + 1 (the paper's sec. 3.2.1): positive, so the normaliser never vanishes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from common.bench import peak_memory_bytes, time_interleaved
from common.cli import run_main
from common.results import command_line, make_record
from common.runtime import set_threads


def feature_map(x: torch.Tensor) -> torch.Tensor:
    """phi(x) = elu(x) + 1 > 0."""
    return F.elu(x) + 1


def softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False) -> torch.Tensor:
    """The reference, written out: (B, H, T, D) -> (B, H, T, D) through a (B, H, T, T) score matrix."""
    scores = q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5
    if causal:
        T = q.shape[-2]
        scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    return scores.softmax(dim=-1) @ v


def linear_attention_quadratic(q, k, v, causal: bool = False, eps: float = 1e-6) -> torch.Tensor:
    """The same kernelised attention computed the O(T^2) way, (phi(Q) phi(K)^T) V: the definition, to test against."""
    qf, kf = feature_map(q), feature_map(k)
    a = qf @ kf.transpose(-2, -1)  # (B, H, T, T), every entry > 0
    if causal:
        a = a.tril()
    return (a @ v) / (a.sum(-1, keepdim=True) + eps)


def linear_attention(q, k, v, eps: float = 1e-6) -> torch.Tensor:
    """Non-causal, O(T): phi(Q) (phi(K)^T V), normalised by phi(Q) (phi(K)^T 1)."""
    qf, kf = feature_map(q), feature_map(k)
    kv = kf.transpose(-2, -1) @ v  # (B, H, D, D): the whole sequence summarised once
    z = kf.sum(dim=-2)  # (B, H, D)
    return (qf @ kv) / ((qf * z[..., None, :]).sum(-1, keepdim=True) + eps)


def causal_linear_attention(q, k, v, eps: float = 1e-6, chunk: int = 64) -> torch.Tensor:
    """Causal, parallel over time: running sums of phi(k_j) v_j^T, computed chunk by chunk (memory
    O(chunk D^2), not O(T D^2)): inside a chunk the exact masked quadratic form, across chunks the carried state."""
    qf, kf = feature_map(q), feature_map(k)
    B, H, T, D = q.shape
    state = q.new_zeros(B, H, D, v.shape[-1])
    z = q.new_zeros(B, H, D)
    out = []
    for s in range(0, T, chunk):
        qc, kc, vc = qf[..., s: s + chunk, :], kf[..., s: s + chunk, :], v[..., s: s + chunk, :]
        a = (qc @ kc.transpose(-2, -1)).tril()  # within the chunk: j <= i
        num = qc @ state + a @ vc  # earlier chunks through the state, this one exactly
        den = (qc * z[..., None, :]).sum(-1, keepdim=True) + a.sum(-1, keepdim=True)
        out.append(num / (den + eps))
        state = state + kc.transpose(-2, -1) @ vc
        z = z + kc.sum(dim=-2)
    return torch.cat(out, dim=-2)


def recurrent_linear_attention(q, k, v, eps: float = 1e-6) -> torch.Tensor:
    """Causal, one step at a time (eq. 18-20): the state S (D, D) and z (D) are all that is kept."""
    qf, kf = feature_map(q), feature_map(k)
    B, H, T, D = q.shape
    S = q.new_zeros(B, H, D, v.shape[-1])
    z = q.new_zeros(B, H, D)
    out = []
    for t in range(T):
        S = S + kf[..., t, :, None] * v[..., t, None, :]  # outer product phi(k_t) v_t^T
        z = z + kf[..., t, :]
        num = (qf[..., t, :, None] * S).sum(-2)  # phi(q_t)^T S_t      (B, H, Dv)
        den = (qf[..., t, :] * z).sum(-1, keepdim=True)  # phi(q_t)^T z_t (B, H, 1)
        out.append(num / (den + eps))
    return torch.stack(out, dim=-2)


# ---------------------------------------------------------------------------------------------------
# time and memory against sequence length
# ---------------------------------------------------------------------------------------------------

@dataclass
class LinearAttentionConfig:
    """Forward time (best of repeats, 1 thread) and peak memory (a fresh process per point) of softmax
    attention vs linear attention, non-causal, one layer's worth: batch 1, 4 heads of 64."""

    lengths: str = "256,512,1024,2048,4096,8192"  # sequence lengths T
    heads: int = 4  # H
    head_dim: int = 64  # D
    repeats: int = 3  # best of this many, spread reported
    memory_runs: int = 3  # fresh processes per memory point; the median is reported
    threads: int = 1  # 1: comparable on a shared machine
    png: str = "runs/appendix/linear_attention.png"  # the plot (README copy: doc/appendix_linear_attention.png)
    out_dir: str = "runs/appendix/linear_attention"  # rows.json (every figure) and results.json
    worker: str = ""  # internal: "softmax:T" or "linear:T" runs one forward in this process and prints peak RSS


FUNCS = {"softmax": lambda q, k, v: softmax_attention(q, k, v), "linear": linear_attention}


def _inputs(cfg: LinearAttentionConfig, T: int):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(1, cfg.heads, T, cfg.head_dim, generator=g) for _ in range(3)]


def _peak_rss_mib() -> float:
    return peak_memory_bytes("cpu") / 2**20


def run_worker(cfg: LinearAttentionConfig) -> None:
    """In a fresh process: the peak resident memory before and after one forward at length T; the
    difference is what the forward's intermediates added (the process's high-water mark cannot go down,
    so the warm-up runs at a short length and the inputs exist before the first reading)."""
    kind, T = cfg.worker.split(":")
    q, k, v = _inputs(cfg, 64)
    FUNCS[kind](q, k, v)  # warm-up: load kernels, set up the allocator
    q, k, v = _inputs(cfg, int(T))
    base = _peak_rss_mib()
    FUNCS[kind](q, k, v)
    print(json.dumps({"peak_added_mib": max(_peak_rss_mib() - base, 0.0)}))


def measure(cfg: LinearAttentionConfig) -> list[dict]:
    set_threads(cfg.threads)
    rows = []
    for T in [int(t) for t in cfg.lengths.split(",")]:
        q, k, v = _inputs(cfg, T)
        times = time_interleaved({name: (lambda f=f, q=q, k=k, v=v: f(q, k, v)) for name, f in FUNCS.items()},
                                 repeats=cfg.repeats)
        row = {"T": T}
        for name in FUNCS:
            env = {**os.environ, "OMP_NUM_THREADS": "1"}
            peaks = []
            for _ in range(cfg.memory_runs):  # the allocator's peak varies a little from process to process
                proc = subprocess.run([sys.executable, "-m", "appendix.linear_attention", "--worker", f"{name}:{T}",
                                       "--heads", str(cfg.heads), "--head-dim", str(cfg.head_dim)],
                                      capture_output=True, text=True, env=env, check=True)
                peaks.append(json.loads(proc.stdout.strip().splitlines()[-1])["peak_added_mib"])
            row[f"{name}_ms"] = times[name][0] * 1e3
            row[f"{name}_spread_ms"] = times[name][1] * 1e3
            row[f"{name}_peak_mib"] = sorted(peaks)[len(peaks) // 2]  # median
        # the score matrix softmax must hold: H T^2 floats (and as many for its softmax)
        row["score_matrix_mib"] = cfg.heads * T * T * 4 / 2**20
        rows.append(row)
        print(f"T {T:>5} | softmax {row['softmax_ms']:8.1f} ms (+-{row['softmax_spread_ms']:.1f}), "
              f"{row['softmax_peak_mib']:7.1f} MiB | linear {row['linear_ms']:7.1f} ms "
              f"(+-{row['linear_spread_ms']:.1f}), "
              f"{row['linear_peak_mib']:6.1f} MiB", flush=True)
    return rows


def draw(rows: list[dict], png: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    T = [r["T"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(8, 3), dpi=90)
    for name in FUNCS:
        a.loglog(T, [r[f"{name}_ms"] for r in rows], "o-", label=name)
        b.loglog(T, [max(r[f"{name}_peak_mib"], 0.1) for r in rows], "o-", label=name)
    a.set_title("forward time (ms), 1 thread", fontsize=9)
    b.set_title("memory added by the forward (MiB)", fontsize=9)
    for ax in (a, b):
        ax.set_xlabel("sequence length T")
        ax.grid(alpha=0.3, which="both")
        ax.legend()
    fig.tight_layout()
    Path(png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png)
    plt.close(fig)


def main(cfg: LinearAttentionConfig) -> list[dict]:
    if cfg.worker:
        run_worker(cfg)
        return []
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 37, 16, dtype=torch.float64) for _ in range(3))
    print("max |difference| (float64):\n"
          f"  non-causal O(T) vs its O(T^2) definition: "
          f"{(linear_attention(q, k, v) - linear_attention_quadratic(q, k, v)).abs().max():.1e}\n"
          f"  causal recurrent vs O(T^2) masked:         "
          f"{(recurrent_linear_attention(q, k, v) - linear_attention_quadratic(q, k, v, True)).abs().max():.1e}\n"
          f"  causal chunked vs recurrent:               "
          f"{(causal_linear_attention(q, k, v, chunk=8) - recurrent_linear_attention(q, k, v)).abs().max():.1e}")
    rows = measure(cfg)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "rows.json").write_text(json.dumps(rows, indent=2) + "\n")
    cmd = command_line("appendix.linear_attention")
    records = []
    for r in rows:
        run = f"linear_attention_h{cfg.heads}_d{cfg.head_dim}_T{r['T']}"
        records += [make_record("appendix", run, "forward_ms", r["linear_ms"], "softmax_attention", r["softmax_ms"],
                                0.0, cmd),
                    make_record("appendix", run, "peak_added_mib", r["linear_peak_mib"], "softmax_attention",
                                r["softmax_peak_mib"], 0.0, cmd)]
    (out / "results.json").write_text(json.dumps(records, indent=2) + "\n")
    draw(rows, cfg.png)
    print("\n| T | softmax ms | linear ms | softmax / linear | softmax MiB | linear MiB | H T^2 fp32 scores MiB |\n"
          "|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['T']} | {r['softmax_ms']:.1f} | {r['linear_ms']:.1f} | {r['softmax_ms'] / r['linear_ms']:.1f}x | "
              f"{r['softmax_peak_mib']:.0f} | {r['linear_peak_mib']:.0f} | {r['score_matrix_mib']:.0f} |")
    print(f"figure: {cfg.png}")
    return rows


if __name__ == "__main__":
    run_main(main, LinearAttentionConfig)
