"""A Kafka broker and PostgreSQL of a test's own, run by ``scripts/infra.sh`` from a state directory
of their own on free ports: the tests that crash them, or configure them differently (SASL/TLS,
durable PostgreSQL), never touch the servers the other tests share.

The state directory is made with :func:`tempfile.mkdtemp` (not pytest's ``tmp_path``, whose
parents only root may enter: as root, PostgreSQL runs as the ``postgres`` OS user).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "scripts" / "infra.sh"


def own_servers_or_skip() -> None:
    """Skip unless this machine can run servers of a test's own (what scripts/test.sh needs anyway)."""
    if os.environ.get("RLHF_TEST_INFRA") == "none":
        pytest.skip("RLHF_TEST_INFRA=none: no Kafka broker or PostgreSQL is started for the tests")
    if shutil.which("java") is None:
        pytest.skip("needs Java 17+ for a Kafka broker of the test's own (scripts/infra.sh)")


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port_run(n: int) -> int:
    """A port p such that p .. p+n-1 are all free now."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            p = s.getsockname()[1]
        if p + n <= 65535 and all(_free(p + i) for i in range(1, n)):
            return p
    raise RuntimeError(f"no {n} consecutive free ports found")


class Infra:
    """``scripts/infra.sh`` on a state directory of its own. ``env`` holds what ``start`` wrote
    (RLHF_TEST_KAFKA_BOOTSTRAP, RLHF_TEST_DATABASE_URL, and with SASL the login's files)."""

    def __init__(self, *, sasl: bool = False, durable: bool = False, timeout: int = 240):
        self.dir = Path(tempfile.mkdtemp(prefix="rlhf-infra-"))
        self.dir.chmod(0o755)
        self.timeout = timeout
        self.vars = {
            "RLHF_TEST_INFRA_DIR": str(self.dir / "state"),
            "RLHF_TEST_KAFKA_PORT": str(free_port_run(3)),
            "RLHF_TEST_PG_PORT": str(free_port_run(1)),
            "RLHF_TEST_PYTHON": sys.executable,
            "RLHF_TEST_KAFKA_SASL": "1" if sasl else "0",
            "RLHF_TEST_PG_DURABLE": "1" if durable else "0",
            "RLHF_TEST_INFRA_TIMEOUT": str(timeout // 2),
        }
        self.env: dict[str, str] = {}

    def run(self, *args: str) -> str:
        """Run ``scripts/infra.sh ARGS``; its output (both streams) on failure in the error."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("RLHF_TEST_")}
        p = subprocess.run(["bash", str(INFRA), *args], env={**env, **self.vars}, cwd=ROOT, text=True,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=self.timeout)
        if p.returncode != 0:
            raise RuntimeError(f"scripts/infra.sh {' '.join(args)} failed ({p.returncode}):\n{p.stdout[-6000:]}")
        return p.stdout

    def start(self, what: str = "all") -> "Infra":
        self.run("start", what)
        self.env = {}
        for line in (self.dir / "state" / "env").read_text().splitlines():
            if line.startswith("export "):
                k, _, v = line[len("export "):].partition("=")
                self.env[k] = v
        return self

    def crash(self, what: str) -> None:
        self.run("crash", what)

    def restart(self, what: str = "all") -> None:
        self.run("restart", what)

    def stop(self) -> None:
        try:
            self.run("stop")
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)
