"""Calibration: run sample text through the model one decoder layer at a time, so that a method can look at what
each linear layer really receives (GPTQ's Hessian X X^T, Wanda's per-input norms ||X_j||), change the layer,
and hand the *changed* layer's outputs to the next one (both papers do this: each layer is fitted to the inputs
the already-compressed layers below it produce).

    inputs of layer 0  --(layer 0, observed; then compressed; then run again)-->  inputs of layer 1  --> ...

The embedding's output and the keyword arguments every decoder layer gets (rotary cos/sin, the causal mask) are
caught once by a pre-hook that stops the forward at layer 0, as the GPTQ reference's ``Catcher`` does.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn


class _Stop(Exception):
    pass


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of decoder blocks of a transformers causal LM (model.model.layers for the Llama family)."""
    return model.model.layers


@torch.no_grad()
def first_layer_inputs(model: nn.Module, samples: torch.Tensor,
                       batch: int) -> tuple[list[torch.Tensor], list[dict]]:
    """(hidden states entering layer 0, one tensor per batch of samples; each batch's keyword arguments: rotary
    cos/sin and the mask, whose shapes follow the batch's)."""
    layer0 = decoder_layers(model)[0]
    caught: list[torch.Tensor] = []
    kwargs: list[dict] = []

    def catch(module, args, kw):
        caught.append(args[0] if args else kw["hidden_states"])
        kw = {k: v for k, v in kw.items() if k not in ("hidden_states", "past_key_values", "past_key_value")}
        kwargs.append(kw | {"use_cache": False})
        raise _Stop

    handle = layer0.register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for i in range(0, len(samples), batch):
            try:
                model(samples[i:i + batch], use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    return caught, kwargs


def run_layer(layer: nn.Module, xs: list[torch.Tensor], kwargs: list[dict]) -> list[torch.Tensor]:
    """The layer's output for each batch (transformers layers return a tensor or a tuple led by it). One caveat:
    layer 0's arguments serve every layer, so models that mix attention types per layer (sliding windows in some
    layers) would need each layer's own mask; the Llama family has one type."""
    outs = []
    for x, kw in zip(xs, kwargs, strict=True):
        y = layer(x, **kw)
        outs.append(y[0] if isinstance(y, tuple) else y)
    return outs


@torch.no_grad()
def layer_by_layer(model: nn.Module, samples: torch.Tensor, batch: int,
                   observe: Callable[[int, dict[str, nn.Linear]], Callable[[str, torch.Tensor], None]],
                   change: Callable[[int, dict[str, nn.Linear]], None], progress: bool = True) -> None:
    """For each decoder layer i: run the calibration inputs through it while ``observe(i, linears)`` returns a
    function called with (linear name, its input) for every linear; then ``change(i, linears)`` (quantize, prune);
    then run the changed layer to make the next layer's inputs. ``linears`` maps names relative to the layer
    (self_attn.q_proj, mlp.down_proj, ...) to the modules."""
    from tqdm import tqdm

    xs, kwargs = first_layer_inputs(model, samples, batch)
    layers = decoder_layers(model)
    for i in tqdm(range(len(layers)), desc="layers", disable=not progress, leave=False):
        layer = layers[i]
        linears = {n: m for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
        see = observe(i, linears)
        handles = [m.register_forward_hook(lambda mod, args, out, n=n, see=see: see(n, args[0]))
                   for n, m in linears.items()]
        try:
            run_layer(layer, xs, kwargs)
        finally:
            for h in handles:
                h.remove()
        change(i, linears)
        xs = run_layer(layer, xs, kwargs)
