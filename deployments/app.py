"""The builder `serve run` imports: config -> the router and the planner actor, which plans for the cluster, deploys
one stage deployment per planned stage pinned to its GPU type, hands them to the router, and re-plans when GPU
nodes join or leave.

    serve run deployments/demo.yaml             # the config file's args go to build_app
    serve run deployments.app:build_app model=/path/to/checkpoint cluster=ray
"""

from __future__ import annotations

from typing import Any

from ray.serve import Application

from deployments.planner import Planner
from deployments.router import Router
from llmpq_serve.config import ServeConfig


def build_app(args: dict[str, Any]) -> Application:
    """The router (HTTP ingress) and the planner actor; the planner plans and deploys the stages once it runs."""
    config = ServeConfig.model_validate(args)
    path = config.checkpoint()
    return Router.bind(Planner.bind(args), str(path), config.model if config.model.startswith("demo-") else path.name,
                       config.workload.batch_size, config.max_context, config.scheduling())
