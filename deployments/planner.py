"""The planner actor: solves the plan for the cluster as it is, deploys the plan's stages as an application of their
own and hands them to the router; then watches the cluster's GPU nodes and does it again when they change.

The stages live in their own application so that a re-plan can take them down without touching the router: the
router's scheduler holds every request meanwhile and prefills each again on the new stages with what it had
produced (Scheduler.switch), so clients see their streams go on."""

from __future__ import annotations

import asyncio
import logging
import os
import uuid
from collections import Counter
from typing import Any

import ray
from ray import serve
from ray.serve import Application

from deployments.router import CONTROL_PLANE, STARTING
from deployments.stage import StageDeployment
from llmpq_serve.config import ServeConfig
from llmpq_serve.runtime.shard import QuantOptions, StageSpec, default_quant_dir
from llmpq_serve.server.errors import NOT_LOADED
from llmpq_serve.spec import GPUSpec, ModelSpec, accelerator_types, slot_count

logger = logging.getLogger("llmpq")


# Serve gives every application's ingress replica, this one too, a direct-ingress HTTP server in its throughput-optimized
# mode, and holds such a replica open for 30 s when it goes down, for load balancers to deregister it. None points
# at this one, and a re-plan waits for the old stage application to go before deploying the new one.
NO_DRAIN = {"env_vars": {"RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "0"}}
FP16_ONLY = "none needed: quality fp16 keeps every layer at 16 bits"
# Stage replicas answer control calls only (the ring carries the micro-batches): nothing to wait for at shutdown.
QUICK_SHUTDOWN = {"graceful_shutdown_wait_loop_s": 0.1, "graceful_shutdown_timeout_s": 5}


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0, "runtime_env": NO_DRAIN}, **QUICK_SHUTDOWN)
class StageSet:
    """The stage application's ingress: the stages' handles, in pipeline order."""

    def __init__(self, *stages):
        self.stages = list(stages)

    def handles(self) -> list:
        return self.stages


def stage_app(config: ServeConfig, path: str, quant: QuantOptions, stages: list[tuple[str, StageSpec]],
              decode_micro_batch: int) -> Application:
    """One stage deployment per planned stage, pinned to its GPU type."""
    slots = slot_count(config.workload.batch_size, decode_micro_batch)
    threads = max(1, (os.cpu_count() or 1) // len(stages))  # used only by stages that end up on a CPU
    return StageSet.bind(*[
        StageDeployment.options(name=f"stage{i}", **QUICK_SHUTDOWN, ray_actor_options={
            "num_gpus": 1, "num_cpus": 0, "accelerator_type": ray_type}).bind(
            path, spec, slots, config.max_context, quant, threads)
        for i, (ray_type, spec) in enumerate(stages)])


def checked_stages(config: ServeConfig, model: ModelSpec) -> list[tuple[str, StageSpec]] | None:
    """What of the config can be checked against the model before any planning, checked (`serve run` calls it, so
    that a mistake stops it rather than the planner's every poll): the context, and fixed stages, returned as
    (accelerator type, stage) pairs (None without)."""
    if config.max_context > model.max_pos:
        raise ValueError(f"max_context {config.max_context} exceeds the model's {model.max_pos} positions")
    if config.stages is None:
        return None
    specs = StageSpec.chain([(s.layers[0], s.layers[1], s.bits or [16] * (s.layers[1] - s.layers[0]))
                             for s in config.stages])
    if specs[-1].end != model.layers:
        raise ValueError(f"the fixed stages end at layer {specs[-1].end}, the model has {model.layers} layers")
    return [(s.accelerator_type, spec) for s, spec in zip(config.stages, specs)]


def solve_plan(config: ServeConfig, path, quant: QuantOptions) -> tuple[list[tuple[str, StageSpec]], int, int, dict]:
    """((accelerator type, stage) per stage, prefill micro-batch, decode micro-batch, the plan as JSON)."""
    model = ModelSpec.from_checkpoint(path)
    stages = checked_stages(config, model)
    if stages is not None:
        doc = {"fixed": [s.model_dump() for s in config.stages], "prefill_micro_batch": config.prefill_micro_batch,
               "decode_micro_batch": config.decode_micro_batch}
        return stages, config.prefill_micro_batch, config.decode_micro_batch, doc

    from llmpq_serve.costmodel import SUPPORTED_BITS, CostModel
    from llmpq_serve.indicator import Indicator
    from llmpq_serve.planner import InfeasibleError, Problem, plan
    from llmpq_serve.quant.apply import QuantCache
    from llmpq_serve.runtime.local import stage_specs
    from llmpq_serve.runtime.quantized import checkpoint_indicator

    cluster = config.cluster_spec()
    if not cluster.devices:
        raise ValueError("the Ray cluster shows no GPUs with an accelerator_type; start nodes with --num-gpus and "
                         "--resources '{\"accelerator_type:<TYPE>\": 1}' (see the README), or give cluster: <yaml>")
    if config.quality == "fp16":
        # the budget, the model at fp16, keeps every layer at 16 bits whatever ω says (and θ then has nothing to
        # trade): calibrating ω would only delay the first plan by minutes
        indicator = Indicator.analytic(model).model_copy(update={"source": FP16_ONLY})
        bits = (16,)
    else:
        indicator = checkpoint_indicator(path, model.arch, quant, QuantCache(quant.cache_dir or default_quant_dir()))
        bits = SUPPORTED_BITS
    problem = Problem(model, cluster, config.workload, cost=CostModel(model), indicator=indicator, bits=bits,
                      context=config.max_context)
    problem = problem.with_target(config.theta, None, config.quality)
    try:
        result = plan(problem, config.method, time_limit=config.plan_time_limit)
    except InfeasibleError as e:
        if bits == (16,):  # the way out the planner's message cannot see: it was given 16 bits only
            raise InfeasibleError(f"{e} Quality fp16 keeps every layer's weights at 16 bits; with quality int8, "
                                  "awq4 or awq3 they take less memory.") from None
        raise
    logger.info("plan:\n%s", result.table())
    types = [GPUSpec.from_catalog(s.device.gpu).ray_type for s in result.stages]
    return (list(zip(types, stage_specs(result))), result.prefill_micro_batch, result.decode_micro_batch,
            result.model_dump(mode="json"))


def gpus_by_type(nodes: list[dict]) -> Counter:
    """GPUs the alive nodes of `ray.nodes()` offer, per accelerator type."""
    offered: Counter = Counter()
    for n in nodes:
        if n["Alive"]:
            for ray_type in accelerator_types(n["Resources"]):
                offered[ray_type] += n["Resources"].get("GPU", 0)
    return offered


def unplaceable(types: list[str], offered: Counter) -> str | None:
    """Why stages of these accelerator types (one GPU each) cannot all be placed, or None: Serve would wait for
    the missing GPUs forever."""
    for ray_type, needed in Counter(types).items():
        if needed > offered[ray_type]:
            have = ", ".join(f"{t}: {n:g}" for t, n in sorted(offered.items())) or "none"
            return (f"{needed} stage(s) need a GPU of accelerator_type {ray_type!r}, the alive nodes offer "
                    f"{offered[ray_type]:g} (GPUs by type: {have})")
    return None


def gpu_nodes(nodes: list[dict]) -> frozenset:
    """The alive nodes of `ray.nodes()` that offer GPUs, with their accelerator types and GPU counts: what a plan
    depends on."""
    return frozenset((n["NodeID"], tuple(sorted(accelerator_types(n["Resources"]))), n["Resources"]["GPU"])
                     for n in nodes if n["Alive"] and n["Resources"].get("GPU"))


def starting_reason(app, types: list[str]) -> str:
    """Why the stages of `app` (Serve's status of the stage application; `types`: each stage's accelerator type)
    do not serve yet, for /healthz."""
    waiting = []
    for i, ray_type in enumerate(types):
        d = app.deployments.get(f"stage{i}")
        if d is None or d.status != "HEALTHY":
            waiting.append(f"stage{i} ({ray_type}): " + (d.message if d is not None and d.message else "starting"))
    return f"{STARTING}; not up yet: {'; '.join(waiting)}"


def start_failure(app) -> str:
    """What Serve says went wrong in a stage application that failed to deploy."""
    said = [f"{name}: {d.message}" for name, d in app.deployments.items() if d.message and d.status != "HEALTHY"]
    return "; ".join(said or [app.message or app.status])


PLANNING = (f"{NOT_LOADED}: the planner is solving the plan (a model's first plan below quality fp16 also "
            "calibrates its quality indicator, which takes minutes; the planner's log shows progress)")
DEPLOY_POLL_S = 1.0  # how often the planner looks at starting stages (and the cluster under them)

# The router's poll for new stages is a request in flight here. Serve runs __del__, which takes the stage application
# down with the app, only once no request is: so a poll returns after STAGES_POLL_S at the latest, and the shutdown
# timeout covers the one in flight and one more that may arrive before the router hears that this replica is going.
STAGES_POLL_S = 2.0


@serve.deployment(num_replicas=1, ray_actor_options=CONTROL_PLANE, graceful_shutdown_wait_loop_s=0.1,
                  graceful_shutdown_timeout_s=2 * STAGES_POLL_S + 2)
class Planner:
    def __init__(self, args: dict[str, Any]):
        self.config = ServeConfig.model_validate(args)
        self.path = self.config.checkpoint()
        self.quant = QuantOptions(self.config.quant_method, self.config.group_size)
        # this planner's own names: a redeployed app's new planner never takes over an old one's stages
        self.app_prefix = f"{serve.get_replica_context().app_name}-stages-"
        self.prefix = f"{self.app_prefix}{uuid.uuid4().hex[:6]}-"
        # only a plan for the live cluster changes with it: fixed stages and a cluster file are deployed once
        self.watching = self.config.stages is None and self.config.cluster == "ray"
        self.generation, self.current, self.stage_app, self.reason = 0, None, None, None
        self.replans, self._layout, self._closing = 0, None, False
        self._changed = asyncio.Condition()
        self._watcher = asyncio.get_event_loop().create_task(self._watch())

    async def next_stages(self, after: int, reason_seen: str | None = None, planner: str | None = None) -> dict:
        """Waits for a deployment newer than generation `after` and returns it: {"generation", "planner" (this
        planner's id), "stages" (handles in pipeline order), "plan", "prefill_micro_batch", "decode_micro_batch"};
        or, first, for the planner's `reason` (why no new stages serve yet: an error, or the stages still starting)
        to differ from `reason_seen`, and returns {"reason": it or None}; or, after STAGES_POLL_S with neither, {}.
        The router follows these, asking again each time. `planner`: the id of the last deployment's planner; every
        deployment of another one (this one, restarted by Serve, counts generations from 0 again and has deleted the
        stages of the one before) is newer."""
        if planner is not None and planner != self.prefix:
            after = 0
        async with self._changed:
            try:
                await asyncio.wait_for(
                    self._changed.wait_for(lambda: self._newer(after) or self.reason != reason_seen),
                    STAGES_POLL_S)
            except asyncio.TimeoutError:  # not TimeoutError: on Python 3.10 the two differ
                return {}
            # "serving": whether the last stages handed out still serve (a re-plan deletes them before the new ones
            # are up: the router's requests then wait, and its probe says why)
            return self.current if self._newer(after) else {"reason": self.reason, "serving": self.current is not None}

    def _newer(self, after: int) -> bool:
        return self.generation > after and self.current is not None

    def status(self) -> dict:
        return {"generation": self.generation, "stage_app": self.stage_app, "replans": self.replans,
                "watching": self.watching, "reason": self.reason, "node": ray.get_runtime_context().get_node_id()}

    async def _watch(self) -> None:
        seen, cleaned = None, False
        while not self._closing:
            try:  # a failed call to Ray's control store must not end the watch: it is tried again at the next poll
                if not cleaned:
                    await asyncio.to_thread(self._remove_stale_stage_apps)
                    cleaned = True
                nodes = await asyncio.to_thread(ray.nodes)
                members = gpu_nodes(nodes)
                # also when nothing serves: a re-plan that deleted the old stages and whose new ones never came
                # up would otherwise wait for the cluster to change again, its requests failing meanwhile
                if (members != seen or self._layout is None) and await self._deploy(nodes):
                    seen = members
                    await self._report(None)
            except Exception as e:  # reported to the router and by status()
                logger.exception("planning or deploying the stages failed")
                await self._report(f"the planner could not deploy the stages (it tries again): "
                                   f"{type(e).__name__}: {e}")
            if seen is not None and not self.watching:
                return
            await asyncio.sleep(self.config.replan_poll_s)

    async def _report(self, reason: str | None) -> None:
        async with self._changed:
            self.reason = reason
            self._changed.notify_all()

    async def _deploy(self, nodes: list[dict]) -> bool:
        """Solves the plan for `nodes` and deploys its stages unless they already serve. False when nodes the stages
        need left before the stages were up: those stages are deleted, the plan being one for a cluster gone."""
        await self._report(PLANNING)
        stages, prefill_mb, decode_mb, doc = await asyncio.to_thread(solve_plan, self.config, self.path, self.quant)
        why = unplaceable([t for t, _ in stages], gpus_by_type(nodes))
        if why is not None:
            raise ValueError(why)
        if (stages, prefill_mb, decode_mb) == self._layout:
            logger.info("the cluster changed but the plan did not: the stages stay")
            return True
        if self.stage_app is not None:  # the new stages need the old ones' GPUs; the router holds the requests
            await asyncio.to_thread(serve.delete, self.stage_app)
            # gone: should the cluster come back to the old plan, it must be deployed again, not kept; and a router
            # (re)starting meanwhile must not be handed them
            self.stage_app = self._layout = self.current = None
        if self._closing:  # stages deployed after the app's cleanup would hold their GPUs with nobody to delete them
            raise RuntimeError("the app is going down")
        name = f"{self.prefix}{self.generation + 1}"
        app = stage_app(self.config, str(self.path), self.quant, stages, decode_mb)
        self.stage_app = name  # deploying or deployed, it goes down with the app (__del__)
        try:
            # not serve.run: it waits for the stages however long their GPUs stay taken, with no word on why, and
            # meanwhile the cluster could change under a plan made for it
            [ingress] = await asyncio.to_thread(serve.run_many, [serve.RunTarget(app, name=name, route_prefix=None)],
                                                wait_for_applications_running=False)
            up = await self._until_running(name, [t for t, _ in stages])
            handles = await ingress.handles.remote() if up else None
        except Exception:  # a stage that failed to start: its siblings would hold their GPUs
            await self._drop(name)
            raise
        if not up:
            logger.info("nodes the stages of %s need left while they started: planning again", name)
            await self._drop(name)
            return False
        async with self._changed:
            self.replans += self.generation > 0
            self.generation += 1
            self.current = {"generation": self.generation, "planner": self.prefix, "stages": handles, "plan": doc,
                            "prefill_micro_batch": prefill_mb, "decode_micro_batch": decode_mb}
            self._layout = (stages, prefill_mb, decode_mb)
            self._changed.notify_all()
        logger.info("stages of plan generation %d deployed as %s", self.generation, name)
        return True

    async def _drop(self, name: str) -> None:
        """Deletes the stage application `name`, which never served."""
        self.stage_app = None
        await asyncio.to_thread(serve.delete, name)

    async def _until_running(self, name: str, types: list[str]) -> bool:
        """Waits for the stage application `name` to run, reporting meanwhile which stages are not up yet and what
        Serve says of them (a stage waiting for a GPU another application holds, one slow to load). False when the
        alive nodes no longer offer the stages' GPUs (nodes joining leave the stages be: the watch re-plans once
        they are up); raises when a stage fails to start."""
        while True:
            app = (await asyncio.to_thread(serve.status)).applications.get(name)
            if app is None:
                raise RuntimeError(f"the stage application {name} was deleted while it started")
            if app.status == "RUNNING":
                return True
            if app.status in ("DEPLOY_FAILED", "UNHEALTHY"):
                raise RuntimeError(f"the stages failed to start: {start_failure(app)}")
            await self._report(starting_reason(app, types))
            if unplaceable(types, gpus_by_type(await asyncio.to_thread(ray.nodes))) is not None:
                return False
            await asyncio.sleep(DEPLOY_POLL_S)

    def _remove_stale_stage_apps(self) -> None:
        """Stage applications of an earlier planner of this app (a redeploy, a crash) hold GPUs nobody uses."""
        for name in serve.status().applications:
            if name.startswith(self.app_prefix) and not name.startswith(self.prefix):
                serve.delete(name)

    def __del__(self) -> None:  # Serve calls it when the app goes down: the stages go with it
        self._closing = True  # a flag, not the watch task's cancel: this may run on another thread than its loop
        if getattr(self, "stage_app", None) is not None:
            try:
                serve.delete(self.stage_app, _blocking=False)
            except Exception:  # Serve itself is going down (serve.shutdown): it takes every app along
                logger.warning("could not delete the stage application %s", self.stage_app, exc_info=True)
