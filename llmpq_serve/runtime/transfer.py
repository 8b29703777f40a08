"""Moving a stage's output off its device: to the next stage's process or to the router's sampler."""

from __future__ import annotations

import torch


def to_host(t: torch.Tensor) -> torch.Tensor:
    """A CPU copy of `t` (`t` itself when already there). From a GPU it goes through page-locked memory, from torch's
    caching host allocator: a pageable copy is staged through a driver buffer at a fraction of the bus's speed, and
    a last stage hands over a vocabulary-wide row of logits per request every step."""
    if t.device.type != "cuda":
        return t
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    torch.cuda.current_stream(t.device).synchronize()
    return host
