"""Our checkpoint -> a transformers `DeepseekV3ForCausalLM` directory, and back.

    python -m deepseek_v3.export_hf --ckpt runs/deepseek_v3/train/final --out runs/deepseek_v3/hf
    python -m deepseek_v3.export_hf --import-dir runs/deepseek_v3/hf --out runs/deepseek_v3/imported

The names are transformers' already, so the map is: a `model.` prefix on the decoder, and each MoE layer's
experts packed into two tensors, gate_up_proj (E, 2I, C) = [gate; up] and down_proj (E, C, I). RoPE: we rotate
interleaved pairs as the official code does, which is transformers' `rope_interleave=True`.
transformers has no MTP module (it drops the official checkpoint's layer 61 at load), so the MTP weights
travel beside the export in `mtp.safetensors`, which transformers ignores and the import reads back.
The exported directory loads with `AutoModelForCausalLM.from_pretrained(dir)`, no custom code.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from common.checkpoint import atomic_write_text, load_pretrained, read_config, save_pretrained
from common.cli import run_main
from common.errors import UserError

from .model import DeepseekV3Config, DeepseekV3ForCausalLM


def hf_config(cfg: DeepseekV3Config, bos_token_id: int | None = None, eos_token_id: int | None = None):
    """transformers' DeepseekV3Config describing the same network."""
    from transformers import DeepseekV3Config as HFConfig

    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_factor > 1:
        rope = {"rope_type": "yarn", "rope_theta": cfg.rope_theta, "factor": cfg.rope_factor,
                "original_max_position_embeddings": cfg.original_max_position_embeddings,
                "beta_fast": cfg.beta_fast, "beta_slow": cfg.beta_slow, "mscale": cfg.mscale,
                "mscale_all_dim": cfg.mscale}
    return HFConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                    moe_intermediate_size=cfg.moe_intermediate_size, num_hidden_layers=cfg.num_hidden_layers,
                    num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_attention_heads,
                    n_shared_experts=cfg.n_shared_experts, n_routed_experts=cfg.n_routed_experts,
                    routed_scaling_factor=cfg.routed_scaling_factor, kv_lora_rank=cfg.kv_lora_rank,
                    q_lora_rank=cfg.q_lora_rank or None, qk_rope_head_dim=cfg.qk_rope_head_dim,
                    v_head_dim=cfg.v_head_dim, qk_nope_head_dim=cfg.qk_nope_head_dim, n_group=cfg.n_group,
                    topk_group=cfg.topk_group, num_experts_per_tok=cfg.num_experts_per_tok,
                    first_k_dense_replace=cfg.first_k_dense_replace, norm_topk_prob=cfg.norm_topk_prob,
                    hidden_act="silu", rms_norm_eps=cfg.rms_norm_eps, tie_word_embeddings=cfg.tie_word_embeddings,
                    max_position_embeddings=int(cfg.max_position_embeddings * max(cfg.rope_factor, 1)),
                    rope_parameters=rope, rope_interleave=True, attention_bias=False,
                    num_nextn_predict_layers=cfg.num_nextn_predict_layers, initializer_range=cfg.initializer_range,
                    bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=None)


def config_from_hf(d: dict) -> DeepseekV3Config:
    """Our config from a transformers config.json (a dict)."""
    if d.get("model_type") != "deepseek_v3":
        raise UserError(f"model_type {d.get('model_type')!r}: expected 'deepseek_v3'")
    if d.get("num_key_value_heads", d["num_attention_heads"]) != d["num_attention_heads"]:
        raise UserError("num_key_value_heads differs from num_attention_heads: MLA has no separate KV heads")
    if not d.get("rope_interleave", True):
        raise UserError("rope_interleave false: this chapter rotates interleaved pairs (the official layout)")
    rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
    theta = rope.get("rope_theta", d.get("rope_theta", 10000.0))
    yarn = rope.get("rope_type", rope.get("type", "default")) == "yarn"
    factor = rope.get("factor", 1.0) if yarn else 1.0
    return DeepseekV3Config(
        vocab_size=d["vocab_size"], hidden_size=d["hidden_size"], intermediate_size=d["intermediate_size"],
        moe_intermediate_size=d["moe_intermediate_size"], num_hidden_layers=d["num_hidden_layers"],
        first_k_dense_replace=d["first_k_dense_replace"], num_attention_heads=d["num_attention_heads"],
        q_lora_rank=d.get("q_lora_rank") or 0, kv_lora_rank=d["kv_lora_rank"], qk_nope_head_dim=d["qk_nope_head_dim"],
        qk_rope_head_dim=d["qk_rope_head_dim"], v_head_dim=d["v_head_dim"], n_routed_experts=d["n_routed_experts"],
        num_experts_per_tok=d["num_experts_per_tok"], n_shared_experts=d["n_shared_experts"],
        n_group=d.get("n_group") or 1, topk_group=d.get("topk_group") or 1,
        routed_scaling_factor=d["routed_scaling_factor"], norm_topk_prob=d["norm_topk_prob"],
        num_nextn_predict_layers=d.get("num_nextn_predict_layers", 0),
        max_position_embeddings=int(d["max_position_embeddings"] / factor), rope_theta=theta, rope_factor=factor,
        original_max_position_embeddings=rope.get("original_max_position_embeddings",
                                                  int(d["max_position_embeddings"] / factor)),
        beta_fast=rope.get("beta_fast", 32), beta_slow=rope.get("beta_slow", 1),
        mscale=rope.get("mscale_all_dim", rope.get("mscale", 1.0)) if yarn else 1.0,
        rms_norm_eps=d["rms_norm_eps"], tie_word_embeddings=d.get("tie_word_embeddings", False),
        initializer_range=d.get("initializer_range", 0.02))


def moe_layers(cfg: DeepseekV3Config) -> list[int]:
    return [i for i in range(cfg.num_hidden_layers) if i >= cfg.first_k_dense_replace and cfg.n_routed_experts]


def to_hf_state(model: DeepseekV3ForCausalLM) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """-> (transformers' state dict, the MTP weights under our own names)."""
    cfg = model.config
    ours = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    mtp = {k: ours.pop(k) for k in list(ours) if k.startswith("mtp.")}
    state = {("lm_head.weight" if k == "lm_head.weight" else f"model.{k}"): v for k, v in ours.items()}
    for i in moe_layers(cfg):
        p = f"model.layers.{i}.mlp.experts"
        E = cfg.n_routed_experts
        state[f"{p}.gate_up_proj"] = torch.stack([torch.cat([state.pop(f"{p}.{e}.gate_proj.weight"),
                                                             state.pop(f"{p}.{e}.up_proj.weight")]) for e in range(E)])
        state[f"{p}.down_proj"] = torch.stack([state.pop(f"{p}.{e}.down_proj.weight") for e in range(E)])
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return state, mtp


def from_hf_state(state: dict[str, torch.Tensor], cfg: DeepseekV3Config) -> dict[str, torch.Tensor]:
    """transformers' state dict -> ours (without MTP)."""
    out = {}
    for k, v in state.items():
        if k.startswith("model.layers.") and int(k.split(".")[2]) >= cfg.num_hidden_layers:
            continue  # an official checkpoint's MTP layer (layer 61): not in transformers' model either
        out[k.removeprefix("model.")] = v
    for i in moe_layers(cfg):
        p = f"layers.{i}.mlp.experts"
        gate_up, down = out.pop(f"{p}.gate_up_proj"), out.pop(f"{p}.down_proj")
        for e in range(cfg.n_routed_experts):
            out[f"{p}.{e}.gate_proj.weight"], out[f"{p}.{e}.up_proj.weight"] = gate_up[e].chunk(2, dim=0)
            out[f"{p}.{e}.down_proj.weight"] = down[e]
    if cfg.tie_word_embeddings:
        out["lm_head.weight"] = out["embed_tokens.weight"]
    return {k: v.contiguous() for k, v in out.items()}


def load_from_hf_model(hf_model, with_mtp: int = 0) -> DeepseekV3ForCausalLM:
    """Our model holding a transformers DeepseekV3ForCausalLM's weights (MTP modules fresh, `with_mtp` deep)."""
    cfg = replace(config_from_hf(hf_model.config.to_dict()), num_nextn_predict_layers=with_mtp)
    model = DeepseekV3ForCausalLM(cfg)
    missing, unexpected = model.load_state_dict(from_hf_state(hf_model.state_dict(), cfg), strict=False)
    if unexpected or any(not k.startswith("mtp.") for k in missing):
        raise ValueError(f"weights do not fit: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return model


def export(ckpt: str | Path, out: str | Path) -> Path:
    """Write `out` as a transformers directory (config.json, model.safetensors, the tokenizer if the
    checkpoint has one, and mtp.safetensors)."""
    from transformers import AutoTokenizer

    ckpt, out = Path(ckpt), Path(out)
    cfg = DeepseekV3Config.from_dict(read_config(ckpt))
    model = load_pretrained(DeepseekV3ForCausalLM(cfg), ckpt)
    tok = AutoTokenizer.from_pretrained(ckpt / "tokenizer") if (ckpt / "tokenizer").is_dir() else None
    bos = eos = None
    if tok is not None:
        bos, eos = tok.bos_token_id, tok.pad_token_id  # documents end with <|endoftext|> (the pad token) in training
    state, mtp = to_hf_state(model)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    hf_config(cfg, bos, eos).save_pretrained(tmp)
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    if mtp:
        save_file(mtp, str(tmp / "mtp.safetensors"), metadata={"format": "pt"})
    if tok is not None:
        tok.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def import_hf(hf_dir: str | Path, out: str | Path) -> Path:
    """A transformers DeepseekV3 directory (ours or any other) -> our checkpoint directory."""
    hf_dir, out = Path(hf_dir), Path(out)
    cfg_path = hf_dir / "config.json"
    if not cfg_path.is_file():
        raise UserError(f"--import-dir {hf_dir}: no config.json there; expected a transformers model directory")
    d = json.loads(cfg_path.read_text())
    if d.get("model_type") != "deepseek_v3":
        raise UserError(f"--import-dir {hf_dir}: config.json has model_type {d.get('model_type')!r}; expected "
                        "'deepseek_v3'")
    has_mtp = (hf_dir / "mtp.safetensors").is_file()
    cfg = replace(config_from_hf(d), num_nextn_predict_layers=d.get("num_nextn_predict_layers", 0) if has_mtp else 0)
    files = sorted(hf_dir.glob("*.safetensors"))
    state = {}
    for f in files:
        if f.name != "mtp.safetensors":
            state.update(load_file(str(f)))
    ours = from_hf_state(state, cfg)
    if has_mtp:
        ours.update(load_file(str(hf_dir / "mtp.safetensors")))
    model = DeepseekV3ForCausalLM(cfg)
    missing, unexpected = model.load_state_dict(ours, strict=False)
    if missing or unexpected:
        raise UserError(f"--import-dir {hf_dir}: the weights do not fit the config (missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]})")
    save_pretrained(model, cfg.to_dict(), out)
    tok_files = [p for p in hf_dir.iterdir() if p.name.startswith(("tokenizer", "special_tokens"))]
    if tok_files:
        (out / "tokenizer").mkdir(exist_ok=True)
        for p in tok_files:
            shutil.copy(p, out / "tokenizer" / p.name)
    atomic_write_text(out / "source.txt", f"imported from {hf_dir}\n")
    return out


@dataclass
class ExportConfig:
    """Export a checkpoint to transformers' format, or import one."""

    ckpt: str = "runs/deepseek_v3/train/final"  # our checkpoint directory (config.json + model.safetensors)
    out: str = "runs/deepseek_v3/hf"  # where to write
    import_dir: str = ""  # a transformers DeepseekV3 directory to import instead (then --out is ours)


def main(cfg: ExportConfig) -> dict:
    if cfg.import_dir:
        out = import_hf(cfg.import_dir, cfg.out)
        print(f"imported {cfg.import_dir} -> {out}")
        return {"out": out}
    if not (Path(cfg.ckpt) / "config.json").is_file():
        raise UserError(f"--ckpt {cfg.ckpt}: no config.json there; train first (python -m deepseek_v3.train)")
    out = export(cfg.ckpt, cfg.out)
    print(f"exported {cfg.ckpt} -> {out} (AutoModelForCausalLM.from_pretrained loads it)")
    return {"out": out}


if __name__ == "__main__":
    run_main(main, ExportConfig)
