"""Write the parameter tables of charts/rlhf/README.md from the `## @param` lines of values.yaml.

    python scripts/chart_readme.py           # rewrite the tables in place
    python scripts/chart_readme.py --check   # exit 1 when the README is stale (tests/deploy does this)

values.yaml documents each key with a line `## @param <dotted.key> <description>` and groups them
with `## @section <title>`; the table shows each key's default from the file. A value documented as
a whole (a map such as `resources`) covers the keys inside it. The tables replace what lies between
the README's `<!-- parameters:begin -->` and `<!-- parameters:end -->` markers.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import yaml

CHART = Path(__file__).resolve().parents[1] / "charts" / "rlhf"
BEGIN, END = "<!-- parameters:begin -->", "<!-- parameters:end -->"
_PARAM = re.compile(r"^\s*## @param (\S+)\s+(.*\S)\s*$")
_SECTION = re.compile(r"^\s*## @section (.*\S)\s*$")


def parse(values_text: str) -> list[tuple[str, list[tuple[str, str]]]]:
    """[(section title, [(key, description), ...]), ...] in file order."""
    sections: list[tuple[str, list[tuple[str, str]]]] = []
    for line in values_text.splitlines():
        if m := _SECTION.match(line):
            sections.append((m.group(1), []))
        elif m := _PARAM.match(line):
            if not sections:
                raise ValueError(f"@param {m.group(1)} before the first @section")
            sections[-1][1].append((m.group(1), m.group(2)))
    return sections


def lookup(values: dict, key: str):
    node = values
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(key)
        node = node[part]
    return node


def leaves(node, prefix: str = "") -> list[str]:
    """Dotted paths of every value that is not a non-empty map."""
    if isinstance(node, dict) and node:
        return [p for k, v in node.items() for p in leaves(v, f"{prefix}.{k}" if prefix else k)]
    return [prefix]


def undocumented(values: dict, documented: set[str]) -> list[str]:
    """Keys of values.yaml that neither have an @param nor lie inside a documented one."""
    def covered(path: str) -> bool:
        parts = path.split(".")
        return any(".".join(parts[:i]) in documented for i in range(1, len(parts) + 1))

    return [p for p in leaves(values) if not covered(p)]


def _cell(value) -> str:
    text = json.dumps(value, separators=(", ", ": ")) if not isinstance(value, str) else json.dumps(value)
    return "`" + text.replace("|", "\\|") + "`"


def render(values_text: str) -> str:
    values = yaml.safe_load(values_text)
    sections = parse(values_text)
    documented = {k for _, params in sections for k, _ in params}
    missing = [k for k in sorted(documented) if not _exists(values, k)]
    if missing:
        raise ValueError(f"@param names keys that values.yaml does not have: {', '.join(missing)}")
    bare = undocumented(values, documented)
    if bare:
        raise ValueError(f"values.yaml keys without an @param: {', '.join(bare)}")
    out = []
    for title, params in sections:
        out += [f"### {title}", "", "| Name | Description | Default |", "|---|---|---|"]
        out += ["| `%s` | %s | %s |" % (k, d.replace("|", "\\|"), _cell(lookup(values, k))) for k, d in params]
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def _exists(values: dict, key: str) -> bool:
    try:
        lookup(values, key)
        return True
    except KeyError:
        return False


def updated_readme(readme: str, tables: str) -> str:
    if BEGIN not in readme or END not in readme:
        raise ValueError(f"the README lacks the markers {BEGIN} ... {END}")
    head, rest = readme.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n\n{tables}\n{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="exit 1 when the README is not what this writes")
    args = p.parse_args(argv)
    readme_path = CHART / "README.md"
    readme = readme_path.read_text()
    new = updated_readme(readme, render((CHART / "values.yaml").read_text()))
    if args.check:
        if new != readme:
            print("charts/rlhf/README.md is stale: run python scripts/chart_readme.py", file=sys.stderr)
            return 1
        return 0
    readme_path.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
