"""Decoder-layer forward passes over the slot KV cache, for the HF layer modules a stage holds.

The modules (and so the parameter names, the quantization code and the on-disk cache) are transformers' own; only
the forward is ours, because a micro-batch mixes requests at different positions: each row has its own start
position and number of new tokens, writes its keys and values into its own cache slot, and attends only to its own
past, so a request's tokens never depend on who it is batched with.

Rows are packed: a micro-batch's activations are [tokens, hidden], row i's new tokens consecutive, no padding. The
linear layers (nearly all the work) then run once over every token of the micro-batch, whether a row is decoding
one token or prefilling a whole prompt, and padding costs nothing there; so a new request's prefill can also ride
along with a decode step and share its weight reads. Attention runs in at most two batched calls: one-token rows
together, longer rows padded to the longest of them (attention is a small share of the work)."""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from llmpq_serve.runtime.kvcache import KVCache

# Not cuDNN's attention, torch's first choice on Hopper: it builds an execution graph for each new key length, and a
# decode step's keys grow by one token every step. On an H100, 8 Llama-3-8B layers decoding 16 rows took 66 ms per
# token in the running engine with it (7 ms per step at one fixed length), 14 ms with these. The memory-efficient
# kernel takes any length and a boolean mask; flash attention takes no mask, so the math kernel is the fallback.
GPU_ATTENTION = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def attention_kernels(device: torch.device) -> contextlib.AbstractContextManager:
    """The attention kernels a stage's layers may use on `device`: entered once around a stage's layers (or a
    profiled layer), since entering costs ~20 us."""
    return sdpa_kernel(GPU_ATTENTION) if device.type == "cuda" else contextlib.nullcontext()


class RowGroup:
    """Rows that attend in one batched call: their tokens padded to [rows, steps] (a padding step repeats the row's
    last real token, so it stays inside the cache and is dropped afterwards), and the keys each step may see."""

    def __init__(self, slots: list[int], starts: list[int], counts: list[int], offsets: list[int]):
        width = max(counts)
        if width == 1:  # decode rows: nothing to pad (the common case, kept cheap)
            self.packed = torch.tensor(offsets)
            self.index, self.real = self.packed[:, None], torch.arange(len(offsets))
            positions = torch.tensor(starts)[:, None]
        else:
            steps = torch.arange(width)
            counts_t = torch.tensor(counts)[:, None]
            last_step = torch.minimum(steps[None], counts_t - 1)
            self.index = torch.tensor(offsets)[:, None] + last_step  # [rows, steps] into the packed tokens
            positions = torch.tensor(starts)[:, None] + last_step
            real = steps[None] < counts_t
            self.real = real.flatten().nonzero().flatten()  # the real steps, in packed order
            self.packed = self.index[real]
        self.span = max(s + n for s, n in zip(starts, counts))
        self.slots = torch.tensor(slots)
        first = min(slots)
        spread = max(slots) - first + 1
        contiguous = slots == list(range(first, first + len(slots)))
        # Decode rows whose slots lie within a range at most twice their number (a decode group with some slots
        # free) attend over that whole range as one view of the cache, the free slots as idle rows whose output is
        # dropped: cheaper than gathering copies of the rows' keys and values, which cost 15% of a 14-of-16-row CPU
        # demo step. Other rows are gathered.
        self.window = (first, spread) if contiguous or (width == 1 and spread <= 2 * len(slots)) else None
        self.within = None  # each row's place in the window, where the window has idle rows
        if self.window is not None and not contiguous:
            self.within = self.slots - first
            positions = torch.full((spread, 1), self.span - 1).index_copy_(0, self.within, positions)
        self.mask = (torch.arange(self.span)[None, None] <= positions[:, :, None])[:, None]  # [rows, 1, steps, span]
        self._masks: dict[int, torch.Tensor] = {1: self.mask}

    def mask_for(self, group: int) -> torch.Tensor:
        """The mask of queries folded `group` query heads to a key head (see `_attend_group`): [rows, 1, group *
        steps, span], built once per micro-batch rather than once per layer."""
        if group not in self._masks:
            self._masks[group] = self.mask.repeat(1, 1, group, 1)
        return self._masks[group]

    def to(self, device: torch.device) -> RowGroup:
        for name in ("index", "mask", "slots", "real", "packed", "within"):
            if getattr(self, name) is not None:
                setattr(self, name, getattr(self, name).to(device))
        self._masks = {1: self.mask}
        return self


@dataclass
class Rows:
    """Where a micro-batch's rows sit: cache slot, first new position and number of new tokens of each row."""

    slots: list[int]
    starts: list[int]
    counts: list[int]

    def __post_init__(self) -> None:
        self.decode = all(n == 1 for n in self.counts)  # the common case, kept cheap: token i is row i
        if self.decode:
            self.tokens = len(self.counts)
            self.positions = torch.tensor(self.starts)
            self.token_slots = torch.tensor(self.slots)
            self.groups = [RowGroup(self.slots, self.starts, self.counts, list(range(self.tokens)))]
            return
        ends = list(itertools.accumulate(self.counts))
        self.tokens = ends[-1]
        self.positions = torch.cat([torch.arange(s, s + n) for s, n in zip(self.starts, self.counts)])
        self.token_slots = torch.repeat_interleave(torch.tensor(self.slots), torch.tensor(self.counts))
        self.last = torch.tensor(ends) - 1  # each row's last token in the packed tensor
        # one-token rows attend together without padding; longer rows are padded to the longest of them
        self.groups = []
        for rows in ([i for i, n in enumerate(self.counts) if n == 1], [i for i, n in enumerate(self.counts) if n > 1]):
            if rows:
                self.groups.append(RowGroup([self.slots[i] for i in rows], [self.starts[i] for i in rows],
                                            [self.counts[i] for i in rows], [ends[i] - self.counts[i] for i in rows]))

    def to(self, device: torch.device) -> Rows:
        self.positions, self.token_slots = self.positions.to(device), self.token_slots.to(device)
        if not self.decode:
            self.last = self.last.to(device)
        self.groups = [g.to(device) for g in self.groups]
        return self

    def last_token(self, x: torch.Tensor) -> torch.Tensor:
        """Each row's last new token: [tokens, ...] -> [rows, ...]."""
        return x if self.decode else x[self.last]


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: KVCache, layer: int, rows: Rows) -> torch.Tensor:
    """q [tokens, H, d], k/v [tokens, KV, d] of the new tokens -> attention output [tokens, H*d]; stores k/v in the
    cache."""
    ck, cv = cache.k[layer], cache.v[layer]
    ck[rows.token_slots, :, rows.positions] = k.to(ck.dtype)
    cv[rows.token_slots, :, rows.positions] = v.to(cv.dtype)
    if rows.decode:
        return _attend_group(q[:, None], ck, cv, rows.groups[0]).reshape(q.shape[0], -1)
    out = torch.empty_like(q)
    for g in rows.groups:
        out[g.packed] = _attend_group(q[g.index], ck, cv, g)[g.real]
    return out.reshape(q.shape[0], -1)


def _folds_heads(q: torch.Tensor) -> bool:
    """Whether grouped query heads attend folded (see `_attend_group`): on CUDA, whose kernels of GPU_ATTENTION
    refuse grouped heads; the CPU kernel takes them as they are, 1-3% faster on the demo model than folded."""
    return q.is_cuda


def _attend_group(q: torch.Tensor, ck: torch.Tensor, cv: torch.Tensor, g: RowGroup) -> torch.Tensor:
    """q [rows, steps, H, d] -> [rows * steps, H, d]."""
    if g.window is None:
        keys, values = ck[g.slots, :, :g.span], cv[g.slots, :, :g.span]
    else:  # a view, no copy
        first, n = g.window
        keys, values = (c[first:first + n, :, :g.span] for c in (ck, cv))
        if g.within is not None:
            q = q.new_zeros((n, *q.shape[1:])).index_copy_(0, g.within, q)
    rows, steps, heads, d = q.shape
    kv_heads = keys.shape[1]
    # Folded, the query heads that share a key head attend as one head of group * steps queries: as many query heads
    # as key heads, and no copy of the keys
    group = heads // kv_heads if _folds_heads(q) else 1
    q = q.transpose(1, 2)
    if group > 1:
        q = q.reshape(rows, kv_heads, group * steps, d)
    o = F.scaled_dot_product_attention(q, keys.to(q.dtype), values.to(q.dtype), attn_mask=g.mask_for(group),
                                       enable_gqa=q.shape[1] != kv_heads)
    o = o.reshape(rows, heads, steps, d)
    if g.within is not None:
        o = o[g.within]
    return o.transpose(1, 2).reshape(-1, heads, d)


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
