"""Calibration activations: the inputs every linear of every decoder layer sees on calibration text."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from llmpq_serve.quant.layout import LAYERS_PATH, linear_names

MAX_TOKENS = 4096
MAX_CALLS = 4  # decoder-layer calls kept per layer for block-output losses


@dataclass
class LayerCalibration:
    """What one decoder layer saw: each linear's inputs [tokens, in] and the layer's own calls (args, kwargs), so
    that a candidate quantization can be judged by the block's real output."""

    inputs: dict[str, torch.Tensor]
    calls: list[tuple[tuple, dict]] = field(default_factory=list)

    def block_output(self, layer: nn.Module) -> torch.Tensor:
        outs = [layer(*args, **kwargs) for args, kwargs in self.calls]
        return torch.cat([o[0] if isinstance(o, tuple) else o for o in outs])


def decoder_layers(model: nn.Module, arch: str) -> nn.ModuleList:
    return model.get_submodule(LAYERS_PATH[arch])


@torch.no_grad()
def collect_inputs(model: nn.Module, arch: str, batches: list[torch.Tensor],
                   max_tokens: int = MAX_TOKENS) -> dict[int, LayerCalibration]:
    """Per decoder layer, from full-precision forward passes over `batches` of token ids: every linear's inputs (a
    deterministic subsample of at most `max_tokens` rows) and the layer's first calls."""
    captured: dict[int, dict[str, list[torch.Tensor]]] = {}
    calls: dict[int, list[tuple[tuple, dict]]] = {}
    hooks = []
    for i, layer in enumerate(decoder_layers(model, arch)):
        captured[i], calls[i] = {}, []

        def layer_hook(_module, args, kwargs, i=i):
            if len(calls[i]) < MAX_CALLS:
                calls[i].append((tuple(a.detach() if torch.is_tensor(a) else a for a in args), dict(kwargs)))
        hooks.append(layer.register_forward_pre_hook(layer_hook, with_kwargs=True))
        for name in linear_names(arch):
            def hook(_module, args, i=i, name=name):
                captured[i].setdefault(name, []).append(args[0].detach().reshape(-1, args[0].shape[-1]).float())
            hooks.append(layer.get_submodule(name).register_forward_pre_hook(hook))
    try:
        for ids in batches:
            model(input_ids=ids, use_cache=False)  # a cache would make re-run calls attend to stale keys
    finally:
        for h in hooks:
            h.remove()
    gen = torch.Generator().manual_seed(0)
    out: dict[int, LayerCalibration] = {}
    for i, per_layer in captured.items():
        inputs = {}
        for name, parts in per_layer.items():
            x = torch.cat(parts)
            if x.shape[0] > max_tokens:
                x = x[torch.randperm(x.shape[0], generator=gen)[:max_tokens]]
            inputs[name] = x
        out[i] = LayerCalibration(inputs, calls[i])
    return out
