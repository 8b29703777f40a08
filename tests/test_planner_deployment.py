"""The planner deployment's bookkeeping without a Ray cluster: the class Serve wraps, with Serve's calls replaced.
What a live cluster shows (re-plans on join and leave, no stream lost) is in test_replan_ray.py."""

import asyncio
from types import SimpleNamespace

import pytest
from pydantic import ValidationError

from deployments import planner as planner_module
from llmpq_serve.config import ServeConfig
from llmpq_serve.runtime.shard import QuantOptions, StageSpec


def bare_planner(**state) -> object:
    """A Planner's state as its __init__ leaves it, without the replica context and the watch task it starts."""
    p = object.__new__(planner_module.Planner.func_or_class)
    p.config = ServeConfig(model="m")
    p.path, p.quant = "ckpt", None
    p.app_prefix, p.prefix = "app-stages-", "app-stages-new-"
    p.watching = True
    p.generation, p.current, p.stage_app, p.reason = 0, None, None, None
    p.replans, p._layout, p._closing = 0, None, False
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


T4_NODE = {"Alive": True, "Resources": {"GPU": 1, "accelerator_type:T4": 1}}
ONE_T4_STAGE = ([("T4", StageSpec(0, 4, (16,) * 4, True, True))], 1, 1, {})


class FakeServe:
    """Serve's calls the planner makes, over stage applications whose states a test scripts: `states` is the
    sequence of (application status, stage0's deployment message) that serve.status() walks through."""

    def __init__(self, monkeypatch, states=(("RUNNING", ""),), fail_run: str | None = None, nodes=(T4_NODE,)):
        self.deleted, self.runs, self.states, self.fail_run = [], [], list(states), fail_run
        self.nodes = iter(nodes)
        self.node_list = [T4_NODE]
        monkeypatch.setattr(planner_module, "stage_app", lambda *args: "app")
        monkeypatch.setattr(planner_module, "DEPLOY_POLL_S", 0)
        monkeypatch.setattr(planner_module.serve, "delete", lambda name, **kw: self.deleted.append(name))
        monkeypatch.setattr(planner_module.serve, "run_many", self.run_many)
        monkeypatch.setattr(planner_module.serve, "status", self.status)
        monkeypatch.setattr(planner_module.ray, "nodes", self.ray_nodes)

    def run_many(self, targets, wait_for_applications_running):
        assert not wait_for_applications_running
        self.runs.append(targets[0].name)
        if self.fail_run:
            raise RuntimeError(self.fail_run)

        async def handles():
            return ["stage0 handle"]
        return [SimpleNamespace(handles=SimpleNamespace(remote=handles))]

    def status(self):
        status, message = self.states.pop(0) if len(self.states) > 1 else self.states[0]
        stage0 = SimpleNamespace(status="HEALTHY" if status == "RUNNING" else "UPDATING", message=message)
        app = SimpleNamespace(status=status, message="", deployments={"stage0": stage0})
        return SimpleNamespace(applications={name: app for name in self.runs})

    def ray_nodes(self):
        self.node_list = [next(self.nodes, self.node_list[0])]
        return self.node_list


def test_a_failed_deploy_takes_its_stages_down_and_a_later_old_plan_is_deployed_again(monkeypatch):
    """The old stages are deleted, the new ones fail to start: those go too (they would hold GPUs), and when the
    cluster comes back to the old plan it is deployed again, not taken as still there. A stage may fail at once
    or once Serve has tried to start it."""
    new = ([("T4", StageSpec(0, 4, (8,) * 4, True, True))], 1, 1, {})
    plans = iter([new, ONE_T4_STAGE])
    monkeypatch.setattr(planner_module, "solve_plan", lambda *args: next(plans))
    p = bare_planner(generation=2, stage_app="app-stages-new-2", _layout=ONE_T4_STAGE[:3])
    try:
        fake = FakeServe(monkeypatch, fail_run="stage0 failed to load")
        with pytest.raises(RuntimeError, match="failed to load"):
            asyncio.run(p._deploy([T4_NODE]))
        fake = FakeServe(monkeypatch, states=[("DEPLOYING", ""), ("DEPLOY_FAILED", "CUDA out of memory")])
        with pytest.raises(RuntimeError, match="the stages failed to start: stage0: CUDA out of memory"):
            asyncio.run(p._deploy([T4_NODE]))
        assert fake.deleted == ["app-stages-new-3"] and fake.runs == ["app-stages-new-3"] and p.stage_app is None
    finally:
        p.stage_app = None  # its __del__ must not reach a real Serve once the fakes are gone


def test_stages_waiting_for_their_gpus_say_why_and_serve_once_up(monkeypatch):
    """Another application holds the GPU: the planner does not block in serve.run but reports, as the router's
    not-ready reason, that it plans, then which stage waits and what Serve says of it; once the stage runs, its
    handles are served."""
    waiting = "has 1 replicas that have taken more than 30s to be scheduled"
    fake = FakeServe(monkeypatch, states=[("DEPLOYING", ""), ("DEPLOYING", waiting), ("RUNNING", "")])
    monkeypatch.setattr(planner_module, "solve_plan", lambda *args: ONE_T4_STAGE)
    p = bare_planner()
    reasons = []

    async def go():
        follow = asyncio.create_task(follow_reasons())
        assert await p._deploy([T4_NODE])
        follow.cancel()

    async def follow_reasons():
        while True:
            update = await p.next_stages(0, reasons[-1] if reasons else None)
            if "reason" in update:
                reasons.append(update["reason"])

    try:
        asyncio.run(go())
        assert reasons[0] == planner_module.PLANNING
        assert any(r.endswith("not up yet: stage0 (T4): starting") for r in reasons)
        assert any(r.endswith(f"stage0 (T4): {waiting}") for r in reasons)
        assert p.generation == 1 and p.current["stages"] == ["stage0 handle"] and fake.deleted == []
    finally:
        p.stage_app = None


def test_stages_whose_node_leaves_while_they_start_are_dropped_for_a_new_plan(monkeypatch):
    """The T4 node the starting stage waits for leaves: that stage would wait forever, so the planner deletes it
    and returns for the watch to plan again; a node joining meanwhile leaves the starting stages be."""
    v100 = {"Alive": True, "Resources": {"GPU": 1, "accelerator_type:V100": 1}}
    monkeypatch.setattr(planner_module, "solve_plan", lambda *args: ONE_T4_STAGE)
    fake = FakeServe(monkeypatch, states=[("DEPLOYING", "")], nodes=[T4_NODE, T4_NODE, v100])
    p = bare_planner()
    try:
        assert asyncio.run(p._deploy([T4_NODE])) is False
        assert fake.deleted == fake.runs == ["app-stages-new-1"] and p.stage_app is None and p.generation == 0
    finally:
        p.stage_app = None


def test_fixed_stages_must_follow_each_other_from_layer_0():
    for stages, says in [([(0, 4, [16] * 4), (5, 8, [16] * 3)], "must start at 4"),
                         ([(0, 4, [16] * 4), (3, 8, [16] * 5)], "must start at 4"),
                         ([(1, 4, [16] * 3)], "must start at 0")]:
        with pytest.raises(ValueError, match=says):
            StageSpec.chain(stages)


@pytest.mark.parametrize("quality, theta", [("fp16", None), ("fp16", 2.0), ("int8", None), (None, 1.0)])
def test_only_a_target_below_fp16_waits_for_the_calibrated_indicator(demo_checkpoint, monkeypatch, tmp_path, quality,
                                                                     theta):
    """Calibrating the checkpoint's indicator takes minutes on a model's first plan; quality fp16 keeps every layer
    at 16 bits whatever it says, so a plan for it does not wait for one."""
    from llmpq_serve.indicator import Indicator
    from llmpq_serve.runtime import quantized

    path = demo_checkpoint("llama")
    calibrated = []

    def checkpoint_indicator(path, arch, options, cache):
        calibrated.append(path)
        return Indicator(source="calibrated: stand-in", omega=[{16: 0.0, 8: 1e-4, 4: 1e-2, 3: 5e-2}] * 3)

    monkeypatch.setattr(quantized, "checkpoint_indicator", checkpoint_indicator)
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text("name: t4-v100\nnodes:\n  - {name: a, devices: [{type: T4, count: 1}]}\n"
                       "  - {name: b, devices: [{type: V100-SXM2-32GB, count: 1}]}\n")
    config = ServeConfig(model=str(path), cluster=str(cluster), quality=quality,
                         theta=theta, plan_time_limit=5)
    stages, _, _, plan = planner_module.solve_plan(config, path, QuantOptions())
    bits = [b for s in plan["stages"] for b in s["bits"]]
    if quality == "fp16":
        assert not calibrated and plan["indicator"] == planner_module.FP16_ONLY and set(bits) == {16}
    else:
        assert calibrated == [path] and plan["indicator"] == "calibrated: stand-in"
    assert sum(spec.end - spec.start for _, spec in stages) == len(bits) == 3


def test_an_fp16_plan_that_does_not_fit_points_at_a_lower_quality(demo_checkpoint, tmp_path):
    from llmpq_serve.planner import InfeasibleError

    path = demo_checkpoint("llama")
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text("name: t4\nnodes:\n  - {name: a, devices: [{type: T4, count: 1}]}\n")
    # KV-cache slots for 40000 requests of 512 tokens: 60 GB, beyond a T4
    config = ServeConfig(model=str(path), cluster=str(cluster), quality="fp16", plan_time_limit=5, max_context=512,
                         workload={"batch_size": 40000, "prompt_len": 256, "gen_len": 256})
    with pytest.raises(InfeasibleError, match="with quality int8, awq4 or awq3 they take less memory"):
        planner_module.solve_plan(config, path, QuantOptions())


def test_serve_run_refuses_a_wrong_cluster_file_and_hands_on_absolute_paths(tmp_path, monkeypatch):
    """`serve run` builds the app where it runs; the planner actor reads the files wherever Ray puts it. A cluster
    file it could not read must stop `serve run` itself, and relative paths must not reach the actors."""
    from deployments import app as app_module

    checkpoint = tmp_path / "ckpt"
    tiny_config().save_pretrained(checkpoint)
    bad = tmp_path / "bad.yaml"
    bad.write_text("devices: [{type: X100, count: 1}]\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"cluster file bad.yaml: .*unknown GPU type 'X100'"):
        app_module.build_app({"model": "ckpt", "cluster": "bad.yaml"})
    (tmp_path / "good.yaml").write_text("devices: [{type: T4, count: 2}]\n")
    bound = {}
    monkeypatch.setattr(app_module, "Planner", SimpleNamespace(bind=lambda args: bound.setdefault("planner", args)))
    monkeypatch.setattr(app_module, "Router", SimpleNamespace(bind=lambda *args: bound.setdefault("router", args)))
    app_module.build_app({"model": "ckpt", "cluster": "good.yaml", "quality": "fp16"})
    assert bound["planner"]["model"] == str(checkpoint) and bound["planner"]["cluster"] == str(tmp_path / "good.yaml")
    assert bound["planner"]["quality"] == "fp16" and bound["router"][1] == str(checkpoint)


def tiny_config():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=8,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)


@pytest.mark.parametrize("wrong, says", [
    ({"stages": []}, "at least 1 item"),
    ({"stages": [{"accelerator_type": "T4", "layers": [0, 4]}]}, "end at layer 4, the model has 8 layers"),
    ({"stages": [{"accelerator_type": "T4", "layers": [0, 4]}, {"accelerator_type": "T4", "layers": [5, 8]}]},
     "must start at 4"),
    ({"stages": [{"accelerator_type": "T4", "layers": [0, 8], "bits": [16] * 7}]}, "7 bit-widths for the 8 layers"),
    ({"stages": [{"accelerator_type": "T4", "layers": [0, 8], "bits": [5] * 8}]}, r"bit-widths \[5\]"),
    ({"stages": [{"accelerator_type": "T4", "layers": [4, 4]}]}, "0 <= first < end"),
    ({"max_context": 8192}, "max_context 8192 exceeds the model's 1024 positions"),
])
def test_serve_run_refuses_what_the_planner_would_refuse_at_every_poll(tmp_path, monkeypatch, wrong, says):
    from deployments import app as app_module

    tiny_config().save_pretrained(tmp_path)
    fixed = {"prefill_micro_batch": 1, "decode_micro_batch": 1} if "stages" in wrong else {}
    with pytest.raises((ValueError, ValidationError), match=says):
        app_module.build_app({"model": str(tmp_path), **fixed, **wrong})


def test_a_misspelt_method_fails_the_config_not_the_planner_later():
    from pydantic import ValidationError

    from llmpq_serve.config import PLAN_METHODS
    from llmpq_serve.planner import METHODS

    assert set(PLAN_METHODS) == set(METHODS)
    with pytest.raises(ValidationError, match="llmpq_fast"):
        ServeConfig(model="m", method="llmpqq")


def test_a_ray_clusters_gpu_variants_and_inter_node_bandwidth_come_from_the_config(monkeypatch):
    """Ray says V100, not which V100: the smallest (of the same memory, the slowest: PCIe) is planned for unless the
    config names another."""
    nodes = [{"Alive": True, "NodeID": "a" * 16, "Resources": {"GPU": 2, "accelerator_type:V100": 1}},
             {"Alive": True, "NodeID": "b" * 16, "Resources": {"GPU": 1, "accelerator_type:A100": 1}}]
    monkeypatch.setattr(planner_module.ray, "nodes", lambda: nodes)
    default = ServeConfig(model="m").cluster_spec()
    assert sorted(d.gpu for d in default.devices) == ["A100-SXM4-40GB", "V100-PCIE-16GB", "V100-PCIE-16GB"]
    assert default.inter_node_gbs == 3.0
    given = ServeConfig(model="m", gpu_variants={"V100": "V100-SXM2-32GB"}, inter_node_gbs=12.5).cluster_spec()
    assert sorted(d.gpu for d in given.devices) == ["A100-SXM4-40GB", "V100-SXM2-32GB", "V100-SXM2-32GB"]
    assert given.inter_node_gbs == 12.5
    with pytest.raises(ValidationError, match="not a catalog GPU of accelerator_type 'V100'; choose from V100-"):
        ServeConfig(model="m", gpu_variants={"V100": "A100-SXM4-80GB"})
    with pytest.raises(ValidationError, match="no accelerator_type 'X9'"):
        ServeConfig(model="m", gpu_variants={"X9": "T4"})


def test_a_replan_whose_new_stages_never_came_up_is_deployed_again_on_the_cluster_it_came_back_to(monkeypatch):
    """A V100 joins: the re-plan deletes the T4 stages and starts V100 ones; the V100 leaves before they are up, and
    they are dropped. The cluster is the one of the last deployment again, but nothing serves: the watch deploys
    again instead of waiting for the cluster to change (while the router's requests time out), and a router asking
    meanwhile is not handed the deleted stages."""
    t4 = {"Alive": True, "NodeID": "t4", "Resources": {"GPU": 1, "accelerator_type:T4": 1}}
    v100 = {"Alive": True, "NodeID": "v100", "Resources": {"GPU": 1, "accelerator_type:V100": 1}}
    on_v100 = ([("V100", StageSpec(0, 4, (16,) * 4, True, True))], 1, 1, {})
    views = iter([[t4], [t4, v100], [t4]])
    seen: list[list[dict]] = []

    def nodes():
        seen.append(next(views, [t4]))
        return seen[-1]

    fake = FakeServe(monkeypatch, states=[("RUNNING", ""), ("RUNNING", ""), ("DEPLOYING", ""), ("RUNNING", "")])
    monkeypatch.setattr(planner_module.ray, "nodes", nodes)
    monkeypatch.setattr(planner_module, "solve_plan",
                        lambda *args: on_v100 if v100 in seen[-1] else ONE_T4_STAGE)
    p = bare_planner(config=ServeConfig(model="m", replan_poll_s=0.01))
    handed = []

    async def go():
        watch = asyncio.create_task(p._watch())
        while len(fake.runs) < 2 or fake.runs[-1] not in fake.deleted:
            await asyncio.sleep(0.01)
        handed.append(await p.next_stages(0))  # the V100 stages dropped, the T4 ones deleted before them
        while p.current is None:
            await asyncio.sleep(0.01)
        watch.cancel()

    try:
        asyncio.run(asyncio.wait_for(go(), 10))
        assert fake.runs == ["app-stages-new-1", "app-stages-new-2", "app-stages-new-2"]
        assert fake.deleted == ["app-stages-new-1", "app-stages-new-2"]
        assert "stages" not in handed[0] and handed[0]["serving"] is False
        assert p.generation == 2 and p.current["stages"] == ["stage0 handle"]
    finally:
        p.stage_app = None


def test_the_router_says_not_ready_while_the_planners_last_stages_are_gone():
    from deployments import router as router_module

    updates = iter([{"reason": "the planner is deploying the stages", "serving": False},
                    {"reason": "the planner is deploying the stages", "serving": True}])
    states = []

    async def next_stages(*args):
        states.append(r.paused)
        try:
            return next(updates)
        except StopIteration:
            await asyncio.Event().wait()  # nothing more

    # the router's state, not an instance: Serve's ingress wrapper has a coroutine __del__, never awaited outside it
    r = SimpleNamespace(generation=1, planner_id="p", not_ready=router_module.STARTING, paused=None)
    follow_stages = router_module.Router.func_or_class._follow

    async def go():
        follow = asyncio.create_task(follow_stages(r, SimpleNamespace(next_stages=SimpleNamespace(remote=next_stages))))
        while len(states) < 3:
            await asyncio.sleep(0.01)
        follow.cancel()

    asyncio.run(asyncio.wait_for(go(), 10))
    assert states == [None, "the planner is deploying the stages", None]


def test_a_planner_going_down_deploys_no_more_stages(monkeypatch):
    """Serve deleted the app (the planner's __del__ ran) while a re-plan solved: stages deployed after the cleanup
    would hold their GPUs with nobody left to delete them."""
    fake = FakeServe(monkeypatch)
    monkeypatch.setattr(planner_module, "solve_plan", lambda *args: ONE_T4_STAGE)
    p = bare_planner()
    p.__del__()
    with pytest.raises(RuntimeError, match="going down"):
        asyncio.run(p._deploy([T4_NODE]))
    assert fake.runs == []
    asyncio.run(asyncio.wait_for(p._watch(), 5))  # returns at once
