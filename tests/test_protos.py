"""The committed stubs are exactly what protos/ generates, and the protos follow the house style."""

import importlib.util
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = ROOT / "clients" / "python" / "rlhf_client" / "gen"


def _load_gen():
    spec = importlib.util.spec_from_file_location("gen_protos", ROOT / "scripts" / "gen_protos.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["gen_protos"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_committed_stubs_match_protos(tmp_path):
    pytest.importorskip("grpc_tools")
    gen = _load_gen()
    gen.generate(tmp_path / "gen")
    fresh = {p.relative_to(tmp_path / "gen"): p.read_text() for p in (tmp_path / "gen").rglob("*") if p.is_file()}
    committed = {p.relative_to(COMMITTED): p.read_text() for p in COMMITTED.rglob("*")
                 if p.is_file() and "__pycache__" not in p.parts}
    assert sorted(fresh) == sorted(committed), "run scripts/gen_protos.py: the set of generated files changed"
    stale = [str(k) for k in fresh if fresh[k] != committed[k]]
    assert not stale, f"stubs out of date, run scripts/gen_protos.py: {stale}"


def test_protos_follow_buf_style():
    protos = sorted((ROOT / "protos").glob("rlhf/**/*.proto"))
    assert protos
    for p in protos:
        text = p.read_text()
        area = p.parent.parent.name
        assert f"package rlhf.{area}.v1;" in text, p
        assert p.parent.name == "v1"
        for enum, body in re.findall(r"enum (\w+) \{(.*?)\}", text, flags=re.S):
            first = re.search(r"(\w+) = 0;", body).group(1)
            assert first.endswith("_UNSPECIFIED"), (p, enum)
        for name, req, resp in re.findall(r"rpc (\w+)\((?:stream )?(\w+)\) returns \((?:stream )?(\w+)\)", text):
            assert req == f"{name}Request" and resp == f"{name}Response", (p, name)


def test_sdk_exposes_topics_and_messages():
    import rlhf_client as c

    assert c.TOPIC_FEEDBACK == "rlhf.feedback.v1"
    ev = c.feedback_pb2.FeedbackEvent(event_id="x")
    assert c.feedback_pb2.FeedbackEvent.FromString(ev.SerializeToString()).event_id == "x"
    assert c.feedback_pb2.DESCRIPTOR.package == "rlhf.feedback.v1"
