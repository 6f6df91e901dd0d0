"""Torch's intra-op threads in a server process: one OpenMP thread team, owned by the model thread.

A service runs its model work on one dedicated thread (the inference engine's worker, a
:class:`~rlhf.runtime.server.ModelExecutor`, a trainer job), not on the event loop's thread.
GNU OpenMP, which torch's CPU kernels use, gives every thread that opens a parallel region a
team of its own, and its threads stay parked for later regions. Once the parked and running
threads of all teams outnumber the CPUs, libgomp stops spinning between parallel regions and
puts its threads to sleep after each one. A decode step opens about 50 small regions, and each
one then pays for waking a sleeping thread.

`bench/serving.py` on a 2-core CPU, 2 intra-op threads, a batch of 16 prompts and 48 new tokens:
the engine's forward passes took 429 ms per batch while the main thread held a team of its own
(it had loaded the model with 2 threads), and 134 ms with the rule below (docs/benchmarks.md).

Hence the rule a server process follows:
- :func:`prepare_process`, called before torch is imported, gives every thread a single
  intra-op thread (``OMP_NUM_THREADS=MKL_NUM_THREADS=1``; a thread with one thread never forms a
  team);
- the model thread calls :func:`use_model_threads` first, and gets the process's share of CPUs.

``torch.set_num_threads`` also records the count process-wide, and a thread that runs its first
torch work *after* that call starts with that count. So the services load every model version
on one loader thread (``services.common.ModelWatcher``), whose first torch work, the first load,
comes before any model thread starts.
"""

from __future__ import annotations

import logging
import os
import sys

ENV = "RLHF_TORCH_THREADS"  # intra-op threads of a process's model thread (set by prepare_process)

log = logging.getLogger("rlhf.runtime")


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def prepare_process(threads: int = 0) -> int:
    """Give every thread of this process one intra-op thread, and its model thread ``threads``.

    ``threads`` 0 keeps what the environment asked for: ``RLHF_TORCH_THREADS``, else
    ``OMP_NUM_THREADS``, else every CPU this process may run on. Returns the model thread's
    count. Must run before torch is imported (OpenMP reads ``OMP_NUM_THREADS`` once); later it
    only records the count and logs a warning.
    """
    n = threads or int(os.environ.get(ENV) or 0) or int(os.environ.get("OMP_NUM_THREADS") or 0) or _cpus()
    if n < 1:
        raise ValueError(f"torch threads must be >= 1, got {n}")
    os.environ[ENV] = str(n)
    if "torch" in sys.modules:
        log.warning("prepare_process() ran after torch was imported: threads other than the model thread "
                    "keep torch's default thread count")
    else:
        # torch starts each thread with MKL's count when MKL_NUM_THREADS is set, so both are 1
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"
    return n


def model_threads() -> int:
    """The intra-op thread count of this process's model thread (0: torch's default)."""
    return int(os.environ.get(ENV) or 0)


def use_model_threads(threads: int = 0) -> None:
    """Called first on a model thread: run its torch work with ``threads`` intra-op threads
    (0: :func:`model_threads`, or torch's default when the process was not prepared)."""
    n = threads or model_threads()
    if n > 0:
        import torch

        torch.set_num_threads(n)
