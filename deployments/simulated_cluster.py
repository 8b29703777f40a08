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


def throughput_optimized_env(direct_port: int, ports: int = 100) -> dict[str, str]:
    """The environment of Serve's throughput-optimized mode, for the Ray processes to inherit: user code on the
    replica's own event loop and gRPC between replicas cut what every request and every control call costs, which on
    a small machine shows in tokens/s. The mode also gives the ingress replica (the router) an HTTP server of its own,
    which load balancers (or Serve's HAProxy mode) reach without the proxy actor's extra hop; it binds the first free
    port from `direct_port` to `direct_port + ports`, so that its port is known in advance."""
    return {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(direct_port),
            "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(direct_port + ports)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="Serve config file")
    parser.add_argument("--gpus", nargs="+", default=["T4", "V100"], help="one node per entry, typed so")
    parser.add_argument("--direct-port", type=int, default=30000,
                        help="the router replica's own HTTP port (Serve's direct ingress, beside the proxy's; "
                             "the next free one if taken)")
    args = parser.parse_args(argv)
    from ray.cluster_utils import Cluster

    for name, value in throughput_optimized_env(args.direct_port).items():  # Ray processes inherit them
        os.environ.setdefault(name, value)
    cpus = os.cpu_count() or 2
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": cpus})
    server = None
    try:
        for gpu in args.gpus:
            cluster.add_node(num_cpus=cpus, num_gpus=1, resources={f"accelerator_type:{gpu}": 1})
        cluster.wait_for_nodes()
        # a plain `kill` must stop it all at once too, as Ctrl-C does. Ray's nodes started in this process each put a
        # SIGTERM handler of their own in place, which drains the head for up to 30 s and exits 1: this one replaces it
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
        serve = shutil.which("serve", path=os.path.dirname(sys.executable)) or "serve"
        server = subprocess.Popen([serve, "run", "--address", cluster.address, args.config])
        return server.wait()
    except KeyboardInterrupt:
        return 130
    finally:
        if server is not None and server.poll() is None:
            # nothing in `serve run` to wait for (Ctrl-C has it shut Serve down, which waits 30 s for the router's
            # drain): the cluster goes down next with all it started. Not SIGTERM: Ray's handler there prints a trace.
            server.kill()
            server.wait()
        cluster.shutdown()


if __name__ == "__main__":
    sys.exit(main())
