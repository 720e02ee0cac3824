"""The sealed manifest that dom0 hands to `commit` (format in docs/design.md, "Sealed manifest").

The adapter cannot verify the seal (the key never leaves dom0) and does not need to: it stores the
bytes exactly as received. It checks the shape, bounds the size, and cross-checks the chunk list
against the members `store` recorded, so that a manifest cannot be attached to the wrong stream.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import BinaryIO

from scrypt_shim.shim import (  # the one definition of the formats (docs/design.md)
    BACKUP_ID_RE,
    HEADER_MEMBER,
    HEADER_PATH,
    MANIFEST_FORMAT,
    MAX_MANIFEST_BYTES,
    QUBE_NAME_RE,
    TRAILER_SIZE,
)

from .errors import BadInputError
from .tarstream import Member

_HEX = re.compile(r"[0-9a-f]+")


@dataclass(frozen=True)
class ManifestChunk:
    path: str
    size: int


@dataclass(frozen=True)
class ManifestInfo:
    backup_id: str
    qubes: list[str]
    created: str
    chunks: list[ManifestChunk]
    sha256: str
    size: int


def read_bounded(source: BinaryIO, limit: int = MAX_MANIFEST_BYTES) -> bytes:
    data = source.read(limit + 1)
    if len(data) > limit:
        raise BadInputError(f"manifest on stdin is larger than {limit} bytes")
    return data


def member_for_chunk(path: str) -> str:
    return HEADER_MEMBER if path == HEADER_PATH else f"{path}.enc"


def parse_sealed_manifest(data: bytes) -> ManifestInfo:
    def bad(why: str) -> BadInputError:
        return BadInputError(f"manifest on stdin rejected: {why}")

    if not data:
        raise bad("empty input")
    try:
        sealed = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise bad(f"not JSON ({exc})") from None
    if not isinstance(sealed, dict) or set(sealed) != {"manifest", "seal"}:
        raise bad('expected an object with exactly "manifest" and "seal"')
    # dom0 accepts only the canonical byte form (design.md): catch a malformed one now, not at
    # restore time when the backup could no longer be fixed.
    if json.dumps(sealed, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode() != data:
        raise bad("not in canonical form (sorted keys, no whitespace, ASCII)")
    seal, body = sealed["seal"], sealed["manifest"]
    if not isinstance(seal, str) or len(seal) != 64 or not _HEX.fullmatch(seal):
        raise bad("seal is not 64 lowercase hex digits")
    if not isinstance(body, dict) or body.get("format") != MANIFEST_FORMAT:
        raise bad(f'format is not "{MANIFEST_FORMAT}"')
    backup_id, qubes, chunks = body.get("backup_id"), body.get("qubes"), body.get("chunks")
    if not isinstance(backup_id, str) or not BACKUP_ID_RE.fullmatch(backup_id):
        raise bad("backup_id missing or malformed")
    names = (q for q in qubes) if isinstance(qubes, dict) else None
    if names is None or not all(QUBE_NAME_RE.fullmatch(q) or q == "dom0" for q in names):
        raise bad("qubes must be an object keyed by qube names")
    if not isinstance(chunks, list) or not chunks:
        raise bad("chunks must be a non-empty list")
    parsed: list[ManifestChunk] = []
    for chunk in chunks:
        if not isinstance(chunk, dict):
            raise bad("a chunk is not an object")
        path, size = chunk.get("path"), chunk.get("size")
        if not isinstance(path, str) or not path or not isinstance(size, int) or size < 0:
            raise bad("a chunk lacks path or size")
        parsed.append(ManifestChunk(path, size))
    created = body.get("created")
    return ManifestInfo(
        backup_id=backup_id,
        qubes=list(qubes),
        created=created if isinstance(created, str) else "",
        chunks=parsed,
        sha256=hashlib.sha256(data).hexdigest(),
        size=len(data),
    )


def cross_check(info: ManifestInfo, members: list[Member]) -> None:
    """Every chunk of the manifest must be a stored member of the expected size.

    The adapter checks only this direction; the driver checks that every stored member has a
    shim record (members without one, e.g. the plaintext backup-header, are its business).
    """
    stored = {m.name: m.size for m in members}
    for chunk in info.chunks:
        name = member_for_chunk(chunk.path)
        if name not in stored:
            raise BadInputError(f"manifest names {chunk.path!r} but the stored stream has no member {name!r}")
        if stored[name] != chunk.size + TRAILER_SIZE:
            raise BadInputError(
                f"manifest size of {chunk.path!r} ({chunk.size} + {TRAILER_SIZE}) differs from the "
                f"stored member ({stored[name]} bytes)"
            )
