"""Consumers are idempotent: an event delivered twice (or a stale one) changes nothing."""

from __future__ import annotations

import asyncio

from rlhf_client import common_pb2, models_pb2

from rlhf.registry import ModelRegistry
from services.common import ModelWatcher
from tests.services.helpers import tiny_policy_registry


def test_model_watcher_loads_only_newer_versions_of_its_kind(tmp_path):
    reg = tiny_policy_registry(tmp_path)
    first = reg.latest("policy")
    second = reg.publish("policy", lambda d: (d / "config.json").write_text("{}")).version
    loads = []

    def load(path, version):
        loads.append(version)
        return version

    served = []
    w = ModelWatcher(ModelRegistry(tmp_path), "policy", load, served.append)

    async def run():
        await w.load_initial()
        ev = lambda v, kind=common_pb2.MODEL_KIND_POLICY: models_pb2.ModelVersionPublishedEvent(
            event_id=v, version=v, kind=kind)
        await w.on_event(ev(second))  # the initial load already took the newest
        await w.on_event(ev(first))  # an older version, e.g. a replay
        await w.on_event(ev(second, common_pb2.MODEL_KIND_REWARD))  # another kind

    asyncio.run(run())
    assert loads == [second] and served == [second] and w.version == second


def test_model_watcher_finds_a_version_written_without_an_event(tmp_path):
    """Polling the registry: a version another process wrote is served within a few polls; one
    that fails to load is not tried again."""
    reg = tiny_policy_registry(tmp_path)
    loads = []

    def load(path, version):
        loads.append(version)
        if (path / "broken").exists():
            raise OSError("unreadable weights")
        return version

    w = ModelWatcher(ModelRegistry(tmp_path), "policy", load, lambda engine: None)

    async def wait_for(cond) -> None:
        for _ in range(200):
            if cond():
                return
            await asyncio.sleep(0.02)

    async def run():
        await w.load_initial()
        w.poll(0.05)
        second = reg.publish("policy", lambda d: (d / "config.json").write_text("{}")).version
        await wait_for(lambda: w.version == second)
        assert w.version == second
        third = reg.publish("policy", lambda d: (d / "broken").write_text("")).version
        await wait_for(lambda: third in loads)
        await asyncio.sleep(0.3)  # several more polls
        w.close()
        return second, third

    second, third = asyncio.run(run())
    assert loads.count(third) == 1 and w.version == second
