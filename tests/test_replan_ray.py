"""The planner actor on a live multi-node Ray cluster, in Serve's throughput-optimized mode: a GPU node joining makes
it re-plan and redeploy the stages, one leaving in the middle of streamed generations too, and no stream is lost:
each goes on, uninterrupted, to exactly HF's greedy output. Deleting the app takes its stages down."""

import threading
import time

import httpx
import pytest
import ray
from ray import serve

from llmpq_serve.runtime.ring import free_port
from tests.test_runtime import PROMPTS, hf_greedy
from tests.test_serve_ray import wait_ready

NEW = 400


@pytest.fixture()
def cluster(monkeypatch):
    """A head node and one T4 node, with Serve started in its throughput-optimized mode, which `make serve` runs
    (deployments/simulated_cluster.py; the Ray processes started here inherit it): (cluster, the proxy's URL)."""
    from ray.cluster_utils import Cluster

    from deployments.simulated_cluster import throughput_optimized_env

    for name, value in throughput_optimized_env(free_port(), 10).items():
        monkeypatch.setenv(name, value)
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    try:
        c.add_node(num_cpus=1, num_gpus=1, resources={"accelerator_type:T4": 1})
        c.wait_for_nodes()
        ray.init(address=c.address, log_to_driver=False)
        port = free_port()
        # one proxy, on the head: a proxy on a node that leaves would take its connections with it
        serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
        yield c, f"http://127.0.0.1:{port}"
    finally:
        # no serve.shutdown(): it would wait 30 s for the router, which as the mode's direct ingress drains that long
        # for load balancers; the cluster's shutdown takes every replica down with its node
        ray.shutdown()
        c.shutdown()


def stream(url: str, prompt: str, started: threading.Event, out: dict) -> None:
    """One streamed completion; sets `started` at its first token; out[prompt] = (text, SSE lines)."""
    import json

    lines, text = [], ""
    with httpx.stream("POST", f"{url}/v1/completions", timeout=300, json={
            "prompt": prompt, "max_tokens": NEW, "temperature": 0, "ignore_eos": True, "stream": True}) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: "):
                lines.append(line)
                if line != "data: [DONE]":
                    text += json.loads(line[6:])["choices"][0]["text"]
                    started.set()
    out[prompt] = (text, lines)


def test_nodes_joining_and_leaving_replan_without_losing_a_stream(cluster, demo_checkpoint):
    from transformers import AutoTokenizer

    from deployments.app import build_app

    c, url = cluster
    path = demo_checkpoint("llama")
    router = serve.run(build_app({
        "model": str(path), "cluster": "ray", "quality": "fp16", "plan_time_limit": 5, "max_context": 448,
        "workload": {"batch_size": 4, "prompt_len": 16, "gen_len": 32}, "replan_poll_s": 0.5}),
        name="llmpq", route_prefix="/")
    wait_ready(router, 1)
    assert {p["accelerator_types"][0] for p in router.placements.remote().result()} == {"T4"}

    # a faster GPU joins: the plan uses it
    c.add_node(num_cpus=1, num_gpus=1, resources={"accelerator_type:V100": 1})
    wait_ready(router, 2)
    placements = router.placements.remote().result()
    assert "V100" in {p["accelerator_types"][0] for p in placements}

    # the node of the first stage leaves while every request is mid-stream
    planner = serve.get_deployment_handle("Planner", app_name="llmpq")
    control = {router.status.remote().result()["node"], planner.status.remote().result()["node"]}
    assert control == {c.head_node.node_id}  # the control plane stays on the head
    gone = next(n for n in c.worker_nodes if n.node_id == placements[0]["node_id"])
    started = [threading.Event() for _ in PROMPTS]
    out = {}
    threads = [threading.Thread(target=stream, args=(url, p, s, out)) for p, s in zip(PROMPTS, started)]
    for t in threads:
        t.start()
    assert all(s.wait(120) for s in started)
    c.remove_node(gone)
    for t in threads:
        t.join(300)

    wait_ready(router, 3)
    tok = AutoTokenizer.from_pretrained(str(path))
    expected = [tok.decode(ids, skip_special_tokens=True) for ids in hf_greedy(path, PROMPTS, NEW)]
    assert [out[p][0] for p in PROMPTS] == expected
    assert all(out[p][1][-1] == "data: [DONE]" and not any('"error"' in line for line in out[p][1])
               for p in PROMPTS)
    status = router.status.remote().result()
    assert status["replans"] >= 2 and status["resumed_requests"] >= len(PROMPTS)  # all were moved mid-stream
    assert gone.node_id not in {p["node_id"] for p in router.placements.remote().result()}


def test_stages_beyond_the_gpus_of_their_type_are_refused_with_a_reason():
    from deployments.planner import gpus_by_type, unplaceable

    offered = gpus_by_type([{"Alive": True, "Resources": {"CPU": 2, "GPU": 2, "accelerator_type:T4": 1}},
                            {"Alive": False, "Resources": {"GPU": 1, "accelerator_type:V100": 1}},
                            {"Alive": True, "Resources": {"CPU": 2}}])
    assert dict(offered) == {"T4": 2}
    assert unplaceable(["T4", "T4"], offered) is None
    assert unplaceable(["T4"] * 3, offered) == ("3 stage(s) need a GPU of accelerator_type 'T4', the alive nodes "
                                                "offer 2 (GPUs by type: T4: 2)")
    assert "'V100', the alive nodes offer 0" in unplaceable(["T4", "V100"], offered)


def stage_apps() -> list[str]:
    return [name for name in serve.status().applications if name.startswith("llmpq-stages-")]


def test_deleting_the_app_takes_its_stages_down_and_frees_their_gpus(cluster, demo_checkpoint):
    """The planner's shutdown deletes the stage application, and that goes in seconds (the mode holds an ingress
    replica open 30 s as it goes down, which would also stall every re-plan)."""
    from deployments.app import build_app

    router = serve.run(build_app({
        "model": str(demo_checkpoint("llama")), "stages": [{"accelerator_type": "T4", "layers": [0, 3]}],
        "prefill_micro_batch": 2, "decode_micro_batch": 2, "max_context": 128,
        "workload": {"batch_size": 2, "prompt_len": 16, "gen_len": 16}}), name="llmpq", route_prefix="/")
    wait_ready(router, 1)
    assert len(stage_apps()) == 1 and ray.available_resources().get("GPU", 0) == 0

    serve.delete("llmpq", _blocking=False)  # the router itself drains for 30 s: not waited for
    deadline = time.monotonic() + 27  # below the 30 s drain it once waited for, above a loaded machine's ~10 s
    while stage_apps() or ray.available_resources().get("GPU", 0) < 1:
        assert time.monotonic() < deadline, f"still up 27 s after the app's deletion: {stage_apps()}"
        time.sleep(0.5)
