"""AWQ (activation-aware weight quantization, Lin et al. 2023) for one decoder layer.

1. Scale search: for each group of linears sharing an input X, per-input-channel scales s = mean|X|^α (normalised),
   and the weight-aware s = mean|X|^α / mean|W|^(1-α), are tried for α on a grid; W·diag(s) is quantized and
   divided back, and the scales whose decoder-layer output (the block run on its real calibration inputs) stays
   closest to the full-precision one win. Salient input channels
   (large activations) get finer effective steps.
2. The scales are folded: W ← W·diag(s), and the group's predecessor (its norm, or the linear before it) is divided
   by s, so the layer computes the same function in full precision.
3. Clipping search: per output row and group, the quantization range is shrunk by the ratio that minimises that
   linear's output error on its (scaled) inputs; that, no clipping, and a few whole-matrix shrinks are then judged
   by the block's output error, and the best is kept.
4. The weights are quantized group-wise with zero points, at the range found.
5. Each choice above is made greedily, one group or linear at a time; the whole layer's result must still beat
   plain round-to-nearest of the original weights on the block's output, or the layer falls back to it (a layer
   that quantizes worse than RTN is never what a user wants)."""

from __future__ import annotations

import torch
from torch import nn

from llmpq_serve.costmodel import group_size_for
from llmpq_serve.quant.calibration import LayerCalibration
from llmpq_serve.quant.groupwise import GroupQuant, fake_quantize, quantize
from llmpq_serve.quant.layout import NO_CLIP, linear_names, scale_groups

SCALE_GRID = 20  # AWQ's own grid: alpha in steps of 0.05
CLIP_RATIOS = [1.0 - i / 20 for i in range(11)]  # down to half the range
CLIP_TOKENS = 512
BLOCK_CLIP_RATIOS = (0.95, 0.9, 0.85, 0.8)  # whole-matrix shrinks, judged by the block's output
ROW_CHUNK = 256  # bounds the tokens x rows x groups error tensor


@torch.no_grad()
def awq_quantize_layer(layer: nn.Module, arch: str, calib: LayerCalibration, bits: int,
                       group_size: int = 128) -> dict[str, GroupQuant]:
    """Searches and folds scales into `layer` (in place, unless it falls back to round-to-nearest; its function in
    full precision is unchanged either way), then returns the group quantization of each linear."""
    modules = dict(layer.named_modules())
    inputs = {name: x.float() for name, x in calib.inputs.items()}
    reference = calib.block_output(layer)
    original = {k: v.clone() for k, v in layer.state_dict().items()}
    rtn = {name: quantize(modules[name].weight.detach().float(), bits, group_size) for name in linear_names(arch)}

    def block_error(replace: dict[str, torch.Tensor]) -> float:
        saved = {name: modules[name].weight.data for name in replace}
        for name, w in replace.items():
            modules[name].weight.data = w.to(saved[name].dtype)
        try:
            return (calib.block_output(layer) - reference).pow(2).mean().item()
        finally:
            for name, w in saved.items():
                modules[name].weight.data = w

    rtn_error = block_error({name: gq.dequantize() for name, gq in rtn.items()})  # before any fold
    # OPT's post-norm layers (opt-350m) normalise after attention and the MLP: their norms feed the residual
    # stream, not the linears after them, and a scale folded there would change the layer's function
    post_norm = not getattr(layer, "do_layer_norm_before", True)
    for group in scale_groups(arch):
        linears = [modules[name] for name in group.linears]
        prev = modules[group.prev]
        if isinstance(prev, nn.Linear) and prev.out_features != linears[0].in_features:
            continue  # grouped-query attention: v's outputs are not o's inputs one to one
        if post_norm and not isinstance(prev, nn.Linear):
            continue
        magnitude = inputs[group.linears[0]].abs().mean(0).clamp(min=1e-6)
        w_magnitude = _weight_magnitude(torch.cat([lin.weight.float() for lin in linears]), group_size)
        best, best_s = float("inf"), torch.ones_like(magnitude)
        for s in _candidate_scales(magnitude, w_magnitude):
            err = block_error({name: fake_quantize(lin.weight.float() * s, bits, group_size) / s
                               for name, lin in zip(group.linears, linears)})
            if err < best:
                best, best_s = err, s
        _fold(prev, linears, best_s)
        for name in group.linears:
            inputs[name] = inputs[name] / best_s
    out = {}
    for name in linear_names(arch):
        w = modules[name].weight.detach().float()
        candidates = [quantize(w, bits, group_size)]
        if not name.endswith(NO_CLIP):
            candidates.append(quantize(w, bits, group_size, _search_clip(w, inputs[name], bits, group_size)))
            candidates += [quantize(w, bits, group_size, torch.full(candidates[0].scale.shape, r))
                           for r in BLOCK_CLIP_RATIOS]
        out[name] = min(candidates, key=lambda gq: block_error({name: gq.dequantize()}))
    if rtn_error < block_error({name: gq.dequantize() for name, gq in out.items()}):
        layer.load_state_dict(original)
        return rtn
    return out


def _candidate_scales(x_magnitude: torch.Tensor, w_magnitude: torch.Tensor):
    """AWQ's grid, s = x^α, and its weight-aware form, s = x^α / w^(1-α) (large weights in a channel argue against
    scaling it up), each normalised to a geometric mean of about 1."""
    for i in range(SCALE_GRID):
        alpha = i / SCALE_GRID
        for s in (x_magnitude ** alpha, (x_magnitude ** alpha / w_magnitude ** (1 - alpha)).clamp(min=1e-4)):
            yield s / (s.max() * s.min()).sqrt()


def _weight_magnitude(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """Mean over rows of |w| relative to its group's largest, per input channel."""
    out_f, in_f = w.shape
    g = group_size_for(in_f, group_size)
    wg = w.abs().reshape(out_f, in_f // g, g)
    return (wg / wg.amax(-1, keepdim=True).clamp(min=1e-8)).reshape(out_f, in_f).mean(0).clamp(min=1e-4)


def _fold(prev: nn.Module, linears: list[nn.Linear], s: torch.Tensor) -> None:
    """prev's output / s feeds linears whose weights are · s: the same function, easier to quantize."""
    for lin in linears:
        lin.weight.mul_(s.to(lin.weight.dtype))
    prev.weight.div_(s.to(prev.weight.dtype).view(-1, *([1] * (prev.weight.dim() - 1))))
    if getattr(prev, "bias", None) is not None:
        prev.bias.div_(s.to(prev.bias.dtype))


def _search_clip(w: torch.Tensor, x: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """Per (row, group) shrink ratio of the quantization range minimising that group's output error."""
    gen = torch.Generator().manual_seed(0)
    if x.shape[0] > CLIP_TOKENS:
        x = x[torch.randperm(x.shape[0], generator=gen)[:CLIP_TOKENS]]
    out_f, in_f = w.shape
    g = group_size_for(in_f, group_size)
    xg = x.reshape(x.shape[0], in_f // g, g)  # tokens, groups, g
    best = torch.ones(out_f, in_f // g)
    for rows in torch.split(torch.arange(out_f), ROW_CHUNK):
        wr = w[rows]
        best_err = torch.full((len(rows), in_f // g), float("inf"))
        for r in CLIP_RATIOS:
            ratio = torch.full((len(rows), in_f // g), r)
            dw = (wr - quantize(wr, bits, group_size, ratio).dequantize()).reshape(len(rows), in_f // g, g)
            err = torch.einsum("tkg,okg->tok", xg, dw).pow(2).mean(0)  # rows x groups
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best[rows] = torch.where(better, ratio, best[rows])
    return best
