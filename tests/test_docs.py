"""The docs match the code: generated tables are current, every error code the code raises is documented,
every command and parameter is named. (Regenerate with `.venv/bin/python tests/record_docs.py`.)"""

from __future__ import annotations

import ast
from dataclasses import fields
from pathlib import Path

import pytest

from record_docs import GENERATED, PROTOCOL, README, ROOT, block

SOURCE = ROOT / "streamgen"


@pytest.mark.parametrize("path,name", list(GENERATED), ids=[f"{p.name}:{n}" for p, n in GENERATED])
def test_generated_tables_match_the_code(path: Path, name: str) -> None:
    assert block(path.read_text(), "generated", name) == GENERATED[(path, name)](), (
        f"{path.name}'s {name} table is stale: run .venv/bin/python tests/record_docs.py --tables")


def _codes_in_source() -> set[str]:
    """Every literal error code the package raises: code="...", code = "...", a `code` parameter's default,
    Refusal(status, "code", ...), ErrorEvent(key, "code", ...), ErrorMessage(id, "code", ...),
    RequestRefused("code", ...)."""
    codes = set()
    for path in SOURCE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.keyword) and node.arg == "code" and isinstance(node.value, ast.Constant):
                codes.add(node.value.value)
            elif isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "code" for t in node.targets):
                if isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
                    codes.add(node.value.value)
            elif isinstance(node, ast.arguments):
                named = node.args[len(node.args) - len(node.defaults):] + node.kwonlyargs
                defaults = list(node.defaults) + list(node.kw_defaults)
                codes.update(d.value for a, d in zip(named, defaults)
                             if a.arg == "code" and isinstance(d, ast.Constant) and isinstance(d.value, str))
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                position = {"Refusal": 1, "ErrorEvent": 1, "ErrorMessage": 1, "RequestRefused": 0}.get(node.func.id)
                if position is not None and len(node.args) > position and isinstance(node.args[position], ast.Constant):
                    codes.add(node.args[position].value)
    return codes


def test_every_error_code_the_code_raises_is_documented() -> None:
    from streamgen.errors import ERROR_CODES

    found = _codes_in_source()
    assert len(found) > 15, "the scan found the codes"
    assert found - set(ERROR_CODES) == set(), "add them to streamgen/errors.py ERROR_CODES"
    assert set(ERROR_CODES) - found == set(), "documented codes the code never raises"


def test_every_command_and_benchmark_is_in_the_readme() -> None:
    from streamgen.cli import build_parser

    text = README.read_text()
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices  # noqa: SLF001 - argparse keeps them here
    for name, sub in commands.items():
        assert f"streamgen {name}" in text, f"the README does not name `streamgen {name}`"
        if name == "bench":
            for bench in sub._subparsers._group_actions[0].choices:  # noqa: SLF001
                assert f"streamgen bench {bench}" in text, f"the README does not name `streamgen bench {bench}`"


def test_every_sampling_parameter_is_in_the_protocol_doc() -> None:
    from streamgen.engine.params import SamplingParams

    text = PROTOCOL.read_text()
    for f in fields(SamplingParams):
        assert f"| `{f.name}` |" in text, f"docs/protocol.md's parameter table lacks {f.name}"


def test_the_protocol_doc_states_each_sampling_default_as_the_code_has_it() -> None:
    """docs/protocol.md's params table: the default column of every parameter with a plain default (a number or
    a boolean) is the code's."""
    import re

    from streamgen.engine.params import SamplingParams

    text = PROTOCOL.read_text()
    for f in fields(SamplingParams):
        if isinstance(f.default, bool) or not isinstance(f.default, (int, float)):
            continue
        row = re.search(rf"^\| `{f.name}` \| [^|]+ \| ([^|]+) \|", text, flags=re.M)
        assert row, f"docs/protocol.md has no row for {f.name}"
        assert float(row.group(1).strip()) == float(f.default), f"{f.name}: the doc says {row.group(1).strip()}"
