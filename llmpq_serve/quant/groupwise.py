"""Group-wise asymmetric integer quantization of a weight matrix (what AWQ and round-to-nearest share).

Each row is split into groups of `group_size` inputs; a group's range [lo, hi] maps to the 2^b levels with a float
scale and an integer zero point: q = clamp(round(w / scale) + zero, 0, 2^b - 1), w ≈ (q - zero) · scale — the
convention of AWQ and of compressed-tensors (which stores q and zero shifted by 2^(b-1) as signed integers).
`clip` shrinks the range per (row, group) before rounding (AWQ's clipping search chooses it)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llmpq_serve.costmodel import group_size_for


@dataclass
class GroupQuant:
    q: torch.Tensor  # uint8 [out, in], 0 .. 2^bits - 1
    scale: torch.Tensor  # float32 [out, groups]
    zero: torch.Tensor  # uint8 [out, groups], 0 .. 2^bits - 1
    bits: int
    group_size: int

    def dequantize(self) -> torch.Tensor:
        out_f, in_f = self.q.shape
        q = self.q.reshape(out_f, -1, self.group_size).float()
        return ((q - self.zero[..., None].float()) * self.scale[..., None]).reshape(out_f, in_f)


def quantize(w: torch.Tensor, bits: int, group_size: int = 128, clip: torch.Tensor | None = None) -> GroupQuant:
    out_f, in_f = w.shape
    g = group_size_for(in_f, group_size)
    wg = w.float().reshape(out_f, in_f // g, g)
    hi, lo = wg.amax(-1).clamp(min=0), wg.amin(-1).clamp(max=0)  # the range holds 0, so zero is exact
    if clip is not None:
        hi, lo = hi * clip, lo * clip
    levels = 2**bits - 1
    scale = ((hi - lo) / levels).clamp(min=1e-8)
    zero = torch.round(-lo / scale).clamp(0, levels)
    q = (torch.round(wg / scale[..., None]) + zero[..., None]).clamp(0, levels)
    return GroupQuant(q.reshape(out_f, in_f).to(torch.uint8), scale, zero.to(torch.uint8), bits, g)


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per output row: (int8 values [out, in], float scale [out]), w ≈ q · scale."""
    scale = (w.float().abs().amax(1) / 127).clamp(min=1e-8)
    return torch.round(w.float() / scale[:, None]).clamp(-127, 127).to(torch.int8), scale


def fake_quantize(w: torch.Tensor, bits: int, group_size: int = 128, clip: torch.Tensor | None = None) -> torch.Tensor:
    """w as it comes back after quantizing and dequantizing."""
    return quantize(w, bits, group_size, clip).dequantize().to(w.dtype)
