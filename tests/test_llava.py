"""llava: parity with transformers' Llava and LLaVA-NeXT on tiny random-weight configs, the splice, the labels,
the data, a few training steps, the export, and the bad inputs."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
import torch

from llava.loading import hf_state_dict, to_hf
from llava.model import (
    IGNORE_INDEX,
    LlavaConfig,
    LlavaModel,
    anyres_num_tokens,
    anyres_views,
    pack_anyres,
    select_best_resolution,
)

IMAGE_ID = 127


def tiny(pool: int = 1, projector: str = "mlp2x_gelu", anyres: bool = False, seed: int = 0,
         strategy: str = "default") -> LlavaModel:
    """A 28 px CLIP tower with 14 px patches (4 patches) and a 2-layer Llama of width 32, random weights."""
    from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    tower = CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, image_size=28, patch_size=14))
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False))
    cfg = LlavaConfig(projector_type=projector, pool=pool, image_token_id=IMAGE_ID, anyres=anyres,
                      image_grid_pinpoints=[[28, 56], [56, 28], [56, 56]], vision_feature_select_strategy=strategy)
    return LlavaModel(cfg, tower, lm).eval()


def prompt_ids(n_image: int, batch: int = 2, text: int = 6) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    rows = []
    for _ in range(batch):
        before, after = torch.randint(0, 100, (2,), generator=g), torch.randint(0, 100, (text,), generator=g)
        rows.append(torch.cat([before, torch.full((n_image,), IMAGE_ID), after]))
    return torch.stack(rows)


# --------------------------------------------------------------------------------------------------------
# parity with transformers
# --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("strategy, n_tokens", [("default", 4), ("full", 5)])
def test_logits_match_transformers_llava(strategy, n_tokens):
    """Our model and transformers' LlavaForConditionalGeneration built from the same weights (the export's
    renaming) give the same logits: layer -2, CLS dropped (default) or kept in front (full), the mlp2x_gelu
    projector, the splice."""
    ours = tiny(strategy=strategy)
    hf = to_hf(ours)
    ids = prompt_ids(ours.num_image_tokens())
    pixels = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        a = ours(ids, pixels)["logits"]
        b = hf(input_ids=ids, pixel_values=pixels).logits
    assert ours.num_image_tokens() == n_tokens
    assert (a - b).abs().max().item() <= 1e-4
    # and the images matter: other pictures, other logits
    with torch.no_grad():
        c = ours(ids, torch.randn(2, 3, 28, 28))["logits"]
    assert (a - c).abs().max().item() > 1e-3


def test_export_names_are_transformers_names():
    ours = tiny()
    names = set(hf_state_dict(ours))
    assert {"model.multi_modal_projector.linear_1.weight", "model.multi_modal_projector.linear_2.bias",
            "model.vision_tower.embeddings.patch_embedding.weight", "model.language_model.embed_tokens.weight",
            "lm_head.weight"} <= names


def test_image_token_count_equals_llava_processor():
    """The placeholders a picture needs, ours and LlavaProcessor's expansion of <image>, for the same tower."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import CLIPImageProcessor, LlavaProcessor, PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "hi": 1, "<image>": 2}
    t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=t, unk_token="<unk>", additional_special_tokens=["<image>"])
    ours = tiny()
    proc = LlavaProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 28},
                                                             crop_size={"height": 28, "width": 28}),
                          tokenizer=tok, patch_size=14, vision_feature_select_strategy="default",
                          num_additional_image_tokens=1, image_token="<image>")
    from PIL import Image

    enc = proc(images=Image.new("RGB", (28, 28)), text="<image> hi", return_tensors="pt")
    assert int((enc["input_ids"] == 2).sum()) == ours.num_image_tokens() == 4


def test_pooling_quarters_the_tokens_and_averages():
    ours = tiny(pool=2)
    assert ours.num_image_tokens() == 1
    pixels = torch.randn(1, 3, 28, 28)
    with torch.no_grad():
        pooled = ours.image_features(pixels)
        h = ours.vision_tower(pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
        expect = ours.multi_modal_projector(h.mean(1, keepdim=True))
    assert torch.allclose(pooled, expect, atol=1e-6)


def test_pooling_keeps_the_cls_token_whole_in_front_with_full():
    """--vision-feature-select-strategy full with --pool 2: the CLS vector first, unpooled, then the pooled
    patches; anyres (which stitches patch grids) refuses it."""
    ours = tiny(pool=2, strategy="full")
    assert ours.num_image_tokens() == 2
    pixels = torch.randn(3, 3, 28, 28)
    with torch.no_grad():
        feats = ours.image_features(pixels)
        h = ours.vision_tower(pixels, output_hidden_states=True).hidden_states[-2]
        expect = ours.multi_modal_projector(torch.stack([h[:, 0], h[:, 1:].mean(1)], dim=1))
    assert feats.shape == (3, 2, 32)
    assert torch.allclose(feats, expect, atol=1e-6)
    with pytest.raises(ValueError, match="anyres .* default"):
        LlavaConfig(anyres=True, vision_feature_select_strategy="full")


# --------------------------------------------------------------------------------------------------------
# anyres (LLaVA-NeXT)
# --------------------------------------------------------------------------------------------------------

PINPOINTS = [[28, 56], [56, 28], [56, 56], [28, 84]]


def test_best_resolution_equals_transformers():
    from transformers.image_processing_utils import select_best_resolution as hf_select

    rng = random.Random(0)
    for _ in range(300):
        size = (rng.randint(5, 200), rng.randint(5, 200))
        assert select_best_resolution(size, PINPOINTS) == tuple(hf_select(size, PINPOINTS)), size


@pytest.mark.parametrize("size", [(40, 90), (90, 40), (50, 50), (20, 70)])
def test_anyres_views_equal_llava_next_image_processor(size):
    """The global view then the tiles of the best grid, the picture scaled to fit and padded evenly: the same
    views as LlavaNextImageProcessor's (pixel values within the rounding of two bicubic resizers)."""
    from transformers import LlavaNextImageProcessor

    proc = LlavaNextImageProcessor(image_grid_pinpoints=PINPOINTS, size={"height": 28, "width": 28},
                                   crop_size={"height": 28, "width": 28}, do_normalize=False, do_rescale=False)
    image = torch.rand(3, *size) * 255
    theirs = proc._get_image_patches(image, grid_pinpoints=PINPOINTS, size=(28, 28), patch_size=28, resample=3)
    ours, grid = anyres_views(image, PINPOINTS, 28)
    assert len(theirs) == len(ours) == 1 + grid[0] * grid[1]
    for a, b in zip(ours, theirs):
        assert a.shape == b.shape
        assert (a - b.float()).abs().mean().item() < 1.0  # on a 0..255 scale


@pytest.mark.parametrize("size", [(40, 90), (90, 40), (50, 50), (20, 70), (56, 30)])
def test_anyres_packing_equals_llava_next(size):
    """Tiles stitched, unpadded, a newline after each row, after the global view: LLaVA-NeXT's
    pack_image_features, and the count its processor expands <image> to."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration
    from transformers.models.llava_next.processing_llava_next import LlavaNextProcessor

    n, C = 2, 8
    grid = select_best_resolution(size, PINPOINTS)
    rows, cols = grid[0] // 28, grid[1] // 28
    feats = torch.randn(1 + rows * cols, n * n, C)
    newline = torch.randn(C)
    ours = pack_anyres(feats, size, (rows, cols), newline)
    hf = LlavaNextForConditionalGeneration(LlavaNextConfig(
        vision_config=CLIPVisionConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                                       image_size=28, patch_size=14),
        text_config=LlamaConfig(vocab_size=64, hidden_size=C, intermediate_size=16, num_hidden_layers=1,
                                num_attention_heads=2), image_grid_pinpoints=PINPOINTS))
    packed, lens = hf.model.pack_image_features([feats], torch.tensor([size]), "default", image_newline=newline)
    assert torch.equal(ours, packed[0])
    proc = LlavaNextProcessor.__new__(LlavaNextProcessor)
    proc.image_processor = type("P", (), {"image_grid_pinpoints": PINPOINTS})()
    proc.patch_size, proc.num_additional_image_tokens = 14, 0
    assert anyres_num_tokens(size, PINPOINTS, 28, n) == ours.shape[0] == proc._get_number_of_features(*size, 28, 28)


def test_anyres_model_path_runs_end_to_end():
    ours = tiny(anyres=True)
    feats = ours.anyres_features(torch.randn(3, 40, 90))
    assert feats.shape == (anyres_num_tokens((40, 90), ours.config.image_grid_pinpoints, 28, 2), 32)
    ids = prompt_ids(feats.shape[0], batch=1)
    with torch.no_grad():
        out = ours(ids, image_features=feats[None])
    assert torch.isfinite(out["logits"]).all()


# --------------------------------------------------------------------------------------------------------
# the splice, the loss, decoding
# --------------------------------------------------------------------------------------------------------

def test_placeholder_count_must_match_features():
    ours = tiny()
    with pytest.raises(ValueError, match="4 per picture"):
        ours(prompt_ids(3), torch.randn(2, 3, 28, 28))


def test_loss_scores_only_the_labelled_positions():
    """The loss equals the full-logits cross-entropy over the labelled positions; changing a label at a -100
    position changes nothing."""
    ours = tiny()
    ids = prompt_ids(4)
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, -3:] = ids[:, -3:]
    pixels = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        loss = ours(ids, pixels, labels=labels)["loss"]
        logits = ours(ids, pixels)["logits"]
    ref = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 128), labels[:, 1:].reshape(-1),
                                            ignore_index=IGNORE_INDEX)
    assert abs(loss.item() - ref.item()) < 1e-5


def test_generate_with_cache_equals_transformers_greedy():
    """Our greedy decoding with the KV cache, left-padded batch, equals transformers' generate on each row."""
    ours = tiny()
    hf = to_hf(ours)
    a, b = prompt_ids(4, batch=1, text=3)[0], prompt_ids(4, batch=2, text=6)[1]
    ids = torch.stack([torch.cat([torch.zeros(3, dtype=torch.long), a]), b])  # row 0 left-padded by 3
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    pixels = torch.randn(2, 3, 28, 28)
    got = ours.generate(ids, mask, pixels, max_new_tokens=5, eos_token_id=-1)
    for row, (p, pix) in enumerate([(a, pixels[:1]), (b, pixels[1:])]):
        ref = hf.generate(input_ids=p[None], pixel_values=pix, max_new_tokens=5, do_sample=False)
        assert got[row] == ref[0, len(p):].tolist()


# --------------------------------------------------------------------------------------------------------
# the data: the chat template, the labels, your own conversations
# --------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smol_tok():
    from transformers import AutoTokenizer

    from llava.loading import add_image_token, smollm2_dir

    return add_image_token(AutoTokenizer.from_pretrained(str(smollm2_dir())))


def test_encode_labels_the_answers_and_their_end_of_turn_only(smol_tok):
    from llava.dataset import encode

    ids, labels = encode(smol_tok, [("what is the red shape?", "circle"), ("and its colour?", "red")], n_image=16)
    image_id = smol_tok.convert_tokens_to_ids("<image>")
    assert ids.count(image_id) == 16 and len(ids) == len(labels)
    kept = [t for t, lab in zip(ids, labels) if lab != IGNORE_INDEX]
    assert all(lab in (IGNORE_INDEX, t) for t, lab in zip(ids, labels))
    assert smol_tok.decode(kept) == "circle<|im_end|>\nred<|im_end|>\n"
    assert all(lab == IGNORE_INDEX for t, lab in zip(ids, labels) if t == image_id)


def test_the_prompt_is_the_conversation_up_to_the_answer(smol_tok):
    from llava.dataset import encode, encode_prompt

    ids, labels = encode(smol_tok, [("is there a circle?", "yes")], n_image=4)
    prompt = encode_prompt(smol_tok, "is there a circle?", n_image=4)
    assert ids[:len(prompt)] == prompt and labels[len(prompt)] == ids[len(prompt)]
    assert all(lab == IGNORE_INDEX for lab in labels[:len(prompt)])


def write_pictures(folder, n: int = 16):
    """n 64 px pictures of a red or blue square, and LLaVA-format conversations about their colour ("red", "dark
    blue")."""
    import json

    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        color = ("red", "blue")[i % 2]
        im = Image.new("RGB", (64, 64), (240, 240, 230))
        ImageDraw.Draw(im).rectangle([8 + i, 10, 40 + i, 42], fill=color)
        im.save(folder / f"{i}.png")
        answer = ("red", "dark blue")[i % 2]  # answers of unequal length: the ranks' shares of answer tokens differ
        rows.append({"id": str(i), "image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nwhat color is the shape?"}, {"from": "gpt", "value": answer}]})
    path = folder / "conv.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_own_conversations_load_and_bad_rows_name_file_and_line(tmp_path):
    import json

    from common.errors import UserError
    from llava.dataset import load_conversations

    path = write_pictures(tmp_path / "pics", 4)
    ex = load_conversations(path)
    assert len(ex) == 4 and ex[1].turns == [("what color is the shape?", "dark blue")]
    bad = tmp_path / "pics" / "bad.jsonl"
    good = path.read_text().splitlines()
    for row, expect in [({"image": "0.png"}, "missing field"),
                        ({"image": "0.png", "conversations": [{"from": "gpt", "value": "x"}]}, "pairs"),
                        ({"image": "0.png", "conversations": [{"from": "gpt", "value": "x"},
                                                              {"from": "human", "value": "y"}]}, "turns 1 and 2"),
                        ({"image": "nope.png", "conversations": json.loads(good[0])["conversations"]}, "not found")]:
        bad.write_text(good[0] + "\n" + json.dumps(row) + "\n")
        with pytest.raises(UserError, match=rf"bad.jsonl:2: .*{expect}"):
            load_conversations(bad)


def test_baselines_that_never_see_a_picture():
    from llava.dataset import Example, majority_per_type, question_prior

    train = [Example(0, [("is there a circle?", "no")], "yes/no"), Example(1, [("is there a circle?", "no")], "yes/no"),
             Example(2, [("is there a red shape?", "yes")], "yes/no"), Example(3, [("what shape?", "circle")], "shape"),
             Example(4, [("what color?", "red")], "color")]
    test = [Example(5, [("is there a circle?", "no")], "yes/no"),
            Example(6, [("is there a red shape?", "yes")], "yes/no")]
    assert majority_per_type(train, test)["overall"] == 0.5  # "no" for every yes/no question
    assert question_prior(train, test)["overall"] == 1.0  # each question's own most common answer


def test_answer_balance_makes_each_question_say_yes_and_no_equally_often():
    """With the weights, a question whose training answer is "no" 7 times in 8 is drawn with "yes" as often as
    with "no", so its wording alone predicts nothing; without them the order is a shuffle (each example once)."""
    from llava.dataset import Example
    from llava.training import answer_balance, epoch_order

    ex = [Example(i, [("is there a red shape?", "yes" if i % 8 == 0 else "no")], "yes/no") for i in range(800)]
    ex += [Example(800 + i, [("what shape?", ("circle", "triangle")[i % 2])], "shape") for i in range(200)]
    order = epoch_order(len(ex), 0, 0, answer_balance(ex))
    red = [ex[i].turns[0][1] for i in order if ex[i].turns[0][0] == "is there a red shape?"]
    assert abs(red.count("yes") / len(red) - 0.5) < 0.05
    assert sorted(epoch_order(len(ex), 0, 0)) == list(range(len(ex)))


# --------------------------------------------------------------------------------------------------------
# training on tiny models: the loss falls, resume, LoRA/QLoRA, the export
# --------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory, smol_tok):
    """A 64 px CLIP tower (8 px patches, width 32) and a 2-layer Llama of width 64 with SmolLM2's tokenizer.
    Width 64: on a CPU with AVX512-BF16, bitsandbytes repacks 4-bit weights for inference, which needs
    in_features a multiple of its 64 block size and out_features a multiple of 32 (bitsandbytes 0.50)."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

    d = tmp_path_factory.mktemp("llava_dirs")
    torch.manual_seed(0)
    CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     image_size=64, patch_size=8)).save_pretrained(str(d / "clip"))
    CLIPImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64}).save_pretrained(
        str(d / "clip"))
    LlamaForCausalLM(LlamaConfig(vocab_size=len(smol_tok) - 1, hidden_size=64, intermediate_size=128,
                                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                 max_position_embeddings=160, tie_word_embeddings=True)).save_pretrained(str(d / "llm"))
    from transformers import AutoTokenizer

    from llava.loading import smollm2_dir

    AutoTokenizer.from_pretrained(str(smollm2_dir())).save_pretrained(str(d / "llm"))
    data = write_pictures(d / "pics", 16)
    return {"vision": str(d / "clip"), "llm": str(d / "llm"), "data": str(data)}


def stage_cfg(stage: int, dirs: dict, out, **kw):
    from llava.train_stage1 import Stage1Config
    from llava.train_stage2 import Stage2Config

    common = dict(vision=dirs["vision"], llm=dirs["llm"], data_file=dirs["data"], valid_file=dirs["data"],
                  batch_size=4, warmup_iters=1, eval_examples=8, eval_batch_size=8, log_every=1, save_every=2,
                  threads=1, dtype="fp32", out_dir=str(out))  # fp32: the same figures on CPUs with and without bf16
    if "pool" in kw:
        common["model"] = LlavaConfig(pool=kw.pop("pool"),
                                      vision_feature_select_strategy=kw.pop("strategy", "default"))
    common.update(kw)
    if stage == 1:
        return Stage1Config(**{"max_iters": 6, "lr": 1e-2, **common})
    return Stage2Config(**{"max_iters": 4, "lr": 1e-2, "lora_dropout": 0.0, **common})


def losses(out) -> list[float]:
    from common.log import read_metrics

    return [r["loss"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r]


@pytest.fixture(scope="module")
def stage1_run(tiny_dirs, tmp_path_factory):
    from llava.train_stage1 import main

    out = tmp_path_factory.mktemp("stage1")
    res = main(stage_cfg(1, tiny_dirs, out, max_iters=12))
    return out, res


def test_stage1_trains_the_projector_only_and_its_loss_falls(stage1_run):
    out, res = stage1_run
    names = list(res["trainable"].params)
    assert names and all(n.startswith("multi_modal_projector") for n in names)
    ls = losses(out)
    assert sum(ls[-3:]) / 3 < sum(ls[:3]) / 3
    assert (out / "final" / "llava.json").is_file() and (out / "loss.png").is_file()


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_stage2_modes_train_what_they_say_and_resume_to_the_same_weights(tiny_dirs, stage1_run, tmp_path, mode):
    from safetensors.torch import load_file

    from llava.train_stage2 import main

    init = str(stage1_run[0] / "final")
    whole = main(stage_cfg(2, tiny_dirs, tmp_path / "whole", init_from=init, mode=mode))
    names = list(whole["trainable"].params)
    assert any(n.startswith("multi_modal_projector") for n in names)
    if mode == "lora":
        assert all("lora_" in n or n.startswith("multi_modal_projector") for n in names)
    else:
        assert any(n.endswith("embed_tokens__weight") for n in names)
    # an interruption after step 2: the run's folder as it was then (step 2's checkpoint, no step 4, no final/)
    import shutil

    shutil.copytree(tmp_path / "whole", tmp_path / "part")
    shutil.rmtree(tmp_path / "part" / "checkpoints" / "step_000004")
    shutil.rmtree(tmp_path / "part" / "final")
    (tmp_path / "part" / "checkpoints" / "latest").write_text("step_000002\n")
    main(stage_cfg(2, tiny_dirs, tmp_path / "part", init_from=init, mode=mode, resume=True))
    a = load_file(str(tmp_path / "whole" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "part" / "final" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=0, rtol=0)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_questions_score_each_conversation_as_its_own_row_does(tiny_dirs, attention):
    """pack_questions: one row per picture, its conversations after the shared prefix. The loss and the
    projector's gradient equal those of one row per conversation (collate); with a plain causal mask instead,
    later questions would read the earlier ones' answers, and the loss differs."""
    from llava.dataset import Example
    from llava.loading import build
    from llava.training import collate, pack_questions, picture_groups

    model, tok, _ = build(tiny_dirs["vision"], tiny_dirs["llm"], LlavaConfig(pool=2))
    model.language_model.config._attn_implementation = attention
    examples = [Example(0, [("is there a red shape?", "yes")]), Example(1, [("what colour is it?", "blue")]),
                Example(0, [("what shape is it?", "square")]), Example(0, [("is it blue?", "no")]),
                Example(1, [("is it a circle?", "no"), ("what is it then?", "a square")]),
                Example(2, [("is it red?", "yes")]),  # a picture with one conversation
                Example(3, [("is it red?", "yes")]), Example(3, [("is it red?", "no")])]  # the same question twice
    pixels = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    n = model.num_image_tokens()
    groups = picture_groups(examples)
    assert groups == [[0, 2, 3], [1, 4], [5], [6, 7]]
    ids, mask, labels, positions, n_tokens = pack_questions(tok, [[examples[i] for i in g] for g in groups], n,
                                                            "Answer in one word.", 512, model.config.image_token_id)
    flat = [i for g in groups for i in g]
    ids1, mask1, labels1 = collate(tok, [examples[i] for i in flat], n, "Answer in one word.", 512)
    assert ids.shape[0] == 4 and n_tokens < int(mask1.sum())
    assert (labels != IGNORE_INDEX).sum() == (labels1 != IGNORE_INDEX).sum()
    assert positions.max() < mask1.sum(1).max()  # each conversation's positions are its own

    def loss_and_grad(*args, **kw):
        model.zero_grad()
        loss = model(*args, **kw)["loss"]
        loss.backward()
        return loss.item(), model.multi_modal_projector.linear_1.weight.grad.clone()

    model.multi_modal_projector.requires_grad_(True)
    packed = loss_and_grad(ids, pixels, mask, labels, position_ids=positions)
    plain = loss_and_grad(ids1, pixels[[examples[i].image for i in flat]], mask1, labels1)
    assert abs(packed[0] - plain[0]) < 1e-5
    torch.testing.assert_close(packed[1], plain[1], atol=1e-6, rtol=1e-4)
    causal = torch.ones_like(mask).tril()
    leaky = loss_and_grad(ids, pixels, causal, labels, position_ids=torch.arange(ids.shape[1]).expand_as(ids))
    assert abs(leaky[0] - plain[0]) > 1e-3


def test_qlora_base_is_4bit_nf4_with_double_quantization_and_trains(tiny_dirs, stage1_run, tmp_path):
    pytest.importorskip("bitsandbytes")
    from llava.train_stage2 import main

    res = main(stage_cfg(2, tiny_dirs, tmp_path, init_from=str(stage1_run[0] / "final"), mode="qlora"))
    from llava.training import load_trained

    model = load_trained(res["final_dir"])[0]
    q_proj = model.language_model.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    assert type(q_proj).__name__ == "Linear4bit"
    assert q_proj.weight.quant_state.quant_type == "nf4" and q_proj.weight.quant_state.nested
    assert all(math.isfinite(v) for v in losses(tmp_path))


@pytest.mark.parametrize("strategy", ["default", "full"])
def test_export_loads_in_transformers_and_answers_with_the_same_text(tiny_dirs, tmp_path, strategy):
    """A --pool 1 model trained a few steps, exported: transformers' Llava gives infer.py's greedy answers, with
    CLS dropped (default: stage 1 alone) and kept (full: stage 1, then LoRA stage 2, which the export merges)."""
    from llava.dataset import load_conversations, pixel_values, read_image
    from llava.export_hf import export, load_export
    from llava.train_stage1 import main
    from llava.training import answer, load_trained

    res = main(stage_cfg(1, tiny_dirs, tmp_path / "s1", pool=1, strategy=strategy, max_iters=4))
    if strategy == "full":
        from llava.train_stage2 import main as stage2

        res = stage2(stage_cfg(2, tiny_dirs, tmp_path / "s2", init_from=str(res["final_dir"]), max_iters=2,
                               save_every=2))
    ours, tok, proc, meta = load_trained(res["final_dir"])
    assert ours.config.vision_feature_select_strategy == strategy
    export(res["final_dir"], tmp_path / "hf")
    theirs, tok2, proc2, _ = load_export(tmp_path / "hf")
    ex = load_conversations(tiny_dirs["data"])[:4]
    pix = pixel_values([read_image(e.image) for e in ex], proc)
    torch.testing.assert_close(pix, pixel_values([read_image(e.image) for e in ex], proc2))
    qs = [e.turns[0][0] for e in ex]
    assert answer(ours, tok, qs, pix, meta["system_prompt"]) == answer(theirs, tok2, qs, pix, meta["system_prompt"])
    # the tiny model may end its turn at once: compare 6 greedy tokens past the end of turn too
    from llava.dataset import encode_prompt, pad_left

    ids, mask = pad_left([encode_prompt(tok, q, ours.num_image_tokens(), meta["system_prompt"]) for q in qs],
                         tok.pad_token_id)
    a = ours.generate(ids, mask, pix, max_new_tokens=6, eos_token_id=5)
    b = theirs.generate(ids, mask, pix, max_new_tokens=6, eos_token_id=5)
    assert a == b and all(len(r) == 6 for r in a)


def test_export_refuses_a_pooled_model_and_says_why():
    from common.errors import UserError

    with pytest.raises(UserError, match="--pool 2"):
        to_hf(tiny(pool=2))


# --------------------------------------------------------------------------------------------------------
# several processes: torchrun (DDP, FSDP2), accelerate launch, DeepSpeed ZeRO-2/3
# --------------------------------------------------------------------------------------------------------

def _flags(dirs: dict, init: str, out) -> list[str]:
    return ["--vision", dirs["vision"], "--llm", dirs["llm"], "--data-file", dirs["data"], "--valid-file",
            dirs["data"], "--init-from", init, "--batch-size", "4", "--max-iters", "3", "--warmup-iters", "1",
            "--lr", "1e-2", "--lora-dropout", "0", "--eval-examples", "4", "--save-every", "3", "--log-every", "1",
            "--threads", "1", "--dtype", "fp32", "--out-dir", str(out)]


def _launch(launcher: list[str], flags: list[str]) -> None:
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    cmd = [sys.executable, "-m", *launcher, *flags]
    proc = subprocess.run(cmd, cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _weights(out) -> dict:
    from safetensors.torch import load_file

    return load_file(str(out / "final" / "model.safetensors"))


TORCHRUN = ["torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "llava.train_stage2"]
ACCELERATE = ["accelerate.commands.launch", "--config_file", "llava/accelerate_config.yaml", "-m",
              "llava.train_stage2"]


@pytest.fixture(scope="module")
def one_process(tiny_dirs, stage1_run, tmp_path_factory):
    """Stage 2 (LoRA) for 3 steps of batch 4 in one process (``_flags``' values): what two processes of 2 each
    must reproduce."""
    from llava.train_stage2 import main

    out = tmp_path_factory.mktemp("one")
    main(stage_cfg(2, tiny_dirs, out, init_from=str(stage1_run[0] / "final"), max_iters=3, save_every=3,
                   eval_examples=4))
    return out


@pytest.mark.parametrize("launcher, extra", [(TORCHRUN, []), (TORCHRUN, ["--distributed", "fsdp"]),
                                             (ACCELERATE, [])], ids=["torchrun-ddp", "torchrun-fsdp2", "accelerate"])
def test_two_processes_train_the_weights_one_process_trains(tiny_dirs, stage1_run, one_process, tmp_path, launcher,
                                                            extra):
    """Each rank takes half of every batch; the loss is weighed by each rank's share of the answer tokens, so the
    averaged gradient is the global batch's: the final weights equal one process's within float summation order."""
    _launch(launcher, _flags(tiny_dirs, str(stage1_run[0] / "final"), tmp_path) + extra)
    a, b = _weights(one_process), _weights(tmp_path)
    assert a.keys() == b.keys()
    # AdamW divides by the root of each element's squared gradients, so where an element's gradient nearly cancels
    # across the batch, float summation-order noise becomes a few 1e-5 in the weight (seen: one element in 2048 at
    # 4.5e-5). The tolerance is 1 % of one step at lr 1e-2; a wrongly weighted loss moves most elements by far more.
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-4, rtol=0, msg=lambda m, k=k: f"{k}: {m}")
    init = _weights(stage1_run[0])
    moved = max((a[k] - init[k]).abs().max().item() for k in init if k in a)
    assert moved > 1e-3  # the runs trained: the projector left stage 1's values


@pytest.mark.parametrize("config", ["ds_zero2.json", "ds_zero3.json"])
def test_deepspeed_zero_two_processes_train_the_weights_one_process_trains(tiny_dirs, stage1_run, one_process,
                                                                            tmp_path, config):
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        pytest.skip("deepspeed is not installed: it is not a dependency of this project (pip install deepspeed; "
                    "the README's multi-process section)")
    _launch(TORCHRUN, _flags(tiny_dirs, str(stage1_run[0] / "final"), tmp_path) + ["--deepspeed", f"llava/{config}"])
    a, b = _weights(one_process), _weights(tmp_path)
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=2e-5, rtol=0, msg=lambda m, k=k: f"{k}: {m}")


def test_a_conversation_longer_than_the_context_is_one_clear_error(tiny_dirs, tmp_path):
    import json

    from common.errors import UserError
    from llava.train_stage1 import main

    long = tmp_path / "long.jsonl"
    row = json.loads(open(tiny_dirs["data"]).readline())
    row["image"] = str(Path(tiny_dirs["data"]).parent / row["image"])
    row["conversations"][0]["value"] = "<image>\n" + "is it red? " * 60
    long.write_text(json.dumps(row) + "\n")
    with pytest.raises(UserError, match=r"tokens with its 64 visual words; the language model's context is 160"):
        main(stage_cfg(1, tiny_dirs, tmp_path / "out", data_file=str(long), valid_file=str(long), batch_size=1,
                       pool=1))


def test_infer_answers_a_picture_file_and_refuses_a_question_past_the_context(tiny_dirs, stage1_run):
    from common.errors import UserError
    from llava.infer import InferConfig, main

    picture = str(Path(tiny_dirs["data"]).parent / "0.png")
    res = main(InferConfig(ckpt=str(stage1_run[0] / "final"), image=picture, question="what color is the shape?",
                           max_new_tokens=3))
    assert isinstance(res["answer"], str)
    with pytest.raises(UserError, match="the model's context is 160"):
        main(InferConfig(ckpt=str(stage1_run[0] / "final"), image=picture, question="is it red? " * 60))


def test_chat_keeps_the_conversation_and_an_empty_line_ends_it(tiny_dirs, stage1_run, monkeypatch):
    import io

    from llava.infer import InferConfig, main

    monkeypatch.setattr("sys.stdin", io.StringIO("what color is it?\nand the shape?\n\nnot read\n"))
    picture = str(Path(tiny_dirs["data"]).parent / "1.png")
    res = main(InferConfig(ckpt=str(stage1_run[0] / "final"), image=picture, chat=True, max_new_tokens=2))
    assert [q for q, _ in res["history"]] == ["what color is it?", "and the shape?"]
