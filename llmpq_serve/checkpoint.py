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
    """The keys (the model's own names) a stage holding `layers` needs: those layers, plus the embeddings (and OPT's
    projection into the hidden size) on the first stage, and the final norm, OPT's projection out of it and the LM
    head on the last."""
    prefix = LAYERS_PATH[arch] + "."
    wanted = []
    for k in keys:
        if k.startswith(prefix):
            if int(k[len(prefix):].split(".")[0]) in layers:
                wanted.append(k)
        elif "embed" in k or ".project_in." in k:
            if first or (last and k.endswith("embed_tokens.weight")):  # a tied LM head reads the embedding
                wanted.append(k)
        elif last:
            wanted.append(k)
    return wanted


def model_key(key: str, model_keys: set[str]) -> str | None:
    """The model's name for a checkpoint's tensor: as it is, or with the base model's `model.` prefix, which OPT's
    own checkpoints (facebook/opt-13b, -30b) leave out (`decoder.layers.0...`); None for one the model lacks."""
    if key in model_keys:
        return key
    return f"model.{key}" if f"model.{key}" in model_keys else None


def read_tensors(path: str | Path, arch: str, layers: range, first: bool, last: bool,
                 model_keys: set[str]) -> dict[str, torch.Tensor]:
    """The stage's tensors, by the model's own names."""
    out: dict[str, torch.Tensor] = {}
    for f in checkpoint_files(path):
        with safe_open(str(f), framework="pt") as sf:
            keys = sf.keys()  # a safe_open handle is no mapping: it cannot be iterated itself
            names = {name: k for k in keys if (name := model_key(k, model_keys)) is not None}
            for name in stage_keys(arch, list(names), layers, first, last):
                out[name] = sf.get_tensor(names[name])
    return out


def load_stage_model(path: str | Path, arch: str, layers: range, first: bool = True,
                     last: bool = True) -> nn.Module:
    """The HF model with only `layers` (and the embeddings / head the stage holds) materialised from the checkpoint;
    every other parameter stays on the meta device and takes no memory."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(path))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    own = set(model.state_dict())
    tensors = read_tensors(path, arch, layers, first, last, own)
    tied = getattr(config, "tie_word_embeddings", False)
    missing = [k for k in stage_keys(arch, sorted(own), layers, first, last)
               if k not in tensors and not (tied and k == "lm_head.weight")]
    if missing:  # left on the meta device, they would fail the stage's first forward, far from the cause
        raise ValueError(f"{path}: the checkpoint lacks {len(missing)} tensor(s) this stage needs, e.g. "
                         f"{', '.join(missing[:3])}")
    model.load_state_dict(tensors, strict=False, assign=True)
    if tied and last:
        model.tie_weights()
    model.eval()
    return model
