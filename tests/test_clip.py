"""clip: the model against transformers' CLIPModel, the two losses against their references, the gathered loss
under two processes against one process, the captions against the pictures, and a short run that learns."""

from __future__ import annotations

import json
import math
import os
import socket

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clip import dataset as ds
from clip.model import MAX_LOGIT_SCALE, CLIPConfig, CLIPModel
from clip.train_clip import ContrastiveLoss, contrastive_logits, infonce_loss, siglip_loss
from common.errors import UserError

TINY = dict(image_size=32, patch_size=8, vision_hidden_size=32, vision_num_hidden_layers=2,
            vision_num_attention_heads=4, vision_intermediate_size=64, vocab_size=99, text_hidden_size=48,
            text_num_hidden_layers=2, text_num_attention_heads=4, text_intermediate_size=96,
            max_position_embeddings=16, projection_dim=24)


def _text_batch(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Three captions of different lengths: <|endoftext|> (id 1) at 6, 9 and 3, padding (0) after the third."""
    ids = torch.randint(3, 99, (3, 10), generator=gen)
    for row, end in enumerate((6, 9, 3)):
        ids[row, end] = 1
    ids[2, 4:] = 0
    mask = (torch.arange(10)[None] <= torch.tensor([9, 9, 3])[:, None]).long()
    return ids, mask


def test_our_model_with_transformers_weights_gives_transformers_outputs():
    transformers = pytest.importorskip("transformers")
    cfg = CLIPConfig(**TINY)
    torch.manual_seed(0)
    ref = transformers.CLIPModel(transformers.CLIPConfig(**cfg.to_hf_dict())).eval()
    ours = CLIPModel(cfg).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)  # the same names, nothing left over
    gen = torch.Generator().manual_seed(1)
    ids, mask = _text_batch(gen)
    px = torch.randn(3, 3, 32, 32, generator=gen)
    with torch.no_grad():
        r = ref(input_ids=ids, pixel_values=px, attention_mask=mask, return_loss=True)
        o = ours(ids, px, mask)
    for key in ("logits_per_image", "logits_per_text", "image_embeds", "text_embeds"):
        torch.testing.assert_close(o[key], r[key], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(infonce_loss(o["logits_per_image"]), r.loss, atol=1e-6, rtol=1e-6)
    # and a config.json written by us is a config transformers reads, and back
    assert CLIPConfig.from_dict(transformers.CLIPConfig(**cfg.to_hf_dict()).to_dict()) == cfg


def test_the_text_feature_is_read_at_the_first_end_of_text_token():
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(**TINY)).eval()
    ids, mask = _text_batch(torch.Generator().manual_seed(1))
    changed = ids.clone()
    changed[0, 7:] = 5  # tokens after the end of caption 0 (it ends at 6): causal attention cannot see them
    with torch.no_grad():
        a, b = model.get_text_features(ids, mask), model.get_text_features(changed, mask)
    torch.testing.assert_close(a[0], b[0])
    changed[0, 5] = 7  # a token before the end changes the feature
    with torch.no_grad():
        assert not torch.allclose(model.get_text_features(changed, mask)[0], a[0])


def test_siglip_loss_equals_transformers_siglip():
    transformers = pytest.importorskip("transformers")
    tc = dict(vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
              max_position_embeddings=16)
    vc = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, image_size=32,
              patch_size=8)
    torch.manual_seed(0)
    ref = transformers.SiglipModel(transformers.SiglipConfig(text_config=tc, vision_config=vc)).eval()
    with torch.no_grad():
        ref.logit_bias.fill_(-3.0)
        out = ref(input_ids=torch.randint(0, 99, (4, 8)), pixel_values=torch.randn(4, 3, 32, 32), return_loss=True)
        # transformers: logits_per_text = scale <t, i> + bias; ours adds the bias inside the loss
        ours = siglip_loss(out.logits_per_image - ref.logit_bias, ref.logit_bias)
    torch.testing.assert_close(ours, out.loss, atol=1e-5, rtol=1e-5)


def test_infonce_is_ln_b_for_uninformative_features_and_falls_when_pairs_match():
    B = 8
    assert infonce_loss(torch.zeros(B, B)).item() == pytest.approx(math.log(B))
    logits = torch.randn(B, B)  # a rank's rows: the same loss as the whole matrix's rows there
    whole = F.cross_entropy(logits, torch.arange(B), reduction="none") + F.cross_entropy(
        logits.t(), torch.arange(B), reduction="none")
    assert infonce_loss(logits[4:], logits.t()[4:], offset=4).item() == pytest.approx(whole[4:].mean().item() / 2)
    assert infonce_loss(10 * torch.eye(B)).item() < 0.01
    loss = ContrastiveLoss("siglip")
    assert loss.logit_bias.item() == -10.0 and ContrastiveLoss("infonce").logit_bias is None
    with pytest.raises(ValueError, match="--loss triplet: expected infonce or siglip"):
        ContrastiveLoss("triplet")


def _ddp_worker(rank: int, port: int, out_file: str, kind: str) -> None:
    import torch.distributed as dist

    from common.distributed import DistInfo

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(**TINY))
    net = torch.nn.parallel.DistributedDataParallel(model)
    gen = torch.Generator().manual_seed(1)
    ids, mask = _text_batch(gen)
    ids, mask = torch.cat([ids, ids.flip(0)]), torch.cat([mask, mask.flip(0)])  # a global batch of 6
    px = torch.randn(6, 3, 32, 32, generator=gen)
    mine = slice(3 * rank, 3 * rank + 3)
    loss = ContrastiveLoss(kind)(*contrastive_logits(net, px[mine], ids[mine], mask[mine], DistInfo(rank, rank, 2)))
    loss.backward()
    losses = [torch.zeros(()) for _ in range(2)]
    dist.all_gather(losses, loss.detach())
    if rank == 0:
        grads = {n: p.grad.tolist() for n, p in model.named_parameters() if p.grad is not None}
        with open(out_file, "w") as f:
            json.dump({"loss": sum(x.item() for x in losses) / 2, "grads": grads}, f)
    dist.destroy_process_group()



def test_a_swapped_caption_the_text_tower_cannot_tell_apart_costs_the_loss_a_coin_toss_per_image():
    """--swap-negatives: each image also meets its own caption with a word changed. Perfect features otherwise
    (true logit 20, the rest 0): if the swapped caption scores as high as the true one, InfoNCE's image row is a
    coin toss between them, ln 2, and the mean of the two directions grows by ln 2 / 2; SigLIP pays
    -log sigmoid(-(20 + b)) per image. contrastive_logits reads the swapped captions from the second half."""
    logits = 20 * torch.eye(4)
    infonce = ContrastiveLoss("infonce")
    assert infonce(logits, logits.t()).item() < 1e-6
    coin_toss = infonce(logits, logits.t(), swapped=torch.full((4,), 20.0)).item()
    assert coin_toss == pytest.approx(math.log(2) / 2, abs=1e-6)
    assert infonce(logits, logits.t(), swapped=torch.full((4,), -20.0)).item() < 1e-6  # told apart: no cost
    siglip = ContrastiveLoss("siglip")
    base = siglip(logits, logits.t()).item()
    got = siglip(logits, logits.t(), swapped=torch.full((4,), 20.0)).item()
    assert got - base == pytest.approx(-F.logsigmoid(torch.tensor(-10.0)).item(), rel=1e-5)
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(**TINY))
    gen = torch.Generator().manual_seed(1)
    ids, mask = _text_batch(gen)
    px = torch.randn(3, 3, 32, 32, generator=gen)
    both_ids, both_mask = torch.cat([ids, ids.flip(0)]), torch.cat([mask, mask.flip(0)])
    per_image, _, _, swapped = contrastive_logits(model, px, both_ids, both_mask)
    alone, _, _, none = contrastive_logits(model, px, ids, mask)
    assert none is None
    torch.testing.assert_close(per_image, alone)
    torch.testing.assert_close(swapped, alone.flip(1).diagonal())  # image i against caption 2 - i


def test_a_place_blind_model_can_only_guess_among_pictures_that_agree_on_every_other_word():
    def item(i, row, col, tint="pink"):
        return ds.Item(i, "circle", "red", "small", row, col, 0.1, 0.5, 0.5, tint)

    # a group of three pictures (two share the top-left caption) and a picture alone in its group
    items = [item(0, "top", "left"), item(1, "top", "left"), item(2, "bottom", "right"), item(3, "top", "left", "mint")]
    i2t, t2i = ds.place_blind_recall(items)
    assert i2t == pytest.approx((1 / 2 + 1 / 2 + 1 / 2 + 1) / 4)  # two distinct captions in the group
    assert t2i == pytest.approx((2 / 3 + 1 / 3 + 1) / 3)  # per distinct caption: its pictures / the group's

def test_swapped_captions_change_the_one_attribute_asked_for():
    import random

    rng = random.Random(0)
    items = [ds.Item(i, ds.SHAPES[i % 3], list(ds.COLORS)[i % 8], ds.SIZES[i % 2], ds.ROWS[i % 3], ds.COLS[i // 3 % 3],
                     0.1, 0.5, 0.5, ds.TINTS[i % 6]) for i in range(30)]
    for it in items:
        for attribute in ds.SWAPPABLE:
            for template in range(len(ds.TEMPLATES)):
                false = ds.swapped_caption(it, template, attribute, rng)
                # the false caption is the true one of some picture that differs in that attribute alone
                twins = [ds.replace(it, **dict(zip(("row", "col"), v)) if attribute == "place" else {attribute: v})
                         for v in ds.SWAPPABLE[attribute]]
                matches = [o for o in twins if o.caption(template) == false]
                assert matches and all(o != it for o in matches), (it, attribute, false)
    with pytest.raises(UserError, match="--swap-negatives where: expected some of place, size"):
        ds.swapped_caption(items[0], 0, "where", rng)

@pytest.mark.parametrize("kind", ["infonce", "siglip"])
def test_two_processes_compute_the_global_batch_loss_and_its_gradient(tmp_path, kind):
    """open_clip's local loss with a differentiable gather: the two ranks' mean loss is the one-process loss
    of the whole batch, and DDP's averaged gradient is its gradient (logit_scale's included)."""
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out_file = str(tmp_path / "rank0.json")
    mp.spawn(_ddp_worker, args=(port, out_file, kind), nprocs=2, join=True)
    got = json.loads(open(out_file).read())
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(**TINY))
    gen = torch.Generator().manual_seed(1)
    ids, mask = _text_batch(gen)
    ids, mask = torch.cat([ids, ids.flip(0)]), torch.cat([mask, mask.flip(0)])
    px = torch.randn(6, 3, 32, 32, generator=gen)
    loss = ContrastiveLoss(kind)(*contrastive_logits(model, px, ids, mask))
    loss.backward()
    assert got["loss"] == pytest.approx(loss.item(), abs=1e-6)
    for name, p in model.named_parameters():
        torch.testing.assert_close(torch.tensor(got["grads"][name]), p.grad, atol=1e-6, rtol=1e-4)


# ---------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------

def _picture(shape: str, color: str, box: tuple[int, int, int, int], bg=(245, 230, 250)) -> np.ndarray:
    from PIL import Image, ImageDraw

    im = Image.new("RGB", (64, 64), bg)
    draw = ImageDraw.Draw(im)
    x0, y0, x1, y1 = box
    {"rectangle": lambda: draw.rectangle(box, fill=ds.COLORS[color]),
     "circle": lambda: draw.ellipse(box, fill=ds.COLORS[color]),
     "triangle": lambda: draw.polygon([(x0, y1), (x1, y1), ((x0 + x1) // 2, y0)], fill=ds.COLORS[color])}[shape]()
    return np.asarray(im)


def test_captions_say_what_the_picture_shows():
    img = _picture("triangle", "teal", (2, 2, 18, 18))
    items = ds.describe(img[None], {}, area_cuts=(0.05, 0.15))  # no answers: shape and colour from the pixels
    it = items[0]
    assert (it.shape, it.color, it.size, it.row, it.col, it.tint) == ("triangle", "teal", "small", "top", "left",
                                                                      "lavender")
    assert it.caption(0) == "a small teal triangle in the top left on a lavender background"
    big = ds.describe(_picture("circle", "red", (40, 40, 62, 62), bg=(230, 245, 235))[None], {0: ("circle", None)},
                      area_cuts=(0.05, 0.08))[0]
    assert (big.shape, big.color, big.size, big.row, big.col, big.tint) == ("circle", "red", "large", "bottom",
                                                                            "right", "mint")
    assert len(set(big.captions())) == len(ds.TEMPLATES) and all("red" in c and "circle" in c for c in big.captions())


def _centroids_x(x: torch.Tensor) -> list[float]:
    back = ((x * 0.5 + 0.5) * 255).round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()
    return [np.nonzero(ds.shape_mask(b))[1].mean() for b in back], back


def test_augmentation_moves_a_shape_by_at_most_two_pixels_and_keeps_its_colour():
    img = _picture("rectangle", "blue", (30, 30, 40, 40))
    x = ds.to_tensor(np.stack([img] * 16), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    cxs, back = _centroids_x(ds.augment(x, torch.Generator().manual_seed(0)))
    cx0 = np.nonzero(ds.shape_mask(img))[1].mean()
    moves = [abs(c - cx0) for c in cxs]
    assert max(moves) <= 2.01 and max(moves) > 0  # it does move, never by more than 2
    assert all(ds.nearest_color(np.median(b[ds.shape_mask(b)], axis=0)) == "blue" for b in back)


def test_augmentation_keeps_a_shape_near_a_cell_border_in_its_cell():
    # centroid at x = 23 pixels (22.5 + half a pixel): 1.7 pixels right of the left/center border (64 / 3 = 21.3)
    img = _picture("rectangle", "blue", (18, 30, 27, 40))
    item = ds.describe(img[None], {0: ("rectangle", "blue")}, area_cuts=(0.05, 0.08))[0]
    assert item.col == "center"
    ranges = ds.shift_ranges([item] * 32, 64)
    assert ranges[0].tolist() == [-1, 2, -2, 2]  # two pixels left would cross the border
    x = ds.to_tensor(np.stack([img] * 32), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    kept, _ = _centroids_x(ds.augment(x, torch.Generator().manual_seed(0), ranges=ranges))
    free, _ = _centroids_x(ds.augment(x, torch.Generator().manual_seed(0)))
    cx0 = item.cx * 64 - 0.5  # Item.cx measures pixel centres
    assert min(kept) == cx0 - 1 and max(kept) == cx0 + 2  # the whole allowed range is drawn, in the right direction
    assert all(int((c + 0.5) / (64 / 3)) == 1 for c in kept)
    assert any(int((c + 0.5) / (64 / 3)) == 0 for c in free)  # unbounded, some copies would be captioned wrongly


def test_own_pairs_file_reads_csv_and_jsonl_and_names_bad_rows(tmp_path):
    from PIL import Image

    from common.errors import UserError

    Image.fromarray(_picture("circle", "red", (10, 10, 30, 30))).save(tmp_path / "a.png")
    (tmp_path / "b.png").write_bytes(b"not an image")
    (tmp_path / "ok.csv").write_text("filepath,title\na.png,a red circle\n")
    images, caps = ds.load_pairs_file(tmp_path / "ok.csv", 32)
    assert images.shape == (1, 32, 32, 3) and caps == ["a red circle"]
    (tmp_path / "ok.jsonl").write_text('{"filepath": "a.png", "title": "a red circle"}\n')
    assert ds.load_pairs_file(tmp_path / "ok.jsonl", 32)[1] == ["a red circle"]
    cases = {"nohead.csv": ("file,caption\na.png,x\n", "nohead.csv:1: the header has no column filepath, title"),
             "empty_title.csv": ("filepath,title\na.png,x\na.png,\n", "empty_title.csv:3: column 'title' is empty"),
             "missing.csv": ("filepath,title\nnope.png,x\n", "missing.csv:2: image"),
             "notimage.csv": ("filepath,title\nb.png,x\n", "notimage.csv:2:"),
             "bad.jsonl": ('{"filepath": "a.png", "title": 3}\n', "bad.jsonl:1:")}
    for name, (text, expected) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(UserError, match=expected.replace("(", r"\(")):
            ds.load_pairs_file(tmp_path / name, 32)


def test_tokenizer_wraps_captions_and_loads_with_auto_tokenizer(tmp_path):
    from transformers import AutoTokenizer

    from clip.tokenizer import encode, train_tokenizer

    train_tokenizer(["a small red circle in the top left", "a large blue square"] * 20, 300, tmp_path, 16)
    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id) == (0, 1, 2)
    ids, mask = encode(tok, ["A Small red circle", "a large blue square in the top left corner of it all"], 8)
    assert ids.shape == (2, 8) and ids[0, 0] == 2 and (ids == 1).sum(1).tolist() == [1, 1]
    assert ids[1, -1] == 1  # cut to 8 tokens, still ending in <|endoftext|>
    assert tok.decode(ids[0], skip_special_tokens=True) == "a small red circle"  # lower-cased


# ---------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------

def _pairs_files(tmp_path, n: int = 48) -> tuple[str, str]:
    """Own-data files: n pictures of 4 kinds, captions saying which."""
    from PIL import Image

    kinds = [("circle", "red"), ("rectangle", "blue"), ("triangle", "green"), ("circle", "yellow")]
    rows = []
    rng = np.random.default_rng(0)
    for i in range(n):
        shape, color = kinds[i % 4]
        x, y = rng.integers(4, 30, size=2)
        Image.fromarray(_picture(shape, color, (x, y, x + 28, y + 28))).save(tmp_path / f"{i}.png")
        rows.append(f"{i}.png,a {color} {shape}")
    (tmp_path / "train.csv").write_text("filepath,title\n" + "\n".join(rows[: n * 3 // 4]) + "\n")
    (tmp_path / "valid.csv").write_text("filepath,title\n" + "\n".join(rows[n * 3 // 4:]) + "\n")
    return str(tmp_path / "train.csv"), str(tmp_path / "valid.csv")


def _tiny_cfg(tmp_path, **over):
    from clip.train_clip import TrainConfig

    train, valid = _pairs_files(tmp_path)
    model = CLIPConfig(**{**TINY, "vocab_size": 300, "logit_scale_init_value": 4.7})  # above ln 100: clamped
    return TrainConfig(model=model, data_file=train, valid_file=valid, tokenizer_dir=str(tmp_path / "tok"),
                       batch_size=12, max_iters=over.pop("max_iters", 30), lr=3e-3, warmup_iters=3,
                       eval_every=1000, save_every=over.pop("save_every", 1000), log_every=5, threads=1,
                       out_dir=str(tmp_path / over.pop("out", "run")), device="cpu", **over)


def test_a_short_run_learns_to_match_pictures_and_captions(tmp_path, capsys):
    from clip.train_clip import main

    res = main(_tiny_cfg(tmp_path))
    assert "--hard-negatives and --swap-negatives are off" in capsys.readouterr().out  # own pairs: said, not failed
    first, final = res["summary"]["initial"], res["summary"]["final"]
    assert final["i2t_recall_at_1"] > first["i2t_recall_at_1"] and final["i2t_recall_at_1"] >= 0.75  # 4 captions
    assert res["model"].logit_scale.item() <= MAX_LOGIT_SCALE + 1e-6  # clamped after every step
    losses = [json.loads(x)["loss"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in x]
    assert losses[-1] < losses[0]
    records = json.loads((tmp_path / "run" / "results.json").read_text())
    assert {"i2t_recall_at_1", "t2i_recall_at_1"} <= {r["metric"] for r in records}
    assert (tmp_path / "run" / "final" / "tokenizer" / "tokenizer.json").is_file()


def test_resume_continues_to_the_same_weights(tmp_path):
    from safetensors.torch import load_file

    from clip.train_clip import main

    main(_tiny_cfg(tmp_path, max_iters=6, save_every=3, out="whole"))
    main(_tiny_cfg(tmp_path, max_iters=3, save_every=3, out="part"))
    main(_tiny_cfg(tmp_path, max_iters=6, save_every=3, out="part", resume=True))
    a = load_file(str(tmp_path / "whole" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "part" / "final" / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=0, rtol=0)


def test_siglip_run_trains_its_bias(tmp_path):
    from clip.train_clip import main

    res = main(_tiny_cfg(tmp_path, loss="siglip", max_iters=10))
    assert res["summary"]["loss"] == "siglip"
    assert res["summary"]["final"]["i2t_recall_at_1"] > 0


def test_retrieval_counts_a_caption_shared_by_several_images_as_right_for_each():
    from clip.scoring import retrieval

    img = F.normalize(torch.tensor([[1.0, 0, 0], [0.9, 0.1, 0], [0, 1.0, 0]]), dim=-1)
    captions = ["red", "red", "blue"]
    txt = F.normalize(torch.tensor([[0, 1.0, 0], [1.0, 0, 0]]), dim=-1)  # sorted: "blue", "red"
    r = retrieval(img, txt, captions)
    assert r["i2t_recall_at_1"] == 1.0 and r["t2i_recall_at_1"] == 1.0 and r["distinct_captions"] == 2
    r = retrieval(img, txt.flip(0), captions)  # every caption embedding on the wrong pictures
    assert r["i2t_recall_at_1"] == 0.0 and r["t2i_median_rank"] > 1



def test_hard_negatives_differ_in_shape_only_or_in_place_only_and_a_batch_holds_no_picture_twice():
    import random

    from clip.train_clip import with_partners

    rng = np.random.default_rng(0)
    # two tints over 90 pictures, and one picture whose tint no other shares (its partners let the tint go)
    items = [ds.Item(i, ds.SHAPES[i % 3], ["red", "blue"][i % 2], ds.SIZES[i // 6 % 3], ds.ROWS[i // 18 % 3],
                     ds.COLS[i % 5 % 3], 0.1, float(rng.random()), float(rng.random()),
                     "mint" if i == 89 else ["pink", "sand"][i // 54]) for i in range(90)]
    partners = ds.hard_negative_partners(items, k=4, place=True, same_tint=True)
    shape_only = ds.hard_negative_partners(items, k=4, same_tint=True)
    assert any(items[p].tint != it.tint for it, ps in zip(items, ds.hard_negative_partners(items, k=4)) for p in ps)
    assert [ps[:len(a)] for ps, a in zip(partners, shape_only)] == shape_only  # the shape partners come first
    for it, ps in zip(items, partners):
        by_shape = [p for p in ps if items[p].shape != it.shape]
        by_place = [p for p in ps if items[p].shape == it.shape]
        assert by_shape and by_place and by_shape + by_place == ps
        assert all(items[p].color == it.color and items[p].size == it.size for p in ps)
        # the tint word must not tell them apart: the tint is shared wherever a picture with it qualifies
        same_tint = [o for o in items if o.tint == it.tint and o.color == it.color and o.size == it.size]
        assert all(items[p].tint == it.tint for p in by_shape) == any(o.shape != it.shape for o in same_tint)
        assert all(items[p].tint == it.tint for p in by_place) == any(
            o.shape == it.shape and o.place != it.place for o in same_tint)
        assert all(items[p].place != it.place for p in by_place)
        dist = [(items[p].cx - it.cx) ** 2 + (items[p].cy - it.cy) ** 2 for p in by_shape]
        assert dist == sorted(dist)  # the nearest first
    batch = with_partners(list(range(0, 90, 2)), partners, 90, random.Random(0))
    assert len(batch) == 90 and len(set(batch)) == 90


def test_sincos_positions_encode_row_and_column_and_stay_a_plain_clip_parameter():
    from clip.model import CLIPConfig, CLIPModel

    cfg = CLIPConfig(image_size=32, patch_size=8, vision_hidden_size=16, vision_num_hidden_layers=1,
                     vision_num_attention_heads=2, vision_intermediate_size=32)
    emb = CLIPModel(cfg).vision_model.embeddings
    emb.init_sincos_positions(scale=1.0)
    pos = emb.position_embedding.weight.detach().clone()
    assert torch.all(pos[0] == 0)  # the class slot
    grid = pos[1:].reshape(4, 4, 16)  # (row, col, C): patches in row-major order
    assert torch.allclose(grid[:, :1, :8].expand(4, 4, 8), grid[..., :8])  # the first half: the row alone
    assert torch.allclose(grid[:1, :, 8:].expand(4, 4, 8), grid[..., 8:])  # the second half: the column alone
    assert torch.allclose(grid[2, 0, :8], torch.cat([torch.sin(2.0 / 10000 ** (torch.arange(4) / 4)),
                                                     torch.cos(2.0 / 10000 ** (torch.arange(4) / 4))]))
    assert len({tuple(v.tolist()) for v in pos[1:]}) == 16  # every patch its own vector
    assert emb.position_embedding.weight.requires_grad
    emb.init_sincos_positions(scale=0.1)
    torch.testing.assert_close(emb.position_embedding.weight.detach(), 0.1 * pos)


def test_export_runs_in_transformers_pipeline_with_our_scores_and_imports_back(tmp_path):
    from PIL import Image
    from transformers import pipeline

    from clip.export_hf import export, import_hf
    from clip.infer import classify, read_images
    from clip.scoring import load_model
    from clip.train_clip import main

    res = main(_tiny_cfg(tmp_path, max_iters=4))
    hf_dir = export(res["final_dir"], tmp_path / "hf")
    files = []
    for i, (shape, color) in enumerate([("circle", "red"), ("rectangle", "blue")]):
        Image.fromarray(_picture(shape, color, (4, 4, 24, 24))).resize((40, 40)).save(tmp_path / f"q{i}.png")
        files.append(str(tmp_path / f"q{i}.png"))
    labels = ["a red circle", "a blue rectangle", "a green triangle"]
    model, tok = load_model(res["final_dir"], "cpu")
    ours = classify(model, tok, read_images(files, model.config.image_size), labels, "cpu")
    pipe = pipeline("zero-shot-image-classification", model=str(hf_dir))
    for f, p in zip(files, ours):
        got = {r["label"]: r["score"] for r in pipe(Image.open(f), candidate_labels=labels, hypothesis_template="{}")}
        assert max(got, key=got.get) == labels[int(p.argmax())]
        for j, label in enumerate(labels):
            assert abs(got[label] - p[j].item()) <= 1e-4, (label, got[label], p[j].item())
    back = import_hf(str(hf_dir), tmp_path / "back")
    again, _ = load_model(back, "cpu")
    for k, v in model.state_dict().items():
        torch.testing.assert_close(again.state_dict()[k], v, atol=0, rtol=0)


def test_a_legacy_checkpoint_with_eos_id_2_is_read_at_the_largest_id_as_transformers_does(tmp_path):
    """OpenAI's checkpoints say eos_token_id 2 and mean <|endoftext|>, the largest id: imported from a saved
    transformers directory, our model pools where transformers does."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    from clip.export_hf import import_hf
    from clip.scoring import load_model

    cfg = CLIPConfig(**{**TINY, "eos_token_id": 2, "bos_token_id": 97, "pad_token_id": 1})
    torch.manual_seed(0)
    ref = transformers.CLIPModel(transformers.CLIPConfig(**cfg.to_hf_dict())).eval()
    ref.save_pretrained(str(tmp_path / "openai_like"))
    vocab = {f"t{i}": i for i in range(99)}
    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0"))).save_pretrained(
        str(tmp_path / "openai_like"))
    ours, _ = load_model(import_hf(str(tmp_path / "openai_like"), tmp_path / "ours"), "cpu")
    ids = torch.tensor([[97, 5, 9, 98, 1, 1], [97, 40, 41, 42, 43, 98]])  # 98: the largest id, the "end"
    with torch.no_grad():
        torch.testing.assert_close(ours.get_text_features(ids), ref.get_text_features(input_ids=ids).pooler_output,
                                   atol=1e-5, rtol=1e-5)


def test_sweep_cells_see_the_same_pictures_and_refuse_a_budget_that_does_not_divide():
    from clip.sweep import SweepConfig, cell_command

    cfg = SweepConfig(pairs=3200)
    seen = set()
    for b in (16, 32, 64, 128):
        cmd = cell_command("siglip", b, cfg)
        flag = {cmd[i]: cmd[i + 1] for i in range(3, len(cmd), 2)}
        seen.add(int(flag["--max-iters"]) * int(flag["--batch-size"]))
        assert flag["--loss"] == "siglip" and flag["--eval-every"] == flag["--max-iters"]
    assert seen == {3200}
    with pytest.raises(UserError, match="--pairs 1000"):
        cell_command("infonce", 64, SweepConfig(pairs=1000))


def test_bench_times_the_same_model_in_ours_and_transformers_and_counts_saved_activations():
    from clip.bench import (
        activation_bytes,
        batch,
        bench_records,
        build_ours,
        build_transformers,
        check_same_logits,
        logits_fns,
    )

    cfg = CLIPConfig(**{**TINY, "max_position_embeddings": 12})
    ours = build_ours(cfg, "cpu")
    models = {"ours": ours, "transformers_sdpa": build_transformers(ours, "sdpa")}
    b = batch(cfg, 4, 12, "cpu")
    assert (b["input_ids"] == cfg.eos_token_id).sum(1).eq(1).all()  # one end-of-text token per caption
    assert check_same_logits(logits_fns(models, b))["transformers_sdpa"] < 1e-5
    with torch.no_grad():
        models["transformers_sdpa"].logit_scale += 0.1  # another model: the check must refuse to time it
    with pytest.raises(AssertionError, match="differ from ours"):
        check_same_logits(logits_fns(models, b))
    small, large = (activation_bytes(ours, batch(cfg, n, 12, "cpu"), torch.device("cpu"), torch.float32)
                    for n in (2, 8))
    assert 0 < small < large
    fake = {"device": "cpu", "threads": 1, "speed": {"preset": "cpu", "batch_size": 4, "step_s": {"ours": 0.5},
                                                     "ours_speedup": {"open_clip": {"median": 1.2}}}}
    recs = {r["metric"]: r for r in bench_records(fake, "python -m clip.bench")}
    assert recs["train_step_ms"]["value"] == 500.0 and recs["train_step_speedup_vs_open_clip"]["value"] == 1.2
    assert recs["train_step_ms"]["run"] == "clip_bench_cpu_b4_1thread_cpu"


def test_retrieval_misses_name_the_caption_words_that_were_wrong():
    from clip.scoring import i2t_misses

    def item(i, col, tint="pink"):
        return ds.Item(i, "circle", "red", "small", "top", col, 0.1, 0.5, 0.2, tint)

    items = [item(0, "left"), item(1, "right"), item(2, "center", "mint"), item(3, "left")]  # 0 and 3 share a caption
    distinct = sorted({it.caption() for it in items})
    txt = torch.eye(len(distinct))
    pick = [items[1], items[1], items[0], items[0]]  # the caption each picture's features point at
    img = torch.stack([txt[distinct.index(it.caption())] for it in pick])
    assert i2t_misses(img, txt, items) == {"col": 1, "col+tint": 1}  # picture 1 and 3 are right (3 shares 0's)


def test_zero_shot_reads_shape_colour_and_place_from_prompt_ensembles(monkeypatch):
    """Features that spell out shape, colour and cell word by word: every head is right; an image tower that
    ignores where the shape is puts every picture in one cell (the place head can fail)."""
    from clip import scoring
    from clip.scoring import PLACES, zero_shot

    words = [*ds.SHAPES, *ds.COLORS, *PLACES]

    def spelled(shape, color, place):
        f = torch.zeros(len(words))
        f[[words.index(shape), words.index(color), words.index(place)]] = 1.0
        return f

    def fake_text_features(model, tok, texts, device, dtype):
        def place_of(t):  # the longest cell name the caption holds ("top left" before "top")
            return max((p for p in PLACES if f"the {p} " in t or (p == "middle" and "in the middle" in t)), key=len)
        return torch.nn.functional.normalize(torch.stack([spelled(
            next(s for s in ds.SHAPES if s in t), next(c for c in ds.COLORS if f" {c} " in t), place_of(t))
            for t in texts]), dim=-1)

    monkeypatch.setattr(scoring, "text_features", fake_text_features)
    model = torch.nn.Module()
    model.logit_scale = torch.nn.Parameter(torch.tensor(4.0))
    items = [ds.Item(i, ds.SHAPES[i % 3], list(ds.COLORS)[i % 8], "small", ds.ROWS[i // 3 % 3], ds.COLS[i % 3],
                     0.1, 0.5, 0.5, "pink") for i in range(72)]
    img = torch.nn.functional.normalize(torch.stack([spelled(it.shape, it.color, it.place) for it in items]), dim=-1)
    res = zero_shot(model, None, img, items, "cpu", torch.float32)
    assert res["zero_shot_shape_acc"] == res["zero_shot_color_acc"] == res["zero_shot_joint_acc"] == 1.0
    assert res["zero_shot_place_acc"] == 1.0
    blind = img.clone()
    blind[:, len(ds.SHAPES) + len(ds.COLORS):] = 0  # no cell in the image features
    res = zero_shot(model, None, torch.nn.functional.normalize(blind, dim=-1), items, "cpu", torch.float32)
    assert res["zero_shot_joint_acc"] == 1.0 and res["zero_shot_place_acc"] <= 1 / 9 + 0.01
