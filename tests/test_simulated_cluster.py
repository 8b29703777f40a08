"""`make serve`'s cluster (deployments/simulated_cluster.py) stops at once, and whole, on Ctrl-C and on a `kill`."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest
from ray import serve

from llmpq_serve.runtime.ring import free_port

ROOT = Path(__file__).resolve().parents[1]


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0})
class Hello:
    def __call__(self, request) -> str:
        return "hello"


app = Hello.bind()


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["kill", "ctrl-c"])
def test_the_demo_cluster_stops_whole_within_seconds(tmp_path, sig, code):
    port = free_port()
    config = tmp_path / "hello.yaml"
    config.write_text(f"proxy_location: HeadOnly\nhttp_options: {{host: 127.0.0.1, port: {port}}}\napplications:\n"
                      f"  - {{name: hello, route_prefix: /, import_path: 'tests.test_simulated_cluster:app'}}\n")
    log = tmp_path / "log"
    # in a session of its own, as a terminal's foreground job, and with Ctrl-C's default action even where the suite
    # runs in the background (which ignores SIGINT, and so would every process it starts); the Ray processes import
    # this module by PYTHONPATH
    foreground = ("import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
                  "os.execv(sys.executable, [sys.executable, '-m', 'deployments.simulated_cluster', *sys.argv[1:]])")
    with log.open("w") as out:
        demo = subprocess.Popen([sys.executable, "-c", foreground, str(config), "--gpus", "T4", "--direct-port",
                                 str(free_port())], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONPATH": str(ROOT)}, start_new_session=True)
    started = []
    try:
        deadline = time.monotonic() + 180
        while True:
            assert demo.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/", timeout=5).text == "hello":
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        started = psutil.Process(demo.pid).children(recursive=True)
        assert any("raylet" in p.name() for p in started)
        stopped_at = time.monotonic()
        if sig == signal.SIGINT:  # Ctrl-C goes to the terminal's whole foreground process group
            os.killpg(demo.pid, sig)
        else:  # a kill to the one process
            demo.send_signal(sig)
        assert demo.wait(timeout=60) == code
        _, alive = psutil.wait_procs(started, timeout=15)
        assert not alive, [p.cmdline() for p in alive]
        assert time.monotonic() - stopped_at < 20  # Ray's own SIGTERM handler drained the head for 30 s first
        assert "SIGTERM received" not in log.read_text()  # Ray's stack trace from serve run terminated mid-shutdown
    finally:
        if demo.poll() is None:
            os.killpg(demo.pid, signal.SIGKILL)
            demo.wait()
        for p in started:
            if p.is_running():
                p.kill()
