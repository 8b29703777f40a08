"""Runs `serve run <config>` on a simulated heterogeneous cluster on this machine: Ray nodes whose logical GPUs are
typed by `accelerator_type` resources (by default one T4 node and one V100 node), as `make serve` does on a machine
without GPUs. Stages pinned to a type land on that node and run on its CPU. The cluster goes down on exit.

    python -m deployments.simulated_cluster deployments/demo.yaml --gpus T4 V100
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="Serve config file")
    parser.add_argument("--gpus", nargs="+", default=["T4", "V100"], help="one node per entry, typed so")
    parser.add_argument("--direct-port", type=int, default=30000,
                        help="the router replica's own HTTP port (Serve's direct ingress, beside the proxy's; "
                             "the next free one if taken)")
    args = parser.parse_args(argv)
    from ray.cluster_utils import Cluster

    # a plain `kill` must tear the cluster down too, not only Ctrl-C
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    # Serve's throughput-optimized mode (user code on the replica's own event loop, gRPC between replicas): it cuts
    # what every request and every control call costs, which on a small machine shows in tokens/s. Ray processes
    # inherit it from this environment.
    os.environ.setdefault("RAY_SERVE_THROUGHPUT_OPTIMIZED", "1")
    # That mode also gives the ingress replica (the router) an HTTP server of its own, which load balancers (or
    # Serve's HAProxy mode) reach without the proxy actor's extra hop; pinning its port makes it known in advance.
    os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT", str(args.direct_port))
    os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT", str(args.direct_port + 100))
    cpus = os.cpu_count() or 2
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": cpus})
    server = None
    try:
        for gpu in args.gpus:
            cluster.add_node(num_cpus=cpus, num_gpus=1, resources={f"accelerator_type:{gpu}": 1})
        cluster.wait_for_nodes()
        serve = shutil.which("serve", path=os.path.dirname(sys.executable)) or "serve"
        server = subprocess.Popen([serve, "run", "--address", cluster.address, args.config])
        return server.wait()
    except KeyboardInterrupt:
        return 130
    finally:
        if server is not None and server.poll() is None:
            server.terminate()
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
        cluster.shutdown()


if __name__ == "__main__":
    sys.exit(main())
