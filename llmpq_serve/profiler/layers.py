"""One decoder layer of a model's shape, built with random weights in the runtime's own form (the same HF layer
modules, QuantLinear kernels, KV cache and forward that a stage runs), and timed over a grid of prefill and decode
points at each bit-width; the LM head likewise."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from llmpq_serve.profile_table import HeadPoint, LayerShape, ProfilePoint
from llmpq_serve.profiler.timing import measure, measure_round_robin
from llmpq_serve.quant.groupwise import GroupQuant
from llmpq_serve.quant.layout import linear_names
from llmpq_serve.quant.linear import QuantLinear
from llmpq_serve.runtime.kvcache import KVCache
from llmpq_serve.runtime.layers import Rows, attention_kernels, layer_forward, rope_of, rotary
from llmpq_serve.runtime.transfer import to_host

BITS = (16, 8, 4, 3)


@dataclass(frozen=True)
class Grid:
    prefill_batches: tuple[int, ...]
    prompt_lens: tuple[int, ...]
    decode_batches: tuple[int, ...]
    context_lens: tuple[int, ...]


GPU_GRID = Grid((1, 2, 4, 8), (128, 512, 1024, 2048), (1, 4, 16, 32, 64), (128, 512, 1024, 2048))
CPU_GRID = Grid((1, 2, 4, 8), (16, 32, 64), (1, 2, 4, 8), (16, 32, 64, 128))


def hf_config(shape: LayerShape, vocab: int = 32000):
    if shape.arch == "gated":
        from transformers import LlamaConfig

        return "llama", LlamaConfig(hidden_size=shape.hidden, intermediate_size=shape.ffn,
                                    num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
                                    num_hidden_layers=1, vocab_size=vocab, max_position_embeddings=8192)
    from transformers import OPTConfig

    return "opt", OPTConfig(hidden_size=shape.hidden, ffn_dim=shape.ffn, num_attention_heads=shape.heads,
                            num_hidden_layers=1, vocab_size=vocab, word_embed_proj_dim=shape.hidden,
                            max_position_embeddings=8192)


def random_linear(linear: nn.Linear, bits: int, group_size: int, dtype: torch.dtype) -> nn.Module:
    out_f, in_f = linear.weight.shape
    dev = linear.weight.device
    bias = None if linear.bias is None else linear.bias.detach().to(dtype)
    if bits == 16:
        return linear.to(dtype)
    if bits == 8:
        q = torch.randint(-127, 128, (out_f, in_f), dtype=torch.int8, device=dev)
        return QuantLinear.from_int8(q, torch.rand(out_f, device=dev) * 1e-2, bias)
    g = min(group_size, in_f)
    levels = 2**bits
    gq = GroupQuant(torch.randint(0, levels, (out_f, in_f), dtype=torch.uint8, device=dev),
                    torch.rand(out_f, in_f // g, device=dev) * 1e-2,
                    torch.randint(0, levels, (out_f, in_f // g), dtype=torch.uint8, device=dev), bits, g)
    return QuantLinear.from_group_quant(gq, bias, dtype)


def build_layer(shape: LayerShape, bits: int, device: torch.device, dtype: torch.dtype, group_size: int = 128):
    arch, config = hf_config(shape)
    with torch.device(device):
        if arch == "llama":
            from transformers.models.llama.modeling_llama import LlamaDecoderLayer as Layer
        else:
            from transformers.models.opt.modeling_opt import OPTDecoderLayer as Layer
        layer = Layer(config, layer_idx=0).to(dtype).eval()
    for name in linear_names(arch):
        head, _, attr = name.rpartition(".")
        parent = layer.get_submodule(head) if head else layer
        setattr(parent, attr, random_linear(getattr(parent, attr), bits, group_size, dtype))
    return arch, config, layer


def last_level_cache_bytes(device: torch.device) -> int:
    """The cache a stage's weights stream through: the GPU's L2, or the CPU's last-level cache."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).L2_cache_size
    sizes = []
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        text = (index / "size").read_text().strip() if (index / "size").is_file() else ""
        if text[:-1].isdigit():
            sizes.append(int(text[:-1]) * {"K": 1024, "M": 1024**2}.get(text[-1], 1))
    return max(sizes, default=32 * 1024**2)


def profile_dtype(device: torch.device) -> torch.dtype:
    """The dtype layers are profiled in: bf16 on a GPU, fp32 on a CPU."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def point_inputs(rope_module: nn.Module | None, hidden: int, phase: str, micro_batch: int, seq: int,
                 device: torch.device, dtype: torch.dtype
                 ) -> tuple[Rows, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """A grid point's micro-batch as a stage gets it: its rows (prefill: `seq` new tokens each from position 0;
    decode: one new token each after `seq` cached ones), random activations and their rotary tables."""
    if phase == "prefill":
        rows = Rows(list(range(micro_batch)), [0] * micro_batch, [seq] * micro_batch).to(device)
    else:
        rows = Rows(list(range(micro_batch)), [seq] * micro_batch, [1] * micro_batch).to(device)
    x = torch.randn(rows.tokens, hidden, device=device, dtype=dtype)
    return rows, x, rope_of(rope_module, x, rows)


@torch.inference_mode()
def profile_shape(shape: LayerShape, bits: tuple[int, ...], grid: Grid, device: torch.device, dtype: torch.dtype,
                  samples: int, bar: tqdm) -> list[ProfilePoint]:
    """Every grid point of one layer shape at each of `bits`, sampled round-robin (`measure_round_robin`), so the
    layers of every bit-width are held at once, and the points share one KV cache of the grid's largest micro-batch
    and length (a point's rows use its first slots and positions, as a stage's rows use part of its cache).

    Calls cycle through enough copies of the layer that their weights overflow the last-level cache, as a stage's
    consecutive layers do: one layer timed alone would find its weights in cache and look faster than it runs in a
    stage (small layers on a CPU by about 2x)."""
    arch, config = hf_config(shape)
    forward = layer_forward(arch, config)
    rope_module = rotary(arch, config, device)
    head_dim = shape.hidden // shape.heads
    stacks = {b: layer_copies(shape, b, device, dtype) for b in bits}
    copies = max(len(layers) for layers in stacks.values())
    cache = KVCache(copies, max(grid.prefill_batches + grid.decode_batches),
                    max(grid.prompt_lens + grid.context_lens) + 1, shape.kv_heads, head_dim, dtype, device)
    keys, calls = [], []
    for b, layers in stacks.items():
        for phase, batches, lens in (("prefill", grid.prefill_batches, grid.prompt_lens),
                                     ("decode", grid.decode_batches, grid.context_lens)):
            for mb, n in itertools.product(batches, lens):
                rows, x, rope = point_inputs(rope_module, shape.hidden, phase, mb, n, device, dtype)
                turn = itertools.cycle(range(len(layers)))

                def call(x=x, rope=rope, rows=rows, turn=turn, layers=layers, cache=cache):
                    i = next(turn)
                    return forward(layers[i], x, rope, cache, i, rows)

                keys.append((b, phase, mb, n))
                calls.append(call)
    with attention_kernels(device):
        measured = measure_round_robin(calls, device, samples, bar=bar)
    return [ProfilePoint(bits=b, phase=phase, micro_batch=mb, seq=n, median_s=median, p10_s=p10, p90_s=p90)
            for (b, phase, mb, n), (median, p10, p90) in zip(keys, measured)]


def layer_copies(shape: LayerShape, bits: int, device: torch.device, dtype: torch.dtype) -> list[nn.Module]:
    """Enough copies of the layer that their weights overflow the last-level cache twice (at most 16)."""
    layer = build_layer(shape, bits, device, dtype)[2]
    layer_bytes = sum(t.numel() * t.element_size() for t in [*layer.parameters(), *layer.buffers()])
    copies = max(1, min(16, math.ceil(2 * last_level_cache_bytes(device) / max(layer_bytes, 1))))
    return [layer] + [build_layer(shape, bits, device, dtype)[2] for _ in range(copies - 1)]


@torch.inference_mode()
def profile_head(hidden: int, vocab: int, batches: tuple[int, ...], device: torch.device,
                 dtype: torch.dtype) -> list[HeadPoint]:
    """Final norm + LM head on the last position of each sequence, and the logits' copy to the host."""
    norm = nn.LayerNorm(hidden, device=device, dtype=dtype)
    head = nn.Linear(hidden, vocab, bias=False, device=device, dtype=dtype)
    out = []
    for mb in batches:
        x = torch.randn(mb, hidden, device=device, dtype=dtype)
        median, _, _ = measure(lambda x=x: to_host(head(norm(x))), device)
        out.append(HeadPoint(hidden=hidden, vocab=vocab, micro_batch=mb, median_s=median))
    return out
