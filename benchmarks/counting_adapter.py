"""Benchmark only: stands in front of the real qtb-adapter in the emulated backup qube (installed as
usr/local/bin/qtb-adapter, ahead of the real one on the qube's PATH) and appends to ~/dump-bytes.log
how many bytes each `dump` served into the pipe: what a restore read out of the repository, measured
where it leaves the backup qube (tar2qfile may close the pipe early; what was served until then counts).
Every other command is the real adapter itself (exec)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

HOME = Path(os.environ["HOME"])
REAL = HOME.parent.parent / "usr/bin/qtb-adapter"
LOG = HOME / "dump-bytes.log"


def main(argv: list[str]) -> int:
    if argv[:1] != ["dump"]:
        os.execv(REAL, [str(REAL), *argv])
    child = subprocess.Popen([str(REAL), *argv], stdout=subprocess.PIPE)
    served = 0
    try:
        while chunk := os.read(child.stdout.fileno(), 1 << 20):
            view = memoryview(chunk)
            while view:
                view = view[os.write(1, view) :]
            served += len(chunk)
    except BrokenPipeError:
        pass  # the reader has what it wanted, as the real dump treats EPIPE
    finally:
        child.stdout.close()
        code = child.wait()
        with LOG.open("a") as log:
            log.write(f"{served}\n")
    return 0 if code in (0, -13) else code  # -13: SIGPIPE once its reader was gone


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
