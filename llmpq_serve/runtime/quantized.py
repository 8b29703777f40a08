"""Making sure the quantized layers a stage needs are in the on-disk cache, calibrating those that are not.

AWQ needs each layer's real inputs, which only a forward pass through the layers before it gives; so a miss loads
the whole model once (on CPU), runs calibration text through it and quantizes every missing layer in one go. Later
starts, restarts and re-plans find the layers in the cache."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm import tqdm

from llmpq_serve.indicator import Indicator
from llmpq_serve.quant.apply import QuantCache, layer_state, model_id, quantize_layer
from llmpq_serve.quant.calibration import collect_inputs, decoder_layers

if TYPE_CHECKING:
    from llmpq_serve.runtime.shard import QuantOptions

CALIBRATION_WINDOWS, CALIBRATION_SEQ = 32, 128


def calibration_batches(tokenizer, windows: int = CALIBRATION_WINDOWS, seq: int = CALIBRATION_SEQ) -> list[torch.Tensor]:
    """Windows of Python standard-library source (text every Python install has), in batches of 8."""
    from llmpq_serve.demo_model import encode, read_texts, stdlib_files

    train, _ = stdlib_files()
    data = encode(tokenizer, read_texts(train, windows * seq * 8))
    if data.numel() < windows * seq:
        raise ValueError(f"only {data.numel()} calibration tokens, need {windows * seq}")
    return list(data[: windows * seq].reshape(windows, seq).split(8))


@torch.no_grad()
def ensure_quantized(path: Path, arch: str, layers_bits: list[tuple[int, int]], options: QuantOptions,
                     cache: QuantCache, key: str) -> int:
    """Quantizes the (layer, bits) pairs missing from the cache; returns how many it had to quantize."""
    missing = [(i, b) for i, b in layers_bits
               if not cache.path(key, i, b, options.method, options.group_size).is_file()]
    if not missing:
        return 0
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    calibration = None
    if options.method == "awq" and any(b in (4, 3) for _, b in missing):
        calibration = collect_inputs(model, arch, calibration_batches(AutoTokenizer.from_pretrained(str(path))))
    blocks = decoder_layers(model, arch)
    for layer_id, bits in tqdm(missing, desc="quantizing layers", unit="layer", disable=len(missing) < 2):
        block = copy.deepcopy(blocks[layer_id])
        states = quantize_layer(block, arch, bits, options.method, calibration and calibration[layer_id],
                                options.group_size)
        cache.save(key, layer_id, bits, options.method, options.group_size, layer_state(block, arch, states))
    return len(missing)


@torch.no_grad()
def checkpoint_indicator(path: Path, arch: str, options: QuantOptions, cache: QuantCache) -> Indicator:
    """The calibrated quality indicator of a checkpoint under `options`' method, computed once (about a minute for
    the demo models) and then read from the cache beside the model's quantized layers."""
    key = model_id(path)
    file = cache.indicator_path(key, options.method, options.group_size)
    if file.is_file():
        return Indicator.from_json(file)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    calibration = collect_inputs(model, arch, calibration_batches(AutoTokenizer.from_pretrained(str(path))))
    indicator = Indicator.calibrated(model, arch, calibration, options.group_size, options.method)
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_suffix(".tmp")
    tmp.write_text(indicator.model_dump_json())
    tmp.replace(file)
    return indicator
