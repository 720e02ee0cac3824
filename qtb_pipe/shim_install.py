"""Install, remove and inspect the scrypt shim in a dom0 root (`qtb-pipe install-shim` and friends).

`root` is the dom0 root: `/` on a real dom0, the emulated dom0's directory in a qubes-sim world. The
shim goes to `<root><prefix>/bin/scrypt` (default /usr/local/bin, which systemd's default PATH puts
before /usr/bin), next to, never over, the package-owned `<root>/usr/bin/scrypt`. Its REAL_SCRYPT,
STATE_DIR and INSTALLED_DIRS constants are rewritten on the way; INSTALLED_DIRS lists the directories
this installation had to create, so that uninstalling restores the tree exactly.

Standard library only (dom0).
"""

from __future__ import annotations

import ast
import hashlib
import os
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from scrypt_shim import shim as packaged_shim

from .config import write_private

DEFAULT_PREFIX = "/usr/local"
# systemd's default PATH for services; qubesd's unit sets none (facts §1).
SYSTEMD_DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin"
CONSTANT_LINE = r"^{name}(: [^=]+)? = .*$"


class ShimInstallError(Exception):
    """Installing or removing the shim is refused; the message says why and what to do."""


@dataclass(frozen=True)
class ShimLayout:
    """Where things are for one dom0 root and install prefix."""

    root: Path
    prefix: str

    @property
    def shim_path(self) -> Path:
        return under_root(self.root, f"{self.prefix.rstrip('/')}/bin/scrypt")

    @property
    def packaged_real_scrypt(self) -> Path:
        return under_root(self.root, "/usr/bin/scrypt")

    @property
    def state_dir(self) -> Path:
        return under_root(self.root, "/var/lib/qtb-pipe")


@dataclass
class InstallResult:
    shim_path: Path
    real_scrypt: Path  # resolved real scrypt the shim hands non-qtb calls to
    real_scrypt_version: str  # e.g. "scrypt 1.3.1"
    state_dir: Path
    action: str  # "installed", "upgraded" or "unchanged"
    created_dirs: list[Path] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return self.action != "unchanged"


@dataclass
class UninstallResult:
    shim_path: Path
    removed: bool  # False: there was nothing of ours to remove
    removed_dirs: list[Path] = field(default_factory=list)
    kept_dirs: list[Path] = field(default_factory=list)  # created by us but no longer empty


@dataclass
class ShimStatus:
    shim_path: Path
    installed: bool  # our shim is at shim_path
    foreign_file: bool  # something that is not our shim is at shim_path
    installed_version: str | None
    packaged_version: str
    installed_sha256: str | None
    expected_sha256: str | None  # what install-shim would write now, given the installed constants
    real_scrypt: str | None  # REAL_SCRYPT inside the installed shim
    real_scrypt_ok: bool
    state_dir: str | None  # STATE_DIR inside the installed shim
    qubesd_pid: int | None
    qubesd_path: list[str]
    qubesd_path_source: str  # "/proc/<pid>/environ" or "systemd default"
    qubesd_scrypt: Path | None  # the first `scrypt` on qubesd's PATH, looked up under root
    qubesd_uses_shim: bool
    problems: list[str] = field(default_factory=list)

    @property
    def up_to_date(self) -> bool:
        return self.installed and self.installed_sha256 == self.expected_sha256

    @property
    def outdated(self) -> bool:
        return self.installed and not self.up_to_date


def under_root(root: Path, absolute: str) -> Path:
    """`/usr/bin/scrypt` inside the dom0 root."""
    return root / absolute.lstrip("/")


def packaged_shim_source() -> str:
    return Path(packaged_shim.__file__).read_text(encoding="utf-8")


def render_shim(
    real_scrypt: str | Path, state_dir: str | Path, installed_dirs: list[str] | None = None
) -> bytes:
    """The packaged shim with its install-time constants rewritten."""
    source = packaged_shim_source()
    values = {
        "REAL_SCRYPT": repr(str(real_scrypt)),
        "STATE_DIR": repr(str(state_dir)),
        "INSTALLED_DIRS": repr(list(installed_dirs or [])),
    }
    for name, literal in values.items():
        pattern = re.compile(CONSTANT_LINE.format(name=name), re.MULTILINE)
        annotation = ": list[str]" if name == "INSTALLED_DIRS" else ""
        source, count = pattern.subn(lambda _m, n=name, a=annotation, v=literal: f"{n}{a} = {v}", source, 1)
        if count != 1:
            raise ShimInstallError(f"packaged shim has no {name} line to rewrite")
    return source.encode("utf-8")


def read_shim_constants(text: str) -> dict[str, object] | None:
    """REAL_SCRYPT, STATE_DIR, INSTALLED_DIRS, SHIM_VERSION of a shim file; None if it is not ours."""
    if f'SHIM_MARKER = "{packaged_shim.SHIM_MARKER}"' not in text:
        return None
    constants: dict[str, object] = {}
    for name in ("REAL_SCRYPT", "STATE_DIR", "INSTALLED_DIRS", "SHIM_VERSION"):
        match = re.search(CONSTANT_LINE.format(name=name).replace("= .*", "= (?P<value>.*)"), text, re.M)
        if match is None:
            return None
        try:
            constants[name] = ast.literal_eval(match["value"].strip())
        except (ValueError, SyntaxError):
            return None
    return constants


def _read_if_ours(path: Path) -> dict[str, object] | None:
    """Constants of our shim at `path`; None if nothing is there; ShimInstallError if it is foreign."""
    if not path.exists() and not path.is_symlink():
        return None
    if path.is_symlink() or not path.is_file():
        raise ShimInstallError(
            f"{path} exists and is not qtb-pipe's shim (not a regular file); not touching it"
        )
    try:
        constants = read_shim_constants(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, OSError):
        constants = None
    if constants is None:
        raise ShimInstallError(f"{path} exists and is not qtb-pipe's shim; refusing to overwrite it")
    return constants


def check_real_scrypt(candidate: Path) -> tuple[Path, str]:
    """Resolve the package-owned scrypt and make sure it runs and is not a shim; (path, version line)."""
    if not candidate.exists():
        raise ShimInstallError(f"real scrypt {candidate} not found; install the scrypt package first")
    resolved = candidate.resolve()
    try:
        with resolved.open("rb") as binary:
            head = binary.read(65536)
    except OSError as exc:
        raise ShimInstallError(f"cannot read real scrypt {resolved}: {exc.strerror}") from None
    if packaged_shim.SHIM_MARKER.encode() in head:
        raise ShimInstallError(f"{resolved} is a qtb-pipe shim, not the real scrypt")
    try:
        run = subprocess.run(
            [str(resolved), "--version"],
            capture_output=True,
            timeout=30,
            check=False,
            stdin=subprocess.DEVNULL,
        )
    except OSError as exc:
        raise ShimInstallError(f"real scrypt {resolved} does not run: {exc.strerror}") from None
    version = run.stdout.decode(errors="replace").strip()
    if run.returncode != 0 or not version.startswith("scrypt "):
        raise ShimInstallError(
            f"real scrypt {resolved} --version failed (exit {run.returncode}): {version!r}"
        )
    return resolved, version


def install_shim(root: Path, prefix: str = DEFAULT_PREFIX) -> InstallResult:
    """Install (or upgrade) the shim at `<root><prefix>/bin/scrypt`; a second install is a no-op."""
    layout = ShimLayout(root.resolve(), prefix)
    shim_path = layout.shim_path
    if shim_path == layout.packaged_real_scrypt or (
        shim_path.exists()
        and layout.packaged_real_scrypt.exists()
        and shim_path.samefile(layout.packaged_real_scrypt)
    ):
        raise ShimInstallError(
            f"{shim_path} is the package-owned scrypt; choose another prefix (e.g. /usr/local)"
        )
    existing = _read_if_ours(shim_path)
    real_scrypt, version = check_real_scrypt(layout.packaged_real_scrypt)

    created: list[Path] = []
    if existing is not None:
        kept_dirs = [str(d) for d in existing["INSTALLED_DIRS"]]  # type: ignore[union-attr]
        content = render_shim(real_scrypt, layout.state_dir, kept_dirs)
        if shim_path.read_bytes() == content and os.access(shim_path, os.X_OK):
            return InstallResult(shim_path, real_scrypt, version, layout.state_dir, "unchanged")
        action = "upgraded"
    else:
        missing = [d for d in [shim_path.parent, *shim_path.parent.parents] if not d.exists()]
        created = sorted(missing, key=lambda d: len(d.parts))
        for directory in created:
            directory.mkdir(mode=0o755)
            directory.chmod(0o755)  # mkdir's mode is filtered by the umask
        kept_dirs = [str(d) for d in created]
        content = render_shim(real_scrypt, layout.state_dir, kept_dirs)
        action = "installed"
    write_private(shim_path, content, mode=0o755)
    return InstallResult(shim_path, real_scrypt, version, layout.state_dir, action, created)


def uninstall_shim(root: Path, prefix: str = DEFAULT_PREFIX) -> UninstallResult:
    """Remove our shim and the directories its installation created (if empty); nothing else."""
    layout = ShimLayout(root.resolve(), prefix)
    existing = _read_if_ours(layout.shim_path)
    result = UninstallResult(layout.shim_path, removed=False)
    if existing is None:
        return result
    layout.shim_path.unlink()
    result.removed = True
    created = [Path(str(d)) for d in existing["INSTALLED_DIRS"]]  # type: ignore[union-attr]
    for directory in sorted(created, key=lambda d: len(d.parts), reverse=True):
        try:
            directory.rmdir()
            result.removed_dirs.append(directory)
        except FileNotFoundError:
            pass
        except OSError:
            result.kept_dirs.append(directory)  # someone put something there since
    return result


def find_qubesd_pid(root: Path) -> int | None:
    """The pid of qubesd from `<root>/proc`, if that exists and shows one."""
    proc = under_root(root, "/proc")
    try:
        entries = [e for e in proc.iterdir() if e.name.isdigit()]
    except OSError:
        return None
    for entry in sorted(entries, key=lambda e: int(e.name)):
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            comm = (entry / "comm").read_text().strip()
        except OSError:
            continue
        # qubesd is a Python script: argv is [python3, /usr/bin/qubesd, ...], comm is "qubesd".
        if comm == "qubesd" or any(os.path.basename(arg) == b"qubesd" for arg in argv[:2]):
            return int(entry.name)
    return None


def qubesd_path(root: Path, pid: int | None) -> tuple[list[str], str]:
    """qubesd's PATH: from its environment if readable, else systemd's default."""
    if pid is not None:
        try:
            environ = (under_root(root, f"/proc/{pid}") / "environ").read_bytes()
        except OSError:
            environ = b""
        for variable in environ.split(b"\0"):
            if variable.startswith(b"PATH="):
                return variable[5:].decode(errors="replace").split(":"), f"/proc/{pid}/environ"
    return SYSTEMD_DEFAULT_PATH.split(":"), "systemd default"


def which_under_root(root: Path, name: str, path: list[str]) -> Path | None:
    for directory in path:
        if not directory.startswith("/"):
            continue  # execvp would resolve relative entries against qubesd's cwd; ignore them
        candidate = under_root(root, directory) / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


def shim_status(root: Path, prefix: str = DEFAULT_PREFIX, qubesd_pid: int | None = None) -> ShimStatus:
    """Is the shim installed and current, and would qubesd run it for `scrypt`?"""
    layout = ShimLayout(root.resolve(), prefix)
    shim_path = layout.shim_path
    problems: list[str] = []
    constants = None
    foreign = False
    try:
        constants = _read_if_ours(shim_path)
    except ShimInstallError as exc:
        foreign = True
        problems.append(str(exc))

    installed_sha = expected_sha = None
    real_scrypt = state_dir = version = None
    real_ok = False
    if constants is not None:
        installed_sha = hashlib.sha256(shim_path.read_bytes()).hexdigest()
        real_scrypt, state_dir = str(constants["REAL_SCRYPT"]), str(constants["STATE_DIR"])
        version = str(constants["SHIM_VERSION"])
        dirs = [str(d) for d in constants["INSTALLED_DIRS"]]  # type: ignore[union-attr]
        expected_sha = hashlib.sha256(render_shim(real_scrypt, state_dir, dirs)).hexdigest()
        if installed_sha != expected_sha:
            problems.append(
                f"{shim_path} differs from the packaged shim {packaged_shim.SHIM_VERSION}; reinstall"
            )
        real_ok = os.path.isfile(real_scrypt) and os.access(real_scrypt, os.X_OK)
        if not real_ok:
            problems.append(f"the shim's real scrypt {real_scrypt} is missing: only qtb-pipe runs would work")
    elif not foreign:
        problems.append(f"no shim at {shim_path}")

    pid = qubesd_pid if qubesd_pid is not None else find_qubesd_pid(layout.root)
    path, source = qubesd_path(layout.root, pid)
    resolved = which_under_root(layout.root, "scrypt", path)
    uses_shim = (
        resolved is not None and shim_path.exists() and resolved.samefile(shim_path) and constants is not None
    )
    if constants is not None and not uses_shim:
        problems.append(f"qubesd's PATH ({source}) finds {resolved or 'no scrypt'} before {shim_path}")
    return ShimStatus(
        shim_path=shim_path,
        installed=constants is not None,
        foreign_file=foreign,
        installed_version=version,
        packaged_version=packaged_shim.SHIM_VERSION,
        installed_sha256=installed_sha,
        expected_sha256=expected_sha,
        real_scrypt=real_scrypt,
        real_scrypt_ok=real_ok,
        state_dir=state_dir,
        qubesd_pid=pid,
        qubesd_path=path,
        qubesd_path_source=source,
        qubesd_scrypt=resolved,
        qubesd_uses_shim=uses_shim,
        problems=problems,
    )
