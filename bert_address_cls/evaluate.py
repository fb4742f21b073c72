"""Score a trained parser on the test split without training: what train_cls.py prints at its end, plus
the province errors by what each address writes.

    python -m bert_address_cls.evaluate                                    # runs/bert_address_cls/cls/final
    python -m bert_address_cls.evaluate --ckpt runs/bert_address_cls/cls_random/final --no-baseline
    python -m bert_address_cls.evaluate --test-file my_addresses.jsonl     # your own labelled addresses
"""

from __future__ import annotations

from dataclasses import dataclass

from common.cli import run_main
from common.runtime import pick_device, set_threads

from .dataset import build_split, read_addresses
from .parsing import cpca_scores, format_report, load_parser, predict, province_by_written, score


@dataclass
class EvalConfig:
    """Score a train_cls.py checkpoint on the test split."""

    ckpt: str = "runs/bert_address_cls/cls/final"
    test_file: str = ""  # JSONL in dataset.py's format; default: the generated test split
    n_test: int = 5000
    baseline: bool = True  # also run cpca-new
    threads: int = 0
    device: str = "auto"


def main(cfg: EvalConfig) -> dict:
    set_threads(cfg.threads)
    model, tok, names = load_parser(cfg.ckpt, pick_device(cfg.device))
    test = list(read_addresses(cfg.test_file)) if cfg.test_file else build_split("test", cfg.n_test)
    preds = predict(model, tok, test, names)
    result = score(test, preds)
    baseline = cpca_scores(test) if cfg.baseline else None
    print(format_report(result, baseline, len(test)))
    by = province_by_written(test, preds)
    print("\nprovince errors by what the address writes (P province, C city, D district, - left out)")
    print("| written | " + " | ".join(by) + " |")
    print("|---|" + "---|" * len(by))
    print("| addresses | " + " | ".join(f"{v[0]:,}" for v in by.values()) + " |")
    print("| wrong province | " + " | ".join(str(v[1]) for v in by.values()) + " |")
    result["province_by_written"] = by
    return {"test": result, "cpca": baseline, "summary": by}


if __name__ == "__main__":
    run_main(main, EvalConfig)
