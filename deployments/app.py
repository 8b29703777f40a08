"""The builder `serve run` imports: config -> cluster -> plan -> one stage deployment per planned stage, pinned to
its GPU type -> the router.

    serve run deployments/demo.yaml             # the config file's args go to build_app
    serve run deployments.app:build_app model=/path/to/checkpoint cluster=ray
"""

from __future__ import annotations

import logging
import os
from typing import Any

from ray.serve import Application

from deployments.router import Router
from deployments.stage import StageDeployment
from llmpq_serve.config import ServeConfig
from llmpq_serve.runtime.scheduler import slot_count
from llmpq_serve.runtime.shard import QuantOptions, StageSpec, default_quant_dir
from llmpq_serve.spec import GPUSpec

logger = logging.getLogger("llmpq")


def solve_plan(config: ServeConfig, path, quant: QuantOptions) -> tuple[list[tuple[str, StageSpec]], int, int, dict]:
    """((accelerator type, stage) per stage, prefill micro-batch, decode micro-batch, the plan as JSON)."""
    if config.stages is not None:
        specs = StageSpec.chain([(s.layers[0], s.layers[1], s.bits or [16] * (s.layers[1] - s.layers[0]))
                                 for s in config.stages])
        stages = [(s.accelerator_type, spec) for s, spec in zip(config.stages, specs)]
        doc = {"fixed": [s.model_dump() for s in config.stages], "prefill_micro_batch": config.prefill_micro_batch,
               "decode_micro_batch": config.decode_micro_batch}
        return stages, config.prefill_micro_batch, config.decode_micro_batch, doc

    from llmpq_serve.cli import quality_target
    from llmpq_serve.costmodel import CostModel
    from llmpq_serve.planner import Problem, plan
    from llmpq_serve.quant.apply import QuantCache
    from llmpq_serve.runtime.local import stage_specs
    from llmpq_serve.runtime.quantized import checkpoint_indicator
    from llmpq_serve.spec import ClusterSpec, ModelSpec

    model = ModelSpec.from_checkpoint(path)
    cluster = ClusterSpec.from_ray() if config.cluster == "ray" else ClusterSpec.from_yaml(config.cluster)
    if not cluster.devices:
        raise ValueError("the Ray cluster shows no GPUs with an accelerator_type; start nodes with --num-gpus and "
                         "--resources '{\"accelerator_type:<TYPE>\": 1}' (see the README), or give cluster: <yaml>")
    indicator = checkpoint_indicator(path, model.arch, quant, QuantCache(quant.cache_dir or default_quant_dir()))
    problem = Problem(model, cluster, config.workload, cost=CostModel(model), indicator=indicator)
    problem = problem.with_quality(quality_target(problem, config.theta, None, config.quality))
    result = plan(problem, config.method, time_limit=config.plan_time_limit)
    logger.info("plan:\n%s", result.table())
    types = [GPUSpec.from_catalog(s.device.gpu).ray_type for s in result.stages]
    return (list(zip(types, stage_specs(result))), result.prefill_micro_batch, result.decode_micro_batch,
            result.model_dump(mode="json"))


def build_app(args: dict[str, Any]) -> Application:
    config = ServeConfig.model_validate(args)
    path = config.checkpoint()
    quant = QuantOptions(config.quant_method, config.group_size)
    stages, prefill_mb, decode_mb, plan_doc = solve_plan(config, path, quant)
    max_batch = config.workload.batch_size
    slots = slot_count(max_batch, decode_mb)
    threads = max(1, (os.cpu_count() or 1) // len(stages))  # used only by stages that end up on a CPU
    handles = [StageDeployment.options(name=f"stage{i}", ray_actor_options={
        "num_gpus": 1, "num_cpus": 0, "accelerator_type": ray_type}).bind(str(path), spec, slots, config.max_context,
                                                                         quant, threads)
               for i, (ray_type, spec) in enumerate(stages)]
    return Router.bind(handles, str(path), config.model if config.model.startswith("demo-") else path.name, plan_doc,
                       prefill_mb, decode_mb, max_batch, config.max_context, config.max_queue,
                       config.mixed_steps)
