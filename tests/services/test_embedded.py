"""`rlhf up` in one process (SQLite, in-process bus): one online-loop iteration end to end."""

from __future__ import annotations

import asyncio
import threading

import pytest
from sqlalchemy import text

from rlhf.storage.db import make_engine
from services.launch import UpOptions, up
from tests.services import scenario
from tests.services.helpers import free_ports, metric_value, scrape, tiny_policy_registry, wait_serving

pytestmark = pytest.mark.slow

NAMES = ["prompt-collector", "policy-server", "reward-scorer", "feedback-store", "trainer"]


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    root = tmp_path_factory.mktemp("up")
    tiny_policy_registry(root / "registry")
    # five consecutive free ports: take a base from free_ports and check the range
    base = free_ports(1)[0] % 20000 + 30000
    opts = UpOptions(data_dir=root, base_port=base, base_metrics_port=base + 10)
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()
    ready = threading.Event()
    failure: list[BaseException] = []

    def run() -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(up(opts, stop_event=stop, ready=lambda ports: ready.set()))
        except BaseException as e:  # surfaced below
            failure.append(e)
            ready.set()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    assert ready.wait(180), "services did not start"
    assert not failure, failure
    addrs = {n: f"127.0.0.1:{base + i}" for i, n in enumerate(NAMES)}
    for a in addrs.values():
        wait_serving(a)
    yield {"addrs": addrs, "root": root, "metrics_base": base + 10}
    loop.call_soon_threadsafe(stop.set)
    t.join(60)
    assert not failure, failure


def test_online_loop_iteration_in_one_process(embedded):
    addrs = embedded["addrs"]
    run = scenario.run_online_loop(addrs)
    assert run.job.status == scenario.trainer_pb2.JOB_STATUS_SUCCEEDED, run.job.message
    # a new RM version and new policy versions were published, and the policy-server serves the last
    reg_versions = list((embedded["root"] / "registry" / "reward").iterdir())
    assert [p for p in reg_versions if not p.name.startswith(".")]
    policy_published = [v for v in run.job.published_versions if v.startswith("v")]
    assert len(policy_published) >= 3  # 1 RM + 2 PPO steps
    v, gen_v = scenario.served_version(addrs["policy-server"])
    assert v == gen_v == run.job.published_versions[-1]
    # every ranking stored once
    ids = scenario.export_submission_ids(addrs["feedback-store"])
    assert len(ids) == len(set(ids)) == run.rankings_submitted >= 8
    eng = make_engine(f"sqlite:///{embedded['root'] / 'rlhf.db'}")
    with eng.connect() as c:
        assert c.execute(text("select count(*) from submissions where kind = 'ranking'")).scalar() == len(ids)
        assert c.execute(text("select count(*) from outbox where published_at is null")).scalar() == 0
    eng.dispose()
    # trainer metrics
    metrics = scrape(embedded["metrics_base"] + 4)
    for name in ("rlhf_ppo_kl", "rlhf_ppo_reward", "rlhf_ppo_kl_coef", "rlhf_ppo_samples_total"):
        assert metric_value(metrics, name) is not None, name
    assert metric_value(metrics, "rlhf_ppo_samples_total") >= 8
