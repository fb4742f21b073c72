"""The parameter-efficient fine-tuning methods side by side: the same SFT data, the same step budget,
the same pretrained model; only what is trained differs.

    python -m gpt_minimind.peft_zoo                         # every method, one fresh process each; table
    python -m gpt_minimind.peft_zoo --method prefix         # one method
    python -m gpt_minimind.peft_zoo --write-readme          # also put the table into the chapter README

| method | what is trained | paper |
|---|---|---|
| full | every weight | - |
| embedding | the token embeddings only (tied to the output head here) | - |
| prompt | P virtual-token vectors put before the input | Lester et al. 2021 (prompt tuning) |
| p_tuning | P virtual tokens produced by a small MLP (the prompt encoder) | Liu et al. 2021, "GPT Understands, Too" |
| prefix | P learned keys/values in every layer's attention (a pre-filled KV cache) | Li & Liang 2021 |
| bitfit | a bias on every linear layer (Llama has none: zero-initialised ones are added) | Ben Zaken et al. 2022 |
| adapter | bottlenecks (down, GELU, up, residual) after attention and FFN; the norms' gains | Houlsby et al. 2019 |
| lora | low-rank updates B A beside every linear layer (lora.py) | Hu et al. 2021 |
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

from common.cli import run_main
from common.config import apply_overrides
from common.results import make_record
from common.runtime import pick_device, seed_everything, set_threads

from .finetune import SFTConfig, finetune
from .loading import load_model
from .lora import inject_lora
from .model import KVCache, MiniMindForCausalLM
from .tasks import EXACT_TASKS, build_examples, exact_match

METHODS = ("full", "embedding", "prompt", "p_tuning", "prefix", "bitfit", "adapter", "lora")


@dataclass
class ZooConfig(SFTConfig):
    """Fine-tune with each parameter-efficient method on the same budget and tabulate the results."""

    method: str = "all"  # one of METHODS, or all (each in a fresh process, so peak memory is its own)
    out_dir: str = "runs/gpt_minimind/peft_zoo"  # <method>/ runs, zoo.json, zoo.md
    max_iters: int = 200  # the same budget for every method
    eval_every: int = 200
    save_every: int = 200
    n_virtual: int = 16  # virtual tokens of prompt / p-tuning / prefix
    encoder_hidden: int = 0  # P-tuning's prompt-encoder width (0: the model width, peft's default)
    adapter_dim: int = 32  # bottleneck width of the adapters
    lora_r: int = 16
    eval_per_task: int = 50  # held-out questions per checkable task for the accuracy column
    write_readme: bool = False  # replace the table between the markers in gpt_minimind/README.md
    run_name: str = "peft_zoo_cpu"


# lr per method: the small methods take (and need) far larger steps than full fine-tuning
LR = {"full": 5e-4, "embedding": 2e-3, "prompt": 3e-2, "p_tuning": 3e-3, "prefix": 1e-2, "bitfit": 1e-2,
      "adapter": 2e-3, "lora": 2e-3}


# ---------------------------------------------------------------------------------------------------
# The methods. Each returns (model to train, its trainable parameters); the model maps ids -> logits
# aligned with the ids, like MiniMindForCausalLM, so train_sft.finetune trains any of them.
# ---------------------------------------------------------------------------------------------------

class VirtualTokens(nn.Module):
    """Prompt tuning and P-tuning: P vectors placed before the input embeddings; the logits of those
    positions are dropped. P-tuning (``encoder_hidden`` > 0) makes the vectors an MLP of learned inputs,
    the prompt encoder; its layout is peft's (C -> H -> H -> C with ReLUs), so the weights swap 1:1."""

    def __init__(self, base: MiniMindForCausalLM, n_virtual: int, encoder_hidden: int = 0):
        super().__init__()
        self.base, self.config, self.n = base, base.config, n_virtual
        C, H = base.config.hidden_size, encoder_hidden
        with torch.no_grad():  # start from the embeddings of random real tokens (Lester et al., sec. 3)
            init = base.model.embed_tokens.weight[torch.randint(3, base.config.vocab_size, (n_virtual,))].clone()
        self.prompt = nn.Parameter(init)
        self.encoder = None
        if H:
            self.encoder = nn.Sequential(nn.Linear(C, H), nn.ReLU(), nn.Linear(H, H), nn.ReLU(), nn.Linear(H, C))

    @property
    def lm_head(self):
        return self.base.lm_head

    def virtual_embeddings(self) -> torch.Tensor:
        """(P, C): what goes before the input."""
        return self.prompt if self.encoder is None else self.encoder(self.prompt)

    def forward(self, input_ids: torch.Tensor, labels=None) -> dict:
        B = input_ids.shape[0]
        embeds = torch.cat([self.virtual_embeddings().expand(B, -1, -1), self.base.model.embed_tokens(input_ids)], 1)
        logits = self.base(None, inputs_embeds=embeds)["logits"][:, self.n:]
        return {"logits": logits}


class Prefix(nn.Module):
    """Prefix tuning: every layer's attention also sees P learned (key, value) pairs, as if a prefix had
    been run before the input: exactly a KV cache filled with parameters instead of computed values."""

    def __init__(self, base: MiniMindForCausalLM, n_virtual: int):
        super().__init__()
        self.base, self.config, self.n = base, base.config, n_virtual
        cfg = base.config
        shape = (cfg.num_hidden_layers, cfg.num_key_value_heads, n_virtual, cfg.head_dim)
        self.prefix_k = nn.Parameter(torch.randn(shape) * 0.5)
        self.prefix_v = nn.Parameter(torch.randn(shape) * 0.5)

    @property
    def lm_head(self):
        return self.base.lm_head

    def forward(self, input_ids: torch.Tensor, labels=None) -> dict:
        B, T = input_ids.shape
        cache = KVCache(self.config, B, self.n + T, input_ids.device, self.prefix_k.dtype)
        for i in range(self.config.num_hidden_layers):  # fill positions 0..P-1; autograd tracks the copies
            cache.k[i][:, :, :self.n] = self.prefix_k[i]
            cache.v[i][:, :, :self.n] = self.prefix_v[i]
        cache.length = self.n  # the input takes positions P.. (RoPE and the causal mask follow)
        return {"logits": self.base(input_ids, cache=cache)["logits"]}


class Adapter(nn.Module):
    """h + up(GELU(down(h))), after ``layer``; up starts at zero so the block starts as the identity."""

    def __init__(self, layer: nn.Linear, dim: int):
        super().__init__()
        self.layer = layer
        self.down = nn.Linear(layer.out_features, dim)
        self.up = nn.Linear(dim, layer.out_features)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.layer(x)
        return h + self.up(F.gelu(self.down(h)))


def apply_method(model: MiniMindForCausalLM, method: str, cfg: ZooConfig) -> tuple[nn.Module, list[nn.Parameter]]:
    model.requires_grad_(method == "full")
    if method == "full":
        return model, list(model.parameters())
    if method == "embedding":
        model.model.embed_tokens.weight.requires_grad_(True)
        return model, [model.model.embed_tokens.weight]
    if method in ("prompt", "p_tuning"):
        hidden = (cfg.encoder_hidden or model.config.hidden_size) if method == "p_tuning" else 0
        wrapped = VirtualTokens(model, cfg.n_virtual, hidden)
        return wrapped, [p for n, p in wrapped.named_parameters() if not n.startswith("base.")]
    if method == "prefix":
        wrapped = Prefix(model, cfg.n_virtual)
        return wrapped, [wrapped.prefix_k, wrapped.prefix_v]
    if method == "bitfit":
        params = []
        for m in model.model.layers.modules():
            if isinstance(m, nn.Linear):
                m.bias = nn.Parameter(torch.zeros(m.out_features, device=m.weight.device))
                params.append(m.bias)
        return model, params
    if method == "adapter":
        params = []
        for layer in model.model.layers:
            layer.self_attn.o_proj = Adapter(layer.self_attn.o_proj, cfg.adapter_dim)
            layer.mlp.down_proj = Adapter(layer.mlp.down_proj, cfg.adapter_dim)
            for m in (layer.self_attn.o_proj, layer.mlp.down_proj):
                params += [*m.down.parameters(), *m.up.parameters()]
            params += [layer.input_layernorm.weight, layer.post_attention_layernorm.weight]  # the norms' gains
        for p in params:
            p.requires_grad_(True)
        return model, params
    if method == "lora":
        return model, inject_lora(model, cfg.lora_r, 2.0 * cfg.lora_r)
    raise ValueError(f"--method must be one of {', '.join(METHODS)} or all, got {method!r}")


# ---------------------------------------------------------------------------------------------------
# Scoring any of them: greedy answers without a KV cache (answers are a few tokens)
# ---------------------------------------------------------------------------------------------------

@torch.no_grad()
def greedy_answer(model: nn.Module, tok, messages: list[dict], max_new_tokens: int = 12) -> str:
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    out = []
    for _ in range(max_new_tokens):
        nxt = int(model(torch.tensor([ids + out]))["logits"][0, -1].argmax())
        if nxt == tok.eos_token_id:
            break
        out.append(nxt)
    return tok.decode(out, skip_special_tokens=True)


def task_accuracy(model: nn.Module, tok, per_task: int) -> dict[str, float]:
    tests = build_examples("test", {t: -1 for t in EXACT_TASKS})
    model.eval()
    acc = {}
    for task in EXACT_TASKS:
        examples = [ex for ex in tests if ex.task == task][:per_task]
        acc[task] = sum(exact_match(greedy_answer(model, tok, ex.prompt), ex.answer) for ex in examples) / len(examples)
    acc["mean"] = sum(acc.values()) / len(EXACT_TASKS)
    return acc


def peak_rss_bytes() -> int:
    """Peak resident memory of this process (Linux VmHWM; elsewhere ru_maxrss)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_one(cfg: ZooConfig) -> dict:
    set_threads(cfg.threads)
    seed_everything(cfg.seed)
    t0 = time.perf_counter()
    device = pick_device(cfg.device)
    base, tok = load_model(cfg.init_from, device)
    model, params = apply_method(base, cfg.method, cfg)
    run_cfg = apply_overrides(cfg, {"out_dir": str(Path(cfg.out_dir) / cfg.method), "lr": LR[cfg.method]})

    def save_final(final_dir: Path) -> None:  # only what the method trained
        final_dir.mkdir(parents=True, exist_ok=True)
        names = {id(p): n for n, p in model.named_parameters()}
        save_file({names[id(p)]: p.detach().cpu().contiguous() for p in params}, str(final_dir / "trained.safetensors"))

    result = finetune(model, tok, run_cfg, params, device, save_final)
    s = result["summary"]
    acc = task_accuracy(model, tok, cfg.eval_per_task)
    row = {"method": cfg.method, "trainable_params": s["trainable_params"], "total_params": s["total_params"],
           "grad_and_adam_bytes": 12 * s["trainable_params"],  # fp32 gradient + Adam's two moments
           "peak_rss_bytes": peak_rss_bytes(), "step_s_median": s["step_s_median"], "lr": LR[cfg.method],
           "valid_loss_before": s["initial_valid_loss"], "valid_loss_after": s["valid_loss"],
           "accuracy": acc, "steps": s["steps"], "wall_s": time.perf_counter() - t0}
    (Path(run_cfg.out_dir) / "zoo_row.json").write_text(json.dumps(row, indent=2) + "\n")
    return row


def format_table(rows: list[dict]) -> str:
    lines = ["| method | trainable params | share | grads + Adam | peak RSS | step | held-out loss | "
             "news | review | arithmetic | dictionary |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        a = r["accuracy"]
        share = r["trainable_params"] / r["total_params"]
        lines.append(f"| {r['method']} | {r['trainable_params']:,} | {share:.2%} | "
                     f"{r['grad_and_adam_bytes'] / 2**20:.2f} MiB | {r['peak_rss_bytes'] / 2**20:.0f} MiB | "
                     f"{r['step_s_median'] * 1e3:.0f} ms | "
                     f"{r['valid_loss_before']:.2f} → {r['valid_loss_after']:.2f} | "
                     + " | ".join(f"{a[t]:.0%}" for t in EXACT_TASKS) + " |")
    return "\n".join(lines)


README_MARKERS = ("<!-- peft-zoo-table -->", "<!-- /peft-zoo-table -->")


def write_readme(table: str, note: str, readme: Path | None = None) -> None:
    readme = readme or Path(__file__).with_name("README.md")
    text = readme.read_text(encoding="utf-8")
    start, end = README_MARKERS
    if start not in text or end not in text:
        raise ValueError(f"{readme}: the markers {start} ... {end} are missing")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    readme.write_text(f"{head}{start}\n{note}\n\n{table}\n{end}{tail}", encoding="utf-8")


def main(cfg: ZooConfig) -> dict:
    if cfg.method != "all":
        return run_one(cfg)
    rows, t0 = [], time.perf_counter()
    for method in METHODS:  # a fresh process per method: its peak memory is its own
        cmd = [sys.executable, "-m", "gpt_minimind.peft_zoo", "--method", method, "--init-from", cfg.init_from,
               "--out-dir", cfg.out_dir, "--max-iters", str(cfg.max_iters), "--eval-every", str(cfg.eval_every),
               "--save-every", str(cfg.save_every), "--eval-per-task", str(cfg.eval_per_task),
               "--threads", str(cfg.threads), "--seed", str(cfg.seed), "--batch-size", str(cfg.batch_size)]
        print(f"== {method}", flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"{method} failed:\n{proc.stderr[-3000:]}")
        print(re.findall(r"done: .*", proc.stdout + proc.stderr)[-1:], flush=True)
        rows.append(json.loads((Path(cfg.out_dir) / method / "zoo_row.json").read_text()))
    table = format_table(rows)
    wall = time.perf_counter() - t0
    note = (f"Measured by `python -m gpt_minimind.peft_zoo --write-readme` on {time.strftime('%Y-%m-%d')} "
            f"({wall / 60:.0f} minutes for all eight): {cfg.max_iters} steps of {cfg.batch_size} conversations each "
            f"from the pretrained cpu model, {cfg.threads or 'torch default'} thread(s) per run, accuracy on "
            f"{cfg.eval_per_task} held-out questions per task (greedy). 'grads + Adam' is the trainable "
            "parameters' fp32 gradient and two Adam moments (12 bytes each); peak RSS is the whole process "
            "(torch, data, activations), where the methods differ little at this size.")
    print(table)
    out = Path(cfg.out_dir)
    (out / "zoo.json").write_text(json.dumps({"rows": rows, "wall_s": wall}, indent=2) + "\n")
    (out / "zoo.md").write_text(note + "\n\n" + table + "\n")
    (out / "results.json").write_text(json.dumps(records(rows), indent=2) + "\n")
    if cfg.write_readme:
        write_readme(table, note)
    return {"rows": rows, "table": table}


def records(rows: list[dict]) -> list[dict]:
    """doc/results.json lines: each method's held-out loss (against the model before fine-tuning) and mean
    task accuracy (against full fine-tuning at the same budget)."""
    full = next((r for r in rows if r["method"] == "full"), None)
    out = []
    for r in rows:
        run, cmd = f"peft_zoo_{r['method']}_cpu", f"python -m gpt_minimind.peft_zoo --method {r['method']}"
        out.append(make_record("gpt_minimind", run, "valid_loss", r["valid_loss_after"], "before_finetune",
                               r["valid_loss_before"], r["wall_s"], cmd))
        out.append(make_record("gpt_minimind", run, "accuracy", r["accuracy"]["mean"], "full_finetune",
                               full["accuracy"]["mean"] if full else None, r["wall_s"], cmd))
    return out


if __name__ == "__main__":
    run_main(main, ZooConfig)
