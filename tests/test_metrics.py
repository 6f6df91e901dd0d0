"""rlhf.metrics: what the services export beside the PPO step table (tests/algos/test_ppo_math.py)."""

from __future__ import annotations

import math

import pytest
from prometheus_client import Gauge
from sqlalchemy import create_engine, text
from sqlalchemy.exc import IntegrityError, OperationalError

from rlhf.metrics import ServiceMetrics, set_at_scrape


def value(m: ServiceMetrics, name: str, **labels) -> float | None:
    return m.registry.get_sample_value(name, labels)


def test_ppo_step_phases_target_staleness_and_first_length():
    m = ServiceMetrics("trainer")
    # every known phase exists before the first step, so that rate() sees the first steps' increase
    assert value(m, "rlhf_ppo_phase_duration_seconds_count", phase="update") == 0.0
    step = {"step": 1, "kl": 3.0, "kl_target": 6.0, "rollout_staleness_versions": 1, "response_length_tokens": 20.0,
            "time_generate_seconds": 0.4, "time_update_seconds": 1.5, "reward_std": 0.7}
    m.observe_ppo_step(step)
    m.observe_ppo_step({**step, "step": 2, "response_length_tokens": 31.0, "time_update_seconds": 2.5})
    assert value(m, "rlhf_ppo_kl_target") == 6.0
    assert value(m, "rlhf_ppo_reward_std") == 0.7
    assert value(m, "rlhf_ppo_rollout_staleness_versions") == 1.0
    assert value(m, "rlhf_ppo_phase_duration_seconds_count", phase="update") == 2.0
    assert value(m, "rlhf_ppo_phase_duration_seconds_sum", phase="update") == pytest.approx(4.0)
    assert value(m, "rlhf_ppo_phase_duration_seconds_count", phase="generate") == 2.0
    # the first step's length stays the reference of the run; a new run (step 1 again) resets it
    assert (value(m, "rlhf_ppo_response_length_tokens"), value(m, "rlhf_ppo_start_response_length_tokens")) == (31.0, 20.0)
    m.observe_ppo_step({"step": 1, "response_length_tokens": 12.0})
    assert value(m, "rlhf_ppo_start_response_length_tokens") == 12.0


def test_eval_score_and_kl_target_are_absent_until_a_step_reports_them():
    m = ServiceMetrics("trainer")
    m.observe_ppo_step({"step": 1, "kl": 3.0, "reward": 0.2})  # fixed beta, no evaluation
    assert value(m, "rlhf_ppo_reward") == 0.2
    assert value(m, "rlhf_ppo_eval_score") is None and value(m, "rlhf_ppo_kl_target") is None
    m.observe_ppo_step({"step": 2, "reward": 0.3, "eval_score": 0.25})
    m.observe_ppo_step({"step": 3, "reward": 0.4})  # a step between evaluations keeps the last score
    assert value(m, "rlhf_ppo_eval_score") == 0.25
    m.observe_ppo_step({"step": 4, "reward": 0.5, "eval_score": -0.1})
    assert value(m, "rlhf_ppo_eval_score") == -0.1


def test_model_loaded_keeps_one_version_series_per_kind():
    m = ServiceMetrics("policy-server")
    m.model_loaded("policy", "v0001")
    m.model_loaded("policy", "v0002")
    assert value(m, "rlhf_model_version_info", kind="policy", version="v0002") == 1.0
    assert value(m, "rlhf_model_version_info", kind="policy", version="v0001") is None
    assert value(m, "rlhf_model_version_loaded_timestamp_seconds", kind="policy") > 0


def test_database_failures_are_counted_and_constraint_violations_are_not(tmp_path):
    m = ServiceMetrics("feedback-store")
    engine = create_engine(f"sqlite:///{tmp_path / 'x.db'}")
    m.observe_database(engine)
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE t (id INTEGER PRIMARY KEY)"))
        conn.execute(text("INSERT INTO t VALUES (1)"))
    with pytest.raises(IntegrityError), engine.begin() as conn:
        conn.execute(text("INSERT INTO t VALUES (1)"))
    assert value(m, "rlhf_db_errors_total") == 0.0
    with pytest.raises(OperationalError), engine.begin() as conn:
        conn.execute(text("SELECT * FROM no_such_table"))
    assert value(m, "rlhf_db_errors_total") == 1.0


def test_set_at_scrape_reads_at_most_once_per_max_age_and_never_fails_a_scrape():
    m = ServiceMetrics("feedback-store")
    g = Gauge("rlhf_test_reading", "a reading", registry=m.registry)
    reads = []

    def read():
        reads.append(1)
        if len(reads) == 3:
            raise RuntimeError("database down")
        return float(len(reads))

    set_at_scrape(g, read, max_age_s=0.0)
    assert [value(m, "rlhf_test_reading") for _ in range(2)] == [1.0, 2.0]
    assert math.isnan(value(m, "rlhf_test_reading"))
    assert value(m, "rlhf_test_reading") == 4.0
    cached = Gauge("rlhf_test_cached", "a reading", registry=m.registry)
    calls = []
    set_at_scrape(cached, lambda: calls.append(1) or 7.0, max_age_s=3600)
    assert [value(m, "rlhf_test_cached") for _ in range(3)] == [7.0, 7.0, 7.0] and len(calls) == 1
