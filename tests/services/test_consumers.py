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
