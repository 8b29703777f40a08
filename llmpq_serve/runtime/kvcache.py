"""KV-cache memory: the tensors a stage holds for its layers, and the slots the scheduler hands to requests.

Both are sized once from the plan (slots = the planned number of concurrent requests, length = the context a request
may use), so memory never grows while serving. Slots are grouped by decode micro-batch: a group's requests sit in
neighbouring slots, so a full group's attention reads its cache as a view, without a gather."""

from __future__ import annotations

import torch


class CacheFullError(RuntimeError):
    pass


class KVCache:
    """K and V of every layer of a stage: [layers, slots, kv_heads, max_seq, head_dim] each."""

    def __init__(self, layers: int, slots: int, max_seq: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        shape = (layers, slots, kv_heads, max_seq, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_seq = max_seq

    def clear(self, slots: tuple[int, ...]) -> None:
        self.k[:, list(slots)] = 0
        self.v[:, list(slots)] = 0

    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()


class SlotPool:
    """Which request holds which cache slot; slot s belongs to decode group s // group_size."""

    def __init__(self, groups: int, group_size: int):
        self.groups, self.group_size = groups, group_size
        self._owner: dict[str, int] = {}
        self._free = [list(range(g * group_size, (g + 1) * group_size)) for g in range(groups)]

    @property
    def slots(self) -> int:
        return self.groups * self.group_size

    @property
    def free(self) -> int:
        return sum(len(f) for f in self._free)

    def allocate(self, request_id: str) -> int:
        """A slot in the fullest group that still has room: keeps groups full and their slots contiguous."""
        if request_id in self._owner:
            return self._owner[request_id]
        open_groups = [g for g in range(self.groups) if self._free[g]]
        if not open_groups:
            raise CacheFullError(f"all {self.slots} KV-cache slots are in use")
        g = min(open_groups, key=lambda g: len(self._free[g]))
        slot = min(self._free[g])
        self._free[g].remove(slot)
        self._owner[request_id] = slot
        return slot

    def release(self, request_id: str) -> None:
        slot = self._owner.pop(request_id, None)
        if slot is not None:
            self._free[slot // self.group_size].append(slot)

    def group_of(self, slot: int) -> int:
        return slot // self.group_size

    def live(self) -> dict[str, int]:
        return dict(self._owner)
