"""`rlhf up`'s settings: its own options wire the services, RLHF_<SERVICE>_* variables set the rest."""

import pytest

from rlhf.errors import ConfigError
from services.launch import UpOptions, internal_token, up_settings


def test_up_takes_service_variables_and_refuses_ones_for_its_wiring(tmp_path):
    keys = '{"sk-team-a": {"team": "a", "requests_per_minute": 5}}'
    internal_token(tmp_path)  # up() writes it before the settings
    s = up_settings(UpOptions(data_dir=tmp_path, base_port=41000),
                    environ={"RLHF_POLICY_SERVER_API_KEYS": keys, "RLHF_REWARD_SCORER_MAX_BATCH_ITEMS": "7",
                             "RLHF_TRAINER_LOG_LEVEL": "debug"})
    assert s["policy-server"].api_keys == keys and s["policy-server"].port == 41001
    assert s["reward-scorer"].max_batch_items == 7 and s["trainer"].log_level == "DEBUG"
    assert s["prompt-collector"].log_level == "INFO"

    with pytest.raises(ConfigError) as e:
        up_settings(UpOptions(data_dir=tmp_path), environ={"RLHF_POLICY_SERVER_PORT": "9", "RLHF_TRAINER_REGISTRY_DIR": "/x",
                                                            "RLHF_FEEDBACK_STORE_NOPE": "1"})
    msg = str(e.value)  # every problem of every service in one error
    assert "RLHF_POLICY_SERVER_PORT: set by the caller" in msg
    assert "RLHF_TRAINER_REGISTRY_DIR: set by the caller" in msg
    assert "RLHF_FEEDBACK_STORE_NOPE: unknown variable" in msg


def test_up_serves_the_labeling_page_on_its_own_port(tmp_path):
    internal_token(tmp_path)
    s = up_settings(UpOptions(data_dir=tmp_path, labeling_port=8123),
                    environ={"RLHF_FEEDBACK_STORE_OVERLAP_SHARE": "0.25"})
    assert s["feedback-store"].http_port == 8123 and s["feedback-store"].overlap_share == 0.25
    with pytest.raises(ConfigError, match="RLHF_FEEDBACK_STORE_HTTP_PORT: set by the caller"):
        up_settings(UpOptions(data_dir=tmp_path), environ={"RLHF_FEEDBACK_STORE_HTTP_PORT": "9"})
    with pytest.raises(ConfigError, match="overlap_share must be in 0..1"):
        up_settings(UpOptions(data_dir=tmp_path), environ={"RLHF_FEEDBACK_STORE_OVERLAP_SHARE": "1.5"})


@pytest.mark.slow
def test_rlhf_up_prints_the_page_address(tmp_path, capsys):
    from services.launch import up_in_thread
    from tests.services.helpers import free_ports, tiny_policy_registry

    tiny_policy_registry(tmp_path / "registry")
    port = free_ports(1)[0]
    opts = UpOptions(data_dir=tmp_path, base_port=free_ports(1)[0] % 20000 + 30000, base_metrics_port=0,
                     http_port=-1, labeling_port=port, announce=True)
    close = up_in_thread(opts)
    try:
        assert f"labeling page: http://127.0.0.1:{port}/" in capsys.readouterr().err
    finally:
        close()
