"""Decoder-layer forward passes over the slot KV cache, for the HF layer modules a stage holds.

The modules (and so the parameter names, the quantization code and the on-disk cache) are transformers' own; only
the forward is ours, because a micro-batch mixes requests at different positions: each row has its own start
position and number of new tokens, writes its keys and values into its own cache slot, and attends only to its own
past. Padding rows and columns are masked, so a request's tokens never depend on who it is batched with."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from llmpq_serve.runtime.kvcache import KVCache


@dataclass
class Rows:
    """Where a micro-batch's rows sit: cache slot, first new position and number of new tokens of each row."""

    slots: list[int]
    starts: list[int]
    counts: list[int]

    def __post_init__(self) -> None:
        self.width = max(self.counts)
        self.span = max(s + n for s, n in zip(self.starts, self.counts))  # keys any row attends to
        steps = torch.arange(self.width)
        starts = torch.tensor(self.starts)[:, None]
        counts = torch.tensor(self.counts)[:, None]
        # padding steps repeat the row's last real position: harmless and inside the cache
        self.positions = starts + torch.minimum(steps[None], counts - 1)
        keys = torch.arange(self.span)
        self.mask = (keys[None, None, :] <= self.positions[:, :, None])[:, None]  # [B, 1, T, span]
        self.slot_index = torch.tensor(self.slots)
        self.contiguous = self.slots == list(range(self.slots[0], self.slots[0] + len(self.slots)))
        self.decode = self.width == 1

    def to(self, device: torch.device) -> Rows:
        self.positions, self.mask = self.positions.to(device), self.mask.to(device)
        self.slot_index = self.slot_index.to(device)
        return self

    def last_token(self, x: torch.Tensor) -> torch.Tensor:
        """Each row's last real step: [B, T, ...] -> [B, ...]."""
        return x[torch.arange(x.shape[0], device=x.device), torch.tensor(self.counts, device=x.device) - 1]


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: KVCache, layer: int, rows: Rows) -> torch.Tensor:
    """q [B, H, T, d], k/v [B, KV, T, d] of the new tokens -> attention output [B, T, H*d]; stores k/v in the cache."""
    ck, cv = cache.k[layer], cache.v[layer]
    if rows.decode:
        starts = rows.positions[:, 0]
        ck[rows.slot_index, :, starts] = k[:, :, 0].to(ck.dtype)
        cv[rows.slot_index, :, starts] = v[:, :, 0].to(cv.dtype)
    else:
        for i, (slot, start, n) in enumerate(zip(rows.slots, rows.starts, rows.counts)):
            ck[slot, :, start:start + n] = k[i, :, :n].to(ck.dtype)
            cv[slot, :, start:start + n] = v[i, :, :n].to(cv.dtype)
    if rows.contiguous:  # a view, no copy
        s0 = rows.slots[0]
        keys, values = ck[s0:s0 + len(rows.slots), :, :rows.span], cv[s0:s0 + len(rows.slots), :, :rows.span]
    else:
        keys, values = ck[rows.slot_index, :, :rows.span], cv[rows.slot_index, :, :rows.span]
    out = F.scaled_dot_product_attention(q, keys.to(q.dtype), values.to(q.dtype), attn_mask=rows.mask,
                                         enable_gqa=q.shape[1] != keys.shape[1])
    return out.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)


def _heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    b, t, _ = x.shape
    return x.view(b, t, -1, head_dim).transpose(1, 2)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


def llama_layer(layer: nn.Module, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], cache: KVCache,
                index: int, rows: Rows, head_dim: int) -> torch.Tensor:
    """Llama, Mistral and Qwen2 (whose q/k/v biases live in the linears)."""
    attn, mlp = layer.self_attn, layer.mlp
    h = layer.input_layernorm(x)
    q, k, v = (_heads(p(h), head_dim) for p in (attn.q_proj, attn.k_proj, attn.v_proj))
    cos, sin = (t.unsqueeze(1).to(q.dtype) for t in rope)
    q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
    x = x + attn.o_proj(attend(q, k, v, cache, index, rows))
    h = layer.post_attention_layernorm(x)
    return x + mlp.down_proj(mlp.act_fn(mlp.gate_proj(h)) * mlp.up_proj(h))


def opt_layer(layer: nn.Module, x: torch.Tensor, rope: None, cache: KVCache, index: int, rows: Rows, head_dim: int,
              norm_first: bool) -> torch.Tensor:
    attn = layer.self_attn
    h = layer.self_attn_layer_norm(x) if norm_first else x
    q, k, v = (_heads(p(h), head_dim) for p in (attn.q_proj, attn.k_proj, attn.v_proj))
    x = x + attn.out_proj(attend(q, k, v, cache, index, rows))
    if not norm_first:
        x = layer.self_attn_layer_norm(x)
    h = layer.final_layer_norm(x) if norm_first else x
    x = x + layer.fc2(layer.activation_fn(layer.fc1(h)))
    return x if norm_first else layer.final_layer_norm(x)


LayerForward = Callable[[nn.Module, torch.Tensor, "tuple[torch.Tensor, torch.Tensor] | None", KVCache, int, Rows],
                        torch.Tensor]


def head_dim_of(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def layer_forward(arch: str, config) -> LayerForward:
    """The forward for one decoder layer of `arch`: f(layer, x, rope, cache, index, rows)."""
    if arch in ("llama", "qwen2"):
        return partial(llama_layer, head_dim=head_dim_of(config))
    if arch == "opt":
        return partial(opt_layer, head_dim=head_dim_of(config), norm_first=config.do_layer_norm_before)
    raise ValueError(f"the runtime has no decoder layer for architecture {arch!r}; it runs llama, mistral, qwen2, opt")


def rotary(arch: str, config, device: torch.device | str = "cpu") -> nn.Module | None:
    """The rotary embedding (cos, sin per position) of Llama-family models, built from the config so that every rope
    variant transformers knows is handled; None for learned positions (OPT)."""
    if arch not in ("llama", "qwen2"):
        return None
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    with torch.device(device):
        return LlamaRotaryEmbedding(config=config)
