"""The sealed manifest: what dom0 knows about one backup, sealed with a key only dom0 has (format in
docs/design.md; the constants and patterns it uses are scrypt_shim's, the one definition)."""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from dataclasses import dataclass
from typing import Any

from scrypt_shim import shim

from .errors import EXIT_VERIFY, QtbError

SEALED_PREFIX = b'{"manifest":'
SEALED_SUFFIX_RE = re.compile(rb',"seal":"([0-9a-f]{64})"\}')
SEALED_SUFFIX_SIZE = 75
DOM0_HOME = "dom0-home/"  # dom0's home in the stream (qubesd puts it last)
QUBE_PATH_RE = re.compile(rf"vm[0-9]{{1,5}}/|{DOM0_HOME}")
QUBE_CLASSES = ("AppVM", "TemplateVM", "StandaloneVM", "DispVM", "AdminVM")


def canonical_json(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _seal_of(secret: bytes, body: bytes) -> bytes:
    return hmac.new(shim.derive_keys(secret).manifest_key, body, hashlib.sha256).hexdigest().encode()


def seal(secret: bytes, manifest: dict[str, Any]) -> bytes:
    """`{"manifest":<canonical body>,"seal":"<hex HMAC(manifest_key, canonical body)>"}`, exactly."""
    body = canonical_json(manifest)
    return SEALED_PREFIX + body + b',"seal":"' + _seal_of(secret, body) + b'"}'


@dataclass(frozen=True)
class QubeEntry:
    """A qube as the manifest records it: where its files are in the stream, and what it needs."""

    path: str  # vm12/ or DOM0_HOME
    klass: str
    template: str | None
    netvm: str | None

    def as_json(self) -> dict[str, Any]:
        return {"path": self.path, "class": self.klass, "template": self.template, "netvm": self.netvm}


@dataclass(frozen=True)
class Manifest:
    backup_id: str
    created: str
    engine: str
    qubes: dict[str, QubeEntry]
    chunks: list[dict[str, Any]]  # {"path", "size", "tag"} in stream order
    sealed: bytes

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.sealed).hexdigest()

    def chunks_of(self, prefixes: list[str]) -> list[dict[str, Any]]:
        return [c for c in self.chunks if c["path"].startswith(tuple(prefixes))]


def build(
    secret: bytes, backup_id: str, created: str, engine: str, qubes: dict[str, QubeEntry], chunks: list
) -> Manifest:
    body = {
        "format": shim.MANIFEST_FORMAT,
        "backup_id": backup_id,
        "created": created,
        "engine": engine,
        "qubes": {name: entry.as_json() for name, entry in qubes.items()},
        "chunks": chunks,
    }
    return Manifest(backup_id, created, engine, qubes, chunks, seal(secret, body))


def verify(secret: bytes, data: bytes) -> Manifest:
    """Size, byte form and seal first (over the raw bytes, constant-time), then the fields; any
    deviation is EXIT_VERIFY. A valid seal means dom0 wrote it; the field checks still fail closed."""
    if len(data) > shim.MAX_MANIFEST_BYTES:
        raise QtbError(f"manifest larger than {shim.MAX_MANIFEST_BYTES} bytes", EXIT_VERIFY)
    body, suffix = data[len(SEALED_PREFIX) : -SEALED_SUFFIX_SIZE], data[-SEALED_SUFFIX_SIZE:]
    match = SEALED_SUFFIX_RE.fullmatch(suffix)
    if (
        match is None
        or not data.startswith(SEALED_PREFIX)
        or len(data) < len(SEALED_PREFIX) + SEALED_SUFFIX_SIZE
    ):
        raise QtbError('manifest is not in the sealed form {"manifest":…,"seal":"<64 hex>"}', EXIT_VERIFY)
    if not hmac.compare_digest(match[1], _seal_of(secret, body)):
        raise QtbError("manifest seal does not verify (forged, or sealed with another secret)", EXIT_VERIFY)
    try:
        return _fields(json.loads(body), data)
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError):
        raise QtbError(f"manifest is not a {shim.MANIFEST_FORMAT} manifest", EXIT_VERIFY) from None


def _fields(body: dict, sealed: bytes) -> Manifest:
    if body["format"] != shim.MANIFEST_FORMAT or not shim.BACKUP_ID_RE.fullmatch(body["backup_id"]):
        raise ValueError
    qubes = {}
    for name, q in body["qubes"].items():
        names = [n for n in (q["template"], q["netvm"]) if n is not None]
        if not (shim.QUBE_NAME_RE.fullmatch(name) or name == "dom0") or not QUBE_PATH_RE.fullmatch(q["path"]):
            raise ValueError
        if q["class"] not in QUBE_CLASSES or not all(shim.QUBE_NAME_RE.fullmatch(n) for n in names):
            raise ValueError
        qubes[name] = QubeEntry(q["path"], q["class"], q["template"], q["netvm"])
    for chunk in body["chunks"]:
        path, size, tag = chunk["path"], chunk["size"], chunk["tag"]
        if not (path == shim.HEADER_PATH or shim.CHUNK_PATH_RE.fullmatch(path)) or not shim.TAG_RE.fullmatch(
            tag
        ):
            raise ValueError
        if type(size) is not int or not 0 <= size <= shim.MAX_CHUNK_BYTES:
            raise ValueError
    if not isinstance(body["created"], str) or body["engine"] not in ("restic", "borg"):
        raise ValueError
    return Manifest(body["backup_id"], body["created"], body["engine"], qubes, body["chunks"], sealed)
