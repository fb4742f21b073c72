"""The chapter's one table, generated from the runs: every method's bits per weight, bytes, held-out perplexity on
both subjects, and decoding speed on the CPU; plus the headline records for doc/results.json and the picture.

    python -m compression.report          # after demo-compress's evaluate and bench runs; prints the markdown

Reads runs/compression/eval/<model>/rows.json (evaluate.py) and runs/compression/bench/smollm2.json (bench.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from common.cli import run_main
from common.errors import UserError
from common.results import make_record


@dataclass
class ReportConfig:
    """Merge the evaluate and bench runs into one table."""

    eval_dir: str = "runs/compression/eval"  # evaluate.py's output
    bench_file: str = "runs/compression/bench/smollm2.json"  # bench.py's output for SmolLM2 (optional)
    main: str = "smollm2,smollm2_gptq_natural,smollm2_gptq,smollm2_prune"  # the real model's runs (merged)
    subjects: str = "subject,subject_1500"  # the never-quantised subjects' runs (each its own column)
    figure: str = ""  # also draw SmolLM2's sparsity curve here (e.g. doc/compression_sparsity.png)
    out_dir: str = "runs/compression/report"


def load_rows(eval_dir: Path, names: list[str]) -> dict[str, dict]:
    rows: dict[str, dict] = {}
    for n in names:
        p = eval_dir / n / "rows.json"
        if p.is_file():
            rows |= {r["method"]: r for r in json.loads(p.read_text())}
    return rows


def main(cfg: ReportConfig) -> dict:
    eval_dir = Path(cfg.eval_dir)
    main_rows = load_rows(eval_dir, [n.strip() for n in cfg.main.split(",") if n.strip()])
    if not main_rows:
        raise UserError(f"--eval-dir {cfg.eval_dir}: no rows.json for {cfg.main}; run compression.evaluate first")
    subjects = {s.strip(): load_rows(eval_dir, [s.strip()]) for s in cfg.subjects.split(",") if s.strip()}
    subjects = {s: r for s, r in subjects.items() if r}
    speed, threads = {}, 1
    if Path(cfg.bench_file).is_file():
        bench = json.loads(Path(cfg.bench_file).read_text())
        b, threads = bench["speed"], bench.get("threads", 1)
        speed = {"fp32": b.get("fp32")} | {k.split()[1]: v for k, v in b.items() if k.startswith("ours ")}
        speed["torch_int8"] = b.get("torch int8 (dynamic, fbgemm)")

    dense = main_rows["fp32"]["ppl"]
    head = ["method", "bits/weight", "SmolLM2 MB", "SmolLM2 ppl", "vs fp32"]
    head += [f"{s} ppl (vs fp32)" for s in subjects] + [f"decode ms/token ({threads} thread{'s' * (threads > 1)})"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method, r in main_rows.items():
        cells = [method, f"{r['bits_per_weight']:.3f}", f"{r['model_mb']:.0f}", f"{r['ppl']:.2f}",
                 f"{100 * (r['ppl'] / dense - 1):+.1f} %"]
        for rows in subjects.values():
            s = rows.get(method)
            cells.append(f"{s['ppl']:.2f} ({100 * (s['ppl'] / rows['fp32']['ppl'] - 1):+.2f} %)" if s else "-")
        fmt = r.get("format")
        sp = speed.get("fp32" if method == "fp32" or r.get("group") == "prune" else fmt)
        cells.append(f"{sp['decode_ms_per_token']:.0f}" if sp else "-")
        lines.append("| " + " | ".join(cells) + " |")
    if speed.get("torch_int8"):
        t = speed["torch_int8"]
        tp = t.get("heldout_ppl")
        cells = [f"{tp:.2f}", f"{100 * (tp / dense - 1):+.1f} %"] if tp else ["-", "-"]
        lines.append("| torch int8 dynamic: int8 weights per channel, int8 activations (bench.py) | 8 | - | "
                     + " | ".join(cells) + " | " + " | ".join("-" for _ in subjects)
                     + f" | {t['decode_ms_per_token']:.0f} |")
    table = "\n".join(lines)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(table + "\n")
    print(table)

    # headline records: the goals of the chapter as ratios
    records = []

    def gap_closed(rows, a, b):
        return (rows[a]["ppl"] - rows[b]["ppl"]) / (rows[a]["ppl"] - rows["fp32"]["ppl"])

    for name, rows in [("smollm2", main_rows)] + list(subjects.items()):
        rtn_gap = rows.get("rtn_int4_g128", {}).get("ppl", 0) / rows["fp32"]["ppl"] - 1
        if {"rtn_int4_g128", "gptq_int4_g128"} <= set(rows) and rtn_gap < 0.01:
            print(f"{name}: round-to-nearest int4 is within 1 % of fp32 ({100 * rtn_gap:+.2f} %): no gap for GPTQ to "
                  "close, no record")
        elif {"rtn_int4_g128", "gptq_int4_g128"} <= set(rows):
            records.append(make_record("compression", f"{name}_gptq_int4_g128", "rtn_gap_closed",
                                       gap_closed(rows, "rtn_int4_g128", "gptq_int4_g128"), "goal", 0.5, 0.0,
                                       "python -m compression.report"))
        if {"wanda_50", "magnitude_50"} <= set(rows):
            d = rows["fp32"]["ppl"]
            ratio = (rows["wanda_50"]["ppl"] - d) / (rows["magnitude_50"]["ppl"] - d)
            records.append(make_record("compression", f"{name}_prune_50", "wanda_over_magnitude_ppl_increase", ratio,
                                       "goal", 0.5, 0.0, "python -m compression.report"))
    (out / "results.json").write_text(json.dumps(records, indent=2) + "\n")
    for r in records:
        print(f"{r['run']}: {r['metric']} = {r['value']:.3f} (goal {r['baseline_value']})")
    if cfg.figure:
        from .plots import draw_curve

        draw_curve(list(main_rows.values()), dense, "SmolLM2-135M: pruning without retraining", Path(cfg.figure))
    return {"table": table, "records": records}


if __name__ == "__main__":
    run_main(main, ReportConfig)
