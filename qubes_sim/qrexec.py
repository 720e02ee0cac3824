"""qrexec services of a qube, as the backup tools use them (facts §3).

The VM side of qubes.Backup and qubes.Restore are small shell scripts, run by a real shell with
the qube's own PATH and HOME, so `eval "set -- $LOCATION"; "$@"` behaves as it does in a qube.
`tar2qfile` (filter the stream by path prefix) and `qfile-dom0-unpacker` (write files under a
limit in dom0) are emulated in Python with the same observable behaviour.
"""

from __future__ import annotations

import errno
import os
import resource
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

from .world import SimError, World

# VM side of qubes.Backup (docs/qubes-facts.md R6): LOCATION is a directory (the stream goes to a
# file there) or a command whose first word is found on PATH (the stream on its stdin; its exit
# status is the service's); anything else is "Invalid command", exit 1. Everything the script and
# the command print on stdout goes to the service's stdout, which qubesd discards (start_service
# is called with stdout=DEVNULL, as backup.py ~l.870-875 does); only stderr reaches dom0. The
# real script's `sync` calls flush the qube's disks: left out, they change nothing observable.
QUBES_BACKUP = r"""
echo Starting Backupcopy
read -r args
echo "Arguments: $args"
first=${args%% *}
if [ -d "$args" ]; then
    dd bs=128K iflag=fullblock conv=fsync of="$args/qubes-backup-$(date +'%Y-%m-%dT%H%M%S')"
elif command -v "$first" >/dev/null; then
    eval "set -- $args"
    "$@"
else
    echo "Invalid command $first"
    exit 1
fi
"""

# VM side of qubes.Restore: LOCATION is a file (read it) or a command, run from the start each
# time with stdin /dev/null and stdout into a FIFO that tar2qfile reads; its exit code is ignored.
QUBES_RESTORE = r"""
read -r args
read -r paths
if [ -f "$args" ]; then
    exec "$TAR2QFILE" $paths < "$args"
fi
fifo_dir=$(mktemp -d)
mkfifo "$fifo_dir/stream"
( eval "set -- $args"; "$@" < /dev/null > "$fifo_dir/stream" ) &
"$TAR2QFILE" $paths < "$fifo_dir/stream"
status=$?
wait
rm -rf "$fifo_dir"
exit $status
"""


def start_service(
    world: World,
    qube: str,
    service: str,
    stdout: int | IO | None = None,
    stderr: int | IO | None = subprocess.PIPE,
) -> subprocess.Popen:
    """Start a qrexec service in a qube (autostarting it, as qrexec does)."""
    q = world.get_qube(qube)
    if q.klass == "AdminVM":
        raise SimError("qrexec services to dom0 are not emulated", 2)
    world.set_running(qube, True)
    scripts = {"qubes.Backup": QUBES_BACKUP, "qubes.Restore": QUBES_RESTORE}
    if service not in scripts:
        raise SimError(f"service {service} not emulated in {qube}", 2)
    env = world.qube_env(qube)
    env["TAR2QFILE"] = _tar2qfile_wrapper(world)
    return subprocess.Popen(
        ["bash", "-c", scripts[service]],
        stdin=subprocess.PIPE,
        stdout=stdout,
        stderr=stderr,
        env=env,
        cwd=env["HOME"],
        start_new_session=True,
        preexec_fn=_another_machine,
    )


def _another_machine() -> None:
    """The service runs in another VM: dom0's process limits do not reach it. qtb-pipe bounds the
    files qvm-backup-restore writes in dom0 with RLIMIT_FSIZE; here the service is a child of that
    process, and without this borg (whose start-up self-test writes a hash index) failed with EFBIG
    in the backup qube whenever the bound was small, which on Qubes cannot happen."""
    _, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))


def kill_service(proc: subprocess.Popen) -> None:
    """Stop a service call and everything it started (the location command, tar2qfile)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _tar2qfile_wrapper(world: World) -> str:
    path = world.root / ".sim/tar2qfile"
    if not path.exists():
        path.write_text(f'#!/bin/sh\nexec {sys.executable} -m qubes_sim.tar2qfile "$@"\n')
        path.chmod(0o755)
    return str(path)


# --- the qfile stream between tar2qfile (in the qube) and the unpacker (dom0) ---------------
# A frame: u32 name length, u64 data length, name, data. A zero name length ends the stream.
FRAME = struct.Struct("<IQ")


def write_frame(out: IO[bytes], name: bytes, size: int) -> None:
    out.write(FRAME.pack(len(name), size) + name)


class UnpackError(Exception):
    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def wait_for_space(fd: int, needed: int) -> None:
    """unpack.c wait_for_space() (~l.77-91): polled once a second, no timeout (its own TODO)."""
    while needed and (st := os.fstatvfs(fd)).f_bsize * st.f_bavail < needed:
        time.sleep(1)


def unpack_qfile(
    stream: IO[bytes], target: Path, max_bytes: int, max_files: int, on_file, keep_free: int = 0
) -> None:
    """qfile-dom0-unpacker: write each received file under target, calling on_file(name) once
    it is complete. Limits of 0 mean unlimited; exceeding one fails with EDQUOT, as Qubes does.
    `keep_free` (its -w): before writing a file, wait until the disk has its size plus that free."""
    total_bytes = 0
    files = 0
    buf = bytearray(1 << 20)
    while True:
        head = stream.read(FRAME.size)
        if len(head) < FRAME.size:
            if head:
                raise UnpackError("truncated qfile stream", errno.EIO)
            return
        name_len, size = FRAME.unpack(head)
        if name_len == 0:
            return
        name = stream.read(name_len).decode("ascii", errors="replace")
        if name.startswith("/") or ".." in name.split("/") or not name:
            raise UnpackError(f"invalid file name from VM: {name!r}", errno.EINVAL)
        files += 1
        if max_files and files > max_files:
            raise UnpackError("limit exceeded", errno.EDQUOT)
        path = target / name
        # O_EXCL: a file already present (a name served twice before the first copy was decrypted
        # and removed) is never overwritten; the unpacker exits with the errno (unpack.c ~l.218-220),
        # and checks the byte limit only after the open (~l.223-226)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as e:
            raise UnpackError(f"{name}: {e.strerror}", e.errno or errno.EIO) from None
        total_bytes += size
        if max_bytes and total_bytes > max_bytes:
            os.close(fd)
            raise UnpackError("limit exceeded", errno.EDQUOT)
        wait_for_space(fd, size + keep_free if keep_free else 0)
        try:
            with os.fdopen(fd, "wb") as f:
                left = size
                view = memoryview(buf)
                while left:
                    n = stream.readinto(view[: min(left, len(buf))])
                    if not n:
                        raise UnpackError(f"truncated file {name}", errno.EIO)
                    f.write(view[:n])
                    left -= n
        except OSError as e:
            # Past a file size limit the C unpacker is killed by SIGXFSZ (Popen: returncode -25); on
            # other write errors (ENOSPC…) do_exit() exits with the errno (unpack.c).
            code = -signal.SIGXFSZ if e.errno == errno.EFBIG else e.errno or errno.EIO
            raise UnpackError(f"{name}: {e.strerror}", code) from None
        on_file(name)
