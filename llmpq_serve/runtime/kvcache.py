"""The KV cache a stage holds for its layers: a fixed pool of request slots, each with room for a whole request.

The pool is allocated once, from the plan's budget (slots = the planned number of concurrent requests, length = the
context a request may use), so memory never grows while serving; a request takes a slot at admission and gives it
back on finish, cancel or error."""

from __future__ import annotations

import torch


class CacheFullError(RuntimeError):
    pass


class KVCache:
    def __init__(self, layers: int, slots: int, max_seq: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        shape = (layers, slots, kv_heads, max_seq, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_seq = max_seq
        self.lengths = [0] * slots
        self._owner: dict[str, int] = {}
        self._free = list(range(slots - 1, -1, -1))

    @property
    def slots(self) -> int:
        return self.k.shape[1]

    @property
    def free_slots(self) -> int:
        return len(self._free)

    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def allocate(self, request_id: str) -> int:
        if request_id in self._owner:
            return self._owner[request_id]
        if not self._free:
            raise CacheFullError(f"all {self.slots} KV-cache slots are in use")
        slot = self._free.pop()
        self._owner[request_id] = slot
        self.lengths[slot] = 0
        return slot

    def free(self, request_id: str) -> None:
        slot = self._owner.pop(request_id, None)
        if slot is not None:
            self.lengths[slot] = 0
            self._free.append(slot)

    def slot(self, request_id: str) -> int:
        return self._owner[request_id]

    def live(self) -> list[str]:
        return list(self._owner)
