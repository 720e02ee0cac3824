"""Rejoin the members that the stream filter split for borg (`StreamFilter(split=True)`).

`borg export-tar` of an `import-tar-split` archive gives every large member as three consecutive
members `<name>.qtb-head`, `<name>.qtb-body`, `<name>.qtb-tail`. This filter turns each such triple
back into one member named `<name>` whose data is the three pieces' data in order, so what reaches
tar2qfile has every member's data byte for byte as it was stored. Everything else (other members,
their headers, the end-of-archive blocks) passes unchanged.

Streaming with one reused buffer: only a head piece's data (at most MAX_HEAD_BYTES) is held, because
the joined header, which carries the summed size, must precede it. The tail's size is known in
advance (the shim trailer, SPLIT_TAIL_BYTES) and checked when its header comes. Anything that is not
an exact head/body/tail sequence of one name is refused (JoinError), as is a stream that ends inside
a member or a triple.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO

from .tarstream import (
    BLOCK,
    EXTENSION_TYPES,
    MAX_EXTENDED_HEADER_BYTES,
    MAX_USTAR_SIZE,
    REGULAR_TYPE,
    SPLIT_SUFFIXES,
    SPLIT_TAIL_BYTES,
    USTAR_NAME_BYTES,
    ZERO_BLOCK,
    StreamRejected,
    _checksums,
    _cstring,
    _octal_field,
    _padded,
    parse_pax_records,
    piece_header,
    read_through,
)

MAX_HEAD_BYTES = 64 * 1024  # the store writes SPLIT_HEAD_BYTES (4 KiB)
_PIECES = ("head", "body", "tail")


class JoinError(Exception):
    """The engine's tar stream is not what a split archive gives back."""


@dataclass
class _Triple:
    base: bytes
    header: bytes  # the head piece's header: the joined header is made from it
    stage: int  # index of the piece that comes next (1 body, 2 tail)
    head: bytearray
    total: int = 0


class Rejoin:
    """Read an export-tar stream from `source`, write it with split members joined into `write`."""

    def __init__(self, write: Callable[[bytes | memoryview], None]) -> None:
        self._write = write
        self._mode = "header"  # header | ext | data
        self._real_left = 0  # data bytes of the current member still to come
        self._pad_left = 0  # then its padding
        self._piece: int | None = None  # the current member is this piece of self._triple
        self._ext = bytearray()  # extension headers (with data) before the next member header
        self._ext_left = 0  # padded bytes of the current extension header's data still to come
        self._triple: _Triple | None = None
        self.joined = 0  # split members put back together
        self._ended = False  # the last block seen was an end-of-archive (zero) block
        self.at_eof = False  # the source ended (a refusal before it was ours, not the source's end)

    def run(self, source: BinaryIO) -> None:
        left = read_through(source, self._consume)
        self.at_eof = True
        if left or self._mode != "header" or self._ext:
            raise JoinError("the archive's tar stream ends inside a member")
        if self._triple is not None:
            raise JoinError(f"the archive's tar stream ends inside split member {self._name(self._triple)}")
        if not self._ended:  # export-tar always ends with zero blocks: a stream cut between members
            raise JoinError("the archive's tar stream ends without its end-of-archive blocks")

    @staticmethod
    def _name(triple: _Triple) -> str:
        return repr(triple.base.decode("utf-8", errors="replace"))

    def _consume(self, view: memoryview, pos: int, end: int) -> int:
        while pos < end:
            avail = end - pos
            if self._mode == "data":
                if self._real_left:
                    count = min(self._real_left, avail)
                    self._data(view[pos : pos + count])
                    self._real_left -= count
                else:
                    count = min(self._pad_left, avail)
                    if self._piece is None:
                        self._write(view[pos : pos + count])  # a whole member: its padding too
                    self._pad_left -= count
                pos += count
                if not self._real_left and not self._pad_left:
                    self._member_done()
            elif self._mode == "ext":
                count = min(self._ext_left, avail)
                self._ext += view[pos : pos + count]
                self._ext_left -= count
                pos += count
                if not self._ext_left:
                    self._mode = "header"
            else:
                if avail < BLOCK:
                    break
                self._header(bytes(view[pos : pos + BLOCK]))
                pos += BLOCK
        return pos

    def _data(self, data: memoryview) -> None:
        if self._piece == 0:
            assert self._triple is not None
            self._triple.head += data
        else:
            self._write(data)

    def _member_done(self) -> None:
        self._mode = "header"
        if self._piece == 2:  # the tail is written: pad the joined member
            assert self._triple is not None
            self._write(bytes(_padded(self._triple.total) - self._triple.total))
            self._triple = None
            self.joined += 1
        self._piece = None

    def _header(self, header: bytes) -> None:
        if header == ZERO_BLOCK:
            if self._triple is not None:
                raise JoinError(f"split member {self._name(self._triple)} is cut short by an archive end")
            if self._ext:
                raise JoinError("zero block after an extended header")
            self._write(header)
            self._ended = True
            return
        self._ended = False
        if header[257:262] != b"ustar":
            raise JoinError("not a tar header in the archive's tar stream")
        try:
            stored = _octal_field(header[148:156], "checksum")
            size = _octal_field(header[124:136], "size")
        except StreamRejected as exc:
            raise JoinError(str(exc)) from None
        if stored not in _checksums(header):
            raise JoinError("tar header checksum mismatch in the archive's tar stream")
        typeflag = header[156:157]
        if typeflag in EXTENSION_TYPES:
            if size > MAX_EXTENDED_HEADER_BYTES or len(self._ext) > 4 * MAX_EXTENDED_HEADER_BYTES:
                raise JoinError("oversized extended header in the archive's tar stream")
            self._ext += header
            self._ext_left = _padded(size)
            self._mode = "ext" if size else "header"
            return
        name = self._member_name(header)
        piece = next((i for i, s in enumerate(SPLIT_SUFFIXES) if name.endswith(s.encode())), None)
        triple = self._triple
        if piece is None:
            if triple is not None:
                raise JoinError(f"split member {self._name(triple)} lacks its {_PIECES[triple.stage]} piece")
            self._write(bytes(self._ext) + header)
            self._ext = bytearray()
            self._start_data(size, None)
            return
        base = name[: -len(SPLIT_SUFFIXES[piece])]
        if self._ext or typeflag != REGULAR_TYPE or len(base) > USTAR_NAME_BYTES:
            raise JoinError(f"split piece {name!r} is not a plain file member")
        if piece == 0:
            if triple is not None:
                raise JoinError(f"split member {self._name(triple)} lacks its {_PIECES[triple.stage]} piece")
            if size > MAX_HEAD_BYTES:
                raise JoinError(f"split piece {name!r} is too large for a head ({size} bytes)")
            self._triple = _Triple(base, header, 1, bytearray())
        elif triple is None or triple.stage != piece or triple.base != base:
            raise JoinError(f"split piece {name!r} out of order")
        elif piece == 1:
            triple.total = len(triple.head) + size + SPLIT_TAIL_BYTES
            if triple.total > MAX_USTAR_SIZE:
                raise JoinError(f"split member {self._name(triple)} is too large")
            self._write(piece_header(triple.header, base, triple.total) + bytes(triple.head))
            triple.head = bytearray()
            triple.stage = 2
        elif size != SPLIT_TAIL_BYTES:
            raise JoinError(f"split piece {name!r} has {size} bytes, not {SPLIT_TAIL_BYTES}")
        self._start_data(size, piece)

    def _member_name(self, header: bytes) -> bytes:
        """The member's full name: from a GNU long-name or pax path record, else the header."""
        name = _cstring(header[:100])
        if header[257:263] == b"ustar\0" and header[345] != 0:
            name = _cstring(header[345:500]) + b"/" + name
        pos = 0
        while pos < len(self._ext):
            ext_header = bytes(self._ext[pos : pos + BLOCK])
            size = _octal_field(ext_header[124:136], "size")
            data = bytes(self._ext[pos + BLOCK : pos + BLOCK + size])
            if ext_header[156:157] == b"L":
                name = _cstring(data)
            elif ext_header[156:157] == b"x":
                try:
                    records = parse_pax_records(data)
                except StreamRejected as exc:
                    raise JoinError(str(exc)) from None
                name = next((v for k, v in records if k == b"path"), name)
            pos += BLOCK + _padded(size)
        return name

    def _start_data(self, size: int, piece: int | None) -> None:
        self._piece = piece
        self._real_left = size
        self._pad_left = _padded(size) - size
        self._mode = "data"
        if not size:
            self._member_done()
