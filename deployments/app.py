"""The builder `serve run` imports: config -> the router and the planner actor, which plans for the cluster, deploys
one stage deployment per planned stage pinned to its GPU type, hands them to the router, and re-plans when GPU
nodes join or leave.

    serve run deployments/demo.yaml             # the config file's args go to build_app
    serve run deployments.app:build_app model=/path/to/checkpoint cluster=ray
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ray.serve import Application

from deployments.planner import Planner, checked_stages
from deployments.router import Router
from llmpq_serve.config import DEMO_MODELS, ServeConfig
from llmpq_serve.spec import ModelSpec


def build_app(args: dict[str, Any]) -> Application:
    """The router (HTTP ingress) and the planner actor; the planner plans and deploys the stages once it runs."""
    config = ServeConfig.model_validate(args)
    path = config.checkpoint().resolve()
    checked_stages(config, ModelSpec.from_checkpoint(path))
    demo = config.model in DEMO_MODELS
    # the router and the planner may run in another working directory, or on another node with the same files
    given = {} if demo else {"model": str(path)}
    if config.cluster != "ray":
        config.cluster_spec()  # a wrong cluster file fails `serve run` now, not the planner later
        given["cluster"] = str(Path(config.cluster).resolve())
    return Router.bind(Planner.bind({**args, **given}), str(path), config.model if demo else path.name,
                       config.workload.batch_size, config.max_context, config.scheduling())
