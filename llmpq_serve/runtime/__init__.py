"""Running a plan: stage shards, KV caches, sampling and the micro-batch scheduler."""
