"""Reading only the tensors a pipeline stage needs from a safetensors checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from llmpq_serve.quant.layout import LAYERS_PATH


def checkpoint_files(path: str | Path) -> list[Path]:
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        return sorted({path / f for f in json.loads(index.read_text())["weight_map"].values()})
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no safetensors weights in {path}")
    return files


def stage_keys(arch: str, keys: list[str], layers: range, first: bool, last: bool) -> list[str]:
    """The checkpoint keys a stage holding `layers` needs: those layers, plus embeddings on the first stage and the
    final norm and LM head on the last."""
    prefix = LAYERS_PATH[arch] + "."
    wanted = []
    for k in keys:
        if k.startswith(prefix):
            if int(k[len(prefix):].split(".")[0]) in layers:
                wanted.append(k)
        elif "embed" in k:
            if first or (last and k.endswith("embed_tokens.weight")):  # a tied LM head reads the embedding
                wanted.append(k)
        elif last:  # final norm and LM head
            wanted.append(k)
    return wanted


def read_tensors(path: str | Path, arch: str, layers: range, first: bool, last: bool) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in checkpoint_files(path):
        with safe_open(str(f), framework="pt") as sf:
            for k in stage_keys(arch, list(sf.keys()), layers, first, last):
                out[k] = sf.get_tensor(k)
    return out


def load_stage_model(path: str | Path, arch: str, layers: range, first: bool = True,
                     last: bool = True) -> nn.Module:
    """The HF model with only `layers` (and the embeddings / head the stage holds) materialised from the checkpoint;
    every other parameter stays on the meta device and takes no memory."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(path))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    tensors = read_tensors(path, arch, layers, first, last)
    model.load_state_dict(tensors, strict=False, assign=True)
    if getattr(config, "tie_word_embeddings", False) and last:
        model.tie_weights()
    model.eval()
    return model
