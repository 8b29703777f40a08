"""Where the linears of one decoder layer sit, per architecture, and what precedes each group that shares an input
(AWQ folds its per-channel scales into that predecessor)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ScaleGroup:
    prev: str  # module whose output feeds the group: a norm or a linear
    linears: tuple[str, ...]


LLAMA = (ScaleGroup("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
         ScaleGroup("self_attn.v_proj", ("self_attn.o_proj",)),
         ScaleGroup("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
         ScaleGroup("mlp.up_proj", ("mlp.down_proj",)))
OPT = (ScaleGroup("self_attn_layer_norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
       ScaleGroup("self_attn.v_proj", ("self_attn.out_proj",)),
       ScaleGroup("final_layer_norm", ("fc1",)),
       ScaleGroup("fc1", ("fc2",)))  # ReLU between commutes with positive scales
GROUPS = {"llama": LLAMA, "qwen2": LLAMA, "opt": OPT}
# The decoder layers inside a HF causal LM, per architecture.
LAYERS_PATH = {"llama": "model.layers", "qwen2": "model.layers", "opt": "model.decoder.layers"}
# Linears the clipping search leaves alone. AWQ leaves q and k (they feed a softmax); here every candidate clip is
# judged by the block's output, and clipping q and k too lowered the demo models' error (README, "Quantization"),
# so none is left out.
NO_CLIP: tuple[str, ...] = ()


def scale_groups(arch: str) -> tuple[ScaleGroup, ...]:
    if arch not in GROUPS:
        raise ValueError(f"no quantization layout for architecture {arch!r}; supported: {', '.join(GROUPS)}")
    return GROUPS[arch]


def linear_names(arch: str) -> list[str]:
    return [name for g in scale_groups(arch) for name in g.linears]
