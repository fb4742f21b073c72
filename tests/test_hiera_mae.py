"""hiera_mae: Hiera and its MAE against transformers' HieraModel / HieraForPreTraining, the token order (unroll,
reroll, pooling as a reshape), the masking (counts, no leakage through the masked conv), 3-D = 2-D at one frame,
the generated clips, and the training scripts (loss falls, encoder carried over, resume, two processes)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hiera_mae.dataset import MOTIONS, ClipConfig, augment, make_clips, motion_path, pad_to
from hiera_mae.model import (
    HieraConfig,
    HieraForImageClassification,
    HieraForPreTraining,
    HieraModel,
    patchify,
    random_masking,
    reroll,
    undo_windowing,
    unpatchify,
    unroll,
)

TINY = dict(embed_dim=16, depths=[1, 1, 2], num_heads=[1, 2, 2], decoder_hidden_size=16, decoder_depth=1,
            decoder_num_heads=2)
VIDEO = dict(image_size=[4, 16, 16], patch_size=[3, 3, 3], patch_stride=[2, 2, 2], patch_padding=[1, 1, 1],
             query_stride=[1, 2, 2], masked_unit_size=[1, 4, 4], mask_ratio=0.75)


def _randomised(model: torch.nn.Module, seed: int = 0) -> dict:
    """Every tensor random (norms, biases, the mask token too), so no path hides behind a constant init."""
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) * 0.3 for k, v in model.state_dict().items()}


def _hf_config(cfg: HieraConfig):
    import transformers

    keys = ("image_size", "num_channels", "embed_dim", "patch_size", "patch_stride", "patch_padding", "mlp_ratio",
            "depths", "num_heads", "embed_dim_multiplier", "num_query_pool", "query_stride", "masked_unit_size",
            "masked_unit_attention", "layer_norm_eps", "decoder_hidden_size", "decoder_depth", "decoder_num_heads",
            "mask_ratio", "normalize_pixel_loss", "num_labels")
    return transformers.HieraConfig(**{k: getattr(cfg, k) for k in keys})


# --------------------------------------------------------------------------------------------------------
# parity with transformers
# --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw", [{}, {"num_channels": 3, "masked_unit_attention": [True, False, False]},
                                {"depths": [2, 1, 1, 1], "num_heads": [1, 1, 2, 2], "num_query_pool": 3,
                                 "masked_unit_size": [8, 8], "masked_unit_attention": [True, True, False, False],
                                 "image_size": [32, 32]}],
                         ids=["default", "rgb-one-unit-stage", "four-stages"])
def test_classifier_equals_transformers(kw):
    """Same random weights, same logits and tokens (<= 1e-4), for three layouts of stages and windows."""
    import transformers

    cfg = HieraConfig(**{**TINY, **kw})
    ours = HieraForImageClassification(cfg).eval()
    hf = transformers.HieraForImageClassification(_hf_config(cfg)).eval()
    state = _randomised(ours)
    ours.load_state_dict(state)
    hf.load_state_dict(state, strict=True)
    x = torch.randn(3, cfg.num_channels, *cfg.image_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(x, output_hidden_states=True)
        got = ours.hiera(x)
        torch.testing.assert_close(ours(x), ref.logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got["last_hidden_state"], ref.hidden_states[-1], atol=1e-4, rtol=1e-4)
    # the rerolled stage outputs are transformers' reshaped_hidden_states (stage 1 on)
    for ours_map, ref_map in zip(got["feature_maps"], ref.reshaped_hidden_states[1:]):
        torch.testing.assert_close(ours_map, ref_map, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("norm", [True, False])
def test_mae_loss_and_logits_equal_transformers_with_a_fixed_noise(norm):
    """With the same noise both drop the same mask units; the loss agrees to 1e-5, the logits to 1e-4."""
    import transformers

    cfg = HieraConfig(**TINY, normalize_pixel_loss=norm)
    ours = HieraForPreTraining(cfg).eval()
    hf = transformers.HieraForPreTraining(_hf_config(cfg)).eval()
    state = _randomised(ours, seed=3)
    ours.load_state_dict(state)
    hf.load_state_dict(state, strict=True)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 1, 32, 32, generator=g)
    noise = torch.rand(4, 16, generator=g)
    with torch.no_grad():
        ref = hf(x, noise=noise)
        got = ours(x, noise=noise)
    torch.testing.assert_close(got["loss"], ref.loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got["logits"], ref.logits, atol=1e-4, rtol=1e-4)
    assert torch.equal(got["token_mask"], ref.bool_masked_pos)  # the same visible patches, in raster order


# --------------------------------------------------------------------------------------------------------
# the token order and the masking
# --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("size, strides", [([16, 16], [[2, 2]] * 2), ([8, 8], [[2, 2]] * 3),
                                           ([4, 8, 8], [[1, 2, 2]] * 2), ([4, 8, 8], [[2, 2, 2]])])
def test_unroll_then_reroll_is_the_identity(size, strides):
    x = torch.randn(2, math.prod(size), 3)
    u = unroll(x, size, strides)
    assert not torch.equal(u, x)  # it did reorder
    back = reroll(u, size, strides)  # (B, *size, C)
    assert torch.equal(back.flatten(1, -2), x)


def test_pooling_in_the_unrolled_order_is_a_max_pool_of_the_image():
    """After unroll, view(B, 4, -1, C).amax(1) is F.max_pool2d(2) of the raster image, and the pooled tokens are
    themselves in the order the next stage needs: pooling again matches a second max_pool2d."""
    B, C, H = 2, 3, 8
    img = torch.randn(B, C, H, H)
    tokens = img.flatten(2).transpose(1, 2)  # raster order
    u = unroll(tokens, [H, H], [[2, 2], [2, 2]])
    p1 = u.view(B, 4, -1, C).amax(1)
    ref1 = F.max_pool2d(img, 2)
    assert torch.equal(reroll(p1, [H // 2, H // 2], [[2, 2]]).permute(0, 3, 1, 2), ref1)
    p2 = p1.view(B, 4, -1, C).amax(1)
    assert torch.equal(p2.transpose(1, 2).reshape(B, C, 2, 2), F.max_pool2d(ref1, 2))


def test_mask_units_are_contiguous_after_unroll():
    """Unit u's tokens are x[:, j * n_units + u]: they are exactly the 4 x 4 block of the raster grid it covers."""
    H, mu = 16, 4
    ids = torch.arange(H * H, dtype=torch.float32).view(1, -1, 1)
    u = unroll(ids, [H, H], [[2, 2], [2, 2]]).view(mu * mu, (H // mu) ** 2)
    for unit in range((H // mu) ** 2):
        r, c = divmod(unit, H // mu)
        block = torch.arange(H * H).view(H, H)[r * mu:(r + 1) * mu, c * mu:(c + 1) * mu]
        assert sorted(u[:, unit].long().tolist()) == sorted(block.flatten().tolist())


def test_masking_keeps_the_same_exact_count_and_follows_the_noise():
    noise = torch.rand(5, 16, generator=torch.Generator().manual_seed(0))
    keep = random_masking(5, 16, 0.6, noise)
    assert keep.sum(1).tolist() == [int(16 * 0.4)] * 5
    for row, n in zip(keep, noise):  # the kept units are the ones with the smallest noise
        assert n[row].max() < n[~row].min()


@pytest.mark.parametrize("kw", [{}, VIDEO], ids=["image", "clip"])
def test_encoder_sees_exactly_the_kept_tokens_and_nothing_of_the_hidden_pixels(kw):
    """The kept-token count is exact at every stage, and changing the pixels under a hidden unit changes nothing
    the encoder outputs (the masked conv stops the 3 x 3 kernel from reading across the border)."""
    cfg = HieraConfig(**{**TINY, **kw})
    model = HieraModel(cfg, add_pooling_layer=False).eval()
    n_units = math.prod(cfg.mask_spatial_shape)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 1, *cfg.image_size, generator=g)
    keep = random_masking(2, n_units, cfg.mask_ratio, torch.rand(2, n_units, generator=g))
    n_keep = int(n_units * (1 - cfg.mask_ratio))
    with torch.no_grad():
        out = model(x, keep)
    tokens_per_unit_last = math.prod(cfg.masked_unit_size) // math.prod(cfg.query_stride) ** cfg.num_query_pool
    assert out["last_hidden_state"].shape == (2, n_keep * tokens_per_unit_last, cfg.hidden_size)
    assert out["feature_maps"][0].shape == (2, n_keep, *cfg.masked_unit_size, cfg.embed_dim)
    # scramble the hidden units' pixels
    px_mask = F.interpolate(keep.view(2, 1, *cfg.mask_spatial_shape).float(), size=x.shape[2:]).bool()
    y = torch.where(px_mask, x, torch.randn(x.shape, generator=g) * 5)
    assert not torch.equal(x, y)
    with torch.no_grad():
        again = model(y, keep)
    torch.testing.assert_close(again["last_hidden_state"], out["last_hidden_state"], atol=1e-6, rtol=0)


def test_a_one_frame_clip_model_equals_the_image_model():
    """The 3-D path is the 2-D path with one more axis: a clip model with a 1-frame input, temporal kernel and
    stride 1 and the image model's weights (each conv kernel given a time axis of 1) gives the same logits and the
    same MAE loss."""
    img_cfg = HieraConfig(**TINY)
    clip_cfg = HieraConfig(**{**TINY, "image_size": [1, 32, 32], "patch_size": [1, 3, 3], "patch_stride": [1, 2, 2],
                              "patch_padding": [0, 1, 1], "query_stride": [1, 2, 2], "masked_unit_size": [1, 4, 4]})
    for cls in (HieraForImageClassification, HieraForPreTraining):
        a, b = cls(img_cfg).eval(), cls(clip_cfg).eval()
        state = _randomised(a, seed=5)
        a.load_state_dict(state)
        b.load_state_dict({k: (v.unsqueeze(2) if v.ndim == 4 else v) for k, v in state.items()})
        x = torch.randn(2, 1, 32, 32)
        with torch.no_grad():
            if cls is HieraForImageClassification:
                torch.testing.assert_close(b(x.unsqueeze(2)), a(x), atol=1e-5, rtol=1e-5)
            else:
                noise = torch.rand(2, 16)
                torch.testing.assert_close(b(x.unsqueeze(2), noise=noise)["loss"], a(x, noise=noise)["loss"])


def test_patchify_round_trip_and_undo_windowing():
    x = torch.randn(2, 3, 4, 16, 16)
    p = patchify(x, [2, 8, 8])
    assert p.shape == (2, 2 * 2 * 2, 3 * 2 * 8 * 8)
    assert torch.equal(unpatchify(p, [2, 8, 8], [2, 2, 2], 3), x)
    # undo_windowing: unit (r, c) of a 2 x 2 grid of 2 x 2 units lands at rows 2r.., cols 2c..
    units = torch.arange(4).view(1, 4, 1, 1, 1).expand(1, 4, 2, 2, 1).float()
    grid = undo_windowing(units, [4, 4], [2, 2])[0, ..., 0]
    assert grid.tolist() == [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]]


def test_reconstruction_pastes_back_the_visible_patches():
    cfg = HieraConfig(**TINY)
    model = HieraForPreTraining(cfg).eval()
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        out = model(x)
    r = model.reconstruct(x, out["logits"], out["token_mask"])
    vis = unpatchify(out["token_mask"][..., None].expand_as(out["logits"]).float(), cfg.pred_stride,
                     model.decoder.final_grid, 1).bool()
    assert torch.equal(r[vis], x[vis]) and not torch.allclose(r[~vis], x[~vis])


# --------------------------------------------------------------------------------------------------------
# data: padding, augmentation, the generated clips
# --------------------------------------------------------------------------------------------------------

def test_pad_and_augment_shapes():
    x = torch.randint(0, 255, (3, 1, 28, 28), dtype=torch.uint8)
    p = pad_to(x, 32)
    assert p.shape == (3, 1, 32, 32) and torch.equal(p[..., 2:30, 2:30], x) and p[..., :2, :].sum() == 0
    clip = torch.randint(0, 255, (3, 1, 4, 16, 16), dtype=torch.uint8)
    out = augment(clip, 2, False, torch.Generator().manual_seed(0))
    assert out.shape == clip.shape
    # a clip shifts as a whole: one offset explains every frame at once
    padded = F.pad(clip, (2, 2, 2, 2))
    for c in range(3):
        fits = [(dy, dx) for dy in range(5) for dx in range(5)
                if torch.equal(out[c], padded[c, ..., dy:dy + 16, dx:dx + 16])]
        assert len(fits) == 1


def _centre(frame: torch.Tensor) -> np.ndarray:
    w = frame.double()
    ys, xs = torch.meshgrid(torch.arange(frame.shape[0]), torch.arange(frame.shape[1]), indexing="ij")
    return np.array([(w * xs).sum() / w.sum(), (w * ys).sum() / w.sum()])


def test_clips_are_seeded_balanced_and_move_as_labelled():
    """The same seed gives the same clips; classes are balanced; the digit's centre moves right for 'right',
    down for 'down', out and back for the bounces, and stays put for the rotations, which turn the digit."""
    cfg = ClipConfig()
    digit = torch.zeros(28, 28, dtype=torch.uint8)
    digit[6:22, 12:15] = 255  # a vertical bar: its orientation shows a rotation
    digit[6:9, 12:20] = 255  # with a flag, so it is not symmetric
    digits = digit.expand(16, 28, 28)
    a, ya = make_clips(digits, 1, cfg, seed=3)
    b, yb = make_clips(digits, 1, cfg, seed=3)
    assert torch.equal(a, b) and torch.equal(ya, yb)
    assert a.shape == (16, 1, cfg.frames, cfg.clip_size, cfg.clip_size) and a.dtype == torch.uint8
    assert torch.bincount(ya).tolist() == [2] * len(MOTIONS)
    for clip, label in zip(a, ya):
        c = np.stack([_centre(f) for f in clip[0]])
        dx, dy = c[-1] - c[0]
        name = MOTIONS[label]
        if name in ("right", "left"):
            assert (dx > 10 if name == "right" else dx < -10) and abs(dy) < 1.5
        if name in ("down", "up"):
            assert (dy > 10 if name == "down" else dy < -10) and abs(dx) < 1.5
        if name.startswith("bounce"):
            axis = 0 if name == "bounce-h" else 1
            mid = c[cfg.frames // 2, axis] - c[0, axis]
            assert mid > 5 and abs(c[-1, axis] - c[0, axis]) < mid
        if name.startswith("rotate"):
            assert np.abs(c - c[0]).max() < 3  # in place
            assert not torch.equal(clip[0, 0], clip[0, -1])  # but turned
    # held-out starts differ from training starts: another seed, other paths
    rng = np.random.default_rng(0)
    assert not np.allclose(motion_path(0, cfg, rng)[0], motion_path(0, cfg, np.random.default_rng(1))[0])


# --------------------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    """A labelled folder of 48 animal-mnist silhouettes, 2 classes."""
    from PIL import Image

    from hiera_mae.dataset import animal_mnist

    x, y = animal_mnist()
    root = tmp_path_factory.mktemp("animals")
    for cls in (0, 5):
        d = root / ("bear" if cls == 0 else "elephant")
        d.mkdir()
        for i in np.flatnonzero(y == cls)[:24]:
            Image.fromarray(x[i]).save(d / f"{i}.png")
    return root


def mae_cfg(out, image_dir, **kw):
    from common.config import apply_overrides
    from hiera_mae.train_mae import TrainConfig

    base = dict(data_dir=str(image_dir), batch_size=8, max_iters=6, warmup_iters=1, eval_every=3, save_every=3,
                log_every=1, threads=1, out_dir=str(out), lr=3e-3, **TINY)
    return apply_overrides(TrainConfig(), {**base, **kw})


def ft_cfg(out, image_dir, init, **kw):
    from common.config import apply_overrides
    from hiera_mae.train_finetune import TrainConfig

    base = dict(data_dir=str(image_dir), init=str(init), batch_size=8, max_iters=6, warmup_iters=1, eval_every=3,
                save_every=3, log_every=1, threads=1, out_dir=str(out), **TINY)
    return apply_overrides(TrainConfig(), {**base, **kw})


def test_mae_trains_resumes_and_hands_its_encoder_to_the_finetuning(tmp_path, image_dir, capsys):
    from safetensors.torch import load_file

    from hiera_mae.train_finetune import main as finetune
    from hiera_mae.train_mae import main as mae

    res = mae(mae_cfg(tmp_path / "mae", image_dir, max_iters=12, eval_every=12, save_every=12))
    s = res["summary"]
    assert s["final"]["heldout_loss"] < s["initial"]["heldout_loss"]  # it learned something about the pixels
    assert 0 < s["final"]["content_share"] <= 1 and s["final"]["zero_loss"] > 0
    assert (tmp_path / "mae" / "reconstructions.png").is_file() and (tmp_path / "mae" / "loss.png").is_file()
    rows = [json.loads(r) for r in (tmp_path / "mae" / "metrics.jsonl").read_text().splitlines()]
    assert sum("loss" in r for r in rows) == 12 and sum("heldout_loss" in r for r in rows) == 2
    # resume: cut after step 3, continue: the same weights at step 6
    mae(mae_cfg(tmp_path / "full", image_dir))
    mae(mae_cfg(tmp_path / "cut", image_dir))
    import shutil
    shutil.rmtree(tmp_path / "cut" / "checkpoints" / "step_000006")
    (tmp_path / "cut" / "checkpoints" / "latest").write_text("step_000003\n")
    capsys.readouterr()
    mae(mae_cfg(tmp_path / "cut", image_dir, resume=True))
    assert "at step 3" in capsys.readouterr().out
    a = load_file(str(tmp_path / "full" / "checkpoints" / "step_000006" / "model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "checkpoints" / "step_000006" / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0, msg=k)
    # fine-tuning starts from exactly the MAE's encoder; --scratch does not
    from hiera_mae.train_finetune import layer_groups
    from hiera_mae.training import load_encoder, model_config

    cfg = ft_cfg(tmp_path / "ft", image_dir, tmp_path / "mae" / "final", decoder_depth=3)  # not the MAE's 1:
    model = HieraForImageClassification(model_config(cfg, 2))  # the MAE is rebuilt from its own config.json
    load_encoder(model, str(tmp_path / "mae" / "final"))
    saved = load_file(str(tmp_path / "mae" / "final" / "model.safetensors"))
    for k, v in model.state_dict().items():
        if k.startswith("hiera.") and not k.startswith("hiera.pooler."):
            assert torch.equal(v, saved[k]), k
    # layer decay: the stem learns slowest, the head at the full rate
    groups = layer_groups(model, cfg, 0.5)
    lrs = {id(p): g["lr"] for g in groups for p in g["params"]}
    n = sum(model.config.depths)
    assert lrs[id(model.classifier.weight)] == pytest.approx(cfg.lr)
    assert lrs[id(model.hiera.embeddings.patch_embeddings.projection.weight)] == pytest.approx(cfg.lr * 0.5 ** (n + 1))
    out = finetune(cfg)
    rows = [json.loads(r) for r in (tmp_path / "ft" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 6 and all(math.isfinite(v) for v in losses)
    assert 0 <= out["accuracy"] <= 1
    scratch = finetune(ft_cfg(tmp_path / "sc", image_dir, tmp_path / "missing", scratch=True))
    assert "scratch" in json.loads((tmp_path / "sc" / "train_summary.json").read_text())["init"]
    assert scratch["model"].classifier.weight.shape == (2, 64)


def test_finetuning_learns_a_separable_task(tmp_path, image_dir):
    """From scratch, 100 steps on bears vs elephants: the training loss falls clearly (smoke that it learns)."""
    from hiera_mae.train_finetune import main as finetune

    finetune(ft_cfg(tmp_path / "sc", image_dir, tmp_path / "none", scratch=True, max_iters=100, eval_every=100,
                    save_every=100, log_every=1, lr=1e-3, label_smoothing=0.0, shift=0, flip=False))
    rows = [json.loads(r) for r in (tmp_path / "sc" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:10])


def test_video_pipeline_runs_all_three_stages(tmp_path):
    from hiera_mae.train_video import VideoConfig, main

    cfg = VideoConfig(mae_iters=2, finetune_iters=2, batch_size=8, threads=1, out_dir=str(tmp_path / "v"))
    cfg.clips.clips_per_digit, cfg.clips.digits = 1, 64
    out = main(cfg)
    assert set(out["accuracy"]) == {"mae", "scratch"}
    summary = json.loads((tmp_path / "v" / "video_summary.json").read_text())
    assert summary["mae"]["dataset"] == "moving-mnist" and summary["finetune_mae"]["init"] == "mae"


def test_two_processes_train_what_one_process_trains(tmp_path, image_dir):
    """torchrun, 2 CPU processes of 4 images against one of 8: shifts, flips and masks are drawn for the whole
    batch and sliced, and every image hides the same number of units, so the mean losses and the weights agree."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from safetensors.torch import load_file

    from hiera_mae.train_mae import main as mae

    mae(mae_cfg(tmp_path / "one", image_dir, max_iters=3, eval_every=10, save_every=3))
    argv = ["--data-dir", str(image_dir), "--batch-size", "8", "--max-iters", "3", "--warmup-iters", "1",
            "--eval-every", "10", "--save-every", "3", "--log-every", "1", "--threads", "1", "--lr", "3e-3",
            "--out-dir", str(tmp_path / "two")]
    for k, v in TINY.items():
        argv += [f"--{k.replace('_', '-')}", *map(str, v if isinstance(v, list) else [v])]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "hiera_mae.train_mae", *argv], cwd=Path(__file__).resolve().parents[1], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = load_file(str(tmp_path / "one" / "checkpoints" / "step_000003" / "model.safetensors"))
    b = load_file(str(tmp_path / "two" / "checkpoints" / "step_000003" / "model.safetensors"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 2e-5


def test_few_labels_takes_the_first_n_of_each_class_in_order():
    from hiera_mae.dataset import ImageSet
    from hiera_mae.train_finetune import few_labels

    labels = torch.tensor([2, 0, 1, 0, 2, 1, 0, 2])
    data = ImageSet(torch.arange(8).view(8, 1, 1, 1), labels, ["a", "b", "c"])
    few = few_labels(data, 2)
    assert few.images.flatten().tolist() == [0, 1, 2, 3, 4, 5]  # the first two of each class, order kept
    assert torch.bincount(few.labels).tolist() == [2, 2, 2]
