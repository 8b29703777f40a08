"""The planner deployment's bookkeeping without a Ray cluster: the class Serve wraps, with Serve's calls replaced.
What a live cluster shows (re-plans on join and leave, no stream lost) is in test_replan_ray.py."""

import asyncio

import pytest

from deployments import planner as planner_module
from llmpq_serve.config import ServeConfig
from llmpq_serve.runtime.shard import StageSpec


def bare_planner(**state) -> object:
    """A Planner's state as its __init__ leaves it, without the replica context and the watch task it starts."""
    p = object.__new__(planner_module.Planner.func_or_class)
    p.config = ServeConfig(model="m")
    p.path, p.quant = "ckpt", None
    p.app_prefix, p.prefix = "app-stages-", "app-stages-new-"
    p.watching = True
    p.generation, p.current, p.stage_app, p.error = 0, None, None, None
    p.replans, p._layout = 0, None
    p._changed = asyncio.Condition()
    p.__dict__.update(state)
    return p


def test_a_restarted_planners_first_stages_are_new_to_the_router():
    """Serve restarted the planner: it counts from generation 1 again and has deleted the stages the router serves
    on. The router, at generation 3 of the planner before, must still take them."""
    async def go():
        p = bare_planner(generation=1, current={"generation": 1, "planner": "app-stages-new-", "stages": []})
        fresh = await p.next_stages(3, None, "app-stages-old-")
        same = await asyncio.wait_for(p.next_stages(1, None, "app-stages-new-"), 10)
        return fresh, same

    fresh, same = asyncio.run(go())
    assert fresh["generation"] == 1 and same == {}


def test_a_failed_deploy_takes_its_stages_down_and_a_later_old_plan_is_deployed_again(monkeypatch):
    """The old stages are deleted, the new ones fail to start: those go too (they would hold GPUs), and when the
    cluster comes back to the old plan it is deployed again, not taken as still there."""
    deleted, runs = [], []
    old = ([("T4", StageSpec(0, 4, (16,) * 4, True, True))], 1, 1, {})
    new = ([("T4", StageSpec(0, 4, (8,) * 4, True, True))], 1, 1, {})
    plans = iter([new, old])

    def run(app, name, route_prefix):
        runs.append(name)
        raise RuntimeError("stage0 failed to load")

    monkeypatch.setattr(planner_module, "solve_plan", lambda *args: next(plans))
    monkeypatch.setattr(planner_module, "stage_app", lambda *args: "app")
    monkeypatch.setattr(planner_module.serve, "delete", lambda name, **kw: deleted.append(name))
    monkeypatch.setattr(planner_module.serve, "run", run)
    nodes = [{"Alive": True, "Resources": {"GPU": 1, "accelerator_type:T4": 1}}]
    p = bare_planner(generation=2, stage_app="app-stages-new-2", _layout=old[:3])
    try:
        for _ in range(2):
            with pytest.raises(RuntimeError, match="failed to load"):
                asyncio.run(p._deploy(nodes))
        assert deleted == ["app-stages-new-2", "app-stages-new-3", "app-stages-new-3"]
        assert runs == ["app-stages-new-3", "app-stages-new-3"] and p.stage_app is None
    finally:
        p.stage_app = None  # its __del__ must not reach a real Serve once the fakes are gone


def test_fixed_stages_must_follow_each_other_from_layer_0():
    for stages, says in [([(0, 4, [16] * 4), (5, 8, [16] * 3)], "must start at 4"),
                         ([(0, 4, [16] * 4), (3, 8, [16] * 5)], "must start at 4"),
                         ([(1, 4, [16] * 3)], "must start at 0")]:
        with pytest.raises(ValueError, match=says):
            StageSpec.chain(stages)
