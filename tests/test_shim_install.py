"""install-shim / uninstall-shim / shim-status in a temporary dom0 root."""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
from pathlib import Path

import pytest
from shimtools import REAL_SCRYPT

from qtb_pipe import shim_install
from qtb_pipe.shim_install import ShimInstallError
from scrypt_shim import shim


def make_root(base: Path) -> Path:
    root = base / "dom0"
    (root / "usr/bin").mkdir(parents=True)
    (root / "usr/bin/scrypt").symlink_to(REAL_SCRYPT)
    (root / "etc").mkdir()
    (root / "etc/hostname").write_text("dom0\n")
    (root / "usr/local/bin").mkdir(parents=True)  # there on every dom0
    (root / "usr/local/bin/other-tool").write_text("#!/bin/sh\n")
    return root


def listing(root: Path) -> dict[str, tuple[int, str]]:
    """Every path under root with its mode and content hash (or symlink target)."""
    entries: dict[str, tuple[int, str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            info = path.lstat()
            if stat.S_ISLNK(info.st_mode):
                digest = "-> " + os.readlink(path)
            elif stat.S_ISREG(info.st_mode):
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
            else:
                digest = "dir"
            entries[str(path.relative_to(root))] = (info.st_mode, digest)
    return entries


def test_install_uninstall_round_trip_leaves_tree_as_it_was(tmp_path: Path) -> None:
    root = make_root(tmp_path)
    before = listing(root)
    result = shim_install.install_shim(root)
    shim_path = Path(result["shim"])
    assert result["action"] == "installed"
    assert shim_path == root.resolve() / "usr/local/bin/scrypt"
    assert result["real_scrypt"] == str(REAL_SCRYPT.resolve())
    assert result["real_scrypt_version"].startswith("scrypt 1.")
    assert shim_path.stat().st_mode & 0o777 == 0o755
    assert (root / "usr/bin/scrypt").is_symlink()  # the package-owned scrypt is untouched

    text = shim_path.read_text()
    assert f"REAL_SCRYPT = {str(REAL_SCRYPT.resolve())!r}" in text
    assert f"STATE_DIR = {str(root.resolve() / 'var/lib/qtb-pipe')!r}" in text

    assert shim_install.uninstall_shim(root) == {"shim": str(shim_path), "removed": True}
    assert listing(root) == before
    assert not shim_install.uninstall_shim(root)["removed"]  # nothing left to remove


def test_prefix_whose_bin_does_not_exist_is_refused(tmp_path: Path) -> None:
    root = make_root(tmp_path)
    before = listing(root)
    with pytest.raises(ShimInstallError, match="does not exist"):
        shim_install.install_shim(root, prefix="/opt/qtb")
    assert listing(root) == before


def test_install_twice_is_a_no_op(tmp_path: Path) -> None:
    root = make_root(tmp_path)
    shim_install.install_shim(root)
    after_first = listing(root)
    mtime = (root / "usr/local/bin/scrypt").stat().st_mtime_ns
    second = shim_install.install_shim(root)
    assert second["action"] == "unchanged"
    assert listing(root) == after_first
    assert (root / "usr/local/bin/scrypt").stat().st_mtime_ns == mtime


def test_outdated_shim_is_reported_and_upgraded(tmp_path: Path) -> None:
    root = make_root(tmp_path)
    shim_path = Path(shim_install.install_shim(root)["shim"])
    shim_path.write_text(
        shim_path.read_text().replace(f'SHIM_VERSION = "{shim.SHIM_VERSION}"', 'SHIM_VERSION = "0"')
    )
    status = shim_install.shim_status(root)
    assert status["installed"] and not status["up_to_date"] and status["problems"]
    assert shim_install.install_shim(root)["action"] == "upgraded"
    assert shim_install.shim_status(root)["up_to_date"]


def test_foreign_file_is_refused(tmp_path: Path) -> None:
    root = make_root(tmp_path)
    foreign = root / "usr/local/bin/scrypt"
    foreign.write_text('#!/bin/sh\nexec /usr/bin/scrypt "$@"\n')
    before = listing(root)
    with pytest.raises(ShimInstallError, match="not qtb-pipe's shim"):
        shim_install.install_shim(root)
    with pytest.raises(ShimInstallError, match="not qtb-pipe's shim"):
        shim_install.uninstall_shim(root)
    foreign.unlink()
    foreign.symlink_to(REAL_SCRYPT)  # a symlink is foreign too, whatever it points at
    with pytest.raises(ShimInstallError):
        shim_install.install_shim(root)
    foreign.unlink()
    foreign.write_text('#!/bin/sh\nexec /usr/bin/scrypt "$@"\n')
    assert listing(root) == before
    status = shim_install.shim_status(root)
    assert not status["installed"] and not status["active"] and "not qtb-pipe's shim" in status["problems"][0]


def test_missing_or_broken_real_scrypt_is_refused(tmp_path: Path) -> None:
    root = make_root(tmp_path)
    (root / "usr/bin/scrypt").unlink()
    before = listing(root)
    with pytest.raises(ShimInstallError, match="not found"):
        shim_install.install_shim(root)
    (root / "usr/bin/scrypt").write_text("#!/bin/sh\nexit 3\n")
    (root / "usr/bin/scrypt").chmod(0o755)
    with pytest.raises(ShimInstallError, match="--version failed"):
        shim_install.install_shim(root)
    (root / "usr/bin/scrypt").unlink()
    assert listing(root) == before


def test_never_installs_over_the_package_owned_scrypt(tmp_path: Path) -> None:
    root = make_root(tmp_path)
    with pytest.raises(ShimInstallError):
        shim_install.install_shim(root, prefix="/usr")
    assert (root / "usr/bin/scrypt").is_symlink()


def test_real_scrypt_that_is_a_shim_is_refused(tmp_path: Path) -> None:
    root = make_root(tmp_path)
    (root / "usr/bin/scrypt").unlink()
    (root / "usr/bin/scrypt").write_bytes(shim_install.render_shim("/usr/bin/scrypt", "/var/lib/qtb-pipe"))
    with pytest.raises(ShimInstallError, match="is a qtb-pipe shim"):
        shim_install.install_shim(root)


def test_status_follows_qubesd_path(tmp_path: Path) -> None:
    root = make_root(tmp_path)
    status = shim_install.shim_status(root)
    assert not status["installed"] and not status["active"]
    assert status["qubesd_scrypt"] == str(root.resolve() / "usr/bin/scrypt")

    shim_install.install_shim(root)
    status = shim_install.shim_status(root)
    assert status["installed"] and status["up_to_date"] and status["active"] and status["problems"] == []
    assert status["qubesd_path_source"] == "systemd default"

    # a qubesd whose environment puts /usr/bin first would bypass the shim
    proc = root / "proc/4242"
    proc.mkdir(parents=True)
    (proc / "comm").write_text("qubesd\n")
    (proc / "cmdline").write_bytes(b"/usr/bin/python3\0/usr/bin/qubesd\0")
    (proc / "environ").write_bytes(b"LANG=C\0PATH=/usr/bin:/usr/local/bin\0")
    status = shim_install.shim_status(root)
    assert status["qubesd_path_source"] == "/proc/4242/environ"
    assert not status["active"] and status["problems"]
    (proc / "environ").write_bytes(b"PATH=/usr/local/bin:/usr/bin\0")
    assert shim_install.shim_status(root)["active"]


def test_installed_shim_runs_and_status_sees_missing_real_scrypt(tmp_path: Path) -> None:
    root = make_root(tmp_path)
    shim_path = Path(shim_install.install_shim(root)["shim"])
    version = subprocess.run([shim_path, "--version"], capture_output=True, check=False)
    assert (version.returncode, version.stdout, version.stderr) == (
        0,
        b"scrypt 1.3.1\n",
        b"",
    )  # real scrypt's
    state_dir = root.resolve() / "var/lib/qtb-pipe"
    shim_path.write_bytes(shim_install.render_shim(tmp_path / "gone/scrypt", state_dir))
    status = shim_install.shim_status(root)
    assert status["installed"] and status["up_to_date"]
    assert any("missing" in problem for problem in status["problems"])
