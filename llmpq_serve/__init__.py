"""llmpq-serve: phase-aware, mixed-precision pipeline serving of one LLM across heterogeneous GPUs."""

__version__ = "0.1.0"
