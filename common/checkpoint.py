"""Checkpoints: weights as safetensors + config.json, and a trainer state for ``--resume``.

Layout of one checkpoint directory (each written to ``<name>.tmp`` and renamed into place, so a
crash mid-write never leaves a half checkpoint behind):

    runs/<chapter>/<stage>/checkpoints/step_000200/
        model.safetensors    the weights (the only file a user of the model needs)
        config.json          the model config, enough to rebuild the model
        trainer_state.pt     step, optimizer, scheduler, RNG states, data position
    runs/<chapter>/<stage>/checkpoints/latest   a one-line file naming the newest directory

trainer_state.pt holds only tensors and plain python values and is read with
``torch.load(weights_only=True)``: no arbitrary pickle is ever executed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import random
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from .errors import UserError

# full (unsharded) state on CPU: under FSDP this gathers the shards, so every rank must call it
_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module inside DDP / torch.compile wrappers."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model


def _tied_names(model: torch.nn.Module) -> dict[str, str]:
    """Second names of shared parameters -> their first name (e.g. lm_head.weight -> embed weight)."""
    first, tied = {}, {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            tied[name] = first[id(p)]
        else:
            first[id(p)] = name
    return tied


def model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The full state dict on CPU, tied duplicates dropped (works for plain, DDP and FSDP2 models;
    under FSDP it is a collective, so call it on every rank)."""
    model = unwrap(model)
    if any(type(p).__name__ == "DTensor" for p in model.parameters()):  # FSDP2: gather the shards
        state = get_model_state_dict(model, options=_FULL)
    else:  # plain or DDP: the module's own state dict, which also keeps what quantized layers add to it
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    for name in _tied_names(model):
        state.pop(name, None)
    return {k: v.contiguous() for k, v in state.items()}


def save_pretrained(model: torch.nn.Module, config: dict[str, Any], out_dir: str | os.PathLike,
                    state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write ``model.safetensors`` + ``config.json`` into ``out_dir`` (atomic per file).
    Pass ``state`` when it was already gathered (``model_state``) on every rank."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "model.safetensors.tmp"
    save_file(model_state(model) if state is None else state, str(tmp))
    os.replace(tmp, out / "model.safetensors")
    atomic_write_text(out / "config.json", json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    return out


class DamagedCheckpoint(UserError):
    """A checkpoint file that exists but cannot be read (cut short, overwritten, not safetensors)."""


def load_pretrained(model: torch.nn.Module, in_dir: str | os.PathLike) -> torch.nn.Module:
    """Load ``model.safetensors`` from ``in_dir`` into ``model``."""
    path = Path(in_dir) / "model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no weights there; train first or point to a checkpoint directory")
    try:
        state = load_file(str(path))
    except SafetensorError as e:
        raise DamagedCheckpoint(f"{path}: not a readable safetensors file ({e}); the file is damaged or was cut short "
                        "(train again, or use an older checkpoint)") from None
    return load_weights(model, state, str(path))


def load_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str = "weights") -> torch.nn.Module:
    """Load a full state dict: every key must match (tied duplicates excepted), so a wrong file fails
    here with the names, not later with bad outputs."""
    model = unwrap(model)
    state = dict(state)
    for name, first in _tied_names(model).items():
        if first in state:
            state[name] = state[first]
    own = model.state_dict()
    missing, unexpected = set(own) - set(state), set(state) - set(own)
    if missing or unexpected:
        raise UserError(f"{source}: weights do not fit the model: missing {sorted(missing)[:5]}, "
                        f"unexpected {sorted(unexpected)[:5]}")
    wrong = [f"{k} {tuple(state[k].shape)} in the file, {tuple(own[k].shape)} in the model" for k in sorted(own)
             if hasattr(own[k], "shape") and tuple(state[k].shape) != tuple(own[k].shape)]
    if wrong:
        raise UserError(f"{source}: weights do not fit the model ({'; '.join(wrong[:3])}): were they saved with "
                        "other model settings?")
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))
    return model


def read_config(in_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(in_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; a checkpoint directory holds config.json + model.safetensors")
    return json.loads(path.read_text())


def rng_state() -> dict[str, Any]:
    """All random generators that training touches, as weights_only-loadable values."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy(), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(ckpt_root: str | os.PathLike, step: int, model: torch.nn.Module, config: dict[str, Any],
                    optimizer: torch.optim.Optimizer | None = None, scheduler: Any = None,
                    extra: dict[str, Any] | None = None, keep: int = 2, is_main: bool = True) -> Path:
    """Save everything ``--resume`` needs under ``ckpt_root/step_NNNNNN`` and point ``latest`` at it.
    ``extra`` carries the script's own state (data position, best metric ...): plain values only.
    Call on every rank: under FSDP the full state is gathered from all of them; only ``is_main`` writes."""
    root = Path(ckpt_root)
    name = f"step_{step:06d}"
    weights = model_state(model)
    optim = get_optimizer_state_dict(unwrap(model), optimizer, options=_FULL) if optimizer is not None else None
    if not is_main:
        return root / name
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / (name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_pretrained(model, config, tmp, state=weights)
    state = {"step": step, "rng": rng_state(), "extra": extra or {}}
    if optim is not None:
        state["optimizer"] = optim
    if scheduler is not None:
        state["scheduler"] = scheduler.state_dict()
    torch.save(state, tmp / "trainer_state.pt")
    final = root / name
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    atomic_write_text(root / "latest", name + "\n")
    old = sorted(p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))
    # a later step than this one was left by an earlier, longer run in the same folder: it is not this run's,
    # and pruning by step number would otherwise keep it and delete the checkpoint just written
    stale = [p for p in old if p.name > name]
    old = [p for p in old if p.name <= name]
    for p in stale + (old[:-keep] if keep > 0 else []):
        shutil.rmtree(p, ignore_errors=True)
    return final


def latest_checkpoint(ckpt_root: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint directory (the one ``latest`` names, else the newest with all its
    files), or None when there is none."""
    pointer = Path(ckpt_root) / "latest"
    if pointer.is_file():
        path = Path(ckpt_root) / pointer.read_text().strip()
        if (path / "trainer_state.pt").is_file():
            return path
    complete = list_checkpoints(ckpt_root)
    return complete[-1] if complete else None


def resume_point(ckpt_root: str | os.PathLike, resume: bool, is_main: bool = True) -> Path | None:
    """The checkpoint ``--resume`` continues from (None without --resume, or when there is none yet)."""
    path = latest_checkpoint(ckpt_root) if resume else None
    if resume and path is None and is_main:
        print(f"--resume: no checkpoint in {ckpt_root}, starting from scratch")
    return path


def load_checkpoint(path: str | os.PathLike, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer | None = None, scheduler: Any = None,
                    restore_rng: bool = True) -> dict[str, Any]:
    """Restore weights, optimizer, scheduler and RNG states; return ``{"step", "extra"}``."""
    path = Path(path)
    load_pretrained(model, path)
    try:
        state = torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=True)
    except (RuntimeError, OSError, EOFError, pickle.UnpicklingError) as e:
        raise DamagedCheckpoint(f"{path / 'trainer_state.pt'}: cannot be read ({(str(e).splitlines() or [''])[0]}); "
                                "the file is damaged or was cut short") from None
    if optimizer is not None:
        set_optimizer_state_dict(unwrap(model), optimizer, state["optimizer"],
                                 options=StateDictOptions(full_state_dict=True))
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
    if restore_rng:
        set_rng_state(state["rng"])
    return {"step": state["step"], "extra": state["extra"]}


def list_checkpoints(ckpt_root: str | os.PathLike) -> list[Path]:
    """Complete checkpoint directories under ``ckpt_root``, oldest first."""
    return sorted(p for p in Path(ckpt_root).glob("step_*") if (p / "trainer_state.pt").is_file())


def average_weights(dirs: list[Path]) -> dict[str, torch.Tensor]:
    """The element-wise mean of several checkpoints' weights ("Attention Is All You Need" sec. 6.1
    averages the last 5 or 20 checkpoints): a cheap ensemble of nearby points of one run."""
    if not dirs:
        raise ValueError("no checkpoints to average")
    total = None
    for d in dirs:
        state = load_file(str(Path(d) / "model.safetensors"))
        if total is None:
            total = {k: v.double() for k, v in state.items()}
        else:
            if state.keys() != total.keys():
                raise ValueError(f"{d}: its weights have different names from {dirs[0]}")
            for k, v in state.items():
                total[k] += v.double()
    return {k: (v / len(dirs)).to(torch.float32) for k, v in total.items()}


# what reading a damaged checkpoint raises (a file cut short, overwritten or missing)
UNREADABLE = (DamagedCheckpoint, FileNotFoundError)


def config_mismatch(saved: dict[str, Any], cfg: Any) -> list[str]:
    """The flags whose value differs from the checkpoint's config.json (fields both have; a flag left at an
    "automatic" 0 / None / "" is not compared), as "--flag value (the checkpoint: value)"."""
    from .config import to_flat_dict

    flat = to_flat_dict(cfg) if dataclasses.is_dataclass(cfg) else dict(cfg)
    out = []
    for k, v in saved.items():
        mine = flat.get(k)
        if k in flat and mine not in (0, None, "") and json.loads(json.dumps(mine)) != v:
            out.append(f"--{k.replace('_', '-')} {mine} (the checkpoint: {v})")
    return out


def shape_mismatch(ckpt_dir: Path, model: torch.nn.Module) -> list[str]:
    """The tensors of ``ckpt_dir/model.safetensors`` whose shape differs from the model's, read from the
    file's header only (no weight is loaded); [] when they fit or when the header cannot be read."""
    from safetensors import safe_open

    own = {k: tuple(v.shape) for k, v in unwrap(model).state_dict().items() if hasattr(v, "shape")}
    try:
        with safe_open(str(Path(ckpt_dir) / "model.safetensors"), "pt") as f:
            saved = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError):
        return []  # a damaged file: the loading below reports it and falls back
    return [f"{k} is {saved[k]} there, {own[k]} here" for k in sorted(saved) if k in own and saved[k] != own[k]]


def resume_or_start(model: torch.nn.Module, optimizer: torch.optim.Optimizer, cfg: Any, out: Path,
                    resume_from: Path | None, device, min_lr_ratio: float = 0.1, *, schedule: str = "cosine",
                    d_model: int = 512, is_main: bool = True):
    """The learning-rate schedule (warmup + cosine unless ``schedule`` says otherwise; ``d_model`` is for
    noam), the step to start from (model, optimizer and schedule restored when resuming) and the run's
    logger (metrics.jsonl trimmed to that step): the block every training script begins its loop with.
    ``cfg`` needs ``warmup_iters``, ``max_iters`` and ``log_every``. Under torchrun only ``is_main``
    prints and logs. Returns (scheduler, start step, logger)."""
    from .log import RunLogger
    from .schedule import make_scheduler

    scheduler = make_scheduler(optimizer, schedule, cfg.warmup_iters, cfg.max_iters, d_model=d_model,
                               min_ratio=min_lr_ratio)
    start = 0
    if resume_from is not None:
        # a model flag changed since the checkpoint was written: name the flags, before any weight is loaded
        # (flags that do not change the weights' shapes, such as --lr or --save-every, may change on resume)
        wrong = shape_mismatch(resume_from, model)
        if wrong:
            diffs = config_mismatch(read_config(resume_from), cfg)
            raise UserError(f"--resume: {resume_from} does not fit the model these flags build ({wrong[0]})"
                            + (f"; the flags differ from the checkpoint's: {'; '.join(diffs)}" if diffs else "")
                            + ". Resume with the checkpoint's values, or train into another --out-dir")
        # a checkpoint that cannot be read (cut short by a crash while it was written, a damaged disk) is
        # reported and the next older one is used: at most one more save interval is lost
        candidates = [resume_from, *(p for p in reversed(list_checkpoints(resume_from.parent))
                                     if p.name < resume_from.name)]
        for i, path in enumerate(candidates):
            try:
                start = load_checkpoint(path, model, optimizer, scheduler)["step"]
                break
            except UNREADABLE as e:
                if is_main:
                    why = (str(e).splitlines() or [""])[0][:300]
                    why = why if isinstance(e, DamagedCheckpoint) else f"{type(e).__name__}: {why}"
                    then = "trying the next older one" if i + 1 < len(candidates) else "no older one is left"
                    print(f"warning: --resume: {path} cannot be read ({why}); {then}", file=sys.stderr)
        else:
            raise UserError(f"--resume: no checkpoint in {resume_from.parent} can be read; delete them or train "
                            "without --resume")
        resume_from = path
        if is_main:
            print(f"resumed from {resume_from} at step {start}")
    logger = RunLogger(out, cfg.max_iters, start, resume=resume_from is not None, enabled=is_main,
                       log_every=cfg.log_every, device=device)
    return scheduler, start, logger
