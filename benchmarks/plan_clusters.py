"""Every planning method on the LLM-PQ paper's 11 clusters plus a 32-device scaling instance.

    python benchmarks/plan_clusters.py [--json] [--only 3 5] [--no-large]

Same as `llmpq bench plan`; writes benchmarks/results/plan_clusters.{md,json}."""

import sys

from llmpq_serve.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "plan", *sys.argv[1:]]))
