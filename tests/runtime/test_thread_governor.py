"""rlhf.runtime.threads.ThreadGovernor: training runs with as many intra-op threads as other
processes leave CPUs free (the measured reason: bench/contention.py, docs/benchmarks.md)."""

from __future__ import annotations

import os
import subprocess
import time
from types import SimpleNamespace

import pytest
import torch

from rlhf.runtime import threads


class Clock:
    """The governor's view of the machine, driven by the test: wall time, /proc/stat, os.times."""

    def __init__(self, tmp_path, monkeypatch, cpus=2):
        self.t, self.own, self.busy = 100.0, 0.0, [0] * cpus  # seconds; own CPU seconds; ticks per CPU
        self.path = tmp_path / "stat"
        self.hz = os.sysconf("SC_CLK_TCK")
        monkeypatch.setattr(threads.time, "monotonic", lambda: self.t)
        monkeypatch.setattr(threads.os, "times", lambda: SimpleNamespace(user=self.own, system=0.0))
        self.write()

    def write(self):
        lines = ["cpu  0 0 0 0 0 0 0 0 0 0"]
        for i, b in enumerate(self.busy):
            # user nice system idle iowait irq softirq steal: busy split over user, system and steal
            lines.append(f"cpu{i} {b // 2} 0 {b - b // 2 - b // 4} 999 5 0 0 {b // 4} 0 0")
        self.path.write_text("\n".join(lines) + "\nintr 1 2 3\n")

    def run(self, seconds: float, own_cores: float, other_cores: float):
        """``seconds`` pass; this process keeps ``own_cores`` busy, other processes ``other_cores``."""
        self.t += seconds
        self.own += own_cores * seconds
        total = int(round((own_cores + other_cores) * seconds * self.hz))
        for i in range(len(self.busy)):
            self.busy[i] += total // len(self.busy) + (i < total % len(self.busy))
        self.write()


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def make(clock, max_threads=2):
    g = threads.ThreadGovernor(max_threads, interval=1.0, stat_path=str(clock.path))
    g.cpus = list(range(len(clock.busy)))
    g._last = g._sample()
    return g


def test_a_busy_core_takes_a_thread_after_two_agreeing_looks_and_gives_it_back(tmp_path, monkeypatch, two_threads):
    c = Clock(tmp_path, monkeypatch)
    g = make(c)
    c.run(1.0, own_cores=1.3, other_cores=0.7)  # two threads beside one busy process share the cores
    assert g.poll() == 2 and g.others == pytest.approx(0.7, abs=0.02)  # one look is not enough
    c.run(1.0, own_cores=1.3, other_cores=0.7)
    assert g.poll() == 1 and torch.get_num_threads() == 1
    c.run(0.5, own_cores=1.0, other_cores=1.0)
    assert g.poll() == 1 and g.others == pytest.approx(0.7, abs=0.02)  # before the interval: no look
    c.run(1.0, own_cores=1.0, other_cores=0.0)  # the other process ended
    assert g.poll() == 1
    c.run(1.0, own_cores=1.0, other_cores=0.05)
    assert g.poll() == 2 and torch.get_num_threads() == 2


def test_one_busy_second_does_not_flap_the_count(tmp_path, monkeypatch, two_threads):
    c = Clock(tmp_path, monkeypatch)
    g = make(c)
    for others in (1.0, 0.1, 1.0, 0.0, 0.9, 0.2):
        c.run(1.0, own_cores=1.0, other_cores=others)
        assert g.poll() == 2
    assert torch.get_num_threads() == 2


def test_never_more_than_the_ceiling_and_a_count_set_elsewhere_becomes_the_ceiling(tmp_path, monkeypatch, two_threads):
    c = Clock(tmp_path, monkeypatch, cpus=4)
    g = make(c, max_threads=2)
    for _ in range(3):  # four idle CPUs, but the ceiling is 2
        c.run(1.0, own_cores=2.0, other_cores=0.0)
        assert g.poll() == 2
    torch.set_num_threads(1)  # the caller chose one thread (a test, a deterministic run)
    for _ in range(3):
        c.run(1.0, own_cores=1.0, other_cores=0.0)
        assert g.poll() == 1
    assert torch.get_num_threads() == 1


def test_three_of_four_cpus_busy_leaves_one_thread(tmp_path, monkeypatch, two_threads):
    c = Clock(tmp_path, monkeypatch, cpus=4)
    g = make(c, max_threads=4)
    torch.set_num_threads(4)
    g.threads = 4
    for _ in range(2):
        c.run(1.0, own_cores=1.0, other_cores=3.0)
        g.poll()
    assert g.threads == 1 and torch.get_num_threads() == 1


def test_an_unreadable_stat_file_keeps_the_count(tmp_path, monkeypatch, two_threads):
    c = Clock(tmp_path, monkeypatch)
    g = make(c)
    c.path.unlink()
    c.write = lambda: None  # it stays unreadable
    for _ in range(3):
        c.run(1.0, own_cores=0.0, other_cores=2.0)
        assert g.poll() == 2


def test_fit_threads_is_off_when_asked(monkeypatch):
    monkeypatch.setenv(threads.ADAPT_ENV, "0")
    assert threads.fit_threads() == 0


@pytest.mark.skipif(not os.path.exists("/proc/stat") or len(os.sched_getaffinity(0)) > 8,
                    reason="reads Linux's /proc/stat; starts one busy process per CPU but one")
def test_on_this_machine_busy_processes_leave_one_thread(two_threads):
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip("one CPU: nothing to give back")
    torch.set_num_threads(len(cpus))
    hogs = [subprocess.Popen(["yes"], stdout=subprocess.DEVNULL) for _ in cpus[1:]]
    try:
        g = threads.ThreadGovernor(len(cpus), interval=0.3)
        for _ in range(4):
            time.sleep(0.35)
            g.poll()
        assert g.others >= 0.6 * len(hogs) and g.threads == 1 and torch.get_num_threads() == 1
    finally:
        for h in hogs:
            h.kill()
            h.wait()
