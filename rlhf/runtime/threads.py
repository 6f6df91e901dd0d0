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
import math
import os
import sys
import threading
import time

ENV = "RLHF_TORCH_THREADS"  # intra-op threads of a process's model thread (set by prepare_process)

log = logging.getLogger("rlhf.runtime")


def _cpu_ids() -> list[int]:
    """The CPUs this process may run on."""
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return list(range(os.cpu_count() or 1))


def _cpus() -> int:
    return len(_cpu_ids())


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


# ----------------------------------------------------------------------------------------------
# Sharing the CPUs with other processes
# ----------------------------------------------------------------------------------------------
#
# An OpenMP team waits at the end of every parallel region for its slowest thread. When another
# CPU-bound process shares one of the team's cores, the thread on that core runs only in the
# time slices the scheduler gives it, and the whole team waits for it many times a step: on 2
# cores, two threads beside one busy process ran a PPO step, SFT and pre-training 2.5-3.2x slower
# than alone, one thread fewer 1.3-1.6x (bench/contention.py, docs/benchmarks.md).
# So training loops call fit_threads() between steps: it measures how much CPU other processes
# took since the last look and runs the next steps with the CPUs they left free.

ADAPT_ENV = "RLHF_ADAPT_THREADS"  # "0": keep the thread count fixed (fit_threads does nothing)


class ThreadGovernor:
    """Fits torch's intra-op thread count to the CPUs that other processes leave free.

    :meth:`poll`, called between steps, looks at most every ``interval`` seconds: the CPU time
    spent on this process's CPUs (``/proc/stat``, its steal time included: a hypervisor's other
    guests count as other processes) less this process's own (``os.times``) gives the cores the
    others took. The target is the free cores rounded, between 1 and ``max_threads``; the count
    changes once two looks in a row agree on the target, so one busy second does not flap it.
    """

    def __init__(self, max_threads: int, interval: float = 1.0, stat_path: str = "/proc/stat"):
        self.max_threads = max_threads
        self.interval = interval
        self.stat_path = stat_path
        self.cpus = _cpu_ids()
        self.hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self.threads = max_threads
        self.others = 0.0  # cores other processes took in the last window
        self._pending: int | None = None
        self._last = self._sample()

    def _busy_seconds(self) -> float | None:
        """CPU seconds spent on this process's CPUs since boot, or None when unreadable."""
        want = {f"cpu{i}" for i in self.cpus}
        try:
            with open(self.stat_path) as f:
                lines = [ln.split() for ln in f if ln.startswith("cpu")]
        except OSError:
            return None
        busy = 0
        for parts in lines:
            if parts[0] in want:
                # user nice system idle iowait irq softirq steal (guest time is inside user)
                vals = [int(v) for v in parts[1:9]]
                busy += vals[0] + vals[1] + vals[2] + vals[5] + vals[6] + vals[7]
        return busy / self.hz

    def _sample(self) -> tuple[float, float | None, float]:
        t = os.times()
        return time.monotonic(), self._busy_seconds(), t.user + t.system

    def poll(self) -> int:
        """The thread count to use now (set with ``torch.set_num_threads`` when it changed).
        A count set by someone else since the last look becomes the new ceiling."""
        import torch

        if torch.get_num_threads() != self.threads:
            self.max_threads = self.threads = torch.get_num_threads()
            self._pending = None
        now = time.monotonic()
        if self.max_threads <= 1 or now - self._last[0] < self.interval:
            return self.threads
        cur = self._sample()
        (t0, busy0, own0), (t1, busy1, own1) = self._last, cur
        self._last = cur
        if busy0 is None or busy1 is None:
            return self.threads
        self.others = max(0.0, ((busy1 - busy0) - (own1 - own0)) / (t1 - t0))
        target = max(1, min(self.max_threads, math.floor(len(self.cpus) - self.others + 0.5)))
        if target == self.threads:
            self._pending = None
        elif target != self._pending:
            self._pending = target
        else:
            log.info("other processes take %.1f of %d CPUs: %d intra-op threads (was %d)",
                     self.others, len(self.cpus), target, self.threads)
            self.threads, self._pending = target, None
            torch.set_num_threads(target)
        return self.threads


_governor: ThreadGovernor | None = None
_governor_lock = threading.Lock()


def fit_threads() -> int:
    """Called by training loops between steps: run the next steps with as many intra-op
    threads as other processes leave CPUs free, never more than the count torch had at the
    first call (:class:`ThreadGovernor`). Off with ``RLHF_ADAPT_THREADS=0`` and where
    ``/proc/stat`` is not readable. Returns the count in use."""
    global _governor
    if os.environ.get(ADAPT_ENV, "1") == "0" or not os.path.exists("/proc/stat"):
        return 0
    import torch

    with _governor_lock:
        if _governor is None:
            _governor = ThreadGovernor(torch.get_num_threads())
        return _governor.poll()
