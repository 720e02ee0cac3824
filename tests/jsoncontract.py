"""The `--json` contract: every answer the tests see is validated against its command's JSON Schema
in docs/json/ (an error, or a partial failure, too). The schemas are the one definition; docs/json.md
is generated from them."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

from jsonschema import Draft202012Validator
from referencing import Registry, Resource

SCHEMAS = Path(__file__).resolve().parent.parent / "docs/json"


@cache
def schemas() -> dict[str, dict]:
    return {
        p.name.removesuffix(".schema.json"): json.loads(p.read_text()) for p in SCHEMAS.glob("*.schema.json")
    }


@cache
def validator(name: str) -> Draft202012Validator:
    registry = Registry().with_resources((s["$id"], Resource.from_contents(s)) for s in schemas().values())
    schema = schemas()[name]
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema, registry=registry)


def schema_name(args: tuple[str, ...]) -> str:
    """The schema of a command line: its subcommand (`config check`: config-check)."""
    words = [a for a in args if not a.startswith("-")]
    return "config-check" if words[:1] == ["config"] else words[0]


def problems(name: str, data: object) -> list[str]:
    return [
        f"{'/'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}"
        for e in validator(name).iter_errors(data)
    ]


def check_answer(args: tuple[str, ...], stdout: bytes, returncode: int) -> object:
    """The one JSON object on stdout fits its command's schema; a failure's is an error object or
    the command's result with the error's keys (a partial failure), carrying the exit code."""
    name = schema_name(args)
    if "--progress" in args:  # JSON Lines: progress objects, then the result on one line
        *lines, last = stdout.decode().splitlines()
        for line in lines:
            assert not (found := problems("progress", json.loads(line))), (args, line, found)
        stdout = last.encode()
    data = json.loads(stdout)
    found = problems(name, data)
    if returncode == 0:
        assert not found, (args, found, f"see docs/json/{name}.schema.json")
        assert "error" not in data, (args, data["error"])
        return data
    assert data.get("exit_code") == returncode, (args, returncode, data)
    if set(data) == {"error", "exit_code", "hint"}:
        found = problems("error", data)
    assert not found, (args, found, f"see docs/json/{name}.schema.json")
    return data
