"""torch's CPU thread count, set in every thread that computes.

`torch.set_num_threads` reaches MKL, which runs the matrix products, only in the calling OS thread: in the worker
threads a stage computes in (the local chain's, the ring's lanes) MKL used every core, unless OMP_NUM_THREADS or
MKL_NUM_THREADS said otherwise (Ray sets OMP_NUM_THREADS in its workers). On 2 cores a worker thread's 512 x 512
products took both where the main thread's took one, while `torch.get_num_threads()` said 1 there."""

from __future__ import annotations

import threading

import torch


class ThreadCount:
    """`threads` CPU threads for the ops of every thread that calls `use()`, set once in each."""

    def __init__(self, threads: int):
        self.threads = threads
        self._set_here = threading.local()

    def use(self) -> None:
        if not getattr(self._set_here, "done", False):
            torch.set_num_threads(self.threads)
            self._set_here.done = True
