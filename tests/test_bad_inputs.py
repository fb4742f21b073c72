"""The catalogue of bad inputs: each case runs the real command as a user would (a subprocess, tiny sizes) and
must end with exit status 1 and one `error:` line that names the file and line or the flag, with no traceback.

The cases run once per session through tests/fork_runner.py: one interpreter imports every command's module,
then forks a child per case that runs the module as `__main__` with the case's argv (the same code path as
`python -m`, without ~2.5 s of imports per case), a few at a time; each case is its own test for the report.
A new chapter adds its families here: a missing file, a file that is not what it should be, a bad row of a
data file, a flag out of range, an empty input.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

RUN_FIRST = 1  # a long file: collected early (tests/conftest.py; the larger, the earlier)
ROOT = Path(__file__).resolve().parents[1]


def _files(d: Path) -> dict[str, str]:
    """The bad (and the few good) input files the cases point at."""
    w = {}

    def put(name: str, data: bytes) -> None:
        (d / name).write_bytes(data)
        w[name] = str(d / name)

    put("text_int.jsonl", b'{"text": "fine"}\n\n\n{"text": 12345}\n')  # the bad record is on line 4
    put("text_null.jsonl", b'{"text": null}\n')
    put("text_latin1.jsonl", b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    put("not_json.jsonl", b'{"text": "fine"}\n{"text": \n')
    put("array.jsonl", b'["text", "fine"]\n')
    put("latin1.txt", b"First Citizen:\nBefore we proceed any further, hear me spe\xe9k.\n")
    put("empty.txt", b"\n\n")
    put("pairs_int.jsonl", b'{"en": "one", "zh": "\xe4\xb8\x80"}\n{"en": 2, "zh": "\xe4\xba\x8c"}\n')
    put("summaries_missing.jsonl", b'{"text": "an article"}\n')
    put("conv_bad.jsonl", b'\n{"conversations": [{"role": "user", "content": "hi"}]}\n')  # no assistant turn
    put("conv_type.jsonl", b'{"conversations": "hello"}\n')
    put("conv_ok.jsonl", "".join(json.dumps({"conversations": [{"role": "user", "content": f"{i}+1="},
                                                               {"role": "assistant", "content": str(i + 1)}]}) + "\n"
                                 for i in range(40)).encode())
    put("dpo_bad.jsonl", b'{"chosen": [{"role": "user", "content": "q"}], "rejected": "no"}\n')
    put("spans_bad.jsonl", '{"text": "浙江省杭州市", "spans": [[0, 3, "town?"]]}\n'.encode())
    put("spans_type.jsonl", '{"text": "浙江省杭州市", "spans": "0-3"}\n'.encode())
    from PIL import Image

    Image.new("RGB", (20, 20), (200, 10, 10)).save(d / "red.png")
    put("notimage.png", b"this is text, not a picture\n")
    put("pairs_ok.csv", b"filepath,title\nred.png,a red square\n")
    put("pairs_header.csv", b"file,caption\nred.png,a red square\n")
    put("pairs_missing_image.csv", b"filepath,title\nred.png,a red square\nnowhere.png,a picture\n")
    put("pairs_not_image.csv", b"filepath,title\nnotimage.png,a picture\n")
    put("pairs_empty_title.csv", b"filepath,title\nred.png,\n")
    put("pairs_type.jsonl", b'{"filepath": "red.png", "title": ["a", "list"]}\n')
    (d / "broken_model").mkdir()
    (d / "broken_model" / "config.json").write_text(json.dumps({"hidden_size": 64}))
    (d / "broken_model" / "model.safetensors").write_bytes(b"\x00" * 16)  # cut short
    w["broken_model"] = str(d / "broken_model")
    put("llava_turns.jsonl", b'{"image": "red.png", "conversations": [{"from": "human", "value": "<image>\\nq?"}, '
                             b'{"from": "gpt", "value": "red"}]}\n{"image": "red.png", "conversations": '
                             b'[{"from": "gpt", "value": "red"}]}\n')
    put("llava_no_image.jsonl", b'{"image": "nowhere.png", "conversations": [{"from": "human", "value": "q?"}, '
                                b'{"from": "gpt", "value": "red"}]}\n')
    w["missing"] = str(d / "does_not_exist.jsonl")
    w["missing_dir"] = str(d / "no_such_run")
    (d / "no_images").mkdir()
    (d / "no_images" / "notes.png").write_bytes(b"a text file with a picture's name\n")
    w["no_images"] = str(d / "no_images")
    w["out"] = str(d / "out")
    return w


def _cases(w: dict[str, str], base: str) -> list[tuple[str, list[str], str]]:
    """(id, python -m arguments, a part of the expected error line)."""
    out = ["--out-dir", w["out"]]
    return [
        # --- gpt_minimind ---------------------------------------------------------------------------------
        ("gpt_pretrain_batch_0", ["gpt_minimind.train_pretrain", "--batch-size", "0"], "--batch-size 0: expected >= 1"),
        ("gpt_pretrain_lr_negative", ["gpt_minimind.train_pretrain", "--lr", "-1"], "--lr -1.0: expected > 0"),
        ("gpt_pretrain_preset_then_bad_flag", ["gpt_minimind.train_pretrain", "--preset", "gpu4gb", "--grad-accum",
                                               "0"], "--grad-accum 0: expected >= 1"),
        ("gpt_pretrain_missing_file", ["gpt_minimind.train_pretrain", "--data-file", w["missing"], *out],
         "does_not_exist.jsonl: No such file"),
        ("gpt_pretrain_text_int", ["gpt_minimind.train_pretrain", "--data-file", w["text_int.jsonl"], *out],
         "text_int.jsonl:4: field 'text' is an integer, expected a string"),
        ("gpt_pretrain_text_null", ["gpt_minimind.train_pretrain", "--data-file", w["text_null.jsonl"], *out],
         "text_null.jsonl:1: field 'text' is null"),
        ("gpt_pretrain_not_utf8", ["gpt_minimind.train_pretrain", "--data-file", w["text_latin1.jsonl"], *out],
         "text_latin1.jsonl:2: not UTF-8 text"),
        ("gpt_pretrain_not_json", ["gpt_minimind.train_pretrain", "--data-file", w["not_json.jsonl"], *out],
         "not_json.jsonl:2: not valid JSON"),
        ("gpt_pretrain_not_an_object", ["gpt_minimind.train_pretrain", "--data-file", w["array.jsonl"], *out],
         "array.jsonl:1: expected a JSON object"),
        ("gpt_pretrain_text_file_not_utf8", ["gpt_minimind.train_pretrain", "--text-file", w["latin1.txt"],
                                             "--tokenizer", "char", *out], "latin1.txt:2: not UTF-8 text"),
        ("gpt_tokenizer_missing_file", ["gpt_minimind.train_tokenizer", "--data-file", w["missing"],
                                        "--out-dir", w["out"]], "does_not_exist.jsonl: No such file"),
        ("gpt_infer_missing_ckpt", ["gpt_minimind.infer", "--ckpt", w["missing_dir"]], "no_such_run"),
        ("gpt_infer_damaged_weights", ["gpt_minimind.infer", "--ckpt", w["broken_model"]],
         "model.safetensors: not a readable safetensors file"),
        ("gpt_infer_max_new_tokens_0", ["gpt_minimind.infer", "--max-new-tokens", "0"],
         "--max-new-tokens 0: expected >= 1"),
        ("gpt_export_missing_ckpt", ["gpt_minimind.export_hf", "--ckpt", w["missing_dir"], "--out", w["out"]],
         "no_such_run"),
        ("gpt_sft_no_assistant_turn", ["gpt_minimind.train_sft", "--init-from", base, "--data-file",
                                       w["conv_bad.jsonl"], *out], "conv_bad.jsonl:2: 'conversations' must"),
        ("gpt_sft_wrong_type", ["gpt_minimind.train_sft", "--init-from", base, "--data-file", w["conv_type.jsonl"],
                                *out], "conv_type.jsonl:1: field 'conversations' is a string, expected a list"),
        ("gpt_sft_missing_init", ["gpt_minimind.train_sft", "--init-from", w["missing_dir"], *out], "no_such_run"),
        ("gpt_lora_bad_data", ["gpt_minimind.train_lora", "--init-from", base, "--data-file", w["text_null.jsonl"],
                               *out], "text_null.jsonl:1: missing field(s) ['conversations']"),
        ("gpt_dpo_bad_pair", ["gpt_minimind.train_dpo", "--init-from", base, "--data-file", w["dpo_bad.jsonl"],
                              *out], "dpo_bad.jsonl:1: field 'rejected' is a string, expected a list"),
        ("gpt_reward_bad_pair", ["gpt_minimind.train_reward", "--init-from", base, "--data-file", w["dpo_bad.jsonl"],
                                 *out], "dpo_bad.jsonl:1: field 'rejected' is a string, expected a list"),
        ("gpt_ppo_bad_prompts", ["gpt_minimind.train_ppo", "--init-from", base, "--data-file", w["conv_bad.jsonl"],
                                 *out], "conv_bad.jsonl:2: 'conversations' must"),
        ("gpt_ppo_missing_reward_model", ["gpt_minimind.train_ppo", "--init-from", base, "--reward-model",
                                          w["missing_dir"], "--data-file", w["conv_ok.jsonl"], *out],
         "no_such_run: no reward model there"),
        ("gpt_ppo_reward_model_is_an_lm", ["gpt_minimind.train_ppo", "--init-from", base, "--reward-model", base,
                                           "--data-file", w["conv_ok.jsonl"], *out],
         "a language model, not a reward model"),
        ("gpt_ppo_minibatch_too_big", ["gpt_minimind.train_ppo", "--minibatch-size", "999", *out],
         "--minibatch-size 999: expected a divisor of --prompts-per-step x --samples-per-prompt = 64"),
        ("gpt_grpo_unchecked_task", ["gpt_minimind.train_grpo", "--init-from", base, "--tasks", "chat", *out],
         "--tasks chat: GRPO needs answers a rule can check"),
        ("gpt_distill_missing_teacher", ["gpt_minimind.train_distill", "--teacher", w["missing_dir"], *out],
         "no_such_run"),
        ("gpt_sweep_unknown_point", ["gpt_minimind.sweep", "--points", "w9999_l9", "--out-dir", w["out"]],
         "--points ['w9999_l9']: not in the grid"),
        # --- transformer_basics ---------------------------------------------------------------------------
        ("tb_train_batch_0", ["transformer_basics.train_translate", "--batch-size", "0"],
         "--batch-size 0: expected >= 1"),
        ("tb_train_pair_type", ["transformer_basics.train_translate", "--data-file", w["pairs_int.jsonl"], *out],
         "pairs_int.jsonl:2: field 'en' is an integer, expected a string"),
        ("tb_train_missing_file", ["transformer_basics.train_translate", "--data-file", w["missing"], *out],
         "does_not_exist.jsonl: No such file"),
        ("tb_infer_empty_sentence", ["transformer_basics.infer", "--model-dir", w["missing_dir"], "--sentence", ""],
         "--sentence is empty"),
        ("tb_infer_other_chapters_model", ["transformer_basics.infer", "--model-dir", base, "--sentence", "hi"],
         "not a transformer_basics model"),
        ("tb_infer_beam_0", ["transformer_basics.infer", "--beam-size", "0"], "--beam-size 0: expected >= 1"),
        ("tb_infer_missing_model", ["transformer_basics.infer", "--model-dir", w["missing_dir"], "--sentence", "hi"],
         "no_such_run"),
        # --- bert_address_cls -----------------------------------------------------------------------------
        ("bert_mlm_batch_0", ["bert_address_cls.train_mlm", "--batch-size", "0"], "--batch-size 0: expected >= 1"),
        ("bert_mlm_text_null", ["bert_address_cls.train_mlm", "--text-file", w["text_null.jsonl"], *out],
         "text_null.jsonl:1: field 'text' is null"),
        ("bert_cls_bad_span", ["bert_address_cls.train_cls", "--train-file", w["spans_bad.jsonl"], *out],
         "spans_bad.jsonl:1: span [0, 3, 'town?'] has field 'town?'"),
        ("bert_cls_spans_type", ["bert_address_cls.train_cls", "--train-file", w["spans_type.jsonl"], *out],
         "spans_type.jsonl:1: field 'spans' is a string, expected a list"),
        ("bert_infer_empty_file", ["bert_address_cls.infer", "--ckpt", base, "--file", w["empty.txt"]],
         "empty.txt: no address in it"),
        ("bert_infer_missing_file", ["bert_address_cls.infer", "--file", w["missing"]],
         "--file " + w["missing"] + ": no such file"),
        ("bert_infer_file_not_utf8", ["bert_address_cls.infer", "--ckpt", base, "--file", w["latin1.txt"]],
         "latin1.txt:2: not UTF-8 text"),
        ("bert_evaluate_missing_ckpt", ["bert_address_cls.evaluate", "--ckpt", w["missing_dir"]], "no_such_run"),
        # --- t5_summarization -----------------------------------------------------------------------------
        ("t5_pretrain_batch_0", ["t5_summarization.train_pretrain", "--batch-size", "0"],
         "--batch-size 0: expected >= 1"),
        ("t5_pretrain_vocab_over_the_text", ["t5_summarization.train_pretrain", "--max-documents", "20",
                                             "--tokenizer-dir", w["out"] + "/t5_tokenizer", *out],
         "--vocab-size 8000: the 20 training texts hold only"),
        ("t5_summarize_missing_field", ["t5_summarization.train_summarize", "--data-file",
                                        w["summaries_missing.jsonl"], "--init-from", "", *out],
         "summaries_missing.jsonl:1: missing field(s) ['summary']"),
        ("t5_infer_empty_text", ["t5_summarization.infer", "--ckpt", w["missing_dir"], "--text", ""],
         "--text is empty"),
        ("t5_infer_beams_0", ["t5_summarization.infer", "--num-beams", "0"], "--num-beams 0: expected >= 1"),
        ("t5_infer_missing_ckpt", ["t5_summarization.infer", "--ckpt", w["missing_dir"], "--text", "x"],
         "no_such_run"),
        # --- clip -----------------------------------------------------------------------------------------
        ("clip_train_batch_0", ["clip.train_clip", "--batch-size", "0"], "--batch-size 0: expected >= 1"),
        ("clip_train_loss_unknown", ["clip.train_clip", "--loss", "triplet", "--data-file", w["pairs_ok.csv"],
                                     "--valid-file", w["pairs_ok.csv"], *out], "--loss triplet: expected infonce"),
        ("clip_train_no_valid_file", ["clip.train_clip", "--data-file", w["pairs_ok.csv"], *out],
         "--data-file needs --valid-file"),
        ("clip_train_csv_header", ["clip.train_clip", "--data-file", w["pairs_header.csv"], "--valid-file",
                                   w["pairs_ok.csv"], *out], "pairs_header.csv:1: the header has no column"),
        ("clip_train_missing_image", ["clip.train_clip", "--data-file", w["pairs_missing_image.csv"],
                                      "--valid-file", w["pairs_ok.csv"], *out],
         "pairs_missing_image.csv:3: image"),
        ("clip_train_not_an_image", ["clip.train_clip", "--data-file", w["pairs_not_image.csv"], "--valid-file",
                                     w["pairs_ok.csv"], *out], "pairs_not_image.csv:2:"),
        ("clip_train_empty_title", ["clip.train_clip", "--data-file", w["pairs_empty_title.csv"],
                                    "--valid-file", w["pairs_ok.csv"], *out],
         "pairs_empty_title.csv:2: column 'title'"),
        ("clip_train_jsonl_type", ["clip.train_clip", "--data-file", w["pairs_type.jsonl"], "--valid-file",
                                   w["pairs_ok.csv"], *out], "pairs_type.jsonl:1:"),
        ("clip_train_missing_file", ["clip.train_clip", "--data-file", w["missing"], "--valid-file",
                                     w["pairs_ok.csv"], *out], "does_not_exist.jsonl"),
        # --- llava ----------------------------------------------------------------------------------------
        ("llava_stage1_missing_vision", ["llava.train_stage1", "--vision", w["missing_dir"], *out],
         "--vision " + w["missing_dir"] + ": does not exist; expected a CLIP directory"),
        ("llava_stage2_missing_llm", ["llava.train_stage2", "--vision", w["broken_model"], "--llm", w["missing_dir"],
                                      *out], "--llm " + w["missing_dir"] + ": does not exist"),
        ("llava_stage2_dtype_unknown", ["llava.train_stage2", "--dtype", "int4", *out],
         "--dtype int4: expected auto, fp32, bf16 or fp16"),
        ("llava_stage2_pack_and_balance", ["llava.train_stage2", "--balance-answers", *out],
         "--pack-questions with --balance-answers"),
        ("llava_stage2_mode_unknown", ["llava.train_stage2", "--mode", "half", *out],
         "--mode half: expected full, lora or qlora"),
        ("llava_stage1_conversation_turns", ["llava.train_stage1", "--vision", w["broken_model"], "--data-file",
                                             w["llava_turns.jsonl"], "--valid-file", w["llava_turns.jsonl"], *out],
         "llava_turns.jsonl:2: 'conversations' has 1 turns"),
        ("llava_stage2_conversation_image", ["llava.train_stage2", "--vision", w["broken_model"], "--data-file",
                                             w["llava_no_image.jsonl"], "--valid-file", w["llava_turns.jsonl"], *out],
         "llava_no_image.jsonl:1: image nowhere.png not found"),
        ("llava_infer_not_an_image", ["llava.infer", "--image", w["notimage.png"], "--question", "what is it?",
                                      "--ckpt", w["missing_dir"]], "notimage.png: not an image PIL can read"),
        ("llava_infer_no_image", ["llava.infer", "--question", "what is it?"], "--question and --chat need --image"),
        ("llava_infer_ckpt_missing", ["llava.infer", "--eval", "--ckpt", w["missing_dir"]],
         "expected a final/ directory"),
        # --- dinov2 ---------------------------------------------------------------------------------------
        ("dinov2_train_data_dir_missing", ["dinov2.train_dino", "--data-dir", w["missing_dir"], *out],
         "no_such_run: not a directory"),
        ("dinov2_train_no_readable_image", ["dinov2.train_dino", "--data-dir", w["no_images"], *out],
         "no readable image"),
        ("dinov2_train_dataset_unknown", ["dinov2.train_dino", "--dataset", "cifar", *out],
         "--dataset cifar: expected one of animal-mnist, mnist, textile"),
        ("dinov2_train_centering_unknown", ["dinov2.train_dino", "--centering", "mean", *out],
         "--centering mean: expected centering or sinkhorn_knopp"),
        ("dinov2_train_local_size", ["dinov2.train_dino", "--local-size", "10", *out],
         "--local-size 10: expected a multiple of --patch-size 4"),
        ("dinov2_knn_ckpt_missing", ["dinov2.eval_knn", "--ckpt", w["missing_dir"]], "no config.json there"),
        ("dinov2_linear_not_dinov2", ["dinov2.eval_linear", "--ckpt", w["broken_model"]],
         "expected dinov2 or dinov2_with_registers"),
        ("dinov2_export_ckpt_missing", ["dinov2.export_hf", "--ckpt", w["missing_dir"]], "train first"),
        # --- hiera_mae ------------------------------------------------------------------------------------
        ("hiera_mae_data_dir_missing", ["hiera_mae.train_mae", "--data-dir", w["missing_dir"], *out],
         "no_such_run: not a directory"),
        ("hiera_mae_no_readable_image", ["hiera_mae.train_mae", "--data-dir", w["no_images"], *out],
         "no readable image"),
        ("hiera_mae_dataset_unknown", ["hiera_mae.train_mae", "--dataset", "cifar", *out],
         "--dataset cifar: expected one of animal-mnist, mnist, textile, moving-mnist"),
        ("hiera_mae_image_size_does_not_tile", ["hiera_mae.train_mae", "--image-size", "30", "30", *out],
         "--image-size 30 30, --patch-stride 2 2, --masked-unit-size 4 4, --query-stride 2 2: expected the token grid"),
        ("hiera_mae_heads_per_stage", ["hiera_mae.train_mae", "--depths", "1", "2", *out],
         "--num-heads 1 2 4: expected one entry per stage of --depths 1 2"),
        ("hiera_mae_mask_ratio_hides_all", ["hiera_mae.train_mae", "--mask-ratio", "0.95", *out],
         "--mask-ratio 0.95: with 16 mask units no unit stays visible"),
        ("hiera_mae_finetune_init_missing", ["hiera_mae.train_finetune", "--init", w["missing_dir"], *out],
         "no config.json there; run train_mae.py first (or pass --scratch)"),
        ("hiera_mae_infer_not_hiera", ["hiera_mae.infer", "--ckpt", w["broken_model"], "--index", "0"],
         "expected hiera"),
        ("hiera_mae_infer_nothing_to_do", ["hiera_mae.infer", "--ckpt", w["missing_dir"]], "no config.json there"),
        # --- deepseek_v3 ----------------------------------------------------------------------------------
        ("deepseek_data_file_missing", ["deepseek_v3.train", "--data-file", w["missing"], *out],
         "does_not_exist.jsonl: no such file"),
        ("deepseek_data_file_bad_line", ["deepseek_v3.train", "--data-file", w["text_int.jsonl"],
                                         "--tokenizer-dir", w["out"] + "/dstok", *out], "text_int.jsonl:4"),
        ("deepseek_n_group", ["deepseek_v3.train", "--n-group", "3", *out],
         "--n-routed-experts 16: expected a multiple of --n-group 3"),
        ("deepseek_balance_unknown", ["deepseek_v3.train", "--balance", "switch", *out],
         "--balance switch: expected bias, aux or none"),
        ("deepseek_infer_ckpt_missing", ["deepseek_v3.infer", "--ckpt", w["missing_dir"]], "no config.json there"),
        ("deepseek_infer_not_deepseek", ["deepseek_v3.infer", "--ckpt", w["broken_model"]],
         "expected a deepseek_v3 checkpoint"),
        ("deepseek_export_ckpt_missing", ["deepseek_v3.export_hf", "--ckpt", w["missing_dir"]], "train first"),
        ("deepseek_import_not_deepseek", ["deepseek_v3.export_hf", "--import-dir", w["broken_model"], "--out",
                                          w["out"] + "/imported"], "expected 'deepseek_v3'"),
        ("deepseek_bench_ckpt_missing", ["deepseek_v3.bench", "--ckpt", w["missing_dir"]], "train first"),
        # --- compression ----------------------------------------------------------------------------------
        ("compress_model_missing", ["compression.evaluate", "--model", w["missing_dir"]],
         "no_such_run does not exist; expected smollm2, subject, or a transformers causal-LM directory"),
        ("compress_model_not_llama", ["compression.evaluate", "--model", w["broken_model"]],
         "expected a Llama-family causal LM"),
        ("compress_methods_unknown", ["compression.evaluate", "--methods", "quant,sparsegpt"],
         "--methods quant,sparsegpt: unknown 'sparsegpt'"),
        ("compress_format_unknown", ["compression.evaluate", "--formats", "nf4,nf5"], "--formats: unknown 'nf5'"),
        ("compress_curve_out_of_range", ["compression.evaluate", "--curve", "0.5,1.5"],
         "every sparsity must lie in (0, 1)"),
        ("compress_text_not_utf8", ["compression.train_subject", "--text-file", w["latin1.txt"], *out],
         "latin1.txt:2: not UTF-8"),
        ("compress_text_too_short", ["compression.train_subject", "--text-file", w["empty.txt"], *out],
         "expected at least 2,000"),
        ("compress_distill_mode", ["compression.train_distill", "--mode", "attention", *out],
         "--mode attention: expected ce, kd or kd_feat"),
        ("compress_distill_model_missing", ["compression.train_distill", "--model", w["missing_dir"], *out],
         "no_such_run does not exist"),
        ("compress_qlora_impl", ["compression.train_qlora", "--impl", "hqq", *out], "--impl hqq: expected ours"),
        ("compress_structured_keep", ["compression.train_structured", "--mlp-keep", "1.5", *out],
         "--mlp-keep 1.5: expected <= 1"),
        ("compress_infer_packed_missing", ["compression.infer", "--packed", w["missing_dir"]],
         "no model.packed.safetensors there"),
        # --- appendix -------------------------------------------------------------------------------------
        ("appendix_rnn_batch_0", ["appendix.rnn", "--batch-size", "0"], "--batch-size 0: expected >= 1"),
        ("appendix_positions_lr_0", ["appendix.positions", "--lr", "0"], "--lr 0.0: expected > 0"),
        ("appendix_memory_threads_negative", ["appendix.memory", "--threads", "-2"], "--threads -2: expected >= 0"),
    ]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, tuple[list[str], str, subprocess.CompletedProcess]]:
    """Every case, run once, in parallel; a tiny 'pretrained' GPT directory serves as --init-from / --ckpt."""
    from common.checkpoint import save_pretrained
    from gpt_minimind import train_tokenizer
    from gpt_minimind.model import MiniMindConfig, MiniMindForCausalLM

    d = tmp_path_factory.mktemp("bad")
    w = _files(d)
    text = d / "tok.jsonl"
    text.write_text("".join(json.dumps({"text": f"计算：{a}+{b}={a + b}。"}, ensure_ascii=False) + "\n"
                            for a in range(10) for b in range(10)))
    train_tokenizer.main(train_tokenizer.TokenizerConfig(vocab_size=300, data_file=str(text), out_dir=str(d / "tok")))
    base = d / "base"
    model = MiniMindForCausalLM(MiniMindConfig(vocab_size=300, hidden_size=32, num_hidden_layers=1,
                                               num_attention_heads=2, num_key_value_heads=1,
                                               max_position_embeddings=32))
    save_pretrained(model, model.config.to_dict(), base)
    (base / "tokenizer").mkdir()
    for f in (d / "tok").iterdir():
        (base / "tokenizer" / f.name).write_bytes(f.read_bytes())
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1",
           "TUTORIALS_DEBUG": "0", "PYTHONWARNINGS": "ignore"}
    cases = _cases(w, str(base))
    (d / "cases.json").write_text(json.dumps([args for _, args, _ in cases]))
    (d / "io").mkdir()
    subprocess.run([sys.executable, str(ROOT / "tests" / "fork_runner.py"), str(d / "cases.json"), str(d / "io"),
                    str(max(2, (os.cpu_count() or 2) + 1))], cwd=ROOT, env=env, check=True, timeout=600)
    codes = json.loads((d / "io" / "codes.json").read_text())
    return {name: (args, expected, subprocess.CompletedProcess(
        args, codes[str(i)], (d / "io" / f"{i}.out").read_text(errors="replace"),
        (d / "io" / f"{i}.err").read_text(errors="replace")))
        for i, (name, args, expected) in enumerate(cases)}


CASE_IDS = [c[0] for c in _cases(defaultdict(str), "")]  # the ids only: no file is needed to name them


def test_the_catalogue_is_large_enough():
    assert len(CASE_IDS) >= 40 and len(set(CASE_IDS)) == len(CASE_IDS)
    chapters = {i.split("_")[0] for i in CASE_IDS}
    assert {"gpt", "tb", "bert", "t5", "clip", "appendix"} <= chapters


@pytest.mark.parametrize("case", CASE_IDS)
def test_bad_input_is_one_clear_line(runs, case):
    args, expected, proc = runs[case]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 1, (args, proc.returncode, proc.stderr[-1500:])
    assert "Traceback" not in proc.stderr, (args, proc.stderr[-1500:])
    assert len(errors) == 1, (args, proc.stderr[-1500:])
    assert expected in errors[0], (args, errors[0])


def test_debug_shows_the_traceback():
    proc = subprocess.run([sys.executable, "-m", "appendix.rnn", "--batch-size", "0", "--debug"], cwd=ROOT,
                          text=True, capture_output=True, timeout=120)
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "UserError" in proc.stderr
