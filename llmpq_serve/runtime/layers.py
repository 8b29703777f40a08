"""Decoder-layer forward passes over the slot KV cache, for the HF layer modules a stage holds.

The modules (and so the parameter names, the quantization code and the on-disk cache) are transformers' own; only
the forward is ours, because a micro-batch mixes requests at different positions: each row has its own start
position and number of new tokens, writes its keys and values into its own cache slot, and attends only to its own
past, so a request's tokens never depend on who it is batched with.

Rows are packed: a micro-batch's activations are [tokens, hidden], row i's new tokens consecutive, no padding. The
linear layers (nearly all the work) then run once over every token of the micro-batch, whether a row is decoding
one token or prefilling a whole prompt; so a new request's prefill can ride along with a decode step and share its
weight reads. Attention is per row: decode rows (one new token) together in one batched call, prefill rows each on
their own."""

from __future__ import annotations

import itertools
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
        ends = list(itertools.accumulate(self.counts))
        self.tokens = ends[-1]
        self.positions = torch.cat([torch.arange(s, s + n) for s, n in zip(self.starts, self.counts)])
        self.last = torch.tensor(ends) - 1  # each row's last token in the packed tensor
        one = [i for i, n in enumerate(self.counts) if n == 1]
        self.decode = len(one) == len(self.counts)  # then token i is row i
        self.one_token = self.last[one]
        self.one_slots = torch.tensor([self.slots[i] for i in one], dtype=torch.long)
        self.one_starts = torch.tensor([self.starts[i] for i in one], dtype=torch.long)
        # the keys any one-token row attends to; shorter rows mask the rest
        self.one_span = max((self.starts[i] + 1 for i in one), default=0)
        self.one_mask = (torch.arange(self.one_span)[None] <= self.one_starts[:, None])[:, None, None]
        first_slot = self.slots[one[0]] if one else 0
        self.one_contiguous = [self.slots[i] for i in one] == list(range(first_slot, first_slot + len(one)))
        # rows with several new tokens: (slot, start, count, offset in the packed tensor)
        self.many = [(self.slots[i], self.starts[i], n, ends[i] - n) for i, n in enumerate(self.counts) if n > 1]

    def to(self, device: torch.device) -> Rows:
        for name in ("positions", "last", "one_token", "one_slots", "one_starts", "one_mask"):
            setattr(self, name, getattr(self, name).to(device))
        return self

    def last_token(self, x: torch.Tensor) -> torch.Tensor:
        """Each row's last new token: [tokens, ...] -> [rows, ...]."""
        return x if self.decode else x[self.last]


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: KVCache, layer: int, rows: Rows) -> torch.Tensor:
    """q [tokens, H, d], k/v [tokens, KV, d] of the new tokens -> attention output [tokens, H*d]; stores k/v in the
    cache."""
    ck, cv = cache.k[layer], cache.v[layer]
    gqa = q.shape[1] != k.shape[1]
    out = None if rows.decode else torch.empty_like(q)
    if len(rows.one_slots):
        q1, k1, v1 = (q, k, v) if rows.decode else (q[rows.one_token], k[rows.one_token], v[rows.one_token])
        ck[rows.one_slots, :, rows.one_starts] = k1.to(ck.dtype)
        cv[rows.one_slots, :, rows.one_starts] = v1.to(cv.dtype)
        if rows.one_contiguous:  # a view, no copy
            s0, n = int(rows.one_slots[0]), len(rows.one_slots)
            keys, values = ck[s0:s0 + n, :, :rows.one_span], cv[s0:s0 + n, :, :rows.one_span]
        else:
            keys, values = ck[rows.one_slots, :, :rows.one_span], cv[rows.one_slots, :, :rows.one_span]
        o = F.scaled_dot_product_attention(q1[:, :, None], keys.to(q.dtype), values.to(q.dtype),
                                           attn_mask=rows.one_mask, enable_gqa=gqa)[:, :, 0]
        if rows.decode:
            return o.reshape(o.shape[0], -1)
        out[rows.one_token] = o
    for slot, start, n, at in rows.many:
        ck[slot, :, start:start + n] = k[at:at + n].transpose(0, 1).to(ck.dtype)
        cv[slot, :, start:start + n] = v[at:at + n].transpose(0, 1).to(cv.dtype)
        keys, values = ck[slot, :, :start + n].to(q.dtype), cv[slot, :, :start + n].to(q.dtype)
        # a row that starts at 0 sees exactly its own tokens causally; one that continues a cache needs an offset
        mask = None if start == 0 else (torch.arange(start + n, device=q.device)[None]
                                        <= torch.arange(start, start + n, device=q.device)[:, None])
        o = F.scaled_dot_product_attention(q[at:at + n].transpose(0, 1), keys, values, attn_mask=mask,
                                           is_causal=start == 0, enable_gqa=gqa)
        out[at:at + n] = o.transpose(0, 1)
    return out.reshape(out.shape[0], -1)


def rope_of(rotary_module: nn.Module | None, x: torch.Tensor, rows: Rows
            ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """cos and sin [tokens, 1, d] at each packed token's position; None for learned positions."""
    if rotary_module is None:
        return None
    cos, sin = rotary_module(x, rows.positions[None])
    return cos[0, :, None], sin[0, :, None]


def _heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    return x.view(x.shape[0], -1, head_dim)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


def llama_layer(layer: nn.Module, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], cache: KVCache,
                index: int, rows: Rows, head_dim: int) -> torch.Tensor:
    """Llama, Mistral and Qwen2 (whose q/k/v biases live in the linears)."""
    attn, mlp = layer.self_attn, layer.mlp
    h = layer.input_layernorm(x)
    q, k, v = (_heads(p(h), head_dim) for p in (attn.q_proj, attn.k_proj, attn.v_proj))
    cos, sin = (t.to(q.dtype) for t in rope)
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
