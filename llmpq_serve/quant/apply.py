"""Quantize exactly the layers a plan gives a stage, each at its bits, with an on-disk cache so that a restart or a
re-plan does not recalibrate."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from llmpq_serve.quant.awq import awq_quantize_layer
from llmpq_serve.quant.calibration import LayerCalibration, decoder_layers
from llmpq_serve.quant.groupwise import quantize
from llmpq_serve.quant.layout import linear_names
from llmpq_serve.quant.linear import QuantLinear

METHODS = ("awq", "rtn")
# Bumped whenever calibration or the search changes what a layer quantizes to, so stale cache entries are not reused.
ALGORITHM_VERSION = 3


# The header and sizes alone stay the same when weights are merged or tuned in place: the cache would hand out the
# old model's layers (and norms). So the id also reads the first ID_CHUNK bytes of every tensor, the whole of any
# norm or bias (an edit of those alone, e.g. norm-only tuning, fell between chunks spread over the file), and
# ID_CHUNKS chunks spread evenly over each file, which sample the middle of the large matrices (a merged LoRA
# changes them throughout). ~46 MB read for Llama-2-70B's 723 tensors, instead of a whole-file hash of 140 GB.
ID_CHUNK = 1 << 16
ID_CHUNKS = 64


def model_id(path: str | Path) -> str:
    """Identifies a checkpoint by its contents, not its path (a copy keeps its cache): its config, and the size,
    header, every tensor's first ID_CHUNK bytes and ID_CHUNKS chunks of each weight file."""
    path = Path(path)
    h = hashlib.sha1((path / "config.json").read_bytes())
    for f in sorted(path.glob("*.safetensors")):
        size = f.stat().st_size
        h.update(f.name.encode() + str(size).encode())
        with open(f, "rb") as fh:
            header_len = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(header_len))
            starts = [size * k // ID_CHUNKS for k in range(ID_CHUNKS)]
            starts += [8 + header_len + t["data_offsets"][0] for k, t in sorted(header.items()) if k != "__metadata__"]
            for start in starts:
                fh.seek(start)
                h.update(fh.read(ID_CHUNK))
    return h.hexdigest()[:16]


class QuantCache:
    """Quantized layers on disk, keyed by (model, layer, bits, method, group size), in the compressed-tensors layout
    (plus the layer's norms, which AWQ rescales)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def indicator_path(self, model: str, method: str, group_size: int) -> Path:
        return self.root / model / f"indicator.{method}-v{ALGORITHM_VERSION}.g{group_size}.json"

    def path(self, model: str, layer: int, bits: int, method: str, group_size: int) -> Path:
        return self.root / model / f"layer{layer:03d}.{method}-v{ALGORITHM_VERSION}.{bits}b.g{group_size}.safetensors"

    def load(self, model: str, layer: int, bits: int, method: str, group_size: int) -> dict[str, torch.Tensor] | None:
        p = self.path(model, layer, bits, method, group_size)
        return load_file(str(p)) if p.is_file() else None

    def save(self, model: str, layer: int, bits: int, method: str, group_size: int,
             state: dict[str, torch.Tensor]) -> None:
        p = self.path(model, layer, bits, method, group_size)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_suffix(".tmp")
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp))
        tmp.replace(p)  # a crash mid-write never leaves a truncated entry behind


def quantize_layer(layer: nn.Module, arch: str, bits: int, method: str = "awq",
                   calib: LayerCalibration | None = None, group_size: int = 128) -> dict[str, dict[str, torch.Tensor]]:
    """Replaces the linears of one decoder layer, in place, by QuantLinears at `bits`. AWQ (4 and 3 bits) needs the
    layer's calibration; int8 is per-channel round-to-nearest either way. Returns the on-disk state of each 4- or
    3-bit linear (for `layer_state`), taken from its integers before they are packed for a kernel: read back out of
    torch's int4 layout they cost a product with the identity, in² · out multiply-adds per linear (hours for
    Llama-70B's layers on a CPU)."""
    if method not in METHODS:
        raise ValueError(f"unknown quantization method {method!r}; choose from {METHODS}")
    if bits == 16:
        return {}
    found = {}
    if method == "awq" and bits in (4, 3):
        if calib is None:
            raise ValueError("AWQ needs calibration data for the layer (quant.calibration.collect_inputs)")
        found = awq_quantize_layer(layer, arch, calib, bits, group_size)
    states = {}
    for name in linear_names(arch):
        parent, attr = _parent(layer, name)
        linear = getattr(parent, attr)
        gq = found.get(name)
        if gq is None and bits in (4, 3):
            gq = quantize(linear.weight.detach().float(), bits, group_size)
        quantized = QuantLinear.from_linear(linear, bits, group_size, gq)
        if gq is not None:
            states[name] = quantized.state(gq)
        setattr(parent, attr, quantized)
    return states


def dequantized_weights(layer: nn.Module, arch: str, bits: int, method: str, calib: LayerCalibration | None,
                        group_size: int = 128) -> dict[str, torch.Tensor]:
    """Each linear's weight as `quantize_layer` would leave it, back in float (AWQ folds its scales into `layer`)."""
    found = awq_quantize_layer(layer, arch, calib, bits, group_size) if method == "awq" and bits in (4, 3) else {}
    out = {}
    for name in linear_names(arch):
        linear = layer.get_submodule(name)
        quantized = QuantLinear.from_linear(linear, bits, group_size, found.get(name))
        out[name] = quantized.dequantized_weight().to(linear.weight.dtype)
    return out


def layer_state(layer: nn.Module, arch: str,
                known: dict[str, dict[str, torch.Tensor]] | None = None) -> dict[str, torch.Tensor]:
    """A quantized layer's tensors: linears in compressed-tensors form (those in `known`, `quantize_layer`'s
    answer, as given), everything else (norms) as is."""
    state: dict[str, torch.Tensor] = {}
    quantized = set()
    for name in linear_names(arch):
        linear_state = (known or {}).get(name) or layer.get_submodule(name).state()
        for k, v in linear_state.items():
            state[f"{name}.{k}"] = v
        quantized.add(name)
    for k, v in layer.state_dict().items():
        if not any(k.startswith(q + ".") for q in quantized):
            state[k] = v
    return state


def load_layer_state(layer: nn.Module, arch: str, bits: int, group_size: int, state: dict[str, torch.Tensor]) -> None:
    for name in linear_names(arch):
        sub = {k[len(name) + 1:]: v for k, v in state.items() if k.startswith(name + ".")}
        parent, attr = _parent(layer, name)
        setattr(parent, attr, QuantLinear.from_state(sub, bits, group_size))
    rest = {k: v for k, v in state.items() if not any(k.startswith(n + ".") for n in linear_names(arch))}
    layer.load_state_dict(rest, strict=False)


def quantize_shard(model: nn.Module, arch: str, layers: list[int], bits_per_layer: list[int],
                   calibration: dict[int, LayerCalibration] | None = None, method: str = "awq",
                   group_size: int = 128, cache: QuantCache | None = None, model_key: str | None = None) -> int:
    """Quantizes `layers` of `model` in place, layer i at bits_per_layer[i]. With a cache (and the model's key),
    layers found there are loaded instead of recalibrated. Returns how many layers came from the cache."""
    if len(layers) != len(bits_per_layer):
        raise ValueError(f"{len(layers)} layers but {len(bits_per_layer)} bit-widths")
    blocks = decoder_layers(model, arch)
    hits = 0
    for layer_id, bits in tqdm(list(zip(layers, bits_per_layer)), desc="quantizing layers", unit="layer",
                               disable=len(layers) < 2):
        if bits == 16:
            continue
        block = blocks[layer_id]
        key = (model_key, layer_id, bits, method, group_size)
        cached = cache.load(*key) if cache is not None and model_key is not None else None
        if cached is not None:
            load_layer_state(block, arch, bits, group_size, cached)
            hits += 1
            continue
        calib = calibration.get(layer_id) if calibration is not None else None
        states = quantize_layer(block, arch, bits, method, calib, group_size)
        if cache is not None and model_key is not None:
            cache.save(*key, layer_state(block, arch, states))
    return hits


def _parent(root: nn.Module, name: str) -> tuple[nn.Module, str]:
    head, _, attr = name.rpartition(".")
    return (root.get_submodule(head) if head else root), attr
