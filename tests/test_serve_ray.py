"""The Ray Serve layer on a real multi-node Ray cluster (ray.cluster_utils, logical GPUs typed by accelerator_type):
greedy output over HTTP equals HF generate for 1-3 stages and both architectures, stages land on their planned GPU
types, the Ray and local transports agree, the planner path deploys, and the API answers errors with 4xx."""

import asyncio
import itertools
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import ray
from ray import serve

from deployments.planner import FP16_ONLY
from llmpq_serve.runtime.ring import free_port
from tests.conftest import environ
from tests.test_runtime import NEW, PROMPTS, hf_greedy, run_all

TYPES = ["T4", "T4", "V100"]  # stage i goes to TYPES[i]


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    # Serve says why a replica has not started after this long (30 s by default): the planner passes it on
    with environ(RAY_SERVE_SLOW_STARTUP_WARNING_S="1", RAY_SERVE_SLOW_STARTUP_WARNING_PERIOD_S="1"):
        c = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    try:
        c.add_node(num_cpus=2, num_gpus=2, resources={"accelerator_type:T4": 1})
        c.add_node(num_cpus=2, num_gpus=1, resources={"accelerator_type:V100": 1})
        c.wait_for_nodes()
        ray.init(address=c.address, log_to_driver=False)
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()
        c.shutdown()


def deploy(path, n_stages: int, **extra):
    from deployments.app import build_app

    bounds = [round(i * 3 / n_stages) for i in range(n_stages + 1)]
    args = {"model": str(path), "stages": [{"accelerator_type": TYPES[i], "layers": [a, b]}
                                            for i, (a, b) in enumerate(itertools.pairwise(bounds))],
            "prefill_micro_batch": 2, "decode_micro_batch": 2, "max_context": 128,
            "workload": {"batch_size": 4, "prompt_len": 16, "gen_len": 16}, **extra}
    return wait_ready(serve.run(build_app(args), name="llmpq", route_prefix="/"))


def wait_ready(router, generation: int = 1, timeout_s: float = 300):
    """The router once it serves on stages of plan `generation` or later (the planner deploys them after the app
    itself is up)."""
    deadline = time.monotonic() + timeout_s
    while (status := router.status.remote().result(timeout_s=60))["generation"] < generation:
        assert time.monotonic() < deadline, f"no stages of generation {generation} after {timeout_s} s: {status}"
        time.sleep(0.5)
    return router


def test_stages_of_a_type_no_node_offers_are_refused_with_a_reason(cluster, demo_checkpoint):
    from deployments.app import build_app

    serve.run(build_app({"model": str(demo_checkpoint("llama")), "stages": [{"accelerator_type": "H900",
                                                                           "layers": [0, 3]}],
                         "prefill_micro_batch": 1, "decode_micro_batch": 1, "max_context": 64}),
              name="llmpq", route_prefix="/")
    deadline = time.monotonic() + 120
    while "H900" not in (health := httpx.get(f"{cluster}/healthz", timeout=30)).json().get("reason", ""):
        assert time.monotonic() < deadline, health.text
        time.sleep(0.5)
    assert health.status_code == 503 and "T4" in health.json()["reason"] and "V100" in health.json()["reason"]
    answer = httpx.post(f"{cluster}/v1/completions", json={"prompt": "x", "max_tokens": 2}, timeout=30)
    assert answer.status_code == 503 and "H900" in answer.json()["error"]["message"]


@serve.deployment(ray_actor_options={"num_gpus": 1, "num_cpus": 0, "accelerator_type": "V100"})
class V100Holder:
    """Another application's replica that holds the cluster's one V100."""

    def __call__(self) -> str:
        return "held"


def test_a_stage_whose_gpu_another_app_holds_says_so_and_serves_once_it_is_freed(cluster, demo_checkpoint):
    from deployments.app import build_app

    serve.run(V100Holder.bind(), name="holder", route_prefix=None)
    try:
        router = serve.run(build_app({"model": str(demo_checkpoint("opt")),
                                      "stages": [{"accelerator_type": "V100", "layers": [0, 3]}],
                                      "prefill_micro_batch": 1, "decode_micro_batch": 1, "max_context": 64}),
                           name="llmpq", route_prefix="/")
        deadline = time.monotonic() + 120
        while "to be scheduled" not in (health := httpx.get(f"{cluster}/healthz", timeout=30)).json()["reason"]:
            assert time.monotonic() < deadline, health.text
            time.sleep(0.5)
        assert health.status_code == 503 and "stage0 (V100)" in health.json()["reason"]
    finally:
        serve.delete("holder")
    wait_ready(router, timeout_s=120)
    assert len(complete(cluster, ["the"], max_tokens=2)) == 1


def complete(url: str, prompts: list[str], **body) -> list[dict]:
    def one(p):
        r = httpx.post(f"{url}/v1/completions", json={"prompt": p, **body}, timeout=120)
        assert r.status_code == 200, r.text
        return r.json()

    with ThreadPoolExecutor(len(prompts)) as pool:
        return list(pool.map(one, prompts))


@pytest.mark.parametrize("arch", ["llama", "opt"])
@pytest.mark.parametrize("stages", [1, 2, 3])
def test_greedy_over_http_matches_hf_generate(cluster, demo_checkpoint, arch, stages):
    from transformers import AutoTokenizer

    path = demo_checkpoint(arch)
    router = deploy(path, stages, max_queue=64, **({"prefill_chunk_tokens": 3} if stages == 3 else {}))  # in pieces
    tok = AutoTokenizer.from_pretrained(str(path))
    out = complete(cluster, PROMPTS, max_tokens=NEW, temperature=0, ignore_eos=True)
    expected = [tok.decode(ids, skip_special_tokens=True) for ids in hf_greedy(path, PROMPTS)]
    assert [o["choices"][0]["text"] for o in out] == expected
    assert all(o["usage"]["completion_tokens"] == NEW for o in out)
    placements = router.placements.remote().result(timeout_s=60)
    assert [p["accelerator_types"] for p in placements] == [[t] for t in TYPES[:stages]]  # each on its planned type
    if stages == 3:
        t4_node = next(n["NodeID"] for n in ray.nodes() if "accelerator_type:T4" in n["Resources"])
        assert placements[0]["node_id"] == placements[1]["node_id"] == t4_node != placements[2]["node_id"]


def test_ray_and_local_transports_agree_with_seeds(cluster, demo_checkpoint):
    from llmpq_serve.runtime.local import even_stages, local_engine
    from llmpq_serve.runtime.sampling import SamplingParams

    path = demo_checkpoint("opt")
    deploy(path, 2)
    body = {"max_tokens": 10, "temperature": 0.8, "top_p": 0.9, "seed": 11, "ignore_eos": True}
    remote = [o["choices"][0]["text"] for o in complete(cluster, PROMPTS, **body)]
    engine = local_engine(path, even_stages(3, 2), 2, 2, 4, 128)
    local_ids = asyncio.run(run_all(engine, PROMPTS, SamplingParams(**body)))
    assert remote == [engine.tokenizer.decode(ids, skip_special_tokens=True) for ids in local_ids]


def test_planned_deployment_serves_and_reports_its_plan(cluster, demo_checkpoint):
    deploy(demo_checkpoint("llama"), 1, stages=None, prefill_micro_batch=None, decode_micro_batch=None,
           cluster="ray", quality="fp16", plan_time_limit=5)
    plan = httpx.get(f"{cluster}/v1/plan", timeout=30).json()
    assert sum(s["layers"][1] - s["layers"][0] for s in plan["stages"]) == 3
    assert plan["indicator"] == FP16_ONLY and {b for s in plan["stages"] for b in s["bits"]} == {16}
    assert httpx.get(f"{cluster}/healthz", timeout=30).status_code == 200
    chunks = []
    with httpx.stream("POST", f"{cluster}/v1/chat/completions", timeout=60, json={
            "messages": [{"role": "user", "content": "hello"}], "max_tokens": 5, "stream": True}) as r:
        assert r.status_code == 200
        chunks = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert chunks[-1] == "data: [DONE]" and len(chunks) >= 3


@pytest.fixture(scope="module")
def two_stage_app(cluster, demo_checkpoint):
    deploy(demo_checkpoint("llama"), 2)
    return cluster


@pytest.mark.parametrize("body,status", [
    ({"prompt": "x", "max_tokens": 0}, 400),
    ({"prompt": "", "max_tokens": 4}, 400),
    ({"prompt": "x", "max_tokens": 100000}, 400),
    ({"prompt": "x", "temperature": 5}, 400),
    ({"prompt": "x", "model": "gpt-9"}, 404),
    ({"prompt": 3}, 400),
])
def test_bad_requests_get_openai_errors(two_stage_app, body, status):
    r = httpx.post(f"{two_stage_app}/v1/completions", json=body, timeout=60)
    assert r.status_code == status and set(r.json()["error"]) >= {"message", "type", "param", "code"}
