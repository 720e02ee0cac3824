"""`make dist`: the release a careful Qubes user can check before anything enters dom0.

dist/ gets
  qtb-pipe-dom0-<version>.tar.gz      the dom0 part (driver, shim, units, installer, docs): the same
                                      bytes from the same commit (sorted members, fixed owner, mode
                                      and time: the commit's, gzip without a name or time)
  qtb-pipe-dom0-<version>-1.noarch.rpm the same files as a package for dom0 (Fedora), by rpmbuild
  qtb_pipe-<version>-py3-none-any.whl the backup qube's part (qtb-adapter; pip install it there)
  SHA256SUMS                          of the three, and SHA256SUMS.asc when QTB_SIGN_KEY names a
                                      gpg key to sign with (docs/release.md)
Only files git tracks go in. Run from a checkout: `make dist` (or .venv/bin/python scripts/dist.py).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

TOP = Path(__file__).resolve().parent.parent
DOM0_TREES = ("qtb_pipe/", "scrypt_shim/", "packaging/dom0/", "docs/", "README.md")


def version() -> str:
    sys.path.insert(0, str(TOP))
    from qtb_pipe import __version__

    return __version__


def tracked(prefixes: tuple[str, ...]) -> list[str]:
    out = subprocess.run(["git", "ls-files", "-z"], cwd=TOP, capture_output=True, check=True).stdout
    return sorted(p for p in out.decode().split("\0") if p.startswith(prefixes))


def commit_time() -> int:
    out = subprocess.run(["git", "log", "-1", "--format=%ct"], cwd=TOP, capture_output=True, check=True)
    return int(out.stdout)


def dom0_tarball(out: Path, ver: str) -> Path:
    name = f"qtb-pipe-dom0-{ver}"
    mtime = commit_time()
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for rel in tracked(DOM0_TREES):
            path = TOP / rel
            info = tarfile.TarInfo(f"{name}/{rel}")
            info.size, info.mtime = path.stat().st_size, mtime
            info.mode = 0o755 if os.access(path, os.X_OK) else 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = "root"
            with path.open("rb") as data:
                tar.addfile(info, data)
    target = out / f"{name}.tar.gz"
    with target.open("wb") as f, gzip.GzipFile(filename="", mode="wb", fileobj=f, mtime=0) as z:
        z.write(raw.getvalue())
    return target


def rpm(out: Path, tarball: Path, ver: str) -> Path:
    with tempfile.TemporaryDirectory(prefix="qtb-rpm-") as top:
        sources = Path(top) / "SOURCES"
        sources.mkdir()
        shutil.copy(tarball, sources)
        subprocess.run(
            ["rpmbuild", "-bb", "--nodeps", "--define", f"_topdir {top}", "--define", f"version {ver}",
             str(TOP / "packaging/dom0/qtb-pipe-dom0.spec")],
            check=True, capture_output=True,
        )  # fmt: skip
        (built,) = Path(top, "RPMS", "noarch").glob("*.rpm")
        return Path(shutil.copy(built, out))


def wheel(out: Path) -> Path:
    with tempfile.TemporaryDirectory(prefix="qtb-wheel-") as temp:
        subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", temp, str(TOP)],
            check=True, capture_output=True,
        )  # fmt: skip
        (built,) = Path(temp).glob("*.whl")
        return Path(shutil.copy(built, out))


def sums(out: Path, files: list[Path]) -> Path:
    lines = [f"{hashlib.sha256(f.read_bytes()).hexdigest()}  {f.name}\n" for f in sorted(files)]
    target = out / "SHA256SUMS"
    target.write_text("".join(lines))
    key = os.environ.get("QTB_SIGN_KEY")
    if key:
        subprocess.run(["gpg", "--local-user", key, "--armor", "--detach-sign", str(target)], check=True)
    return target


def main() -> int:
    out = TOP / "dist"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    ver = version()
    tarball = dom0_tarball(out, ver)
    artifacts = [tarball, rpm(out, tarball, ver), wheel(out)]
    sums(out, artifacts)
    for f in sorted(out.iterdir()):
        print(f"dist/{f.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
