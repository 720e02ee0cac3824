"""Streaming check and normalisation of the outer Qubes v4 backup stream.

The stream is a concatenation of independent `tar -cO --posix` archives, one per file (facts file
section 2). This filter reads it with one reused buffer, looks at nothing but the outer 512-byte
headers (checksum, magic, type, size), passes member data through untouched, and:

- records the member list (name, size) for `pending` and `commit`;
- rejects a stream that ends inside a member or without end-of-archive blocks, garbage, and
  absurd input (huge extended headers, endless zero blocks);
- normalises the per-run bytes of the outer headers (pax atime/ctime/mtime records, ustar mtime),
  so that an unchanged re-run gives identical bytes and the engine stores almost nothing again.
  Names, sizes, types and data are kept exactly; checksums are recomputed;
- withholds the final 512-byte block of the latest member and the zero blocks after it until the
  whole stream has been validated. An engine that sees end-of-file early (because we died or were
  killed) therefore sees a member cut short, except between two of our writes (see docs/adapters.md:
  such a stream is saved at most as pending, never committed);
- with `split=True` (borg import-tar), feeds each large member to the engine as three consecutive
  members, head / body / tail (`split_names`), so that the per-run bytes near its start (the inner
  tar's `GNUSparseFile.<pid>` name) and its end (the shim trailer's tag) each cost the engine one
  small item instead of a ~1 MiB chunk. The member list still has the original names and sizes;
  `adapters/tarjoin.py` rejoins the pieces at restore time.

Run as `python -m qtb_adapters.tarstream --input-fd N --report FILE` it is the command an engine
runs itself (restic --stdin-from-command, borg create --content-from-command): stream in on fd N,
filtered stream out on stdout, a JSON report for qtb-adapter, exit 7 on a bad stream so that the
engine refuses to save anything.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import BinaryIO

from scrypt_shim.shim import TRAILER_SIZE  # the one definition of the member format

BLOCK = 512
ZERO_BLOCK = bytes(BLOCK)
READ_BUFFER_BYTES = 1 << 20  # multiple of BLOCK; one buffer for the whole run
MAX_EXTENDED_HEADER_BYTES = 64 * 1024  # real ones are < 1 KiB
MAX_ZERO_RUN_BLOCKS = 2048  # GNU tar writes 2 + record padding (<= 20); /dev/zero is not a backup
MAX_MEMBERS = 1_000_000  # one member per 100 MiB chunk: 100 TB

REGULAR_TYPE = b"0"  # tar2qfile forwards only '0' members
DIRECTORY_TYPE = b"5"
EXTENSION_TYPES = (b"x", b"g", b"L", b"K")
# pax records that only carry the time of the run; everything else is kept.
VOLATILE_PAX_KEYS = frozenset({b"atime", b"ctime", b"mtime"})
_PAX_PID_DIR = re.compile(rb"PaxHeaders\.\d+")  # tar < 1.32 put the writer's pid in pax names

# Splitting (split=True): a regular member of at least SPLIT_MIN_BYTES goes to the engine as its
# first SPLIT_HEAD_BYTES, its body and its last SPLIT_TAIL_BYTES (the shim trailer), named
# <name>.qtb-head/-body/-tail. Qubes member names end in .enc or .hmac or are backup-header, and a
# stream holding such a name is refused while splitting, so the derived names collide with nothing.
SPLIT_HEAD_BYTES = 4096  # holds the inner tar header (its GNUSparseFile.<pid> name and checksum)
SPLIT_TAIL_BYTES = TRAILER_SIZE  # magic, key check value, length, HMAC tag
SPLIT_MIN_BODY_BYTES = 64 * 1024
SPLIT_MIN_BYTES = SPLIT_HEAD_BYTES + SPLIT_MIN_BODY_BYTES + SPLIT_TAIL_BYTES
SPLIT_SUFFIXES = (".qtb-head", ".qtb-body", ".qtb-tail")
USTAR_NAME_BYTES = 100
MAX_USTAR_SIZE = 8**11 - 1  # 11 octal digits; larger members are not split

EXIT_BAD_STREAM = 7
EXIT_OTHER = 1


class StreamRejected(Exception):
    """The input is not a complete v4-like stream; nothing may be stored."""


@dataclass(frozen=True)
class Member:
    name: str
    size: int


@dataclass
class StreamSummary:
    members: list[Member] = field(default_factory=list)
    stream_bytes: int = 0  # read from the producer
    output_bytes: int = 0  # handed to the engine (normalised headers may be shorter)


def _padded(size: int) -> int:
    return (size + BLOCK - 1) // BLOCK * BLOCK


def _checksums(header: bytes) -> tuple[int, int]:
    """(unsigned, signed) sums with the checksum field counted as spaces; old tars used signed."""
    body = header[:148] + b" " * 8 + header[156:]
    unsigned = sum(body)
    signed = unsigned - 256 * sum(1 for b in body if b >= 128)
    return unsigned, signed


def _set_checksum(header: bytearray) -> None:
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)


def _octal_field(raw: bytes, what: str) -> int:
    if raw and raw[0] & 0x80:  # GNU base-256 for values that do not fit
        if raw[0] == 0xFF:
            raise StreamRejected(f"negative {what} in a tar header")
        return int.from_bytes(bytes([raw[0] & 0x7F]) + raw[1:], "big")
    text = raw.replace(b"\0", b" ").strip()
    if not text:
        return 0
    try:
        return int(text, 8)
    except ValueError:
        raise StreamRejected(f"invalid {what} field in a tar header") from None


def _cstring(raw: bytes) -> bytes:
    return raw.split(b"\0", 1)[0]


def parse_pax_records(data: bytes) -> list[tuple[bytes, bytes]]:
    """`<len> <key>=<value>\\n` records of a pax extended header."""
    records: list[tuple[bytes, bytes]] = []
    pos = 0
    while pos < len(data):
        if data[pos] == 0:  # NUL padding after the last record
            break
        space = data.find(b" ", pos, pos + 21)
        try:
            length = int(data[pos:space]) if space > pos else -1
        except ValueError:
            length = -1
        if length <= space - pos or pos + length > len(data):
            raise StreamRejected("malformed pax extended header")
        record = data[space + 1 : pos + length]
        key, eq, value = record[:-1].partition(b"=")
        if not record.endswith(b"\n") or not eq or not key:
            raise StreamRejected("malformed pax extended header record")
        records.append((key, value))
        pos += length
    return records


def encode_pax_records(records: list[tuple[bytes, bytes]]) -> bytes:
    out = bytearray()
    for key, value in records:
        body = b" " + key + b"=" + value + b"\n"
        length = len(body) + len(str(len(body)))
        if len(str(length)) != len(str(len(body))):
            length = len(body) + len(str(length))
        out += str(length).encode() + body
    return bytes(out)


def split_names(name: bytes) -> tuple[bytes, bytes, bytes]:
    """The names of a split member's head, body and tail pieces."""
    return tuple(name + suffix.encode() for suffix in SPLIT_SUFFIXES)  # type: ignore[return-value]


def is_split_name(name: bytes) -> bool:
    return name.endswith(tuple(suffix.encode() for suffix in SPLIT_SUFFIXES))


def piece_header(template: bytes, name: bytes, size: int) -> bytes:
    """A plain ustar header like `template` (mode, owner, time, magic) with another name and size."""
    block = bytearray(template)
    block[0:USTAR_NAME_BYTES] = name.ljust(USTAR_NAME_BYTES, b"\0")
    block[124:136] = b"%011o\0" % size
    if block[257:263] == b"ustar\0":
        block[345:500] = bytes(155)  # no prefix: the name is whole
    _set_checksum(block)
    return bytes(block)


def _splittable(name: bytes, size: int) -> bool:
    longest = len(name) + max(len(suffix) for suffix in SPLIT_SUFFIXES)
    return SPLIT_MIN_BYTES <= size <= MAX_USTAR_SIZE and longest <= USTAR_NAME_BYTES and name.isascii()


def _normalised_ustar(header: bytes) -> bytes:
    block = bytearray(header)
    block[136:148] = b"00000000000\0"  # mtime: the run's time, not data
    _set_checksum(block)
    return bytes(block)


def _normalised_pax(header: bytes, records: list[tuple[bytes, bytes]]) -> bytes:
    """The pax header without its per-run records; b"" when nothing else was in it."""
    kept = [(k, v) for k, v in records if k not in VOLATILE_PAX_KEYS]
    if not kept:
        return b""  # a pax header holding only timestamps is dropped: plain ustar says the rest
    data = encode_pax_records(kept)
    block = bytearray(header)
    name = _PAX_PID_DIR.sub(b"PaxHeaders", _cstring(header[:100]))
    block[0:100] = name[:100].ljust(100, b"\0")
    block[124:136] = b"%011o\0" % len(data)
    block[136:148] = b"00000000000\0"
    _set_checksum(block)
    return bytes(block) + data + bytes(_padded(len(data)) - len(data))


@dataclass
class _Split:
    """The member being split: where its data goes (offsets count its data bytes forwarded)."""

    template: bytes  # its ustar header, normalised: the pieces' headers are made from it
    names: tuple[bytes, bytes, bytes]
    size: int
    offset: int = 0

    @property
    def body_size(self) -> int:
        return self.size - SPLIT_HEAD_BYTES - SPLIT_TAIL_BYTES


@dataclass
class _Extension:
    typeflag: bytes
    header: bytes
    data: bytes  # exactly `size` bytes


class StreamFilter:
    """Validate (and normalise) a v4-like stream from a raw file into `write`."""

    def __init__(
        self, write: Callable[[bytes | memoryview], None], *, normalise: bool = True, split: bool = False
    ) -> None:
        self._write = write
        self.normalise = normalise
        self.split = split
        self.summary = StreamSummary()
        self._in_data = False
        self._data_left = 0  # padded data bytes of the current member still to come
        self._ext_header: bytes | None = None  # extension header whose data is being collected
        self._ext_size = 0
        self._ext_data = bytearray()
        self._extensions: list[_Extension] = []  # collected for the next member header
        self._held = bytearray()  # final block of the latest member, withheld until validated
        self._hold = BLOCK  # how many of the latest member's last data bytes (with padding) to withhold
        self._split: _Split | None = None  # the latest member, when it is split (its tail is withheld)
        self._zero_blocks = 0  # zero blocks after the latest member, withheld (only counted)
        self._entries = 0  # member headers seen (regular files and directories)

    # -- output -----------------------------------------------------------------------------
    def _emit(self, data: bytes | memoryview) -> None:
        if data:
            self._write(data)
            self.summary.output_bytes += len(data)

    def _release_held(self) -> None:
        if self._split is not None:  # the held bytes are the tail piece's data and padding
            tail = bytes(self._held[:SPLIT_TAIL_BYTES])
            self._emit(tail + bytes(_padded(len(tail)) - len(tail)))
            self._split = None
        else:
            self._emit(bytes(self._held))
        self._held = bytearray()
        while self._zero_blocks:
            count = min(self._zero_blocks, 128)
            self._emit(bytes(BLOCK * count))
            self._zero_blocks -= count

    # -- input ------------------------------------------------------------------------------
    def run(self, source: BinaryIO) -> StreamSummary:
        """Read `source` (raw, unbuffered) to its end. Raises StreamRejected for a bad stream."""
        self._finish(read_through(source, self._consume, self._count))
        return self.summary

    def _count(self, count: int) -> None:
        self.summary.stream_bytes += count

    def _consume(self, view: memoryview, pos: int, end: int) -> int:
        while pos < end:
            avail = end - pos
            if self._in_data:
                forward = self._data_left - self._hold  # all but its final block (a split one's tail)
                if forward > 0:
                    count = min(forward, avail)
                    self._forward(view[pos : pos + count])
                else:
                    count = min(self._data_left, avail)
                    self._held += view[pos : pos + count]
                pos += count
                self._data_left -= count
                if self._data_left == 0:
                    self._in_data = False
            elif self._ext_header is not None:
                count = min(_padded(self._ext_size) - len(self._ext_data), avail)
                self._ext_data += view[pos : pos + count]
                pos += count
                if len(self._ext_data) == _padded(self._ext_size):
                    self._finish_extension()
            else:
                if avail < BLOCK:
                    break
                self._header_block(view[pos : pos + BLOCK])
                pos += BLOCK
        return pos

    def _forward(self, data: memoryview) -> None:
        """Member data that is not withheld; for a split member, with the pieces' headers between."""
        split = self._split
        if split is None:
            self._emit(data)
            return
        if split.offset < SPLIT_HEAD_BYTES:
            head = data[: SPLIT_HEAD_BYTES - split.offset]
            self._emit(head)
            split.offset += len(head)
            data = data[len(head) :]
            if split.offset == SPLIT_HEAD_BYTES:  # the head is complete: the body's header at once
                padding = bytes(_padded(SPLIT_HEAD_BYTES) - SPLIT_HEAD_BYTES)
                self._emit(padding + piece_header(split.template, split.names[1], split.body_size))
        self._emit(data)
        split.offset += len(data)
        if split.offset == split.size - SPLIT_TAIL_BYTES:  # the body is complete: the tail's header
            padding = bytes(_padded(split.body_size) - split.body_size)
            self._emit(padding + piece_header(split.template, split.names[2], SPLIT_TAIL_BYTES))

    def _header_block(self, block: memoryview) -> None:
        if block == ZERO_BLOCK:
            if not self._entries:
                raise StreamRejected("stream does not start with a tar header")
            if self._extensions:
                raise StreamRejected("zero block between an extended header and its member")
            self._zero_blocks += 1
            if self._zero_blocks > MAX_ZERO_RUN_BLOCKS:
                raise StreamRejected(f"more than {MAX_ZERO_RUN_BLOCKS} zero blocks in a row")
            return
        header = bytes(block)
        last = self.summary.members[-1].name if self.summary.members else None
        where = f"after member {last!r}" if last is not None else "at the start of the stream"
        if header[257:262] != b"ustar":
            raise StreamRejected(f"not a ustar/pax tar header {where} (garbage in the stream?)")
        stored = _octal_field(header[148:156], "checksum")
        if stored not in _checksums(header):
            raise StreamRejected(f"tar header checksum mismatch {where}")
        typeflag = header[156:157]
        size = _octal_field(header[124:136], "size")
        if typeflag in EXTENSION_TYPES:
            if size > MAX_EXTENDED_HEADER_BYTES:
                raise StreamRejected(f"extended header of {size} bytes {where}")
            self._ext_header = header
            self._ext_size = size
            self._ext_data = bytearray()
            if size == 0:
                self._finish_extension()
            return
        if typeflag not in (REGULAR_TYPE, DIRECTORY_TYPE):
            raise StreamRejected(f"unsupported tar member type {typeflag!r} {where}")
        self._begin_member(header, typeflag, size)

    def _finish_extension(self) -> None:
        assert self._ext_header is not None
        self._extensions.append(
            _Extension(self._ext_header[156:157], self._ext_header, bytes(self._ext_data[: self._ext_size]))
        )
        self._ext_header = None
        self._ext_data = bytearray()

    def _begin_member(self, header: bytes, typeflag: bytes, size: int) -> None:
        name = _cstring(header[:100])
        if header[257:263] == b"ustar\0" and header[345] != 0:  # POSIX prefix field
            name = _cstring(header[345:500]) + b"/" + name
        pieces: list[bytes] = []
        for ext in self._extensions:
            if ext.typeflag == b"x":
                records = parse_pax_records(ext.data)
                for key, value in records:
                    if key == b"path":
                        name = value
                    elif key == b"size":
                        try:
                            size = int(value)
                        except ValueError:
                            raise StreamRejected("invalid pax size record") from None
                if self.normalise:
                    pieces.append(_normalised_pax(ext.header, records))
                    continue
            elif ext.typeflag == b"L":
                name = _cstring(ext.data)
            pieces.append(ext.header + ext.data + bytes(_padded(len(ext.data)) - len(ext.data)))
        self._extensions = []
        self._entries += 1
        ustar = _normalised_ustar(header) if self.normalise else header
        if self.split and is_split_name(name):
            shown = name.decode("utf-8", errors="replace")
            raise StreamRejected(f"member name {shown!r} ends in a suffix reserved for split members")
        if typeflag == REGULAR_TYPE:
            if len(self.summary.members) >= MAX_MEMBERS:
                raise StreamRejected(f"more than {MAX_MEMBERS} members")
            self.summary.members.append(Member(name.decode("utf-8", errors="surrogateescape"), size))
        # The previous member is complete and another one follows: what was withheld can go.
        self._release_held()
        data_bytes = _padded(size)
        self._hold = BLOCK
        if self.split and typeflag == REGULAR_TYPE and _splittable(name, size):
            # Its extended headers (path, size, times) are not needed: the pieces' names and sizes
            # fit plain ustar headers. Only the tail piece's data is withheld.
            self._split = _Split(ustar, split_names(name), size)
            self._emit(piece_header(ustar, self._split.names[0], SPLIT_HEAD_BYTES))
            self._in_data = True
            self._data_left = data_bytes
            self._hold = data_bytes - (size - SPLIT_TAIL_BYTES)
        elif data_bytes:
            self._emit(b"".join(pieces) + ustar)
            self._in_data = True
            self._data_left = data_bytes
        else:
            self._emit(b"".join(pieces))
            self._held = bytearray(ustar)  # a member without data ends with its header

    def _finish(self, leftover: int) -> None:
        last = self.summary.members[-1].name if self.summary.members else None
        if self._in_data:
            raise StreamRejected(f"stream ends inside member {last!r}")
        if self._ext_header is not None or self._extensions:
            raise StreamRejected("stream ends inside the headers of a member")
        if leftover:
            raise StreamRejected("stream ends inside a 512-byte block")
        if not self.summary.members:
            raise StreamRejected("empty stream: no tar member")
        if self._zero_blocks < 2:
            raise StreamRejected(f"stream ends without end-of-archive blocks after member {last!r}")
        self._release_held()


def read_through(
    source: BinaryIO,
    consume: Callable[[memoryview, int, int], int],
    counted: Callable[[int], None] | None = None,
) -> int:
    """Read `source` (raw, unbuffered) to its end through one reused buffer: `consume(view, start,
    end)` takes what it can and returns where it stopped (an unfinished 512-byte block stays at the
    front for the next read). Returns how many bytes were left unconsumed at the end."""
    buffer = bytearray(READ_BUFFER_BYTES)
    view = memoryview(buffer)
    start = end = 0
    while True:
        if start:
            leftover = end - start
            buffer[:leftover] = buffer[start:end]
            start, end = 0, leftover
        count = source.readinto(view[end:])
        if count is None:
            raise OSError("non-blocking input is not supported")
        if count == 0:
            return end - start
        if counted is not None:
            counted(count)
        end += count
        start = consume(view, start, end)


def write_all_to(fd: int) -> Callable[[bytes | memoryview], None]:
    def write(data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]

    return write


def _write_report(path: str, report: dict[str, object]) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(report, handle)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qtb_adapters.tarstream")
    parser.add_argument("--input-fd", type=int, default=0)
    parser.add_argument("--report", required=True)
    parser.add_argument("--no-normalise", action="store_true")
    args = parser.parse_args(argv)
    source = io.FileIO(args.input_fd, "rb", closefd=False)
    stream_filter = StreamFilter(write_all_to(sys.stdout.fileno()), normalise=not args.no_normalise)
    report: dict[str, object] = {"ok": False, "error": None, "bad_stream": False}
    try:
        summary = stream_filter.run(source)
    except StreamRejected as exc:
        report.update(error=str(exc), bad_stream=True)
        _write_report(args.report, report)
        print(f"qtb-adapter filter: bad input stream: {exc}", file=sys.stderr)
        return EXIT_BAD_STREAM
    except BrokenPipeError:
        report.update(error="the engine stopped reading the stream")
        _write_report(args.report, report)
        return EXIT_OTHER
    except OSError as exc:
        report.update(error=f"stream I/O error: {exc}")
        _write_report(args.report, report)
        print(f"qtb-adapter filter: {exc}", file=sys.stderr)
        return EXIT_OTHER
    report.update(
        ok=True,
        members=[asdict(m) for m in summary.members],
        stream_bytes=summary.stream_bytes,
        output_bytes=summary.output_bytes,
    )
    _write_report(args.report, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
