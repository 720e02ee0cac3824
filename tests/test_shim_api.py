"""The functions the driver imports from the shim, and the shim module's own constraints."""

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
    assert shim.compute_tag(keys.chunk_key, "vm1/root.img.004", data) == expected_tag
    streamed = shim.TagHasher(keys.chunk_key, "vm1/root.img.004")
    for start in range(0, len(data), 777):
        streamed.update(memoryview(data)[start : start + 777])
    assert streamed.finish() == expected_tag and streamed.size == len(data)

    blob = shim.seal_chunk(SECRET, "vm1/root.img.004", data)
    trailer = blob[len(data) :]
    assert len(trailer) == 56
    assert trailer == b"QTBPIPE1" + keys.kcv + struct.pack(">Q", len(data)) + expected_tag
    assert shim.parse_trailer(trailer) == shim.Trailer(keys.kcv, len(data), expected_tag)
    assert shim.parse_trailer(b"x" + trailer[1:]) is None


def test_parse_qtb_passphrase() -> None:
    header = shim.parse_qtb_passphrase(f"backup-header!{USER}")
    assert header == shim.QtbPassphrase("backup-header", None, TOKEN, SECRET)
    chunk = shim.parse_qtb_passphrase(f"20261124T003908-3222!vm12/private.img.003!{USER}".encode())
    assert chunk == shim.QtbPassphrase("vm12/private.img.003", "20261124T003908-3222", TOKEN, SECRET)
    assert shim.make_user_passphrase(TOKEN, SECRET) == USER

    not_ours = [
        "backup-header!my own passphrase",
        f"backup-header!{USER.upper()}",
        "",
    ]
    for passphrase in not_ours:
        assert shim.parse_qtb_passphrase(passphrase) is None, passphrase
    assert shim.parse_qtb_passphrase(b"backup-header!\xff") is None
    with pytest.raises(shim.QtbPassphraseError, match="UTF-8"):
        shim.parse_qtb_passphrase(b"20261124T003908-3222!vm1/\xff.000!" + USER.encode())

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
        f"20261124T003908-3222!../etc/x!{USER}",
        f"20261124T003908-3222!/abs!{USER}",
    ]
    for passphrase in malformed:
        with pytest.raises(shim.QtbPassphraseError):
            shim.parse_qtb_passphrase(passphrase)
    with pytest.raises(ValueError):
        shim.make_user_passphrase("ABC", SECRET)


def test_manifest_seal_round_trip_and_rejections() -> None:
    body = {
        "format": "qtb-pipe-manifest-1",
        "backup_id": "20261124T003908-3222",
        "created": "2026-11-24T00:39:08Z",
        "engine": "borg",
        "qubes": ["work"],
        "chunks": [{"path": "backup-header", "size": 12, "tag": "ab" * 32}],
    }
    sealed = shim.seal_manifest(SECRET, body)
    outer = json.loads(sealed)
    assert (
        outer["seal"]
        == hmac.new(shim.derive_keys(SECRET).manifest_key, shim.canonical_json(body), "sha256").hexdigest()
    )
    assert sealed == shim.canonical_json(outer)  # the sealed form is canonical JSON itself
    assert shim.verify_manifest(SECRET, sealed) == body
    # only the exact sealed form is accepted: the seal is checked over the raw bytes before parsing
    with pytest.raises(shim.ManifestError, match="not in the sealed form"):
        shim.verify_manifest(SECRET, json.dumps(outer, indent=2).encode())

    with pytest.raises(shim.ManifestError, match="seal does not verify"):
        shim.verify_manifest(bytes(32), sealed)
    forged = json.loads(sealed)
    forged["manifest"]["chunks"][0]["size"] = 13
    with pytest.raises(shim.ManifestError, match="seal does not verify"):
        shim.verify_manifest(SECRET, shim.canonical_json(forged))
    with pytest.raises(shim.ManifestError, match="not in the sealed form"):
        shim.verify_manifest(SECRET, b"{")
    with pytest.raises(shim.ManifestError, match="larger than"):
        shim.verify_manifest(SECRET, b" " * (shim.MAX_MANIFEST_BYTES + 1))
    bad_shape = dict(body, chunks=[{"path": "x", "size": -1, "tag": "00" * 32}])
    with pytest.raises(shim.ManifestError, match="malformed manifest chunk"):
        shim.verify_manifest(SECRET, shim.seal_manifest(SECRET, bad_shape))
    assert isinstance(shim.ManifestError("x"), shim.VerificationError)


def test_chunk_paths_and_header_backup_id() -> None:
    assert shim.split_chunk_path("vm12/private.img.003") == ("vm12/private.img", 3)
    assert shim.split_chunk_path("vm12/private.img.1000") == ("vm12/private.img", 1000)
    assert shim.split_chunk_path("dom0-home/user.000") == ("dom0-home/user", 0)
    assert shim.split_chunk_path("backup-header") == ("backup-header", None)
    header = b"version=4\nencrypted=True\nbackup-id=20261124T003908-3222\n"
    assert shim.header_backup_id(header) == "20261124T003908-3222"
    assert shim.header_backup_id(b"version=4\n") is None


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["enc", "-", "out"], ("enc", [], "tty-stdin", "", "-", "out")),
        (["dec", "-f", "in", "out"], ("dec", ["-f"], "tty-stdin", "", "in", "out")),
        (["enc", "-Pt0.1", "in"], ("enc", ["-t", "0.1"], "stdin-once", "", "in", None)),
        (["enc", "-fv", "-t", "1", "in", "-"], ("enc", ["-f", "-v", "-t", "1"], "tty-stdin", "", "in", "-")),
        (
            ["enc", "--logN=10", "-r", "1", "-p1", "in"],
            ("enc", ["--logN", "10", "-r", "1", "-p", "1"], "tty-stdin", "", "in", None),
        ),
        (["dec", "--passphrase", "env:PW", "in"], ("dec", [], "env", "PW", "in", None)),
        (["dec", "--passphrase=file:/x:y", "--", "-in"], ("dec", [], "file", "/x:y", "-in", None)),
        (
            ["enc", "--passphrase", "dev:tty-once", "-M", "1GB", "-m", "0.25", "in"],
            ("enc", ["-M", "1GB", "-m", "0.25"], "tty-once", "", "in", None),
        ),
    ],
)
def test_command_line_parsing(args: list[str], expected: tuple) -> None:
    invocation = shim.parse_command_line(args)
    assert (
        invocation.mode,
        invocation.options,
        invocation.passphrase_method,
        invocation.passphrase_arg,
        invocation.infile,
        invocation.outfile,
    ) == expected


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["info", "x"],
        ["--version"],
        ["enc"],
        ["enc", "a", "b", "c"],
        ["enc", "-x", "a"],
        ["enc", "-t"],
        ["enc", "--version"],
        ["enc", "--log", "10", "a"],
        ["enc", "--logN", "10", "a"],
        ["enc", "--logN", "9", "-r", "1", "-p", "1", "a"],
        ["enc", "-r", "33", "--logN", "10", "-p", "1", "a"],
        ["enc", "-t", "abc", "a"],
        ["enc", "-m", "0.6", "a"],
        ["enc", "-M", "lots", "a"],
        ["enc", "-P", "-"],
        ["enc", "-P", "--passphrase", "env:X", "a"],
        ["dec", "--passphrase", "dev:nope", "a"],
        ["dec", "--passphrase", "nocolon", "a"],
    ],
)
def test_command_lines_left_to_the_real_scrypt(args: list[str]) -> None:
    with pytest.raises(shim.CommandLineNotHandled):
        shim.parse_command_line(args)


def test_manifest_seal_is_checked_before_any_parsing() -> None:
    """Deeply nested JSON from the backup qube must be refused as unsealed, not crash json.loads."""
    deep = b"[" * 200_000 + b"]" * 200_000
    unsealed = b'{"manifest":' + deep + b',"seal":"' + b"0" * 64 + b'"}'
    with pytest.raises(shim.ManifestError, match="seal does not verify"):
        shim.verify_manifest(SECRET, unsealed)
    with pytest.raises(shim.ManifestError, match="not in the sealed form"):
        shim.verify_manifest(SECRET, b'{"manifest":' + deep + b"}")
    # even a correctly sealed body (a driver bug) that json cannot nest that deep is a ManifestError
    seal = hmac.new(shim.derive_keys(SECRET).manifest_key, deep, "sha256").hexdigest().encode()
    with pytest.raises(shim.ManifestError, match="not JSON"):
        shim.verify_manifest(SECRET, b'{"manifest":' + deep + b',"seal":"' + seal + b'"}')
