"""A pipeline stage as a Ray Serve deployment: pinned to its planned GPU type, it loads and quantizes only its own
layers and holds their KV cache. Micro-batches reach it over the stage ring (llmpq_serve.runtime.ring), not as
handle calls; handle calls only set the ring up and ask where the stage runs."""

from __future__ import annotations

import ray
import torch
from ray import serve

from llmpq_serve.runtime.local import StageRunner
from llmpq_serve.runtime.ring import StageLoop
from llmpq_serve.runtime.shard import QuantOptions, StageSpec
from llmpq_serve.spec import accelerator_types


@serve.deployment(num_replicas=1)
class StageDeployment:
    def __init__(self, path: str, stage: StageSpec, slots: int, max_seq: int, quant: QuantOptions,
                 cpu_threads: int | None = None):
        # a logical GPU (tests, the CPU demo) shows no CUDA device: the stage then runs on the CPU, where stages
        # sharing a machine should split its cores rather than each spin up a thread per core
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.runner = StageRunner(path, stage, slots, max_seq, device, quant,
                                  threads=cpu_threads if device == "cpu" else None)

    def join(self, host: str, port: int, index: int, stages: int) -> None:
        """Start serving as stage `index` of `stages` in the ring whose router listens on host:port."""
        StageLoop(self.runner.run, index, stages).start(host, port)

    def placement(self) -> dict:
        """Where this replica runs: its node and that node's accelerator type."""
        node_id = ray.get_runtime_context().get_node_id()
        node = next(n for n in ray.nodes() if n["NodeID"] == node_id)
        return {"node_id": node_id, "accelerator_types": accelerator_types(node["Resources"]),
                "device": str(self.runner.shard.device), "weight_bytes": self.runner.shard.weight_bytes(),
                "kv_cache_bytes": self.runner.cache.nbytes()}
