"""rlhf.config: YAML/TOML files into nested dataclasses, --set overrides, and errors naming fields."""

from __future__ import annotations

import pytest

from rlhf.algos.ppo import PPOConfig
from rlhf.algos.rm import RMTrainConfig
from rlhf.config import apply_overrides, from_dict, load_config, read_config_file, to_dict
from rlhf.errors import ConfigError
from rlhf.generation import SamplingParams
from rlhf.train import PPOJob, RMJob

PPO_YAML = """\
policy: models/sft
reward_model: models/rm
prompts: data/prompts.jsonl
output: models/ppo-1
steps: 20
ppo:
  batch_size: 16
  mini_batch_size: 4
  lr: 2.0e-5
  kl_target: null
  adaptive_kl: false
  stop_token_ids: [13, 198]
  value_model: separate
  sampling:
    max_new_tokens: 24
    min_new_tokens: 4
"""

RM_TOML = """\
model = "minilm"
backbone = "encoder"
data = "data/prefs.jsonl"
output = "models/rm-1"

[rm]
loss = "best_of_k"
epochs = 2
lr = 1e-4
normalize_unit_variance = true
"""


def test_yaml_loads_into_nested_dataclasses(tmp_path):
    path = tmp_path / "ppo.yaml"
    path.write_text(PPO_YAML)
    job = load_config(PPOJob, path)
    assert isinstance(job, PPOJob) and isinstance(job.ppo, PPOConfig) and isinstance(job.ppo.sampling, SamplingParams)
    assert (job.policy, job.reward_model, job.steps) == ("models/sft", "models/rm", 20)
    assert job.ppo.batch_size == 16 and job.ppo.mini_batch_size == 4
    assert job.ppo.lr == 2e-5 and isinstance(job.ppo.lr, float)
    assert job.ppo.kl_target is None and job.ppo.adaptive_kl is False
    assert job.ppo.stop_token_ids == (13, 198)
    assert job.ppo.value_model == "separate"
    assert job.ppo.sampling.max_new_tokens == 24 and job.ppo.sampling.min_new_tokens == 4
    # fields the file leaves out keep their defaults
    assert job.ppo.sampling.temperature == 1.0
    assert job.ppo.clip_range == 0.2 and job.ptx_data is None


def test_toml_loads_into_nested_dataclasses(tmp_path):
    path = tmp_path / "rm.toml"
    path.write_text(RM_TOML)
    job = load_config(RMJob, path)
    assert isinstance(job.rm, RMTrainConfig)
    assert (job.model, job.backbone, job.output) == ("minilm", "encoder", "models/rm-1")
    assert job.rm.loss == "best_of_k" and job.rm.epochs == 2
    assert job.rm.lr == 1e-4 and job.rm.normalize_unit_variance is True
    assert job.rm.batch_size == 16  # default


def test_overrides_apply_on_top_of_the_file(tmp_path):
    path = tmp_path / "ppo.yaml"
    path.write_text(PPO_YAML)
    job = load_config(PPOJob, path, ["ppo.lr=1e-5", "ppo.sampling.max_new_tokens=8", "steps=3",
                                     "ppo.stop_token_ids=[1, 2, 3]", "ppo.adaptive_kl=true", "ptx_data=d.jsonl"])
    assert job.ppo.lr == 1e-5
    assert job.ppo.sampling.max_new_tokens == 8
    assert job.ppo.sampling.min_new_tokens == 4  # siblings from the file survive
    assert job.steps == 3 and job.ppo.stop_token_ids == (1, 2, 3)
    assert job.ppo.adaptive_kl is True and job.ptx_data == "d.jsonl"


def test_apply_overrides_on_plain_dicts():
    d = {"ppo": {"lr": 0.1, "sampling": {"min_new_tokens": 5}}, "steps": 1}
    out = apply_overrides(d, ["ppo.lr=1e-5", "ppo.sampling.max_new_tokens=8", "new.deep.key=x", "empty="])
    assert out["ppo"]["sampling"] == {"min_new_tokens": 5, "max_new_tokens": 8}
    assert float(out["ppo"]["lr"]) == 1e-5
    assert out["new"] == {"deep": {"key": "x"}}
    assert out["empty"] == "" and out["steps"] == 1
    # the input is not modified
    assert d == {"ppo": {"lr": 0.1, "sampling": {"min_new_tokens": 5}}, "steps": 1}
    # a value containing '=' keeps everything after the first '='
    assert apply_overrides({}, ["a=b=c"]) == {"a": "b=c"}


def test_override_without_equals_sign():
    with pytest.raises(ConfigError, match="ppo.lr"):
        apply_overrides({}, ["ppo.lr"])


def test_overrides_without_a_file():
    job = load_config(PPOJob, None, ["ppo.batch_size=8", "ppo.mini_batch_size=8"])
    assert job.ppo.batch_size == 8 and job.policy == ""


@pytest.mark.parametrize(
    "overrides, field",
    [
        (["ppo.lrr=1e-5"], "ppo.lrr"),
        (["ppo.sampling.temp=0.5"], "ppo.sampling.temp"),
        (["stepz=3"], "stepz"),
    ],
)
def test_unknown_field_is_named(overrides, field):
    with pytest.raises(ConfigError) as ei:
        load_config(PPOJob, None, overrides)
    assert field in str(ei.value)


@pytest.mark.parametrize(
    "overrides, field",
    [
        (["ppo.batch_size=many"], "ppo.batch_size"),
        (["ppo.batch_size=true"], "ppo.batch_size"),
        (["ppo.batch_size=8.5"], "ppo.batch_size"),
        (["ppo.lr=fast"], "ppo.lr"),
        (["ppo.adaptive_kl=3"], "ppo.adaptive_kl"),
        (["ppo.value_model=tied"], "ppo.value_model"),
        (["ppo.stop_token_ids=7"], "ppo.stop_token_ids"),
        (["ppo.stop_token_ids=[1, x]"], "ppo.stop_token_ids[1]"),
        (["ppo.sampling=5"], "ppo.sampling"),
        (["ppo.sampling.max_new_tokens=[8]"], "ppo.sampling.max_new_tokens"),
        (["policy=5"], "policy"),
        (["ppo.kl_target=high"], "ppo.kl_target"),
    ],
)
def test_wrong_type_is_named(overrides, field):
    with pytest.raises(ConfigError) as ei:
        load_config(PPOJob, None, overrides)
    assert field in str(ei.value), str(ei.value)


def test_wrong_type_in_a_file_is_named(tmp_path):
    path = tmp_path / "rm.yaml"
    path.write_text("rm:\n  epochs: two\n")
    with pytest.raises(ConfigError, match=r"rm\.epochs"):
        load_config(RMJob, path)
    path.write_text("backbone: lstm\n")
    with pytest.raises(ConfigError, match="backbone"):
        load_config(RMJob, path)


def test_dataclass_validation_becomes_config_error():
    with pytest.raises(ConfigError, match="mini_batch_size"):
        load_config(PPOJob, None, ["ppo.batch_size=10", "ppo.mini_batch_size=4"])
    with pytest.raises(ConfigError, match="top_p"):
        load_config(PPOJob, None, ["ppo.sampling.top_p=0"])


def test_numbers_are_coerced():
    job = from_dict(PPOJob, {"steps": 4.0, "ppo": {"lr": 1, "kl_coef": "0.5", "missing_stop_penalty": -1}})
    assert job.steps == 4 and isinstance(job.steps, int)
    assert job.ppo.lr == 1.0 and isinstance(job.ppo.lr, float)
    assert job.ppo.kl_coef == 0.5
    assert job.ppo.missing_stop_penalty == -1.0


def test_missing_and_bad_files(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as ei:
        load_config(PPOJob, missing)
    assert str(missing) in str(ei.value)
    with pytest.raises(ConfigError):
        read_config_file(tmp_path)  # a directory
    bad = tmp_path / "bad.yaml"
    bad.write_text("ppo: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        read_config_file(bad)
    bad_toml = tmp_path / "bad.toml"
    bad_toml.write_text("steps = = 3\n")
    with pytest.raises(ConfigError, match="bad.toml"):
        read_config_file(bad_toml)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError):
        read_config_file(listy)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert read_config_file(empty) == {}
    assert load_config(RMJob, empty) == RMJob()


def test_to_dict_round_trips(tmp_path):
    path = tmp_path / "ppo.yaml"
    path.write_text(PPO_YAML)
    job = load_config(PPOJob, path)
    d = to_dict(job)
    assert d["ppo"]["sampling"]["max_new_tokens"] == 24
    assert d["ppo"]["stop_token_ids"] == [13, 198]
    assert from_dict(PPOJob, d) == job


def test_config_error_is_a_value_error():
    with pytest.raises(ValueError):
        load_config(PPOJob, None, ["ppo.lrr=1"])


# every bad value of the probe (and more) is refused, all at once, by the CLI and the trainer alike
BAD_OVERRIDES = [
    ("ppo", "steps=0", "steps: must be in [1, 1e+07], got 0"),
    ("ppo", "steps=-3", "steps: must be in"),
    ("rm", "rm.epochs=0", "rm.epochs: must be in [1, 1000], got 0"),
    ("rm", "since_unix=.nan", "since_unix: must be a finite number, got nan"),
    ("ppo", "ppo.kl_coef=.inf", "ppo.kl_coef: must be a finite number, got inf"),
    ("ppo", "ppo.kl_coef=-1", "ppo.kl_coef: must be in [0, 1000], got -1"),
    ("ppo", "ppo.lr=-0.1", "ppo.lr: must be in [0, 1]"),
    ("ppo", "ppo.sampling.temperature=.nan", "ppo.sampling.temperature: must be a finite number"),
    ("ppo", "ppo.sampling.top_p=2", "ppo.sampling.top_p: must be in (0, 1], got 2"),
    ("ppo", "ppo.sampling.max_new_tokens=0", "max_new_tokens"),
    ("ppo", "ppo.gamma=1.5", "ppo.gamma: must be in [0, 1], got 1.5"),
    ("ppo", "ppo.clip_range=0", "ppo.clip_range: must be in (0, 10], got 0"),
    ("ppo", "reference=" + "v" * 5_000_000, "reference: 5000000 characters, at most 4096"),
    ("sft", "sft.batch_size=0", "sft.batch_size: must be in [1, 65536], got 0"),
    ("sft", "sft.epochs=0", "sft.epochs: must be in (0, 10000], got 0"),
    ("sft", "min_demonstrations=0", "min_demonstrations: must be in"),
    ("rm", "min_comparisons=-1", "min_comparisons: must be in"),
]


@pytest.mark.parametrize("stage,override,needle", BAD_OVERRIDES, ids=[o[:30] for _, o, _ in BAD_OVERRIDES])
def test_bad_job_values_are_refused(stage, override, needle):
    from rlhf.train import JOBS

    with pytest.raises(ConfigError) as e:
        load_config(JOBS[stage], None, [override])
    assert needle in str(e.value)
    assert len(str(e.value)) < 1000  # a huge value is named, not echoed


def test_every_bad_value_is_listed_in_one_error():
    from rlhf.train import PPOJob

    with pytest.raises(ConfigError) as e:
        load_config(PPOJob, None, ["steps=0", "ppo.kl_coef=.inf", "ppo.batch_size=0", "ppo.sampling.top_p=2"])
    msg = str(e.value)
    assert msg.startswith("4 invalid values:"), msg
    for needle in ("steps:", "ppo.kl_coef:", "ppo.sampling.top_p:", "batch_size"):
        assert needle in msg
