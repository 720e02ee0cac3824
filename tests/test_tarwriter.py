"""The inner format of LVM thin volumes (qubes.tarwriter, the default install) against its
description (qubes_sim/tarwriter.py docstring; core-admin qubes/tarwriter.py, backup.py ~l.720-745),
and which pools get it in a qubes-sim backup."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import attacker
import pytest
from simtools import Sim, make_world


def tarwriter(path: Path, name: str) -> bytes:
    argv = [sys.executable, "-m", "qubes_sim.tarwriter", f"--override-name={name}", str(path)]
    return subprocess.run(argv, capture_output=True, check=True).stdout


def test_sparse_map_header_and_data(tmp_path: Path):
    volume = tmp_path / "private.img"
    with open(volume, "wb") as f:  # data, a zero block inside data, a hole, data, a zero tail
        f.write(os.urandom(1024) + bytes(512) + os.urandom(512))
        f.seek(1 << 20)
        f.write(os.urandom(700))  # a partial block: the whole block counts as data
        f.truncate(4 << 20)
    out = tarwriter(volume, "vm3/private.img")
    regions = [(0, 1024), (1536, 512), (1 << 20, 1024), (4 << 20, 0)]
    with tarfile.open(fileobj=io.BytesIO(out)) as tar:
        (member,) = tar.getmembers()
        # tarfile reads GNU.sparse.name as the name; the raw ustar name carries the writer's pid
        assert member.name == "vm3/private.img" and member.sparse == regions
        assert list(member.pax_headers)[:4] == [
            "GNU.sparse.major", "GNU.sparse.minor", "GNU.sparse.name", "GNU.sparse.realsize",
        ]  # fmt: skip
        assert member.pax_headers["GNU.sparse.realsize"] == str(4 << 20) and member.mtime == 0
    assert re.search(rb"vm3/GNUSparseFile\.[0-9]+/private\.img\0", out)
    text = "4\n" + "".join(f"{o}\n{s}\n" for o, s in regions)
    body = out[out.index(text.encode()) :]
    assert body.startswith(text.encode() + b"\0" * (512 - len(text)))
    assert out.endswith(bytes(1024)) and len(out) % 512 == 0
    # GNU tar gives the volume back byte for byte, by its real name
    restored = subprocess.run(["tar", "-xO", "vm3/private.img"], input=out, capture_output=True, check=True)
    assert restored.stdout == volume.read_bytes()
    # two runs differ only in the pid in the member name and so in that header's checksum (why an
    # unchanged re-run dedups worse): the pax block, then the ustar header at 1024
    again = tarwriter(volume, "vm3/private.img")
    differ = {i for i, (a, b) in enumerate(zip(out, again, strict=True)) if a != b}
    assert differ and differ <= set(range(1024, 1124)) | set(range(1024 + 148, 1024 + 156))


def test_all_zero_volume_has_one_empty_region(tmp_path: Path):
    volume = tmp_path / "root.img"
    volume.write_bytes(bytes(8192))
    with tarfile.open(fileobj=io.BytesIO(tarwriter(volume, "vm1/root.img"))) as tar:
        assert tar.getmembers()[0].sparse == [(8192, 0)]


def volume_inner_header(world: Sim, tmp_path: Path) -> bytes:
    """The first blocks of work's private volume's inner stream, as a real backup writes it."""
    passphrase = "a passphrase"
    (tmp_path / "pp").write_text(passphrase + "\n")
    target = world.qube_home("backup") / "backups"
    target.mkdir()
    argv = [
        "qvm-backup",
        "-y",
        "--no-compress",
        "-p",
        str(tmp_path / "pp"),
        "-d",
        "backup",
        str(target),
        "work",
    ]
    world.run(*argv, check=True)
    (stream,) = target.iterdir()
    files = {info.name: data for info, data in attacker.members(stream.read_bytes())}
    backup_id = re.search(rb"backup-id=(\S+)", files["backup-header"]).group(1).decode()
    (tmp_path / "chunk").write_bytes(files["vm3/private.img.000.enc"])
    subprocess.run(
        ["scrypt", "dec", "-P", str(tmp_path / "chunk"), str(tmp_path / "plain")],
        input=f"{backup_id}!vm3/private.img.000!{passphrase}\n".encode(),
        check=True,
        capture_output=True,
    )
    return (tmp_path / "plain").read_bytes()[:2048]


@pytest.mark.parametrize(
    ("pool", "block_device"), [("vm-pool", True), ("varlibqubes", False), ("reflink", False)]
)
def test_lvm_thin_volumes_go_through_tarwriter_file_pools_through_gnu_tar(
    tmp_path: Path, pool: str, block_device: bool
):
    header = volume_inner_header(make_world(tmp_path / "w", "--pool", pool), tmp_path)
    if block_device:  # a pax extended header first, naming the writer's pid
        assert header[156:157] == b"x" and b"GNUSparseFile." in header, header
    else:  # GNU tar's own format (tar -Pc --sparse)
        assert header[257:265] == b"ustar  \0" and b"GNUSparseFile." not in header, header
