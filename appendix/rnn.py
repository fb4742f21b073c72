"""Recurrent networks from their equations: the Elman RNN cell, the GRU and the LSTM; stacked and
bidirectional layers; and a character-level language model trained on Shakespeare.

    python -m appendix.rnn                       # parity with torch.nn, then train the char LM and sample
    python -m appendix.rnn --resume              # continue an interrupted run from its last checkpoint
    python -m appendix.rnn --mode gru --impl torch   # the same LM on a GRU, run by torch.nn.GRU

A recurrent layer reads a sequence one step at a time and carries a state h_t (and, for the LSTM, a
cell c_t) from step to step. The three cells differ only in how the new state is made:

    RNN   h' = tanh(W_ih x + b_ih + W_hh h + b_hh)
    GRU   r = s(W_ir x + b_ir + W_hr h + b_hr)             reset gate
          z = s(W_iz x + b_iz + W_hz h + b_hz)             update gate
          n = tanh(W_in x + b_in + r * (W_hn h + b_hn))    candidate
          h' = (1 - z) * n + z * h                         (Cho et al. 2014, torch's variant: r gates W_hn h + b_hn)
    LSTM  i, f, g, o = s(.), s(.), tanh(.), s(.)  of  W_ih x + b_ih + W_hh h + b_hh   (4 gates, one matmul)
          c' = f * c + i * g                               the additive cell path that keeps gradients alive
          h' = o * tanh(c')                                (Hochreiter & Schmidhuber 1997, with a forget gate)

The weights keep torch.nn's layout (gates stacked on the rows of one matrix, in torch's order), so
``load_torch_weights`` copies an ``nn.RNN/GRU/LSTM`` into ours and the tests compare outputs and gradients.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.bench import time_interleaved
from common.checkpoint import resume_or_start, resume_point, save_checkpoint, save_pretrained
from common.cli import run_main
from common.data import evenly_spaced, subset_note
from common.results import command_line, make_record
from common.runtime import pick_device, seed_everything, set_threads
from common.schedule import clip_grad

from .dataset import shakespeare_text

GATES = {"rnn": 1, "gru": 3, "lstm": 4}  # rows of W_ih / W_hh per hidden unit


# ---------------------------------------------------------------------------------------------------
# 1) the cells: one time step
# ---------------------------------------------------------------------------------------------------

class RNNCellBase(nn.Module):
    """Shared parameters: W_ih (G*H, I), W_hh (G*H, H), b_ih, b_hh (G*H), G gates stacked on the rows,
    initialised like torch: U(-1/sqrt(H), 1/sqrt(H))."""

    n_gates = 1

    def __init__(self, input_size: int, hidden_size: int):
        super().__init__()
        g, h = self.n_gates, hidden_size
        self.input_size, self.hidden_size = input_size, hidden_size
        self.weight_ih = nn.Parameter(torch.empty(g * h, input_size))
        self.weight_hh = nn.Parameter(torch.empty(g * h, h))
        self.bias_ih = nn.Parameter(torch.empty(g * h))
        self.bias_hh = nn.Parameter(torch.empty(g * h))
        bound = 1 / math.sqrt(h)
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)


class RNNCell(RNNCellBase):
    """Elman RNN: h' = tanh(W_ih x + b_ih + W_hh h + b_hh).   x (B, I), h (B, H) -> (B, H)"""

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return torch.tanh(F.linear(x, self.weight_ih, self.bias_ih) + F.linear(h, self.weight_hh, self.bias_hh))


class GRUCell(RNNCellBase):
    """Gated recurrent unit (Cho et al. 2014, arXiv:1406.1078 eq. 5-8); gate rows in torch's order r, z, n."""

    n_gates = 3

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        # 1) both projections at once, each split into the three gates     (B, 3H) -> 3 x (B, H)
        xr, xz, xn = F.linear(x, self.weight_ih, self.bias_ih).chunk(3, dim=-1)
        hr, hz, hn = F.linear(h, self.weight_hh, self.bias_hh).chunk(3, dim=-1)
        # 2) reset and update gates
        r = torch.sigmoid(xr + hr)
        z = torch.sigmoid(xz + hz)
        # 3) candidate state: the reset gate scales the recurrent part (torch and cuDNN put r after W_hn h + b_hn;
        #    the paper puts it before the matmul, r * h; both train equally well, this one is one matmul per step)
        n = torch.tanh(xn + r * hn)
        # 4) interpolate between the old state and the candidate
        return (1 - z) * n + z * h


class LSTMCell(RNNCellBase):
    """Long short-term memory with a forget gate; gate rows in torch's order i, f, g, o.
    x (B, I), (h, c) (B, H) each -> (h', c')"""

    n_gates = 4

    def forward(self, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        h, c = state
        # 1) all four gates from one matmul on the input and one on the state        (B, 4H)
        gates = F.linear(x, self.weight_ih, self.bias_ih) + F.linear(h, self.weight_hh, self.bias_hh)
        i, f, g, o = gates.chunk(4, dim=-1)
        i, f, g, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
        # 2) the cell forgets (f), then writes (i * g): an additive update, so dc'/dc = f, not a matmul
        c = f * c + i * g
        # 3) the output gate decides how much of the squashed cell the next layer sees
        return o * torch.tanh(c), c


CELLS = {"rnn": RNNCell, "gru": GRUCell, "lstm": LSTMCell}


# ---------------------------------------------------------------------------------------------------
# 2) a layer: the cell unrolled over time, stacked and optionally bidirectional
# ---------------------------------------------------------------------------------------------------

class Recurrent(nn.Module):
    """``nn.RNN / nn.GRU / nn.LSTM`` with ``batch_first=True``, written as a loop over time.

    x (B, T, I) -> output (B, T, dirs*H) and the final state (layers*dirs, B, H) (a pair for the LSTM).
    Layer k > 0 reads the concatenated outputs of both directions of layer k - 1. The reverse direction
    reads the sequence backwards; its outputs are put back in time order before the concatenation.
    """

    def __init__(self, mode: str, input_size: int, hidden_size: int, num_layers: int = 1,
                 bidirectional: bool = False, dropout: float = 0.0):
        super().__init__()
        if mode not in CELLS:
            raise ValueError(f"mode must be one of {sorted(CELLS)}; got {mode!r}")
        self.mode, self.hidden_size, self.num_layers = mode, hidden_size, num_layers
        self.dirs = 2 if bidirectional else 1
        self.dropout = dropout
        self.cells = nn.ModuleDict()
        for layer in range(num_layers):
            in_size = input_size if layer == 0 else hidden_size * self.dirs
            for suffix in ("", "_reverse")[: self.dirs]:
                self.cells[f"l{layer}{suffix}"] = CELLS[mode](in_size, hidden_size)

    def forward(self, x: torch.Tensor, state=None):
        B, T, _ = x.shape
        n_states = self.num_layers * self.dirs
        if state is None:
            zeros = x.new_zeros(n_states, B, self.hidden_size)
            state = (zeros, zeros) if self.mode == "lstm" else zeros
        h0, c0 = state if self.mode == "lstm" else (state, None)
        h_n, c_n = [], []
        for layer in range(self.num_layers):
            outs = []
            for d, suffix in enumerate(("", "_reverse")[: self.dirs]):
                cell, k = self.cells[f"l{layer}{suffix}"], layer * self.dirs + d
                h = h0[k]
                c = c0[k] if c0 is not None else None
                steps = range(T - 1, -1, -1) if d == 1 else range(T)
                ys = [None] * T
                for t in steps:  # the recurrence: step t needs step t-1, so time cannot be batched
                    if self.mode == "lstm":
                        h, c = cell(x[:, t], (h, c))
                    else:
                        h = cell(x[:, t], h)
                    ys[t] = h
                outs.append(torch.stack(ys, dim=1))  # (B, T, H), in time order for both directions
                h_n.append(h)
                c_n.append(c)
            x = torch.cat(outs, dim=-1)  # (B, T, dirs*H)
            if self.dropout and self.training and layer < self.num_layers - 1:
                x = F.dropout(x, self.dropout)  # between layers, not after the last (as torch)
        h_n = torch.stack(h_n)
        return x, ((h_n, torch.stack(c_n)) if self.mode == "lstm" else h_n)


@torch.no_grad()
def load_torch_weights(ours: Recurrent, ref: nn.RNNBase) -> Recurrent:
    """Copy ``nn.RNN/GRU/LSTM`` weights into ours: torch's ``weight_ih_l{k}{_reverse}`` is our
    ``cells["l{k}{_reverse}"].weight_ih``; same shapes, same gate order, so it is a plain copy."""
    for key, kind, p in _paired(ours, ref):
        getattr(ours.cells[key], kind).copy_(p)
    return ours


# ---------------------------------------------------------------------------------------------------
# 3) a character-level language model (Karpathy's char-rnn, 2015) on Shakespeare
# ---------------------------------------------------------------------------------------------------

@dataclass
class CharLMConfig:
    """A 2-layer LSTM that reads Shakespeare one character at a time and predicts the next one."""

    mode: str = "lstm"  # rnn, gru or lstm
    impl: str = "ours"  # ours (the loop above) or torch (nn.LSTM etc., the same maths in C++; faster)
    embed_dim: int = 64  # character embedding size
    hidden_size: int = 256  # state size per layer (char-rnn's "small" model)
    num_layers: int = 2  # stacked layers
    dropout: float = 0.0  # between the layers; the model is too small to overfit 1 M characters in minutes
    n_chars: int = 1_100_000  # characters of Shakespeare (the size of tinyshakespeare); 90 % train, 10 % valid
    seq_len: int = 100  # characters per training window (truncated backpropagation through time)
    batch_size: int = 32  # windows per step
    max_iters: int = 1500  # optimizer steps
    lr: float = 3e-3  # Adam learning rate, cosine-decayed to 10 %
    warmup_iters: int = 50  # linear warmup steps
    grad_clip: float = 1.0  # global gradient norm clip: RNNs need it (exploding gradients)
    eval_every: int = 250  # steps between validation-loss measurements
    eval_batches: int = 20  # valid batches of windows per evaluation in training, evenly spaced (0: all); final: all
    save_every: int = 500  # steps between checkpoints
    keep_checkpoints: int = 2  # newest checkpoints kept on disk
    log_every: int = 50  # steps between log lines
    sample_chars: int = 400  # characters sampled at the end
    temperature: float = 0.8  # sampling temperature
    seed: int = 1337  # data order, init and sampling
    threads: int = 0  # CPU threads (0: torch's default)
    device: str = "cpu"  # the loop over time is launch-bound: a GPU helps little at this size
    parity: bool = True  # first print the max difference between ours and torch.nn for all three cells
    speed: bool = False  # also time one training step of ours vs torch.nn (1 thread, interleaved, best of 3)
    out_dir: str = "runs/appendix/char_lm"  # checkpoints, metrics.jsonl, loss.png, samples
    resume: bool = False  # continue from the last checkpoint in out_dir
    run_name: str = "char_lstm_cpu"  # names this run's records in doc/results.json


class CharLM(nn.Module):
    """Embedding -> stacked recurrent layer -> linear head over the characters.   (B, T) -> (B, T, V)"""

    def __init__(self, vocab_size: int, cfg: CharLMConfig):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, cfg.embed_dim)
        if cfg.impl == "ours":
            self.rnn = Recurrent(cfg.mode, cfg.embed_dim, cfg.hidden_size, cfg.num_layers, dropout=cfg.dropout)
        elif cfg.impl == "torch":
            cls = {"rnn": nn.RNN, "gru": nn.GRU, "lstm": nn.LSTM}[cfg.mode]
            self.rnn = cls(cfg.embed_dim, cfg.hidden_size, cfg.num_layers, batch_first=True, dropout=cfg.dropout)
        else:
            raise ValueError(f"impl must be ours or torch; got {cfg.impl!r}")
        self.head = nn.Linear(cfg.hidden_size, vocab_size)

    def forward(self, ids: torch.Tensor, state=None):
        out, state = self.rnn(self.embed(ids), state)
        return self.head(out), state


class CharData:
    """Characters -> ids; random windows drawn from a generator seeded by the step, so a resumed run
    sees exactly the batches an uninterrupted run would."""

    def __init__(self, text: str):
        self.chars = sorted(set(text))
        self.stoi = {c: i for i, c in enumerate(self.chars)}
        ids = torch.tensor([self.stoi[c] for c in text], dtype=torch.long)
        n = int(len(ids) * 0.9)
        self.train, self.valid = ids[:n], ids[n:]

    def batch(self, split: torch.Tensor, batch_size: int, seq_len: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        starts = torch.randint(len(split) - seq_len - 1, (batch_size,), generator=g)
        x = torch.stack([split[s: s + seq_len] for s in starts.tolist()])
        y = torch.stack([split[s + 1: s + seq_len + 1] for s in starts.tolist()])
        return x, y

    def decode(self, ids) -> str:
        return "".join(self.chars[i] for i in ids)


@torch.no_grad()
def evaluate(model: CharLM, data: CharData, cfg: CharLMConfig, max_windows: int = 0) -> dict:
    """Mean next-character cross-entropy (nats) on the held-out 10 %, cut into consecutive non-overlapping
    ``seq_len`` windows (window i reads valid[i*T : (i+1)*T] and predicts valid[i*T+1 : (i+1)*T+1]):
    every window (max_windows 0: the figure the results quote, each of the split's characters after the
    first predicted once, a last partial window left out), else ``max_windows`` of them spread evenly over
    the split (a training-time estimate: the same windows at every evaluation of a run).

    Each window starts from a zero state, as every training window does. Carrying the state from window
    to window (the classic LM evaluation) would score contexts longer than any the model was trained on,
    and a subset could not be scored without reading everything before it; from a zero state, the
    training-time subset is part of the final figure, and both implementations (ours, torch) score alike.
    No random generator is used. Returns {"loss", "windows" scored, "of_windows", "chars" predicted}."""
    model.eval()
    T = cfg.seq_len
    n_windows = (len(data.valid) - 1) // T
    x_all = data.valid[: n_windows * T].view(n_windows, T)
    y_all = data.valid[1: n_windows * T + 1].view(n_windows, T)
    picked = torch.tensor(evenly_spaced(n_windows, max_windows), dtype=torch.long)
    device = next(model.parameters()).device
    total = 0.0
    for i in range(0, len(picked), cfg.batch_size):
        rows = picked[i: i + cfg.batch_size]
        logits, _ = model(x_all[rows].to(device))
        total += F.cross_entropy(logits.flatten(0, 1), y_all[rows].to(device).flatten(), reduction="sum").item()
    model.train()
    chars = len(picked) * T
    return {"loss": total / chars if chars else float("nan"), "windows": len(picked), "of_windows": n_windows,
            "chars": chars}


@torch.no_grad()
def sample(model: CharLM, data: CharData, prompt: str, n: int, temperature: float, seed: int) -> str:
    """Feed the prompt, then one character at a time, carrying the recurrent state (the RNN's "KV cache")."""
    model.eval()
    g = torch.Generator().manual_seed(seed)
    ids = torch.tensor([[data.stoi[c] for c in prompt if c in data.stoi]])
    logits, state = model(ids)
    out = []
    for _ in range(n):
        probs = F.softmax(logits[0, -1] / temperature, dim=-1)
        nxt = torch.multinomial(probs, 1, generator=g)
        out.append(nxt.item())
        logits, state = model(nxt.view(1, 1), state)
    return prompt + data.decode(out)


def parity_table(seed: int = 0) -> list[dict]:
    """Ours vs torch.nn for each cell, 2 layers, bidirectional: max |difference| of outputs and gradients."""
    rows = []
    for mode in ("rnn", "gru", "lstm"):
        torch.manual_seed(seed)
        ref = {"rnn": nn.RNN, "gru": nn.GRU, "lstm": nn.LSTM}[mode](8, 16, 2, batch_first=True, bidirectional=True)
        ours = load_torch_weights(Recurrent(mode, 8, 16, 2, bidirectional=True), ref)
        x = torch.randn(3, 7, 8)
        y_ref, s_ref = ref(x)
        y, s = ours(x)
        (y_ref.square().sum() + (s_ref[0] if mode == "lstm" else s_ref).sum()).backward()
        (y.square().sum() + (s[0] if mode == "lstm" else s).sum()).backward()
        grad_diff = max((p.grad - getattr(ours.cells[k], kind).grad).abs().max().item()
                        for k, kind, p in _paired(ours, ref))
        rows.append({"mode": mode, "output_max_diff": (y - y_ref).abs().max().item(), "grad_max_diff": grad_diff})
    return rows


def _paired(ours: Recurrent, ref: nn.RNNBase):
    """(our cell key, parameter kind, torch's parameter) for every parameter of ``ref``."""
    for name, p in ref.named_parameters():
        rev = name.endswith("_reverse")
        kind, layer = (name[: -len("_reverse")] if rev else name).rsplit("_", 1)
        yield layer + ("_reverse" if rev else ""), kind, p


def speed_rows(cfg: CharLMConfig, repeats: int = 3) -> list[dict]:
    """One training step (forward, backward, Adam) of this config, our loop vs torch.nn's fused layer,
    timed in interleaved rounds on 1 thread."""
    torch.set_num_threads(1)
    rows = []
    for mode in ("rnn", "gru", "lstm"):
        fns = {}
        for impl in ("ours", "torch"):
            torch.manual_seed(0)
            model = CharLM(80, CharLMConfig(**{**vars(cfg), "mode": mode, "impl": impl}))
            opt = torch.optim.Adam(model.parameters())
            x = torch.randint(80, (cfg.batch_size, cfg.seq_len))

            def step(model=model, opt=opt, x=x):
                logits, _ = model(x)
                opt.zero_grad()
                F.cross_entropy(logits.flatten(0, 1), x.flatten()).backward()
                opt.step()

            fns[impl] = step
        t = time_interleaved(fns, repeats=repeats)
        rows.append({"mode": mode, "ours_s": t["ours"][0], "ours_spread_s": t["ours"][1],
                     "torch_s": t["torch"][0], "torch_spread_s": t["torch"][1]})
        print(f"  {mode:<4}  ours {t['ours'][0] * 1e3:6.0f} ms (+-{t['ours'][1] * 1e3:.0f})   torch.nn "
              f"{t['torch'][0] * 1e3:6.0f} ms (+-{t['torch'][1] * 1e3:.0f})   "
              f"ratio {t['ours'][0] / t['torch'][0]:.2f}x",
              flush=True)
    return rows


def main(cfg: CharLMConfig) -> dict:
    set_threads(cfg.threads)
    seed_everything(cfg.seed)
    device = pick_device(cfg.device)
    out = Path(cfg.out_dir)
    if cfg.parity:
        print("ours vs torch.nn (2 layers, bidirectional, float32): max |difference|")
        for r in parity_table():
            print(f"  {r['mode']:<4}  output {r['output_max_diff']:.1e}   gradients {r['grad_max_diff']:.1e}")
    if cfg.speed:
        print(f"one training step, batch {cfg.batch_size} x {cfg.seq_len}, {cfg.num_layers}x{cfg.hidden_size}, "
              f"1 thread, best of 3 interleaved:")
        speed_rows(cfg)
        set_threads(cfg.threads)
    data = CharData(shakespeare_text(cfg.n_chars))
    model = CharLM(len(data.chars), cfg).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"data: {len(data.train):,} train / {len(data.valid):,} valid characters, vocab {len(data.chars)} | "
          f"model: {cfg.impl} {cfg.mode} {cfg.num_layers}x{cfg.hidden_size}, {n_params / 1e6:.2f} M parameters")
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    resume_from = resume_point(out / "checkpoints", cfg.resume)
    scheduler, start, logger = resume_or_start(model, optimizer, cfg, out, resume_from, device)
    max_windows = cfg.eval_batches * cfg.batch_size  # the training-time estimate's windows
    if start == 0:
        ev = evaluate(model, data, cfg, max_windows)
        logger.log({"step": 0, "valid_loss": ev["loss"], "valid_windows": ev["windows"]})
        logger.write(f"step 0/{cfg.max_iters} | valid loss {ev['loss']:.3f} (uniform guess: "
                     f"{math.log(len(data.chars)):.3f})" + subset_note(ev["windows"], ev["of_windows"], "windows"))
    losses, t0 = [], time.perf_counter()
    for step in range(start + 1, cfg.max_iters + 1):
        x, y = data.batch(data.train, cfg.batch_size, cfg.seq_len, seed=cfg.seed * 1_000_003 + step)
        logits, _ = model(x.to(device))
        loss = F.cross_entropy(logits.flatten(0, 1), y.to(device).flatten())
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"loss is {loss.item()} at step {step}; lower --lr or --grad-clip")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        clip_grad(model.parameters(), cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        logger.step(step, loss.item(), scheduler.get_last_lr()[0], x.numel())
        if step % cfg.eval_every == 0 or step == cfg.max_iters:
            ev = evaluate(model, data, cfg, max_windows)
            logger.log({"step": step, "valid_loss": ev["loss"], "valid_windows": ev["windows"]})
            logger.write(f"step {step}/{cfg.max_iters} | valid loss {ev['loss']:.3f} ({ev['loss'] / math.log(2):.2f} "
                         f"bits/char)" + subset_note(ev["windows"], ev["of_windows"], "windows"))
        if step % cfg.save_every == 0 or step == cfg.max_iters:
            save_checkpoint(out / "checkpoints", step, model, {"vocab": data.chars, **vars(cfg)}, optimizer, scheduler,
                            keep=cfg.keep_checkpoints)
    wall = time.perf_counter() - t0
    final = evaluate(model, data, cfg)  # every window of the validation text: the figure the results quote
    vl = final["loss"]
    logger.close()
    save_pretrained(model, {"vocab": data.chars, **vars(cfg)}, out / "final")
    text = sample(model, data, "ROMEO:\n", cfg.sample_chars, cfg.temperature, cfg.seed)
    print(f"--- sample (temperature {cfg.temperature}) ---\n{text}\n---")
    summary = {"steps": cfg.max_iters, "resumed_at": start, "train_wall_s": wall, "valid_loss": vl,
               "bits_per_char": vl / math.log(2), "valid_windows": final["windows"], "valid_chars": final["chars"],
               "params": n_params, "sample": text}
    (out / "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if start == 0:  # a figure for the docs only from an uninterrupted run (its wall time is whole)
        cmd = command_line("appendix.rnn", f"python -m appendix.rnn --mode {cfg.mode} --impl {cfg.impl}")
        records = [make_record("appendix", cfg.run_name, "valid_loss", vl, "uniform", math.log(len(data.chars)),
                               wall, cmd)]
        (out / "results.json").write_text(json.dumps(records, indent=2) + "\n")
    print(f"done: {cfg.max_iters} steps in {wall:.0f} s | valid loss {vl:.3f} ({vl / math.log(2):.2f} bits/char; "
          f"all {final['windows']:,} windows of {cfg.seq_len}, {final['chars']:,} characters)")
    return {"losses": losses, "valid_loss": vl, "summary": summary, "model": model, "data": data}


if __name__ == "__main__":
    run_main(main, CharLMConfig)
