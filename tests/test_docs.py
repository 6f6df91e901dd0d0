"""Docs that are generated from code must match it."""

from pathlib import Path

from rlhf.docgen import render
from services.docgen import render as render_services

ROOT = Path(__file__).resolve().parents[1]


def test_cli_reference_is_current():
    committed = (ROOT / "docs" / "cli.md").read_text()
    assert committed == render(), "docs/cli.md is stale: run `python -m rlhf.docgen > docs/cli.md`"


def test_readme_opens_with_the_two_commands_and_ci_runs_the_second():
    head = (ROOT / "README.md").read_text().split("## ")[0]
    assert "./scripts/demo.sh" in head and "./scripts/test.sh" in head
    assert "./scripts/test.sh" in (ROOT / ".ci" / "run").read_text()


def test_services_reference_is_generated_from_the_code():
    committed = (ROOT / "docs" / "services-reference.md").read_text()
    assert committed == render_services(), \
        "docs/services-reference.md is stale: run `python -m services.docgen > docs/services-reference.md`"
