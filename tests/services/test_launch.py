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
