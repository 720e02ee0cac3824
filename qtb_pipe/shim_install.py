"""Install, remove and inspect the scrypt shim in a dom0 root (`qtb-pipe install-shim` and friends).

`root` is the dom0 root: `/` on a real dom0, the emulated dom0's directory in a qubes-sim world. The
shim goes to `<root><prefix>/bin/scrypt` (default /usr/local/bin, which systemd's default PATH puts
before /usr/bin), next to, never over, the package-owned `<root>/usr/bin/scrypt`; its REAL_SCRYPT
and STATE_DIR lines are rewritten on the way. Nothing else is created, so uninstalling (removing
that one file) leaves dom0 as it was.
"""

from __future__ import annotations

import ast
import os
import re
import shutil
from pathlib import Path

from scrypt_shim import shim as packaged

from . import proc
from .config import write_private
from .errors import EXIT_SHIM, QtbError

DEFAULT_PREFIX = "/usr/local"
# systemd's default PATH for services; qubesd's unit sets none (facts §1).
SYSTEMD_DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin"
CONSTANTS = ("REAL_SCRYPT", "STATE_DIR")


class ShimInstallError(QtbError):
    """Installing or removing the shim is refused; the message says why and what to do."""

    def __init__(self, message: str) -> None:
        super().__init__(message, EXIT_SHIM)


def under_root(root: Path, absolute: str) -> Path:
    return root / absolute.lstrip("/")


def render_shim(real_scrypt: str | Path, state_dir: str | Path) -> bytes:
    """The packaged shim with its install-time constants rewritten."""
    source = Path(packaged.__file__).read_text(encoding="utf-8")
    for name, value in zip(CONSTANTS, (str(real_scrypt), str(state_dir)), strict=True):
        source, count = re.subn(
            rf"^{name} = .*$", lambda _m, n=name, v=value: f"{n} = {v!r}", source, count=1, flags=re.M
        )
        if count != 1:
            raise ShimInstallError(f"packaged shim has no {name} line to rewrite")
    return source.encode()


def installed_constants(path: Path) -> dict[str, str] | None:
    """REAL_SCRYPT and STATE_DIR of our shim at `path`; None if nothing is there; ShimInstallError
    if something else is (never overwritten)."""
    if not path.exists() and not path.is_symlink():
        return None
    try:
        text = path.read_text(encoding="utf-8") if path.is_file() and not path.is_symlink() else ""
    except (OSError, UnicodeDecodeError):
        text = ""
    found = {n: re.search(rf"^{n} = (.*)$", text, re.M) for n in CONSTANTS}
    if f'SHIM_MARKER = "{packaged.SHIM_MARKER}"' not in text or not all(found.values()):
        raise ShimInstallError(f"{path} exists and is not qtb-pipe's shim; not touching it")
    try:
        return {n: str(ast.literal_eval(m[1])) for n, m in found.items() if m}
    except (ValueError, SyntaxError):
        raise ShimInstallError(f"{path} is a damaged qtb-pipe shim; remove it by hand") from None


def check_real_scrypt(candidate: Path) -> tuple[Path, str]:
    """The package-owned scrypt, resolved, checked to run and not to be a shim; (path, version)."""
    if not candidate.exists():
        raise ShimInstallError(f"real scrypt {candidate} not found; install the scrypt package first")
    resolved = candidate.resolve()
    with resolved.open("rb") as binary:
        if packaged.SHIM_MARKER.encode() in binary.read(65536):
            raise ShimInstallError(f"{resolved} is a qtb-pipe shim, not the real scrypt")
    try:
        done = proc.run([str(resolved), "--version"])  # the one runner: -v shows it too
    except OSError as exc:
        raise ShimInstallError(f"real scrypt {resolved} does not run: {exc.strerror}") from None
    version = done.stdout.decode(errors="replace").strip()
    if done.code != 0 or not version.startswith("scrypt "):
        raise ShimInstallError(f"real scrypt {resolved} --version failed (exit {done.code}): {version!r}")
    return resolved, version


def install_shim(root: Path, prefix: str = DEFAULT_PREFIX) -> dict:
    """Install (or upgrade) the shim at `<root><prefix>/bin/scrypt`; a second install is a no-op.
    The result: the shim's path, the real scrypt it hands other calls to, its version, the action."""
    root = root.resolve()
    path, package_scrypt = shim_path(root, prefix), under_root(root, "/usr/bin/scrypt")
    if path == package_scrypt or (
        path.exists() and package_scrypt.exists() and path.samefile(package_scrypt)
    ):
        raise ShimInstallError(f"{path} is the package-owned scrypt; choose another prefix (e.g. /usr/local)")
    if not path.parent.is_dir():
        raise ShimInstallError(f"{path.parent} does not exist; create it first (it must be on qubesd's PATH)")
    existing = installed_constants(path)
    real, version = check_real_scrypt(package_scrypt)
    content = render_shim(real, under_root(root, "/var/lib/qtb-pipe"))
    if existing is not None and path.read_bytes() == content and os.access(path, os.X_OK):
        action = "unchanged"
    else:
        write_private(path, content, mode=0o755)
        action = "installed" if existing is None else "upgraded"
    return {"shim": str(path), "real_scrypt": str(real), "real_scrypt_version": version, "action": action}


def uninstall_shim(root: Path, prefix: str = DEFAULT_PREFIX) -> dict:
    """Remove our shim (nothing else); `removed` says whether there was one."""
    path = shim_path(root.resolve(), prefix)
    removed = installed_constants(path) is not None
    if removed:
        path.unlink()
    return {"shim": str(path), "removed": removed}


def shim_path(root: Path, prefix: str) -> Path:
    return under_root(root, f"{prefix.rstrip('/')}/bin/scrypt")


def qubesd_path(root: Path) -> tuple[list[str], str]:
    """qubesd's PATH: from its /proc environment when readable (as root), else systemd's default."""
    for entry in sorted((p for p in under_root(root, "/proc").glob("[0-9]*")), key=lambda p: int(p.name)):
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            if (entry / "comm").read_text().strip() != "qubesd" and b"/usr/bin/qubesd" not in argv[:2]:
                continue
            for variable in (entry / "environ").read_bytes().split(b"\0"):
                if variable.startswith(b"PATH="):
                    return variable[5:].decode(errors="replace").split(":"), f"/proc/{entry.name}/environ"
        except (OSError, ValueError):
            continue
    return SYSTEMD_DEFAULT_PATH.split(":"), "systemd default"


def shim_status(root: Path, prefix: str = DEFAULT_PREFIX) -> dict:
    """Is the shim installed and current, and would qubesd run it for `scrypt`? `active`: installed
    and the first `scrypt` on qubesd's PATH; `problems` says what is not right."""
    root = root.resolve()
    path = shim_path(root, prefix)
    problems: list[str] = []
    try:
        constants = installed_constants(path)
    except ShimInstallError as exc:
        constants = None
        problems.append(str(exc))
    up_to_date = False
    if constants is not None:
        up_to_date = path.read_bytes() == render_shim(constants["REAL_SCRYPT"], constants["STATE_DIR"])
        if not up_to_date:
            problems.append(
                f"{path} differs from the packaged shim {packaged.SHIM_VERSION}: run qtb-pipe install-shim"
            )
        if not os.access(constants["REAL_SCRYPT"], os.X_OK):
            problems.append(
                f"the shim's real scrypt {constants['REAL_SCRYPT']} is missing: only qtb-pipe runs work"
            )
    elif not problems:
        problems.append(f"no shim at {path}")
    directories, source = qubesd_path(root)
    found = shutil.which(
        "scrypt", path=os.pathsep.join(str(under_root(root, d)) for d in directories if d.startswith("/"))
    )
    found = Path(found) if found else None
    if constants is not None and found != path:
        problems.append(f"qubesd's PATH ({source}) finds {found or 'no scrypt'} before {path}")
    return {
        "shim": str(path),
        "installed": constants is not None,
        "up_to_date": up_to_date,
        "real_scrypt": constants and constants["REAL_SCRYPT"],
        "qubesd_path_source": source,  # /proc/<pid>/environ or "systemd default"
        "qubesd_scrypt": str(found) if found else None,
        "active": constants is not None and found == path,
        "problems": problems,
    }


def require_shim(root: Path, for_restore: bool = False) -> None:
    """Refuse (exit 7) unless the shim will run: a backup's `scrypt` is found on qubesd's PATH, a
    restore's on this user's (qvm-backup-restore runs it)."""
    status = shim_status(root)
    if for_restore:
        found = shutil.which("scrypt")
        if status["installed"] and found and Path(found).resolve() == Path(status["shim"]).resolve():
            return
        why = f"qvm-backup-restore would run {found or 'no scrypt'}, not the qtb-pipe shim (check PATH)"
    elif status["active"]:
        return
    else:
        why = "the scrypt shim is not active: " + ("; ".join(status["problems"]) or "qubesd would not run it")
    raise QtbError(f"{why} (run: qtb-pipe install-shim; see qtb-pipe shim-status)", EXIT_SHIM)
