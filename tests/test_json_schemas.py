"""The JSON Schema files of docs/json/: one per command, pinned to the code's formats, consistent with
their own "when" column, and strict enough to refuse what the code must never print."""

from __future__ import annotations

import copy
import re
import sys
from pathlib import Path

import pytest
from jsoncontract import problems, schema_name, schemas

from qtb_pipe import errors
from qtb_pipe.adapter import SNAPSHOT_ID_RE, TIME_RE
from qtb_pipe.cli import build_parser
from qtb_pipe.config import ENGINES, RETENTION_KEYS
from qtb_pipe.records import UTC_TIME
from scrypt_shim.shim import BACKUP_ID_RE, QUBE_NAME_RE

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import gen_json_doc  # noqa: E402


def test_one_schema_per_command():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    commands = {schema_name((c, "check")) for c in sub.choices}
    assert commands | {"common", "error", "progress"} == set(schemas())
    assert set(gen_json_doc.ORDER) == commands  # the page shows each one


def test_the_formats_are_the_codes():
    defs = schemas()["common"]["$defs"]
    assert defs["snapshot_id"]["pattern"] == f"^{SNAPSHOT_ID_RE.pattern}$"
    assert defs["backup_id"]["pattern"] == f"^{BACKUP_ID_RE.pattern}$"
    assert defs["qube"]["pattern"] == f"^(dom0|{QUBE_NAME_RE.pattern})$"
    assert defs["dom0_time"]["pattern"] == f"^{UTC_TIME.pattern}$"
    assert defs["engine_time"]["pattern"] == f"^{TIME_RE.pattern}$"
    assert defs["engine"]["enum"] == list(ENGINES)
    codes = sorted(v for k, v in vars(errors).items() if k.startswith("EXIT_") and v)
    assert defs["exit_code"]["enum"] == codes
    retention = schemas()["prune"]["properties"]["retention"]["propertyNames"]["enum"]
    assert retention == list(RETENTION_KEYS)


def objects(node: object):
    """Every (sub)schema with properties."""
    if isinstance(node, dict):
        if "properties" in node:
            yield node
        for value in node.values():
            yield from objects(value)
    elif isinstance(node, list):
        for value in node:
            yield from objects(value)


def conditions(node: object) -> list[int]:
    """The ids of the `if` parts (they test keys and require none) below `node`."""
    if isinstance(node, list):
        return [i for value in node for i in conditions(value)]
    if not isinstance(node, dict):
        return []
    below = [i for value in node.values() for i in conditions(value)]
    return [*below, id(node["if"])] if "if" in node else below


@pytest.mark.parametrize("name", sorted(schemas()))
def test_when_says_what_is_required(name):
    """A key without "x-when" is there always (required); one with it is not required at its level.
    Not for an `if` part, nor partial_failure (keys of a failure, whose table is the errors')."""
    schema, partial = schemas()[name], schemas()["common"]["$defs"]["partial_failure"]
    for node in objects(schema):
        if id(node) in conditions(schema) or node is partial:
            continue
        always = {k for k, v in node["properties"].items() if "x-when" not in v}
        assert set(node.get("required", [])) == always, (name, sorted(node["properties"]))


RUN = {
    "engine": "restic", "dry_run": False, "snapshots": ["a" * 64], "warnings": [],
    "stream_bytes": 10, "added_bytes": None, "seconds": 1.5,
    "qubes": {
        "work": {"status": "backed up", "why": "no copy yet", "snapshot": "a" * 64, "stream_bytes": 10,
                 "added_bytes": 4},
        "vault": {"status": "unchanged", "why": "unchanged since aaaa (2026-12-06)"},
    },
}  # fmt: skip
NEWEST = {
    "engine": "borg", "verified_only": True, "snapshots": ["s1"], "unreadable": {},
    "qubes": {
        "work": {"snapshot": "s1", "ok": True, "chunks": 2, "verified": 2, "bytes": 100},
        "vault": {"snapshot": "s2", "ok": False, "error": "refused", "exit_code": 5},
    },
    "error": "1 failed: vault", "exit_code": 5, "hint": "see docs/security.md",
}  # fmt: skip
VERIFIED = {  # a verify that passed: the repository check is there
    **{k: v for k, v in NEWEST.items() if k not in ("error", "exit_code", "hint")},
    "qubes": {"work": NEWEST["qubes"]["work"]},
    "check": {
        "engine": "restic",
        "ok": True,
        "read_data_subset": None,
        "output": "no errors were found",
        "warnings": [],
    },
}


def changed(answer: dict, path: str, value: object = KeyError) -> dict:
    """A copy with the key at PATH (a/b/c) set to VALUE, or removed."""
    out = copy.deepcopy(answer)
    *parents, key = path.split("/")
    node = out
    for p in parents:
        node = node[p]
    if value is KeyError:
        del node[key]
    else:
        node[key] = value
    return out


def refs(prop: dict) -> set[str]:
    """The common definitions a property refers to (by name, from whichever file)."""
    return {p["$ref"].partition("#")[2] for p in [prop, *prop.get("anyOf", [])] if "$ref" in p}


@pytest.mark.parametrize("name", sorted(schemas()))
def test_one_name_means_one_thing(name):
    """Issue 12.4: `qubes` was a list of names in one answer and {qube: result} in another, `adapter`
    the adapter's version in one and its raw check answer in another; `version` the adapter's in one
    and the engine's in another."""
    qube = "common.schema.json#/$defs/qube"
    for node in objects(schemas()[name]):
        for key, prop in node["properties"].items():
            if key == "qubes":  # always {qube: what about it}
                assert prop["type"] == "object" and prop["propertyNames"] == {"$ref": qube}, name
            if prop.get("type") == "array" and prop.get("items") == {"$ref": qube}:  # a list of names
                assert key in ("qube_names", "included"), (name, key)  # or what its role is
            assert key != "version" and not (key.endswith("_version") and prop["type"] != "string"), name
            if key == "adapter":  # always `qtb-adapter version`'s answer (null: it did not answer)
                assert "/$defs/adapter" in refs(prop), name
            if key == "snapshot":
                assert refs(prop) == {"/$defs/snapshot_id"}, (name, prop)
            if key == "engine":
                assert refs(prop) == {"/$defs/engine"}, (name, prop)


def test_answers_the_code_gives_are_valid():
    assert problems("backup", RUN) == [] and problems("restore", NEWEST) == []
    assert problems("verify", NEWEST) == []  # a partial failure of verify: no check
    assert problems("verify", VERIFIED) == []


@pytest.mark.parametrize(
    ("name", "answer", "path", "value"),
    [
        ("backup", RUN, "stray", 1),  # a key the contract does not name
        ("backup", RUN, "seconds", KeyError),  # a real run always says how long
        ("backup", RUN, "qubes/work/snapshot", KeyError),  # backed up: where to
        ("backup", RUN, "qubes/work/status", "done"),
        ("backup", RUN, "qubes/work/stream_bytes", -1),
        ("backup", RUN, "snapshots", ["no spaces allowed"]),
        ("backup", RUN, "qubes/1work", {"status": "unchanged", "why": ""}),  # not a qube name
        ("backup", RUN, "error", "half an error"),  # an error carries its exit code and hint
        ("restore", NEWEST, "qubes/vault/error", KeyError),  # a failed qube says why
        ("restore", NEWEST, "backup_id", "20261206T204345-1"),  # one shape or the other, not both
        ("verify", VERIFIED, "check", KeyError),  # a verify that passed ran the check
        ("verify", VERIFIED, "check/warnings", KeyError),  # the check's own shape
        ("restore", NEWEST, "qubes/work/ok", False),  # failed, and not why
    ],
)
def test_answers_the_code_must_not_give_are_refused(name, answer, path, value):
    assert problems(name, changed(answer, path, value)), (name, path, value)


def test_an_error_object_is_exactly_three_keys():
    error = {"error": "no configuration", "exit_code": 3, "hint": "run qtb-pipe init"}
    assert problems("error", error) == []
    assert problems("error", {**error, "exit_code": 0}) and problems("error", {**error, "extra": 1})
    assert re.search("exit_code", " ".join(problems("error", changed(error, "exit_code"))))
