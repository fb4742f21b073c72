"""Benchmark one CLIP training step: ours against transformers' CLIPModel and open_clip at the same config and
the same weights, and the training memory of the gpu4gb preset.

    python -m clip.bench                       # 1 thread, interleaved rounds, best of 3 with the spread
    python -m clip.bench --model-preset gpu4gb --device cuda --dtype bf16
    pip install -e .[bench]                    # open_clip_torch, for its column (skipped, and said so, without it)

Before anything is timed the three models are checked to give the same logits on the same batch (our weights
copied into theirs), so the step does the same arithmetic in all three. One step = forward both towers,
symmetric InfoNCE, backward, AdamW. Absolute times on a shared machine mean little; the ratios are the figures.

The memory figure adds what training keeps beside the activations (fp32 weights, gradients and AdamW's two
moments: 16 bytes a parameter) to the activations autograd saves for the backward pass, counted tensor by
tensor while one forward runs (``saved_tensors_hooks``), plus the largest transient of the backward (one
layer's activations again); ``make gpu-check`` measures the real CUDA peak when a GPU is lent.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from common.bench import paired_ratio, peak_memory_bytes, time_rounds
from common.cli import run_main
from common.errors import UserError
from common.results import command_line, make_record
from common.runtime import autocast, pick_device, pick_dtype, set_threads

from .model import MODEL_PRESETS, CLIPConfig, CLIPModel

VOCAB = 1000  # about the chapter's trained BPE vocabulary


@dataclass
class BenchConfig:
    """Time a CLIP training step in three implementations and estimate the gpu4gb preset's memory."""

    model_preset: str = "cpu"  # cpu or gpu4gb (model.py, MODEL_PRESETS)
    batch_size: int = 128  # pairs per step (the gpu4gb preset's; the cpu preset trains at 32)
    caption_len: int = 20  # tokens per caption (the batch is padded to it; open_clip always pads to its context)
    threads: int = 1  # CPU threads; 1 makes runs on a shared machine comparable
    repeats: int = 3  # timed rounds; the best of each is reported with the spread
    device: str = "auto"
    dtype: str = "auto"  # auto (bf16 on GPU, fp32 on CPU), fp32, bf16
    open_clip: bool = True  # time open_clip too, when open_clip_torch is installed
    memory: bool = True  # the gpu4gb preset's training memory, estimated (and measured on CUDA)
    out: str = "runs/clip/bench/bench.json"


def build_ours(mcfg: CLIPConfig, device) -> CLIPModel:
    torch.manual_seed(0)
    return CLIPModel(mcfg).to(device)


def build_transformers(ours: CLIPModel, attn: str):
    """transformers' CLIPModel with our weights (the names are the same: a strict state-dict copy)."""
    import transformers

    hf = transformers.CLIPModel(transformers.CLIPConfig(**ours.config.to_hf_dict()))
    hf.load_state_dict(ours.state_dict(), strict=True)
    hf.config._attn_implementation = attn
    for m in hf.modules():
        if hasattr(m, "config") and hasattr(m.config, "_attn_implementation"):
            m.config._attn_implementation = attn
    return hf.to(next(ours.parameters()).device)


def open_clip_state_dict(ours: CLIPModel) -> dict[str, torch.Tensor]:
    """Our (transformers') names -> open_clip's: q, k, v stacked into one in_proj, fc1/fc2 -> c_fc/c_proj,
    the projections transposed (open_clip multiplies x @ proj), pre_layrnorm -> ln_pre and so on."""
    sd, out = ours.state_dict(), {}
    for tower, prefix, n_layers in (("vision_model", "visual.transformer", ours.config.vision_num_hidden_layers),
                                    ("text_model", "transformer", ours.config.text_num_hidden_layers)):
        for i in range(n_layers):
            src, dst = f"{tower}.encoder.layers.{i}", f"{prefix}.resblocks.{i}"
            for kind in ("weight", "bias"):
                out[f"{dst}.attn.in_proj_{kind}"] = torch.cat([sd[f"{src}.self_attn.{p}_proj.{kind}"] for p in "qkv"])
                out[f"{dst}.attn.out_proj.{kind}"] = sd[f"{src}.self_attn.out_proj.{kind}"]
                out[f"{dst}.ln_1.{kind}"] = sd[f"{src}.layer_norm1.{kind}"]
                out[f"{dst}.ln_2.{kind}"] = sd[f"{src}.layer_norm2.{kind}"]
                out[f"{dst}.mlp.c_fc.{kind}"] = sd[f"{src}.mlp.fc1.{kind}"]
                out[f"{dst}.mlp.c_proj.{kind}"] = sd[f"{src}.mlp.fc2.{kind}"]
        for kind in ("weight", "bias"):
            if tower == "vision_model":
                out[f"visual.ln_pre.{kind}"] = sd[f"vision_model.pre_layrnorm.{kind}"]
                out[f"visual.ln_post.{kind}"] = sd[f"vision_model.post_layernorm.{kind}"]
            else:
                out[f"ln_final.{kind}"] = sd[f"text_model.final_layer_norm.{kind}"]
    out["visual.class_embedding"] = sd["vision_model.embeddings.class_embedding"]
    out["visual.conv1.weight"] = sd["vision_model.embeddings.patch_embedding.weight"]
    out["visual.positional_embedding"] = sd["vision_model.embeddings.position_embedding.weight"]
    out["visual.proj"] = sd["visual_projection.weight"].t().contiguous()
    out["token_embedding.weight"] = sd["text_model.embeddings.token_embedding.weight"]
    out["positional_embedding"] = sd["text_model.embeddings.position_embedding.weight"]
    out["text_projection"] = sd["text_projection.weight"].t().contiguous()
    out["logit_scale"] = sd["logit_scale"]
    return out


def build_open_clip(ours: CLIPModel):
    """open_clip's CLIP at our config (quick_gelu, features read at the <|endoftext|> id) with our weights,
    or None when open_clip_torch is not installed."""
    try:
        from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
    except ImportError:
        return None
    c = ours.config
    vision = CLIPVisionCfg(layers=c.vision_num_hidden_layers, width=c.vision_hidden_size,
                           head_width=c.vision_hidden_size // c.vision_num_attention_heads,
                           mlp_ratio=c.vision_intermediate_size / c.vision_hidden_size, patch_size=c.patch_size,
                           image_size=c.image_size)
    text = CLIPTextCfg(context_length=c.max_position_embeddings, vocab_size=c.vocab_size, width=c.text_hidden_size,
                       heads=c.text_num_attention_heads, layers=c.text_num_hidden_layers,
                       mlp_ratio=c.text_intermediate_size / c.text_hidden_size, pad_id=c.pad_token_id,
                       eos_id=c.eos_token_id, pool_type="eos")
    oc = CLIP(embed_dim=c.projection_dim, vision_cfg=vision, text_cfg=text, quick_gelu=c.hidden_act == "quick_gelu")
    oc.load_state_dict(open_clip_state_dict(ours), strict=True)
    return oc.to(next(ours.parameters()).device)


def batch(mcfg: CLIPConfig, batch_size: int, caption_len: int, device) -> dict[str, torch.Tensor]:
    """Random pictures and captions shaped like the chapter's: <|startoftext|> words <|endoftext|> and padding
    (lengths from caption_len - 6 to caption_len)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, mcfg.vocab_size, (batch_size, caption_len), generator=g)
    lengths = torch.randint(caption_len - 6, caption_len + 1, (batch_size,), generator=g)
    mask = torch.arange(caption_len)[None] < lengths[:, None]
    ids[:, 0] = mcfg.bos_token_id
    ids[torch.arange(batch_size), lengths - 1] = mcfg.eos_token_id
    ids = ids.masked_fill(~mask, mcfg.pad_token_id)
    pixels = torch.randn(batch_size, 3, mcfg.image_size, mcfg.image_size, generator=g)
    return {"input_ids": ids.to(device), "attention_mask": mask.long().to(device), "pixel_values": pixels.to(device)}


def logits_fns(models: dict, b: dict) -> dict:
    """name -> a function giving (logits_per_image (B, B), logits_per_text) through that implementation."""
    fns = {}
    for name, m in models.items():
        if name == "open_clip":
            def fn(m=m):
                img, txt, scale = m(b["pixel_values"], b["input_ids"])  # normalised features and exp(scale)
                return scale * img @ txt.t(), scale * txt @ img.t()
        else:
            def fn(m=m):
                out = m(input_ids=b["input_ids"], pixel_values=b["pixel_values"], attention_mask=b["attention_mask"])
                return out["logits_per_image"], out["logits_per_text"]
        fns[name] = fn
    return fns


def check_same_logits(fns: dict, tol: float = 1e-4) -> dict[str, float]:
    """Max |logits - ours| of each implementation; an error if any is above ``tol`` (then the step would not
    be the same arithmetic and its time would compare nothing)."""
    with torch.no_grad():
        ref = fns["ours"]()[0].float()
        diffs = {name: (fn()[0].float() - ref).abs().max().item() for name, fn in fns.items() if name != "ours"}
    bad = {k: v for k, v in diffs.items() if v > tol}
    if bad:
        raise AssertionError(f"logits differ from ours by {bad} (> {tol}): the benchmark would time different models")
    return diffs


def symmetric_infonce(per_image: torch.Tensor, per_text: torch.Tensor) -> torch.Tensor:
    """train_clip.py's infonce_loss (a script this benchmark may not import), in fp32."""
    labels = torch.arange(per_image.shape[0], device=per_image.device)
    return (F.cross_entropy(per_image.float(), labels) + F.cross_entropy(per_text.float(), labels)) / 2


def step_fns(models: dict, fns: dict, device, dtype) -> dict:
    """name -> one training step (forward, symmetric InfoNCE, backward, AdamW) of that implementation."""
    steps = {}
    for name, m in models.items():
        opt = torch.optim.AdamW(m.parameters(), lr=1e-4)

        def step(fn=fns[name], opt=opt):
            with autocast(device, dtype):
                per_image, per_text = fn()
            opt.zero_grad(set_to_none=True)
            symmetric_infonce(per_image, per_text).backward()
            opt.step()
        steps[name] = step
    return steps


def speed_table(cfg: BenchConfig, device, dtype) -> dict:
    mcfg = CLIPConfig(**MODEL_PRESETS[cfg.model_preset], vocab_size=VOCAB,
                      max_position_embeddings=cfg.caption_len)
    ours = build_ours(mcfg, device)
    models = {"ours": ours, "transformers_sdpa": build_transformers(ours, "sdpa"),
              "transformers_eager": build_transformers(ours, "eager")}
    oc = build_open_clip(ours) if cfg.open_clip else None
    if oc is not None:
        models["open_clip"] = oc
    elif cfg.open_clip:
        print("open_clip: not installed (pip install -e .[bench]); its column is left out")
    b = batch(mcfg, cfg.batch_size, cfg.caption_len, device)
    fns = logits_fns(models, b)
    diffs = check_same_logits(fns)
    for m in models.values():
        m.train()
    rounds = time_rounds(step_fns(models, fns, device, dtype), cfg.repeats, warmup=1, device=device)
    res = {"preset": cfg.model_preset, "batch_size": cfg.batch_size, "caption_len": cfg.caption_len,
           "n_params": ours.num_parameters(), "max_logit_diff": diffs, "step_s": {}, "step_spread_s": {},
           "ours_speedup": {}}
    for name, t in rounds.items():
        res["step_s"][name], res["step_spread_s"][name] = min(t), max(t) - min(t)
        line = f"train step | {name:18s} | {min(t) * 1e3:7.0f} ms (spread {(max(t) - min(t)) * 1e3:.0f})"
        if name != "ours":
            med, lo, hi = paired_ratio(t, rounds["ours"])
            res["ours_speedup"][name] = {"median": med, "low": lo, "high": hi}
            line += f" | ours is {med:.2f}x as fast (rounds {lo:.2f}-{hi:.2f}; logits within {diffs[name]:.0e})"
        print(line, flush=True)
    return res


def activation_bytes(model: CLIPModel, b: dict, device, dtype) -> int:
    """Bytes of the tensors autograd keeps for the backward pass during one forward + loss, each storage
    counted once (weights excluded: they are already counted as parameters)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast(device, dtype):
        out = model(**b)
        loss = symmetric_infonce(out["logits_per_image"], out["logits_per_text"])
    del loss, out
    return sum(seen.values())


def memory_estimate(cfg: BenchConfig, device, dtype) -> dict:
    """The gpu4gb preset at train_clip.py's batch: 16 bytes per parameter + saved activations + one layer's
    activations again as the backward's transient, in the dtype the GPU would train in (bf16 autocast)."""
    mcfg = CLIPConfig(**MODEL_PRESETS["gpu4gb"], vocab_size=VOCAB, max_position_embeddings=cfg.caption_len)
    act_dtype = dtype if device.type == "cuda" else torch.bfloat16
    model = build_ours(mcfg, device)
    b = batch(mcfg, cfg.batch_size, cfg.caption_len, device)
    acts = activation_bytes(model, b, device, act_dtype)
    n = model.num_parameters()
    layers = mcfg.vision_num_hidden_layers + mcfg.text_num_hidden_layers
    est = {"params": n, "state_bytes": 16 * n, "activation_bytes": acts, "transient_bytes": acts / layers}
    est["total_bytes"] = est["state_bytes"] + acts + est["transient_bytes"]
    print(f"memory | gpu4gb preset, batch {cfg.batch_size}, {str(act_dtype).replace('torch.', '')} activations | "
          f"{n / 1e6:.1f} M params: weights+grads+AdamW {est['state_bytes'] / 2**30:.2f} GiB, saved activations "
          f"{acts / 2**30:.2f} GiB -> about {est['total_bytes'] / 2**30:.2f} GiB", flush=True)
    if device.type == "cuda":  # the real peak of two steps (the second has AdamW's moments)
        step = step_fns({"ours": model}, logits_fns({"ours": model}, b), device, dtype)["ours"]
        torch.cuda.reset_peak_memory_stats(device)
        step()
        step()
        est["measured_peak_bytes"] = peak_memory_bytes(device)
        print(f"memory | measured CUDA peak of two steps: {est['measured_peak_bytes'] / 2**30:.2f} GiB", flush=True)
    return est


def bench_records(result: dict, command: str) -> list[dict]:
    """doc/results.json records: our step time and how many times as fast ours is against each other
    implementation (the median of the paired rounds), run named by preset, batch and threads."""
    sp = result["speed"]
    run = f"clip_bench_{sp['preset']}_b{sp['batch_size']}_{result['threads']}thread_{result['device']}"
    records = [make_record("clip", run, "train_step_ms", sp["step_s"]["ours"] * 1e3, "none", None, 0.0, command)]
    for name, ratio in sp["ours_speedup"].items():
        records.append(make_record("clip", run, f"train_step_speedup_vs_{name}", ratio["median"], name, 1.0, 0.0,
                                   command))
    return records


def main(cfg: BenchConfig) -> dict:
    if cfg.model_preset not in MODEL_PRESETS:
        raise UserError(f"--model-preset {cfg.model_preset}: expected one of {', '.join(MODEL_PRESETS)}")
    set_threads(cfg.threads)
    device = pick_device(cfg.device)
    dtype = pick_dtype(cfg.dtype, device)
    result = {"device": str(device), "dtype": str(dtype).replace("torch.", ""), "threads": torch.get_num_threads(),
              "speed": speed_table(cfg, device, dtype)}
    if cfg.memory:
        result["memory"] = memory_estimate(cfg, device, dtype)
    Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
    Path(cfg.out).write_text(json.dumps(result, indent=2) + "\n")
    records = bench_records(result, command_line("clip.bench"))
    (Path(cfg.out).parent / "results.json").write_text(json.dumps(records, indent=2) + "\n")
    print(f"wrote {cfg.out}")
    return result


if __name__ == "__main__":
    run_main(main, BenchConfig)
