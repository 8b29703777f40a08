"""The single source of truth for hardware and model facts: GPU specs, model shapes, kernel assumptions."""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

import yaml

_HERE = Path(__file__).parent


@cache
def _load(name: str) -> dict[str, Any]:
    with open(_HERE / name) as f:
        return yaml.safe_load(f)


def gpu_table() -> dict[str, dict[str, Any]]:
    return _load("gpus.yaml")["gpus"]


def model_table() -> dict[str, dict[str, Any]]:
    return _load("models.yaml")["models"]


def kernel_assumptions() -> dict[str, Any]:
    return _load("kernels.yaml")


def gpus_for_ray_type(ray_type: str) -> list[str]:
    """Catalog GPU names that Ray reports as `accelerator_type:<ray_type>`, smallest memory first, and of the same
    memory the slowest first (an H100 PCIe before the SXM): the first is what a Ray cluster is planned with unless
    told, and a plan for it holds on the others."""
    table = gpu_table()
    names = [n for n, g in table.items() if g.get("ray_type") == ray_type]
    return sorted(names, key=lambda n: tuple(table[n][k] for k in ("memory_gib", "mem_bw_gbs", "fp16_tflops",
                                                                     "link_gbs")))
