"""Consumers are idempotent: an event delivered twice (or a stale one) changes nothing."""

from __future__ import annotations

import asyncio

from rlhf_client import common_pb2, feedback_pb2, models_pb2

from rlhf.metrics import ServiceMetrics
from rlhf.registry import ModelRegistry
from services.common import ModelWatcher
from services.trainer.service import Settings, Trainer
from tests.services.helpers import tiny_policy_registry


def test_trainer_counts_a_comparison_once_however_often_it_arrives(tmp_path):
    t = Trainer(Settings(registry_dir=str(tmp_path)), ServiceMetrics("trainer"))
    ev = feedback_pb2.FeedbackEvent(event_id="s1", comparison=feedback_pb2.Comparison(submission_id="s1"))
    demo = feedback_pb2.FeedbackEvent(event_id="d1", demonstration=feedback_pb2.Demonstration(submission_id="d1"))

    async def deliver():
        for e in (ev, ev, demo, ev):
            await t._on_feedback(e)

    asyncio.run(deliver())
    assert t._new_comparisons() == 1  # the duplicate and the demonstration do not count
    t._reset_new_comparisons()
    asyncio.run(t._on_feedback(ev))
    assert t._new_comparisons() == 0  # already seen before the reset


def test_model_watcher_loads_only_newer_versions_of_its_kind(tmp_path):
    reg = tiny_policy_registry(tmp_path)
    first = reg.latest("policy")
    second = reg.publish("policy", lambda d: (d / "config.json").write_text("{}")).version
    loads = []

    async def load(path, version):
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
