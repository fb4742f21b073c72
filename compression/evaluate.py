"""Measure every compression method on one model: held-out perplexity, stored bits per weight, model bytes.

    python -m compression.evaluate --model smollm2 --methods quant          # the formats, round-to-nearest
    python -m compression.evaluate --model smollm2 --methods gptq           # GPTQ int4 / int3 vs RTN
    python -m compression.evaluate --model smollm2 --methods prune          # magnitude vs Wanda, 2:4, the curve
    python -m compression.evaluate --model subject --methods all            # the never-quantised subject

Each method starts from a fresh copy of the fp32 model, compresses the decoder's linear layers (the embedding,
tied to the output head, stays fp32 in every row: the convention of bitsandbytes, GPTQ and Wanda), and is
scored on the same held-out windows (the two held-out plays, or the last 10 % of --text-file). Quantized
methods run through QuantLinear (the packed tensors, dequantised in forward) and are saved as packed
safetensors under out_dir/<model>/<method>/, which infer.py and bench.py load. Writes results.json, one
table per model (table.md) and the sparsity curve (sparsity.png).
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass
from pathlib import Path

from common.cli import run_main
from common.errors import UserError
from common.results import command_line, make_record
from common.runtime import seed_everything, set_threads

from .dataset import load_splits, perplexity, token_windows
from .gptq import gptq_model
from .loading import decoder_linears, load_model, model_name, resolve_model
from .model import QuantLinear, replace_linears
from .packed import save_quantized_model
from .plots import draw_curve
from .prune import prune_magnitude, prune_wanda, sparsity_of
from .quantize import FORMATS, nbytes, quantize

GROUPS = ("quant", "gptq", "prune")


@dataclass
class EvaluateConfig:
    """Compress one model every way and measure it."""

    model: str = "smollm2"  # smollm2, subject (train_subject.py), or a transformers Llama-family directory
    methods: str = "all"  # comma list of quant, gptq, prune (or all)
    formats: str = ",".join(FORMATS)  # --methods quant: which formats (quantize.py:FORMATS)
    text_file: str = ""  # your own UTF-8 text (last 10 % held out); empty: the Shakespeare plays
    seq_len: int = 512  # tokens per window (>= 16)
    eval_windows: int = 12  # held-out windows scored (>= 1)
    calib_windows: int = 16  # calibration windows from the training side, for GPTQ and Wanda (>= 1)
    batch: int = 4  # windows per forward (>= 1)
    act_order: bool = True  # GPTQ: columns in order of decreasing Hessian diagonal, static groups (gptq.py)
    damp: float = 0.01  # GPTQ: damping added to the Hessian's diagonal, as a fraction of its mean (> 0)
    sparsity: float = 0.5  # the headline unstructured sparsity (<= 1)
    curve: str = "0.1,0.3,0.5,0.7"  # sparsities of the magnitude-vs-Wanda curve
    save_packed: bool = True  # write the quantized models as packed safetensors (infer.py, bench.py load them)
    threads: int = 0  # CPU threads (0 = torch's default)
    seed: int = 1234
    out_dir: str = "runs/compression/eval"
    run_name: str = ""  # names this run's records in doc/results.json (default: the model's name)


def model_bytes(model) -> tuple[int, float]:
    """(bytes of every stored tensor, bits per weight of the decoder's linear layers)."""
    lin_bytes, lin_weights, rest = 0, 0, 0
    seen = set()
    for name, mod in model.named_modules():
        if isinstance(mod, QuantLinear):
            lin_bytes += nbytes(mod.stored())
            lin_weights += mod.in_features * mod.out_features
            seen |= {f"{name}.{k}" for k in mod.names}
    for name, lin in decoder_linears(model).items():
        lin_bytes += lin.weight.numel() * lin.weight.element_size()
        lin_weights += lin.weight.numel()
        seen.add(f"{name}.weight")
    ptrs = set()
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if name in seen or t is None or t.data_ptr() in ptrs or "rotary" in name:
            continue
        ptrs.add(t.data_ptr())  # a tied embedding / head is stored once
        rest += t.numel() * t.element_size()
    return lin_bytes + rest, 8 * lin_bytes / max(lin_weights, 1)


def main(cfg: EvaluateConfig) -> dict:
    groups = GROUPS if cfg.methods == "all" else tuple(g.strip() for g in cfg.methods.split(","))
    for g in groups:
        if g not in GROUPS:
            raise UserError(f"--methods {cfg.methods}: unknown {g!r}; expected a comma list of {', '.join(GROUPS)}")
    formats = [f.strip() for f in cfg.formats.split(",") if f.strip()]
    for f in formats:
        if f not in FORMATS:
            raise UserError(f"--formats: unknown {f!r}; expected a comma list of {', '.join(FORMATS)}")
    try:
        curve = sorted({float(s) for s in cfg.curve.split(",") if s.strip()} | {cfg.sparsity})
    except ValueError:
        raise UserError(f"--curve {cfg.curve}: expected comma-separated fractions such as 0.1,0.3,0.5") from None
    if not all(0 < s < 1 for s in curve):
        raise UserError(f"--curve {cfg.curve} / --sparsity {cfg.sparsity}: every sparsity must lie in (0, 1)")
    set_threads(cfg.threads)
    seed_everything(cfg.seed)
    resolve_model(cfg.model)  # one error line before the text is read
    train_text, held_text = load_splits(cfg.text_file)
    base, tok = load_model(cfg.model)
    name = cfg.run_name or model_name(cfg.model)
    out = Path(cfg.out_dir) / name
    out.mkdir(parents=True, exist_ok=True)
    vx = token_windows(tok, held_text, cfg.seq_len, cfg.eval_windows, "the held-out text")
    cx = token_windows(tok, train_text, cfg.seq_len, cfg.calib_windows, "the calibration text")
    rows: list[dict] = []

    def score(method: str, model, seconds: float, eval_model=None, **extra) -> dict:
        t0 = time.perf_counter()
        ppl = perplexity(eval_model if eval_model is not None else model, vx, cfg.batch)
        total, bits = model_bytes(model)
        row = {"method": method, "ppl": ppl, "bits_per_weight": bits, "model_mb": total / 1e6,
               "compress_s": seconds, "eval_s": time.perf_counter() - t0, **extra}
        rows.append(row)
        dense = rows[0]["ppl"]
        print(f"{method:>22} | ppl {ppl:9.3f} ({100 * (ppl / dense - 1):+7.2f} %) | {bits:6.3f} bits/weight | "
              f"{total / 1e6:7.1f} MB | {seconds:5.1f} s", flush=True)
        (out / "rows.json").write_text(json.dumps(rows, indent=2) + "\n")
        return row

    print(f"{name}: {base.num_parameters() / 1e6:.1f} M parameters, {len(decoder_linears(base))} decoder linears | "
          f"held out {vx.numel():,} tokens, calibration {cx.numel():,} tokens", flush=True)
    score("fp32", base, 0.0, group="dense")

    def quantized(method: str, layers: dict[str, tuple[str, tuple, dict]], seconds: float, **extra):
        model = copy.deepcopy(base)
        replace_linears(model, lambda n, lin: QuantLinear(*layers[n], bias=lin.bias))
        # perplexity through plain Linear layers holding the dequantised weights: the same numbers as QuantLinear's
        # forward (which is F.linear on weight_fp32()), without unpacking every weight again for every batch
        fast = copy.deepcopy(base)
        for n, lin in decoder_linears(fast).items():
            lin.weight.data = model.get_submodule(n).weight_fp32()
        row = score(method, model, seconds, eval_model=fast, **extra)
        if cfg.save_packed:
            d = out / method
            row["file_mb"] = save_quantized_model(model, tok, d) / 1e6
        return row

    shapes = {n: tuple(lin.weight.shape) for n, lin in decoder_linears(base).items()}

    def rtn(fmt: str) -> None:
        t0 = time.perf_counter()
        layers = {n: (fmt, shapes[n], quantize(lin.weight, fmt)) for n, lin in decoder_linears(base).items()}
        quantized(f"rtn_{fmt}", layers, time.perf_counter() - t0, group="quant", format=fmt)

    def pruned(pruner: str, sparsity: float, pattern: str) -> None:
        model = copy.deepcopy(base)
        t0 = time.perf_counter()
        if pruner == "magnitude":
            prune_magnitude(model, sparsity, pattern)
        else:
            prune_wanda(model, cx, sparsity, pattern, batch=cfg.batch)
        name = f"{pruner}_{pattern if pattern == '2:4' else round(sparsity * 100)}"
        score(name, model, time.perf_counter() - t0, group="prune", pruner=pruner, sparsity=sparsity_of(model),
              pattern="u" if pattern == "unstructured" else pattern)

    if "quant" in groups:
        for fmt in formats:
            rtn(fmt)
    if "gptq" in groups:
        for bits in (4, 3):
            fmt = f"int{bits}_g128"
            if f"rtn_{fmt}" not in {r["method"] for r in rows}:  # the round-to-nearest baseline of the same format
                rtn(fmt)
            work = copy.deepcopy(base)
            t0 = time.perf_counter()
            stored = gptq_model(work, cx, bits, batch=cfg.batch, damp=cfg.damp, act_order=cfg.act_order)
            seconds = time.perf_counter() - t0
            del work
            method = f"gptq_{fmt}" + ("" if cfg.act_order else "_natural_order")
            quantized(method, {n: (fmt, shapes[n], t) for n, t in stored.items()}, seconds, group="gptq",
                      format=fmt, act_order=cfg.act_order)
    if "prune" in groups:
        for s in curve:
            for pruner in ("magnitude", "wanda"):
                pruned(pruner, s, "unstructured")
        for pruner in ("magnitude", "wanda"):
            pruned(pruner, 0.5, "2:4")
        draw_curve(rows, rows[0]["ppl"], f"{model_name(cfg.model)}: pruning without retraining", out / "sparsity.png")

    # the table and the records
    dense = rows[0]["ppl"]
    lines = ["| method | bits/weight (linears) | model MB | perplexity | vs fp32 |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['bits_per_weight']:.3f} | {r['model_mb']:.1f} | {r['ppl']:.3f} | "
                     f"{100 * (r['ppl'] / dense - 1):+.2f} % |")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    cmd = command_line("compression.evaluate")
    short = model_name(cfg.model)  # records are named by model and method, whatever folder the run wrote to
    records = [make_record("compression", f"{short}_{r['method']}".replace(":", "_"), "heldout_ppl", r["ppl"], "fp32",
                           dense, r["compress_s"], cmd) for r in rows]
    (out / "results.json").write_text(json.dumps(records, indent=2) + "\n")
    print("\n".join(lines))
    return {"rows": rows, "out_dir": out, "dense_ppl": dense}


if __name__ == "__main__":
    run_main(main, EvaluateConfig)
