"""The registry's dataset versions: pre-training text imported for the trainer's PPO-ptx."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlhf.data import read_texts
from rlhf.errors import ConfigError, DataError, NotFoundError
from rlhf.registry import DATASET_TEXTS, ModelRegistry, import_texts
from rlhf.train import LocalIO, PPOJob

TEXT = "The film was long.\nAnd slow.\n\nThe second review: great acting.\n\n\nA third one ends here.\n"


def test_imported_text_reads_back_as_the_file_does_and_a_reimport_is_the_same_version(tmp_path):
    src = tmp_path / "pretrain.txt"
    src.write_text(TEXT)
    m = import_texts(src, tmp_path / "registry")
    reg = ModelRegistry(tmp_path / "registry")
    assert reg.versions("dataset") == [m.version] and reg.versions("policy") == []
    assert reg.texts(m.version) == reg.texts("latest") == read_texts(src)
    assert len(read_texts(src)) == 3 and m.data["documents"] == 3
    assert read_texts(reg.path("dataset", m.version) / DATASET_TEXTS) == read_texts(src)
    assert import_texts(src, tmp_path / "registry").version == m.version  # same bytes: no second version
    src.write_text(TEXT + "\nA fourth.\n")
    assert import_texts(src, tmp_path / "registry").version != m.version
    assert len(reg.texts("latest")) == 4


def test_a_bad_file_stores_nothing_and_unknown_versions_are_not_found(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"title": "no text"}) + "\n")
    with pytest.raises(DataError, match="not pre-training text"):
        import_texts(bad, tmp_path / "registry")
    reg = ModelRegistry(tmp_path / "registry")
    assert reg.versions("dataset") == []
    with pytest.raises(NotFoundError, match="no dataset version yet"):
        reg.texts("latest")
    with pytest.raises(NotFoundError, match="no dataset version 'v1'"):
        reg.texts("v1")


def test_cli_import_dataset_prints_the_version(tmp_path, capsys):
    from rlhf.cli import main

    src = tmp_path / "pretrain.txt"
    src.write_text(TEXT)
    assert main(["import-dataset", str(src), "--data-dir", str(tmp_path / "data")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["documents"] == 3 and (Path(out["path"]) / DATASET_TEXTS).is_file()
    assert Path(out["path"]).parent == tmp_path / "data" / "registry" / "dataset"


def test_rlhf_train_refuses_a_registry_dataset():
    with pytest.raises(ConfigError, match="ptx_dataset names a dataset of the trainer's registry"):
        LocalIO().ptx_texts(PPOJob(ptx_dataset="latest"))
