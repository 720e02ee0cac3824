"""Synthetic Qubes v4-like backup streams for the adapter tests, made with real GNU tar.

A v4 stream is a concatenation of independent `tar -cO --posix` archives, one per file, each with
a pax header (sub-second atime/ctime, and mtime unless --mtime is given), its ustar header, the
data, two zero blocks and padding to 10240 bytes. Members are named as Qubes names them
(backup-header, backup-header.hmac, qubes.xml.000.enc, vm1/private.img.000.enc, ...). Member data
is what a pass-through qtb-pipe shim writes: the inner bytes plus the 56-byte trailer of
docs/design.md (the tag uses a fixed test key: the adapter never verifies it).
"""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import random
import shutil
import subprocess
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from qtb_adapters.tarstream import StreamFilter, StreamSummary

BLOCK = 512
TRAILER_BYTES = 56
TEST_CHUNK_KEY = hashlib.sha256(b"streamtools chunk key").digest()
TEST_MANIFEST_KEY = hashlib.sha256(b"streamtools manifest key").digest()


def shim_output(path: str, data: bytes) -> bytes:
    """data || trailer, as the qtb-pipe shim's `enc` writes it."""
    kcv = hmac.new(TEST_CHUNK_KEY, b"qtb-pipe v1 kcv", "sha256").digest()[:8]
    length = len(data).to_bytes(8, "big")
    tag = hmac.new(
        TEST_CHUNK_KEY, b"qtb-pipe v1 tag\0" + path.encode() + b"\0" + data + length, "sha256"
    ).digest()
    return data + b"QTBPIPE1" + kcv + length + tag


def realistic_bytes(seed: int, size: int) -> bytes:
    """Disk-image-like content: incompressible runs, text-like runs, zero runs, repeated blocks."""
    rng = random.Random(seed)
    out = bytearray()
    words = [rng.randbytes(rng.randint(3, 9)).hex().encode() for _ in range(400)]
    while len(out) < size:
        kind = rng.random()
        run = rng.randint(4, 256) * 1024
        if kind < 0.55:
            out += rng.randbytes(run)
        elif kind < 0.75:
            out += b" ".join(rng.choice(words) for _ in range(run // 8))[:run]
        elif kind < 0.9:
            out += bytes(run)
        else:
            block = rng.randbytes(4096)
            out += block * (run // 4096)
    return bytes(out[:size])


@dataclass
class V4Backup:
    """The files of one qvm-backup run, before the outer tar."""

    backup_id: str
    qubes: list[str]
    chunks: list[tuple[str, bytes]] = field(default_factory=list)  # (path without .enc, inner data)

    def header_text(self) -> bytes:
        return (
            "version=4\nencrypted=True\ncompressed=False\ncompression-filter=gzip\n"
            f"hmac-algorithm=scrypt\nbackup-id={self.backup_id}\n"
        ).encode()

    def members(self) -> list[tuple[str, bytes]]:
        header = self.header_text()
        members = [("backup-header", header), ("backup-header.hmac", shim_output("backup-header", header))]
        members += [(f"{path}.enc", shim_output(path, data)) for path, data in self.chunks]
        return members

    def manifest(self, engine: str = "restic") -> bytes:
        chunk_entries = [{"path": "backup-header", "size": len(self.header_text()), "tag": "00" * 32}]
        for path, data in self.chunks:
            chunk_entries.append({"path": path, "size": len(data), "tag": hashlib.sha256(data).hexdigest()})
        qubes = {
            name: {"path": f"vm{number}/", "class": "AppVM", "template": None, "netvm": None}
            for number, name in enumerate(self.qubes, start=1)
        }
        body = {
            "format": "qtb-pipe-manifest-2",
            "backup_id": self.backup_id,
            "created": "2026-11-24T00:00:00Z",
            "engine": engine,
            "qubes": qubes,
            "chunks": chunk_entries,
        }

        def canonical(value: object) -> bytes:
            return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()

        seal = hmac.new(TEST_MANIFEST_KEY, canonical(body), "sha256").hexdigest()
        return canonical({"manifest": body, "seal": seal})  # the exact byte form of docs/design.md


def make_backup(
    seed: int = 1,
    *,
    volumes: dict[str, int] | None = None,
    chunk_bytes: int = 1024 * 1024,
    backup_id: str = "20261124T003908-3222",
    qubes_xml_extra: str = "",
) -> V4Backup:
    """A backup of some qubes; volume name -> size, cut into chunks of chunk_bytes like Qubes does."""
    volumes = volumes if volumes is not None else {"vm1/private.img": 1_500_000, "vm2/private.img": 700_000}
    qube_dirs = sorted({name.split("/")[0] for name in volumes})
    qubes = [f"qube-{d}" for d in qube_dirs]
    xml = "<qubes>" + "".join(f'<domain name="{q}"/>' for q in qubes) + qubes_xml_extra + "</qubes>\n"
    backup = V4Backup(backup_id=backup_id, qubes=qubes, chunks=[("qubes.xml.000", xml.encode())])
    for index, (volume, size) in enumerate(volumes.items()):
        data = realistic_bytes(seed * 1000 + index, size)
        for number, start in enumerate(range(0, max(size, 1), chunk_bytes)):
            backup.chunks.append((f"{volume}.{number:03d}", data[start : start + chunk_bytes]))
        backup.chunks.append((f"{volume.split('/')[0]}/firewall.xml.000", b"<firewall/>\n"))
    return backup


@dataclass
class ArchiveSpan:
    """Byte offsets of one member's archive inside the stream."""

    name: str
    start: int
    member_end: int  # after the member's padded data, before the end-of-archive blocks
    end: int


@dataclass
class Stream:
    path: Path
    spans: list[ArchiveSpan]

    @property
    def size(self) -> int:
        return self.path.stat().st_size


def _member_end(archive: bytes) -> int:
    """Offset after the data of the (single) regular member of a one-file archive."""
    pos = 0
    while True:
        header = archive[pos : pos + BLOCK]
        size = int(header[124:136].replace(b"\0", b" ").strip() or b"0", 8)
        padded = (size + BLOCK - 1) // BLOCK * BLOCK
        pos += BLOCK + padded
        if header[156:157] not in (b"x", b"g", b"L", b"K"):
            return pos


def write_stream(backup: V4Backup, out: Path, workdir: Path, *, mtime: int = 1_700_000_000) -> Stream:
    """The qvm-backup stream of `backup`: one `tar -cO --posix` per member, concatenated."""
    if shutil.which("tar") is None:
        raise RuntimeError("GNU tar is needed")
    workdir.mkdir(parents=True, exist_ok=True)
    spans = []
    with open(out, "wb") as stream:
        for name, data in backup.members():
            path = workdir / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            archive = subprocess.run(
                ["tar", "-cO", "--posix", f"--mtime=@{mtime}", "-C", str(workdir), name],
                check=True,
                capture_output=True,
            ).stdout
            start = stream.tell()
            stream.write(archive)
            spans.append(ArchiveSpan(name, start, start + _member_end(archive), start + len(archive)))
            path.unlink()
    return Stream(out, spans)


def members_by_tar(stream: Path, workdir: Path) -> list[tuple[str, str]]:
    """(name, sha256 of data) of every member, read by GNU tar itself with -i (ignore zero blocks)."""
    names = subprocess.run(["tar", "-i", "-tf", str(stream)], check=True, capture_output=True, text=True)
    workdir.mkdir(parents=True, exist_ok=True)
    subprocess.run(["tar", "-i", "-xf", str(stream), "-C", str(workdir)], check=True, capture_output=True)
    result = []
    for name in names.stdout.splitlines():
        data = (workdir / name).read_bytes()
        result.append((name, hashlib.sha256(data).hexdigest()))
    shutil.rmtree(workdir)
    return result


def expected_members(backup: V4Backup) -> list[tuple[str, str]]:
    return [(name, hashlib.sha256(data).hexdigest()) for name, data in backup.members()]


def tar2qfile_like_names(stream: Path) -> list[str]:
    """Names as tar2qfile sees them: only ustar headers with magic, valid checksum and type '0'.

    Checks the constraints the real tar2qfile puts on headers (checksum over the whole block,
    'ustar' magic, regular members typed '0'), independently of the adapter's own parser.
    """
    names = []
    data = stream.read_bytes()
    pos = 0
    while pos + BLOCK <= len(data):
        header = data[pos : pos + BLOCK]
        pos += BLOCK
        if header == bytes(BLOCK):
            continue
        assert header[257:262] == b"ustar", f"bad magic at {pos - BLOCK}"
        stored = int(header[148:156].replace(b"\0", b" ").strip(), 8)
        assert stored == sum(header[:148]) + 256 + sum(header[156:]), f"bad checksum at {pos - BLOCK}"
        size = int(header[124:136].replace(b"\0", b" ").strip() or b"0", 8)
        if header[156:157] == b"0":
            names.append(header[:100].split(b"\0", 1)[0].decode())
        pos += (size + BLOCK - 1) // BLOCK * BLOCK
    return names


def python_tarfile_fails(data: bytes) -> bool:
    """Would a tar-parsing engine (borg import-tar uses Python's tarfile like this) reject `data`?"""
    import io

    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r|", ignore_zeros=True) as archive:
            for info in archive:
                handle = archive.extractfile(info)
                if handle is not None:
                    handle.read()
    except tarfile.TarError:
        return True
    return False


def run_filter(data: bytes, **options: bool) -> tuple[bytes, StreamSummary]:
    """The adapter's stream filter (the code under test, unlike the rest of this module) over a
    whole stream in memory: what it forwards, and its summary."""
    out = bytearray()
    summary = StreamFilter(out.extend, **options).run(io.BytesIO(data))
    return bytes(out), summary
