"""One pipeline stage's model: its decoder layers (each at its planned bits), plus the embeddings on the first stage
and the final norm and LM head on the last. Only the stage's own tensors are read from the checkpoint."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from llmpq_serve.checkpoint import load_stage_model
from llmpq_serve.quant.apply import QuantCache, load_layer_state, model_id
from llmpq_serve.quant.calibration import decoder_layers
from llmpq_serve.quant.linear import has_int4_kernel
from llmpq_serve.runtime.kvcache import KVCache
from llmpq_serve.runtime.layers import Rows, attention_kernels, head_dim_of, layer_forward, rope_of, rotary
from llmpq_serve.spec import ModelSpec

OPT_POSITION_OFFSET = 2  # OPT's learned position table reserves its first two rows


@dataclass(frozen=True)
class StageSpec:
    """What a stage holds: layers [start, end) of the model at `bits` (one per layer)."""

    start: int
    end: int
    bits: tuple[int, ...]
    first: bool
    last: bool

    def __post_init__(self) -> None:
        if len(self.bits) != self.end - self.start:
            raise ValueError(f"stage [{self.start}, {self.end}) needs {self.end - self.start} bit-widths, "
                             f"got {len(self.bits)}")

    @classmethod
    def chain(cls, stages: list[tuple[int, int, list[int] | tuple[int, ...]]]) -> list[StageSpec]:
        """StageSpecs of consecutive (start, end, bits) stages, in pipeline order (first and last marked)."""
        n = len(stages)
        for i, (a, _, _) in enumerate(stages):
            expected = stages[i - 1][1] if i else 0
            if a != expected:  # a gap skips layers, an overlap runs some twice: wrong text either way
                raise ValueError(f"stage {i} starts at layer {a}; the stages must follow each other from layer 0, so "
                                 f"it must start at {expected}")
        return [cls(a, b, tuple(bits), i == 0, i == n - 1) for i, (a, b, bits) in enumerate(stages)]


@dataclass(frozen=True)
class QuantOptions:
    method: str = "awq"
    group_size: int = 128
    cache_dir: Path | None = None  # default: $LLMPQ_CACHE/quantized


def runtime_dtype(device: torch.device) -> torch.dtype:
    """fp16 weights and activations on a GPU (bf16 on those with it: the int4 kernel takes bf16); fp32 on CPU,
    where half-precision matmuls are slow."""
    if device.type != "cuda":
        return torch.float32
    # GPUs without the int4 kernel (below compute capability 8.0: T4, V100) only emulate bf16, and
    # is_bf16_supported() says yes to that
    return torch.bfloat16 if has_int4_kernel(device) else torch.float16


class StageShard(nn.Module):
    def __init__(self, path: str | Path, stage: StageSpec, device: str | torch.device = "cpu",
                 quant: QuantOptions | None = None):
        super().__init__()
        from transformers import AutoConfig

        self.path, self.stage = Path(path), stage
        self.device = torch.device(device)
        self.dtype = runtime_dtype(self.device)
        self.config = AutoConfig.from_pretrained(str(path))
        self.spec = ModelSpec.from_hf_config(self.config, name=str(path))
        self.arch = self.spec.arch
        if not 0 <= stage.start < stage.end <= self.spec.layers:
            raise ValueError(f"stage layers [{stage.start}, {stage.end}) outside the model's {self.spec.layers}")
        hf = load_stage_model(path, self.arch, range(stage.start, stage.end), stage.first, stage.last)
        self.layers = nn.ModuleList(decoder_layers(hf, self.arch)[stage.start:stage.end])
        body = hf.model.decoder if self.arch == "opt" else hf.model
        self.embed = body.embed_tokens if stage.first else None
        self.positions = body.embed_positions if stage.first and self.arch == "opt" else None
        self.project_in = getattr(body, "project_in", None) if stage.first else None
        self.norm = (body.final_layer_norm if self.arch == "opt" else body.norm) if stage.last else None
        self.project_out = getattr(body, "project_out", None) if stage.last else None
        self.lm_head = hf.lm_head if stage.last else None
        del hf  # the rest of the model is on the meta device: nothing to keep
        self.to(self.device, self.dtype)
        self._quantize(quant or QuantOptions())
        self.rotary = rotary(self.arch, self.config, self.device)
        self.forward_layer = layer_forward(self.arch, self.config)
        self.eval()

    def _quantize(self, options: QuantOptions) -> None:
        todo = [(i, b) for i, b in zip(range(self.stage.start, self.stage.end), self.stage.bits) if b != 16]
        if not todo:
            return
        from llmpq_serve.runtime.quantized import ensure_quantized

        cache = QuantCache(options.cache_dir or default_quant_dir())
        key = model_id(self.path)
        ensure_quantized(self.path, self.arch, todo, options, cache, key)
        for layer_id, bits in todo:
            state = cache.load(key, layer_id, bits, options.method, options.group_size)
            state = {k: v.to(self.device, self.dtype) if v.is_floating_point() else v.to(self.device)
                     for k, v in state.items()}
            load_layer_state(self.layers[layer_id - self.stage.start], self.arch, bits, options.group_size, state)

    def new_cache(self, slots: int, max_seq: int) -> KVCache:
        return KVCache(len(self.layers), slots, max_seq, self.spec.kv_heads, head_dim_of(self.config), self.dtype,
                       self.device)

    def weight_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in [*self.parameters(), *self.buffers()])

    @torch.inference_mode()
    def forward(self, x: torch.Tensor, rows: Rows, cache: KVCache) -> torch.Tensor:
        """First stage: the rows' new token ids, packed [tokens]; others: hidden states [tokens, H]. Returns hidden
        states for the next stage, or on the last stage the logits [rows, vocab] of each row's last token, in the
        runtime dtype: the sampler widens them on the host, so a GPU hands over half the bytes of fp32."""
        rows = rows.to(self.device)
        x = self._embed(x.to(self.device), rows) if self.stage.first else x.to(self.device, self.dtype)
        rope = rope_of(self.rotary, x, rows)
        with attention_kernels(self.device):
            for i, layer in enumerate(self.layers):
                x = self.forward_layer(layer, x, rope, cache, i, rows)
        if not self.stage.last:
            return x
        h = self.norm(rows.last_token(x)) if self.norm is not None else rows.last_token(x)
        if self.project_out is not None:
            h = self.project_out(h)
        return self.lm_head(h)

    def _embed(self, ids: torch.Tensor, rows: Rows) -> torch.Tensor:
        x = self.embed(ids)
        if self.project_in is not None:
            x = self.project_in(x)
        if self.positions is not None:
            x = x + nn.functional.embedding(rows.positions + OPT_POSITION_OFFSET, self.positions.weight)
        return x


def default_quant_dir() -> Path:
    from llmpq_serve.demo_model import cache_dir

    return cache_dir() / "quantized"
