"""Run `scrypt` the way qubesd and qvm-backup-restore do (facts §1).

The caller opens a pty and makes it the child's controlling terminal (setsid + TIOCSCTTY, echo
off); stdin/stdout are pipes or files and only /dev/tty is the pty. It reads exactly the prompt
bytes from the child's stderr and answers `<passphrase>\\n` on the pty; `enc` asks twice.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import termios
from typing import IO

PROMPTS = {
    "enc": (b"Please enter passphrase: ", b"Please confirm passphrase: "),
    "dec": (b"Please enter passphrase: ",),
}


class UnexpectedPrompt(Exception):
    pass


def launch_scrypt(
    argv: list[str],
    passphrase: str,
    env: dict[str, str],
    stdin: int | IO | None = None,
    stdout: int | IO | None = None,
) -> subprocess.Popen:
    """Start scrypt with argv (argv[1] is enc|dec), answer its prompts, return the process.

    The process's stderr is a pipe; what follows the prompts is its error output."""
    action = argv[1]
    master, slave = os.openpty()

    def set_ctty() -> None:
        os.setsid()
        os.close(master)
        fcntl.ioctl(slave, termios.TIOCSCTTY, 0)
        attrs = termios.tcgetattr(slave)
        attrs[3] &= ~termios.ECHO
        termios.tcsetattr(slave, termios.TCSANOW, attrs)

    proc = subprocess.Popen(
        argv, stdin=stdin, stdout=stdout, stderr=subprocess.PIPE, env=env, preexec_fn=set_ctty
    )
    os.close(slave)
    pty = os.fdopen(master, "wb", buffering=0)
    try:
        for prompt in PROMPTS[action]:
            got = _read_exact(proc.stderr, len(prompt))
            if got != prompt:
                raise UnexpectedPrompt(f"Unexpected prompt from scrypt: {got!r}")
            pty.write(passphrase.encode() + b"\n")
    except BaseException:
        proc.kill()
        proc.wait()
        pty.close()
        raise
    proc.pty = pty  # keep the master open until the child is done, as Qubes does
    return proc


def _read_exact(stream: IO[bytes], n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = stream.read(n - len(out))
        if not chunk:
            break
        out += chunk
    return out


def finish(proc: subprocess.Popen) -> tuple[int, str]:
    """Wait for a launched scrypt; return (exit status, its error output)."""
    err = proc.stderr.read()
    code = proc.wait()
    proc.pty.close()
    return code, err.decode(errors="replace").strip()
