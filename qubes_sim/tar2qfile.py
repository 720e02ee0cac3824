"""tar2qfile, in the qube: forward the stream's members whose name starts with a requested prefix.

As upstream tar2qfile.c: pax extended headers are skipped, zero blocks are skipped (resync over the
end-of-archive blocks of each concatenated archive), only the ustar name counts, and once every
prefix has matched, the first member that matches none ends the transfer (the writer then sees
EPIPE). With no prefixes, everything is forwarded.
"""

from __future__ import annotations

import sys

from .qrexec import write_frame

BLOCK = 512


def _octal(field: bytes) -> int:
    text = field.rstrip(b"\0 ").strip()
    return int(text, 8) if text else 0


def _read_exact(inp, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = inp.read(n - len(out))
        if not chunk:
            break
        out += chunk
    return bytes(out)


def main(argv: list[str]) -> int:
    prefixes = [p for p in argv if p]
    matched: set[str] = set()
    inp = sys.stdin.buffer
    out = sys.stdout.buffer
    while True:
        header = _read_exact(inp, BLOCK)
        if len(header) < BLOCK:
            break
        if header == bytes(BLOCK):
            continue
        typeflag = header[156:157]
        size = _octal(header[124:136])
        padded = (size + BLOCK - 1) // BLOCK * BLOCK
        name = header[0:100].split(b"\0", 1)[0]
        prefix = header[345:500].split(b"\0", 1)[0] if header[257:262] == b"ustar" else b""
        if prefix:
            name = prefix + b"/" + name
        if typeflag in (b"x", b"g", b"L", b"K"):
            _skip(inp, padded)
            continue
        text = name.decode("ascii", errors="replace")
        hits = [p for p in prefixes if text.startswith(p)]
        if prefixes and not hits:
            if matched == set(prefixes):
                break  # everything requested has been sent: stop early
            _skip(inp, padded)
            continue
        matched.update(hits)
        write_frame(out, name, size)
        left = size
        while left:
            chunk = inp.read(min(left, 1 << 20))
            if not chunk:
                sys.stderr.write("tar2qfile: unexpected end of archive\n")
                return 1
            out.write(chunk)
            left -= len(chunk)
        _skip(inp, padded - size)
    out.write(b"\0" * 12)  # end frame
    out.flush()
    return 0


def _skip(inp, n: int) -> None:
    while n:
        chunk = inp.read(min(n, 1 << 20))
        if not chunk:
            return
        n -= len(chunk)


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except BrokenPipeError:  # dom0 stopped reading: nothing more to send
        sys.exit(1)
