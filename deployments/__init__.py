"""The Ray Serve layer: stage deployments, the router, the planner actor and the `serve run` builder."""
