"""The backup side: qubesd's `admin.backup.Execute` and the `qvm-backup` client (facts §1–§4).

qubesd builds the v4 stream: backup-header, backup-header.hmac, qubes.xml.000.enc, then per qube
its volumes, firewall.xml and notes.txt, dom0's home last. Each file's inner stream (GNU tar
--sparse for images) is optionally compressed, cut into 100 MiB chunks, and each chunk goes through
`scrypt enc - OUT` over a pty; every resulting file is sent as its own `tar -cO --posix` archive.
As in qubesd, a chunk's scrypt exit status is only logged.
"""

from __future__ import annotations

import datetime
import os
import queue
import shutil
import string
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from . import qrexec, storage
from .scrypt_pty import UnexpectedPrompt, finish, launch_scrypt
from .world import Qube, SimError, World, render_qubes_xml

CHUNK_SIZE = 100 * 1024 * 1024
# Test-only switches (Qubes' own tests lower scrypt's work factor with `-t 0.1` the same way).
TEST_CHUNK_SIZE_ENV = "QUBES_SIM_TEST_CHUNK_SIZE"
TEST_SCRYPT_MAXTIME_ENV = "QUBES_SIM_TEST_SCRYPT_MAXTIME"
# Test-only fault: the scrypt process of this chunk (e.g. "vm4/private.img.000") is killed midway,
# as the OOM killer would; qubesd only logs the status.
TEST_KILL_SCRYPT_ENV = "QUBES_SIM_TEST_KILL_SCRYPT_FOR"
HEADER_KEYS = (
    "version",
    "encrypted",
    "compressed",
    "compression-filter",
    "crypto-algorithm",
    "hmac-algorithm",
    "backup-id",
)


@dataclass
class Profile:
    """A backup profile, /etc/qubes/backup/<name>.conf."""

    destination_vm: str
    destination_path: str
    passphrase_text: str
    include: list[str] | None = None
    exclude: list[str] = field(default_factory=list)
    compression: bool | str = True

    def render(self) -> str:
        def q(s: str) -> str:
            return "'" + s.replace("'", "''") + "'"

        lines = [
            f"destination_vm: {q(self.destination_vm)}",
            f"destination_path: {q(self.destination_path)}",
            f"passphrase_text: {q(self.passphrase_text)}",
            f"compression: {q(self.compression) if isinstance(self.compression, str) else self.compression}",
        ]
        if self.include is not None:
            lines.append("include:")
            lines += [f"  - {q(n)}" for n in self.include]
        if self.exclude:
            lines.append("exclude:")
            lines += [f"  - {q(n)}" for n in self.exclude]
        return "\n".join(lines) + "\n"

    @classmethod
    def parse(cls, text: str) -> Profile:
        """The YAML subset the profiles use: scalars and lists of scalars."""
        values: dict[str, object] = {}
        current: list[str] | None = None
        for raw in text.splitlines():
            if raw.startswith("  - ") and current is not None:
                current.append(_unquote(raw[4:]))
            elif ":" in raw:
                key, _, value = raw.partition(":")
                value = value.strip()
                if value:
                    values[key] = _unquote(value)
                    current = None
                else:
                    current = []
                    values[key] = current
        comp = values.get("compression", "True")
        compression: bool | str = comp if comp not in ("True", "False") else comp == "True"
        return cls(
            destination_vm=str(values["destination_vm"]),
            destination_path=str(values["destination_path"]),
            passphrase_text=str(values["passphrase_text"]),
            include=values.get("include"),
            exclude=list(values.get("exclude", [])),
            compression=compression,
        )


def _unquote(s: str) -> str:
    s = s.strip()
    if len(s) >= 2 and s[0] == s[-1] == "'":
        return s[1:-1].replace("''", "'")
    return s


@dataclass
class FileToBackup:
    path: Path  # source on dom0's disk
    subdir: str  # e.g. "vm12/" or "dom0-home/"
    name: str  # name in the archive, e.g. "private.img"
    size: int  # disk usage, the unit of backup-size
    is_dir: bool = False
    block_device: bool = False  # an LVM thin volume: exported as a block device, written by tarwriter

    @property
    def archive_path(self) -> str:
        return self.subdir + self.name


def disk_usage(path: Path) -> int:
    if path.is_dir():
        return sum(disk_usage(p) for p in path.rglob("*") if p.is_file() and not p.is_symlink())
    return path.stat().st_blocks * 512


def select_qubes(qubes: dict[str, Qube], include: list[str] | None, exclude: list[str]) -> list[Qube]:
    for name in (include or []) + exclude:
        if name not in qubes:
            raise SimError(f"No such VM: {name}", 2)
    chosen = [qubes[n] for n in include] if include else [q for q in qubes.values() if q.include_in_backups]
    # qubes by qid, dom0's home last (as qubesd orders the stream)
    return sorted((q for q in chosen if q.name not in exclude), key=lambda q: (q.klass == "AdminVM", q.qid))


def files_for(world: World, q: Qube) -> list[FileToBackup]:
    if q.klass == "AdminVM":
        home = world.dom0_home
        return [FileToBackup(home, "dom0-home/", world.user, disk_usage(home), is_dir=True)]
    subdir = f"vm{q.qid}/"
    files = []
    drivers = {v.name: v.driver for v in storage.volumes_of(world, q.name)}
    for vol in q.volumes:
        img = q.vm_dir(world) / f"{vol}.img"
        if img.exists():
            lvm = drivers.get(vol) == "lvm_thin"
            files.append(FileToBackup(img, subdir, f"{vol}.img", disk_usage(img), block_device=lvm))
    for extra in ("firewall.xml", "notes.txt"):
        p = q.vm_dir(world) / extra
        if p.exists():
            files.append(FileToBackup(p, subdir, extra, disk_usage(p)))
    return files


def inner_tar_cmd(f: FileToBackup) -> list[str]:
    if f.is_dir:  # dom0 home: members dom0-home/<user>/... (backup.py: --xform=s:^<base>:<subdir>\0:)
        return [
            "tar",
            "-c",
            "-C",
            str(f.path.parent),
            f"--transform=s:^{f.path.name}:dom0-home/&:",
            f.path.name,
        ]
    if f.block_device:  # backup.py ~l.724-745: tar cannot read a block device's content
        return [sys.executable, "-m", "qubes_sim.tarwriter", f"--override-name={f.archive_path}", str(f.path)]
    sparse = ["--sparse"] if f.name.endswith(".img") else []
    return [
        "tar",
        "-c",
        *sparse,
        "-C",
        str(f.path.parent),
        f"--transform=s|^{f.path.name}$|{f.archive_path}|",
        f.path.name,
    ]


class Sender(threading.Thread):
    """qubesd's send worker: one `tar -cO --posix` per finished file onto the target."""

    def __init__(self, tmpdir: Path, target) -> None:
        super().__init__(daemon=True)
        self.tmpdir, self.target = tmpdir, target
        self.files: queue.Queue[str | None] = queue.Queue(maxsize=10)
        self.error: str | None = None

    def run(self) -> None:
        while (name := self.files.get()) is not None:
            if self.error:
                continue
            code = subprocess.call(
                ["tar", "-cO", "--posix", "-C", str(self.tmpdir), name],
                stdout=self.target,
                stderr=subprocess.DEVNULL,
            )
            if code >= 2:
                self.error = (
                    "Failed to write the backup, out of disk space? "
                    "Check console output or ~/.xsession-errors for details."
                )
            (self.tmpdir / name).unlink(missing_ok=True)


def qubesd_backup(world: World, profile: Profile, progress: Callable[[float], None] | None = None) -> str:
    """Run a backup as qubesd does; returns the backup_id."""
    qubes = world.load_qubes()
    selected = select_qubes(qubes, profile.include, profile.exclude)
    backup_id = datetime.datetime.now().strftime("%Y%m%dT%H%M%S-") + str(os.getpid())
    chunk_size = int(os.environ.get(TEST_CHUNK_SIZE_ENV, CHUNK_SIZE))
    maxtime = os.environ.get(TEST_SCRYPT_MAXTIME_ENV)
    scrypt_opts = ["-t", maxtime] if maxtime else []
    env = {"PATH": world.qubesd_path(), "HOME": str(world.dom0 / "root"), "LANG": "C.UTF-8"}
    compressed = profile.compression is not False
    compress_prog = profile.compression if isinstance(profile.compression, str) else "gzip"
    log = open(world.dom0 / "var/log/qubes/qubesd.log", "a")  # noqa: SIM115 - closed in finally

    plan: list[FileToBackup] = []
    for q in selected:
        files = files_for(world, q)
        size = sum(f.size for f in files)
        path = files[0].subdir if q.klass != "AdminVM" else f"dom0-home/{world.user}"
        q.features.update({"backup-content": "True", "backup-path": path, "backup-size": str(size)})
        plan += files
    for q in qubes.values():
        if q not in selected:
            q.features["backup-content"] = "False"

    tmpdir = Path(tempfile.mkdtemp(prefix="backup_", dir=world.dom0 / "var/tmp"))
    vmproc = None
    try:
        (tmpdir / "qubes.xml").write_bytes(render_qubes_xml(qubes))
        header = {
            "version": "4",
            "encrypted": "True",
            "compressed": str(compressed),
            "compression-filter": compress_prog,
            "hmac-algorithm": "scrypt",
            "backup-id": backup_id,
        }
        (tmpdir / "backup-header").write_text(
            "".join(f"{k}={header[k]}\n" for k in HEADER_KEYS if k in header)
        )
        proc = launch_scrypt(
            [
                "scrypt",
                "enc",
                *scrypt_opts,
                str(tmpdir / "backup-header"),
                str(tmpdir / "backup-header.hmac"),
            ],
            f"backup-header!{profile.passphrase_text}",
            env,
        )
        code, err = finish(proc)
        if code != 0:
            raise SimError(f"Failed to compute hmac of header file: {err}")

        if profile.destination_vm == "dom0":
            dest = Path(profile.destination_path)
            if not dest.is_dir():
                raise SimError(f"ERROR: the backup directory for {dest} does not exists")
            target = open(dest / datetime.datetime.now().strftime("qubes-backup-%Y-%m-%dT%H%M%S"), "wb")  # noqa: SIM115
        else:
            vmproc = qrexec.start_service(
                world, profile.destination_vm, "qubes.Backup", stdout=subprocess.DEVNULL
            )
            vmproc.stdin.write(profile.destination_path.replace("\r", "").replace("\n", "").encode() + b"\n")
            vmproc.stdin.flush()
            target = vmproc.stdin
        stderr_buf = bytearray()
        stderr_reader = None
        if vmproc is not None:
            stderr_reader = threading.Thread(
                target=lambda: stderr_buf.extend(vmproc.stderr.read()), daemon=True
            )
            stderr_reader.start()

        sender = Sender(tmpdir, target)
        sender.start()
        sender.files.put("backup-header")
        sender.files.put("backup-header.hmac")

        qubes_xml = FileToBackup(tmpdir / "qubes.xml", "", "qubes.xml", disk_usage(tmpdir / "qubes.xml"))
        total = sum(f.size for f in plan) or 1
        done = 0
        last_progress = time.monotonic()
        for f in [qubes_xml, *plan]:
            cmd = inner_tar_cmd(f)
            inner = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
            source = inner.stdout
            compressor = None
            if compressed:
                compressor = subprocess.Popen([compress_prog], stdin=inner.stdout, stdout=subprocess.PIPE)
                inner.stdout.close()
                source = compressor.stdout
            for index in range(100000):
                first = source.read(min(65536, chunk_size))
                if not first and index > 0:
                    break
                chunk_name = f"{f.archive_path}.{index:03d}"
                (tmpdir / chunk_name).parent.mkdir(parents=True, exist_ok=True)
                enc = launch_scrypt(
                    ["scrypt", "enc", *scrypt_opts, "-", str(tmpdir / (chunk_name + ".enc"))],
                    f"{backup_id}!{chunk_name}!{profile.passphrase_text}",
                    env,
                    stdin=subprocess.PIPE,
                )
                if chunk_name == os.environ.get(TEST_KILL_SCRYPT_ENV):
                    enc.kill()
                consumed = _copy_chunk(first, source, enc.stdin, chunk_size)
                code, err = finish(enc)
                if code != 0:  # qubesd only logs this
                    log.write(f"{backup_id}: scrypt for {chunk_name} exited {code}: {err}\n")
                done += consumed
                # qubes/backup.py _send_progress_update: at most one event a second, none at the end
                if progress and time.monotonic() - last_progress >= 1:
                    last_progress = time.monotonic()
                    progress(min(100.0, 100.0 * done / total))
                sender.files.put(chunk_name + ".enc")
                if sender.error or consumed < chunk_size:
                    break
            source.close()
            inner.wait()
            if compressor:
                compressor.wait()
            if sender.error:
                break
        sender.files.put(None)
        sender.join()
        if vmproc is not None:
            try:
                vmproc.stdin.close()
            except BrokenPipeError:
                pass
            code = vmproc.wait()
            stderr_reader.join()
            if code != 0:  # qubes/backup.py _monitor_process: printable stderr without \r\n%{}
                text = bytes(stderr_buf).decode("ascii", errors="ignore")
                msg = "".join(c for c in text if c in string.printable and c not in "\r\n%{}")
                raise SimError(f"Writing backup to VM {profile.destination_vm} failed: {msg}")
        else:
            target.close()
        if sender.error:
            raise SimError(sender.error)
        # qubes/backup.py ~l.973: each backed-up qube's backup_timestamp, saved in qubes.xml
        saved = world.load_qubes()
        for q in selected:
            if q.klass != "AdminVM":
                saved[q.name].backup_timestamp = int(time.time())
        world.save_qubes(saved)
        return backup_id
    except UnexpectedPrompt as e:
        raise SimError(str(e)) from None
    finally:
        log.close()
        if vmproc is not None and vmproc.poll() is None:
            qrexec.kill_service(vmproc)
        shutil.rmtree(tmpdir, ignore_errors=True)


def _copy_chunk(first: bytes, source, sink, chunk_size: int) -> int:
    """Feed one chunk (starting with `first`) to scrypt's stdin; return the bytes consumed from
    the inner stream. If scrypt dies, the rest of the chunk is still consumed, so the next chunk
    starts where it should (its exit status is only logged by the caller, as qubesd does)."""
    consumed = len(first)
    data = first
    while True:
        if data and sink is not None:
            try:
                sink.write(data)
            except BrokenPipeError:
                sink = None
        if consumed >= chunk_size:
            break
        data = source.read(min(1 << 20, chunk_size - consumed))
        if not data:
            break
        consumed += len(data)
    if sink is not None:
        try:
            sink.close()
        except BrokenPipeError:
            pass
    return consumed
