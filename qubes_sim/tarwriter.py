"""The inner format of a volume exported from an LVM thin pool: what `python3 -m qubes.tarwriter`
writes (QubesOS/qubes-core-admin qubes/tarwriter.py; backup.py ~l.720-745 uses it for block devices
and renamed files, GNU `tar -Pc --sparse` for files in file and file-reflink pools).

Written here from that format's description, not from its code:
- one pax member, GNU sparse format 1.0: pax records `GNU.sparse.major=1`, `GNU.sparse.minor=0`,
  `GNU.sparse.name=<override name>`, `GNU.sparse.realsize=<file size>`, in that order; the ustar name
  is `<dir>/GNUSparseFile.<pid of the writer>/<base>` (so it differs on every run) and all other
  header fields are tarfile.TarInfo's defaults (mtime 0, mode 0644, uid/gid 0);
- the member's data: the sparse map as text (`count\\n` then `offset\\nsize\\n` per region), padded
  with NULs to a 512-byte block, then the bytes of each region;
- regions are runs of 512-byte blocks that are not all zero; the last region always reaches the end
  of the file, with size 0 when the file ends in zeros;
- then two zero blocks, without padding the data to a block first.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tarfile
from collections.abc import Iterator

BLOCK = tarfile.BLOCKSIZE
READ = 4 << 20
ZERO = bytes(BLOCK)


def _data_extents(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """Where the file may hold non-zero bytes: holes are zeros, so they are skipped unread."""
    offset = 0
    while offset < size:
        try:
            start = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError:  # ENXIO: only a hole is left
            return
        end = os.lseek(fd, start, os.SEEK_HOLE)
        yield start, end
        offset = end


def sparse_map(fd: int) -> list[tuple[int, int]]:
    size = os.fstat(fd).st_size
    regions: list[tuple[int, int]] = []
    run_start: int | None = None  # where the current run of non-zero blocks began
    for start, end in _data_extents(fd, size):
        position = start - start % BLOCK  # holes are filesystem blocks: whole 512-byte blocks
        while position < end:
            data = os.pread(fd, min(READ, end - position), position)
            if not data:
                break
            view = memoryview(data)
            for at in range(0, len(data), BLOCK):
                zero = view[at : at + BLOCK] == ZERO
                if zero and run_start is not None:
                    regions.append((run_start, position + at - run_start))
                    run_start = None
                elif not zero and run_start is None:
                    run_start = position + at
            position += len(data)
        if run_start is not None and position < size:  # a hole follows: zero blocks end the run
            regions.append((run_start, position - run_start))
            run_start = None
    regions.append((run_start, size - run_start) if run_start is not None else (size, 0))
    return regions


def header(name: str, regions: list[tuple[int, int]], pid: int) -> bytes:
    text = f"{len(regions)}\n" + "".join(f"{offset}\n{size}\n" for offset, size in regions)
    sparse_text = text.encode() + b"\0" * (-len(text) % BLOCK)
    info = tarfile.TarInfo(f"{os.path.dirname(name)}/GNUSparseFile.{pid}/{os.path.basename(name)}")
    info.size = sum(size for _, size in regions) + len(sparse_text)
    realsize = regions[-1][0] + regions[-1][1]
    info.pax_headers = {
        "GNU.sparse.major": "1",
        "GNU.sparse.minor": "0",
        "GNU.sparse.name": name,
        "GNU.sparse.realsize": str(realsize),
    }
    return info.tobuf(tarfile.PAX_FORMAT) + sparse_text


def write(path: str, name: str, out) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        regions = sparse_map(fd)
        out.write(header(name, regions, os.getpid()))
        for offset, size in regions:
            while size:
                data = os.pread(fd, min(READ, size), offset)
                if not data:
                    raise EOFError("premature EOF")
                out.write(data)
                offset += len(data)
                size -= len(data)
        out.write(bytes(2 * BLOCK))
    finally:
        os.close(fd)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="qubes.tarwriter")
    p.add_argument("--override-name", dest="override_name")
    p.add_argument("--use-compress-program", dest="use_compress_program")
    p.add_argument("input_file")
    p.add_argument("output_file", nargs="?", default="-")
    args = p.parse_args(argv)
    name = args.override_name or args.input_file
    with open("/dev/stdout" if args.output_file == "-" else args.output_file, "wb") as output:
        if not args.use_compress_program:
            write(args.input_file, name, output)
            return 0
        compress = subprocess.Popen([args.use_compress_program], stdin=subprocess.PIPE, stdout=output)
        write(args.input_file, name, compress.stdin)
        compress.stdin.close()
        return compress.wait()


if __name__ == "__main__":
    sys.exit(main())
