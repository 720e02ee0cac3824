"""The shim's formats and functions (also what the driver and the adapter import), the driver's
manifest module, and the shim module's own constraints."""

from __future__ import annotations

import ast
import hashlib
import hmac
import json
import os
import struct
import sys
from pathlib import Path

import pytest
from shimtools import compute_tag

from qtb_pipe import manifest, runs
from qtb_pipe.errors import QtbError
from scrypt_shim import shim

SECRET = bytes(range(32))
TOKEN = "0123456789abcdef0123456789abcdef"
USER = f"qtb1:{TOKEN}:{SECRET.hex()}"


def test_module_is_a_standalone_stdlib_executable() -> None:
    source_path = Path(shim.__file__)
    source = source_path.read_text()
    assert source.startswith("#!/usr/bin/python3\n")
    assert os.access(source_path, os.X_OK)
    imported = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "no relative imports: the file is copied alone"
            imported.add((node.module or "").split(".")[0])
    assert imported <= set(sys.stdlib_module_names) | {"__future__"}, imported


def test_keys_follow_design() -> None:
    keys = shim.derive_keys(SECRET)
    chunk_key = hmac.new(SECRET, b"qtb-pipe v1 chunk", hashlib.sha256).digest()
    assert keys.chunk_key == chunk_key
    assert keys.manifest_key == hmac.new(SECRET, b"qtb-pipe v1 manifest", hashlib.sha256).digest()
    assert keys.kcv == hmac.new(chunk_key, b"qtb-pipe v1 kcv", hashlib.sha256).digest()[:8]


def test_tag_and_trailer_layout() -> None:
    keys = shim.derive_keys(SECRET)
    data = b"hello world" * 1000
    expected_tag = hmac.new(
        keys.chunk_key,
        b"qtb-pipe v1 tag\0vm1/root.img.004\0" + data + struct.pack(">Q", len(data)),
        hashlib.sha256,
    ).digest()
    assert compute_tag(keys.chunk_key, "vm1/root.img.004", data) == expected_tag
    streamed = shim.TagHasher(keys.chunk_key, "vm1/root.img.004")
    for start in range(0, len(data), 777):
        streamed.update(memoryview(data)[start : start + 777])
    assert streamed.finish() == expected_tag and streamed.size == len(data)

    trailer = shim.make_trailer(keys, len(data), expected_tag)
    assert len(trailer) == 56
    assert trailer == b"QTBPIPE1" + keys.kcv + struct.pack(">Q", len(data)) + expected_tag
    assert shim.parse_trailer(trailer) == shim.Trailer(keys.kcv, len(data), expected_tag)
    assert shim.parse_trailer(b"x" + trailer[1:]) is None


def test_parse_qtb_passphrase() -> None:
    header = shim.parse_qtb_passphrase(f"backup-header!{USER}".encode())
    assert header == shim.QtbPassphrase("backup-header", None, TOKEN, SECRET)
    chunk = shim.parse_qtb_passphrase(f"20261124T003908-3222!vm12/private.img.003!{USER}".encode())
    assert chunk == shim.QtbPassphrase("vm12/private.img.003", "20261124T003908-3222", TOKEN, SECRET)
    assert runs.make_user_passphrase(TOKEN, SECRET) == USER

    for passphrase in (
        b"backup-header!my own passphrase",
        f"backup-header!{USER.upper()}".encode(),
        b"",
        b"\xff",
    ):
        assert shim.parse_qtb_passphrase(passphrase) is None, passphrase
    # Anything holding "qtb1:" that is not a well-formed qtb-pipe passphrase is refused, never handed to
    # the real scrypt: e.g. a line cut by fgets, which would give the real scrypt part of the secret.
    malformed = [
        f"backup-header!{USER}x",
        f"backup-header!x{USER}",
        f"backup-header!{USER[:-1]}",
        f"20261124T003908-3222!vm1/a.000!{USER[:40]}",
        "20261124T003908-3222!vm1/a.000!qtb1:",
        "my own passphrase with qtb1: in it",
        USER,
        f"!{USER}",
        f"20261124T003908-3222!{USER}",
        f"2026!vm1/a.000!{USER}",
        f"20261124T003908-3222!../etc/x.000!{USER}",
        f"20261124T003908-3222!vm1/../x.000!{USER}",
        f"20261124T003908-3222!/abs.000!{USER}",
        f"20261124T003908-3222!vm1/private.img!{USER}",  # no chunk number
        "20261124T003908-3222!vm1/\N{SNOWMAN}.000!" + USER,
    ]
    for passphrase in malformed:
        with pytest.raises(shim.ShimError, match="not a well-formed qtb-pipe passphrase"):
            shim.parse_qtb_passphrase(passphrase.encode())
    # what dom0 makes of a wrong token or secret is one of them: the shim refuses it
    wrong = runs.make_user_passphrase("ABC", SECRET)
    with pytest.raises(shim.ShimError):
        shim.parse_qtb_passphrase(f"20261124T003908-3222!vm1/private.img.000!{wrong}".encode())


ENTRY = manifest.QubeEntry("vm3/", "AppVM", "debian-12", "sys-net")
CHUNKS = [
    {"path": "backup-header", "size": 12, "tag": "ab" * 32},
    {"path": "vm3/private.img.000", "size": 5, "tag": "cd" * 32},
]


def sealed_body(body: dict) -> bytes:
    """The sealed form built by hand (test oracle): canonical JSON and the HMAC of the body."""
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
    seal = hmac.new(shim.derive_keys(SECRET).manifest_key, canonical, "sha256").hexdigest()
    return b'{"manifest":' + canonical + b',"seal":"' + seal.encode() + b'"}'


def test_manifest_seal_round_trip_and_rejections() -> None:
    made = manifest.build(
        SECRET, "20261124T003908-3222", "2026-11-24T00:39:08Z", "borg", {"work": ENTRY}, CHUNKS
    )
    body = json.loads(made.sealed)["manifest"]
    assert body["format"] == shim.MANIFEST_FORMAT and body["qubes"]["work"]["path"] == "vm3/"
    assert made.sealed == sealed_body(body)  # the sealed form is exactly the documented bytes
    back = manifest.verify(SECRET, made.sealed)
    assert (back.backup_id, back.qubes, back.chunks, back.sha256) == (
        made.backup_id,
        {"work": ENTRY},
        CHUNKS,
        made.sha256,
    )
    assert back.chunks_of(["vm3/"]) == CHUNKS[1:]
    # only the exact sealed form is accepted: the seal is checked over the raw bytes before parsing
    with pytest.raises(QtbError, match="not in the sealed form"):
        manifest.verify(SECRET, json.dumps(json.loads(made.sealed), indent=2).encode())
    with pytest.raises(QtbError, match="seal does not verify"):
        manifest.verify(bytes(32), made.sealed)
    forged = made.sealed.replace(b'"size":5', b'"size":6')
    with pytest.raises(QtbError, match="seal does not verify"):
        manifest.verify(SECRET, forged)
    with pytest.raises(QtbError, match="not in the sealed form"):
        manifest.verify(SECRET, b"{")
    with pytest.raises(QtbError, match="larger than"):
        manifest.verify(SECRET, b" " * (shim.MAX_MANIFEST_BYTES + 1))


@pytest.mark.parametrize(
    "change",
    [
        lambda b: b.update(format="qtb-pipe-manifest-1"),
        lambda b: b.update(backup_id="20261124T003908-3222\n"),
        lambda b: b.pop("qubes"),  # `qubes` with each qube's path is required: fail closed
        lambda b: b["qubes"]["work"].pop("path"),
        lambda b: b["qubes"]["work"].update(path="../"),
        lambda b: b["qubes"]["work"].update({"class": "Evil"}),
        lambda b: b["qubes"].update({"bad name!": b["qubes"]["work"]}),
        lambda b: b["chunks"].append({"path": "x", "size": 1, "tag": "00" * 32}),
        lambda b: b["chunks"].append({"path": "vm3/private.img.001", "size": -1, "tag": "00" * 32}),
        lambda b: b["chunks"].append({"path": "vm3/private.img.001", "size": True, "tag": "00" * 32}),
        lambda b: b["chunks"].append({"path": "vm3/private.img.001", "size": 1, "tag": "AB" * 32}),
        lambda b: b.update(engine="tar"),
    ],
)
def test_sealed_manifest_with_wrong_fields_still_fails_closed(change) -> None:
    body = json.loads(
        manifest.build(SECRET, "20261124T003908-3222", "t", "borg", {"work": ENTRY}, CHUNKS).sealed
    )["manifest"]
    change(body)
    with pytest.raises(QtbError, match="not a qtb-pipe-manifest-2 manifest"):
        manifest.verify(SECRET, sealed_body(body))


def test_header_backup_id() -> None:
    header = b"version=4\nencrypted=True\nbackup-id=20261124T003908-3222\n"
    assert shim.header_backup_id(header) == "20261124T003908-3222"
    assert shim.header_backup_id(b"version=4\n") is None


def test_plan_lines_are_fixed_width() -> None:
    line = runs.plan_line("vm3/private.img.000", 5, "cd" * 32)
    assert len(line) == shim.PLAN_LINE and line.split() == [b"vm3/private.img.000", b"5", b"cd" * 32]
    with pytest.raises(ValueError):
        runs.plan_line("x" * shim.PLAN_LINE)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["enc", "-", "out"], ("enc", [], False, "-", "out")),
        (["enc", "in", "out"], ("enc", [], False, "in", "out")),
        (["dec", "-f", "in", "out"], ("dec", ["-f"], False, "in", "out")),
        (["enc", "-P", "-t", "0.1", "in", "out"], ("enc", ["-t", "0.1"], True, "in", "out")),
        (["dec", "-t", "1", "-f", "in", "out"], ("dec", ["-t", "1", "-f"], False, "in", "out")),
    ],
)
def test_the_call_forms_qubes_uses(args: list[str], expected: tuple) -> None:
    inv = shim.parse_command_line(args)
    assert (inv.mode, inv.options, inv.from_stdin, inv.infile, inv.outfile) == expected


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["info", "x"],
        ["--version"],
        ["enc"],
        ["enc", "in"],  # output on stdout
        ["dec", "-", "out"],
        ["enc", "a", "b", "c"],
        ["enc", "-x", "a", "b"],
        ["enc", "-fP", "a", "b"],
        ["enc", "-t0.1", "a", "b"],
        ["enc", "-t", "abc", "a", "b"],
        ["enc", "--logN", "10", "-r", "1", "-p", "1", "a", "b"],
        ["enc", "-m", "0.1", "a", "b"],
        ["enc", "-P", "-", "out"],
        ["enc", "-P", "-P", "a", "b"],
        ["enc", "--passphrase", "env:X", "a", "b"],
        ["enc", "--", "a", "b"],
        ["enc", "a", "-"],
    ],
)
def test_command_lines_left_to_the_real_scrypt(args: list[str]) -> None:
    with pytest.raises(shim.NotHandled):
        shim.parse_command_line(args)


def test_manifest_seal_is_checked_before_any_parsing() -> None:
    """Deeply nested JSON from the backup qube must be refused as unsealed, not crash json.loads."""
    deep = b"[" * 200_000 + b"]" * 200_000
    unsealed = b'{"manifest":' + deep + b',"seal":"' + b"0" * 64 + b'"}'
    with pytest.raises(QtbError, match="seal does not verify"):
        manifest.verify(SECRET, unsealed)
    with pytest.raises(QtbError, match="not in the sealed form"):
        manifest.verify(SECRET, b'{"manifest":' + deep + b"}")
    # even a correctly sealed body (a driver bug) that json cannot nest that deep fails closed
    seal = hmac.new(shim.derive_keys(SECRET).manifest_key, deep, "sha256").hexdigest().encode()
    with pytest.raises(QtbError, match="not a qtb-pipe-manifest-2"):
        manifest.verify(SECRET, b'{"manifest":' + deep + b',"seal":"' + seal + b'"}')
