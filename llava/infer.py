"""Ask a trained LLaVA about a picture, chat with it, or score it on the held-out questions.

    python -m llava.infer --image pic.png --question "what is the shape?"   # one answer
    python -m llava.infer --image pic.png --chat                            # several turns (empty line quits)
    python -m llava.infer --eval                                            # easy-VQA test split, per type
    python -m llava.infer --eval --eval-examples 0 --blind                  # every question, blank pictures
    python -m llava.infer --ckpt runs/llava/hf --image pic.png --question "..."   # the exported directory

``--ckpt`` is a final/ directory of train_stage1.py or train_stage2.py, or an exported transformers Llava
directory (export_hf.py), which is run by transformers' own LlavaForConditionalGeneration.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from common.cli import run_main
from common.data import evenly_spaced
from common.errors import UserError
from common.results import command_line, make_record


@dataclass
class InferConfig:
    """Answer questions about pictures with a trained model."""

    ckpt: str = "runs/llava/stage2/final"  # a stage's final/ directory, or an export_hf.py directory
    image: str = ""  # a picture file (PNG, JPEG, ...)
    question: str = ""  # one question about it
    chat: bool = False  # read questions from stdin, one per line, keeping the conversation
    eval: bool = False  # score the easy-VQA test split by exact match, per question type
    eval_examples: int = 1000  # questions scored (evenly spread; 0 = all 9,673, about 20 minutes on 2 cores)
    blind: bool = False  # with --eval: blank pictures (what the model knows from the question alone)
    max_new_tokens: int = 32  # (>= 1)
    run_name: str = ""  # with --eval: write results.json records under this run name


def load_any(ckpt: str):
    """(answer function, model) for one of our directories or an exported transformers one."""
    path = Path(ckpt)
    if (path / "llava.json").is_file():
        from .training import load_trained

        return load_trained(path)
    if (path / "config.json").is_file() and json.loads((path / "config.json").read_text()).get("model_type") == "llava":
        from .export_hf import load_export

        return load_export(path)
    raise UserError(f"--ckpt {ckpt}: expected a final/ directory of train_stage1.py / train_stage2.py (llava.json) "
                    "or an export_hf.py directory (a transformers llava config.json)")


def main(cfg: InferConfig) -> dict:
    if not (cfg.eval or cfg.chat or cfg.question):
        raise UserError("nothing to do: give --image FILE --question '...', --image FILE --chat, or --eval")
    if (cfg.chat or cfg.question) and not cfg.image:
        raise UserError("--question and --chat need --image FILE")
    picture = None
    if cfg.image:
        from .dataset import read_image

        if not Path(cfg.image).is_file():
            raise UserError(f"--image {cfg.image}: no such file")
        picture = read_image(cfg.image, f"--image {cfg.image}")  # checked before the model is loaded
    model, tok, processor, meta = load_any(cfg.ckpt)
    from .dataset import encode_prompt, pixel_values
    from .training import end_of_turn

    system = meta.get("system_prompt", "")
    n_image = model.num_image_tokens()
    max_len = getattr(model.language_model.config, "max_position_embeddings", 8192)

    def reply(question: str, history: list[tuple[str, str]]) -> str:
        import torch

        ids = encode_prompt(tok, question, n_image, system, history)
        if len(ids) + cfg.max_new_tokens > max_len:
            raise UserError(f"the conversation is {len(ids)} tokens with its {n_image} visual words; the model's "
                            f"context is {max_len} (with --max-new-tokens {cfg.max_new_tokens}). Ask a shorter "
                            "question or start a new chat")
        pixels = pixel_values([picture], processor)
        out = model.generate(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long), pixels,
                             cfg.max_new_tokens, eos_token_id=end_of_turn(tok))
        return tok.decode(out[0], skip_special_tokens=True).strip()

    result: dict = {}
    if cfg.question:
        result["answer"] = reply(cfg.question, [])
        print(result["answer"])
    if cfg.chat:
        history: list[tuple[str, str]] = []
        print("ask about the picture; an empty line quits", file=sys.stderr)
        for line in sys.stdin:
            if not line.strip():
                break
            a = reply(line.strip(), history)
            history.append((line.strip(), a))
            print(f"> {a}", flush=True)
        result["history"] = history
    if cfg.eval:
        from .dataset import easy_vqa_questions, prior_answers, question_prior
        from .training import easy_vqa_split, evaluate

        valid = easy_vqa_split("test", easy_vqa_questions("test"), processor)
        train_q = easy_vqa_questions("train")
        t0 = time.perf_counter()
        ev = evaluate(model, tok, valid, cfg.eval_examples, system, cfg.blind, prior=prior_answers(train_q))
        eval_wall = time.perf_counter() - t0
        print(ev["line"])
        for q, a in ev["examples"]:
            print(f"  {q} -> {a}")
        result["eval"] = ev
        if cfg.run_name:
            # the same baseline as the training records: the question prior on the same held-out questions
            subset = [valid.examples[i] for i in evenly_spaced(len(valid.examples), cfg.eval_examples)]
            prior = {f"exact_match_{k.replace('/', '_')}": v for k, v in question_prior(train_q, subset).items()}
            recs = [make_record("llava", cfg.run_name, k, v, "question_prior", prior.get(k), eval_wall,
                                command_line("llava.infer"))
                    for k, v in ev.items() if k.startswith("exact_match")]
            out = Path(cfg.ckpt).parent / f"eval_{cfg.run_name}"  # make results collects */results.json
            out.mkdir(parents=True, exist_ok=True)
            (out / "results.json").write_text(json.dumps(recs, indent=2) + "\n")
            (out / "eval.json").write_text(json.dumps({k: v for k, v in ev.items() if k != "examples"}) + "\n")
    return result


if __name__ == "__main__":
    run_main(main, InferConfig)
