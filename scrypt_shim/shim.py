#!/usr/bin/python3
"""qtb-pipe's `scrypt` shim: authenticated pass-through for Qubes backups, real scrypt for all else.

Installed as `scrypt` ahead of the real one on qubesd's PATH. It takes exactly the call forms Qubes
uses (`enc IN OUT`, `enc - OUT`, `dec [-f] IN OUT`, with `-P` and `-t T` as Qubes' own tests add
them) with scrypt 1.3.1's passphrase dialogue; any other command line goes to the real scrypt
before a byte is read. Then the passphrase decides (docs/design.md):

* a qtb-pipe one (`...!qtb1:<token>:<secret>`): `enc` copies the data and appends a trailer whose
  HMAC tag binds secret, path and data, recorded in the run directory; `dec` writes the data only
  after it matched its tag and the next entry of the run's plan (strict stream order);
* any other goes to the real scrypt (REAL_SCRYPT), the passphrase handed over on a pipe; one that
  holds `qtb1:` but is not well formed is refused.

Standard library only and self-contained (it is copied alone into dom0). It also defines the
formats the driver and the backup qube's adapter share, so that they exist once.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import stat
import struct
import sys
import termios
from dataclasses import dataclass
from typing import Any, NoReturn

# Rewritten by `qtb-pipe install-shim` (qtb_pipe/shim_install.py); each must stay on one line.
REAL_SCRYPT = "/usr/bin/scrypt"
STATE_DIR = "/var/lib/qtb-pipe"

SHIM_MARKER = "qtb-pipe scrypt shim"  # shim_install recognises its own file by this line
SHIM_VERSION = "2"

# --- formats shared with the driver (qtb_pipe) and the adapter (qtb_adapters) ---------------
TRAILER_MAGIC = b"QTBPIPE1"
TRAILER_SIZE = 56  # magic (8) + key check value (8) + data length u64be (8) + tag (32)
HEADER_PATH = "backup-header"  # scrypt'd from file to file; member backup-header.hmac
HEADER_MEMBER = "backup-header.hmac"
QUBES_XML_PATH = "qubes.xml.000"
MANIFEST_FORMAT = "qtb-pipe-manifest-2"
MAX_MANIFEST_BYTES = 16 * 1024 * 1024  # what dom0 accepts back from the backup qube
MAX_CHUNK_BYTES = 100 * 1024 * 1024  # qubesd cuts each file's inner stream into chunks of this size
BACKUP_ID_RE = re.compile(r"[0-9]{8}T[0-9]{6}-[0-9]{1,10}")  # YYYYmmddTHHMMSS-<qubesd pid>
QUBE_NAME_RE = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,30}")  # Qubes' rule for qube names
# a file's path in the stream + chunk number: qubes.xml.000, vm12/private.img.003, dom0-home/user.000
CHUNK_PATH_RE = re.compile(r"(?P<file>\w[\w.-]{0,63}(?:/\w[\w.+-]{0,63})?)\.(?P<index>[0-9]{3,5})", re.ASCII)
TAG_RE = re.compile(r"[0-9a-f]{64}")
PLAN_LINE = 512  # a restore plan's fixed-width line (see RunDir)

SCRYPT_MAGIC = b"scrypt"  # first bytes of every file the real scrypt writes
USER_PART_MARK = "qtb1:"
USER_PART_RE = re.compile(r"qtb1:([0-9a-f]{32}):([0-9a-f]{64})")
MAXPASSLEN = 2048  # scrypt reads passphrase lines with fgets(buf, 2048)
BUFFER_BYTES = 1024 * 1024
PROMPT, CONFIRM_PROMPT = "Please enter passphrase", "Please confirm passphrase"


class ShimError(Exception):
    """What the shim refuses; the message is the one-line reason on stderr."""


# --- keys, passphrase, tags, trailer --------------------------------------------------------
@dataclass(frozen=True)
class Keys:
    chunk_key: bytes
    manifest_key: bytes
    kcv: bytes  # key check value: lets dec say "wrong key" instead of "tampered"


def _hmac(key: bytes, message: bytes) -> bytes:
    return hmac.new(key, message, hashlib.sha256).digest()


def derive_keys(secret: bytes) -> Keys:
    chunk_key = _hmac(secret, b"qtb-pipe v1 chunk")
    return Keys(chunk_key, _hmac(secret, b"qtb-pipe v1 manifest"), _hmac(chunk_key, b"qtb-pipe v1 kcv")[:8])


@dataclass(frozen=True)
class QtbPassphrase:
    """What Qubes' per-file passphrase `<prefix>!qtb1:<token>:<secret>` tells the shim."""

    path: str  # backup-header, qubes.xml.000, vm12/private.img.003, ...
    backup_id: str | None  # None for the header (its backup id is inside the header)
    token: str  # names the run directory
    secret: bytes


def parse_qtb_passphrase(passphrase: bytes) -> QtbPassphrase | None:
    """None if it holds no `qtb1:` at all. Qubes builds `backup-header!P` and `<backup_id>!<path>!P`;
    a passphrase with `qtb1:` must be exactly that with P = `qtb1:<32 hex>:<64 hex>`, or it is refused
    (handing it to the real scrypt could make an unrecorded backup)."""
    text = passphrase.decode("utf-8", "replace")
    if USER_PART_MARK not in text:
        return None
    prefix, _, user_part = text.rpartition("!")
    match = USER_PART_RE.fullmatch(user_part)
    backup_id, _, path = prefix.partition("!")
    if prefix == HEADER_PATH and match:
        return QtbPassphrase(HEADER_PATH, None, match[1], bytes.fromhex(match[2]))
    if match is None or not BACKUP_ID_RE.fullmatch(backup_id) or not CHUNK_PATH_RE.fullmatch(path):
        raise ShimError("passphrase holds 'qtb1:' but is not a well-formed qtb-pipe passphrase")
    return QtbPassphrase(path, backup_id, match[1], bytes.fromhex(match[2]))


class TagHasher:
    """tag = HMAC-SHA256(chunk_key, "qtb-pipe v1 tag\\0" + path + "\\0" + data + u64be(len(data)))."""

    def __init__(self, chunk_key: bytes, path: str) -> None:
        self._mac = hmac.new(chunk_key, b"qtb-pipe v1 tag\0" + path.encode() + b"\0", hashlib.sha256)
        self.size = 0

    def update(self, data: bytes | memoryview) -> None:
        self._mac.update(data)
        self.size += len(data)

    def finish(self) -> bytes:
        self._mac.update(struct.pack(">Q", self.size))
        return self._mac.digest()


@dataclass(frozen=True)
class Trailer:
    kcv: bytes
    size: int
    tag: bytes


def make_trailer(keys: Keys, size: int, tag: bytes) -> bytes:
    return TRAILER_MAGIC + keys.kcv + struct.pack(">Q", size) + tag


def parse_trailer(raw: bytes) -> Trailer | None:
    if len(raw) != TRAILER_SIZE or not raw.startswith(TRAILER_MAGIC):
        return None
    return Trailer(raw[8:16], struct.unpack(">Q", raw[16:24])[0], raw[24:56])


def header_backup_id(header: bytes) -> str | None:
    for line in header.splitlines():
        key, sep, value = line.partition(b"=")
        if sep and key == b"backup-id":
            return value.decode("ascii", "replace")
    return None


# --- scrypt 1.3.1's command line, the call forms Qubes uses ---------------------------------
class NotHandled(Exception):
    """A command line the shim leaves to the real scrypt, untouched."""


@dataclass
class Invocation:
    mode: str  # enc | dec
    options: list[str]  # passed on to the real scrypt: -f, -t T
    from_stdin: bool  # -P: the passphrase is a line on stdin, without prompt or confirmation
    infile: str  # "-" = stdin (enc only)
    outfile: str


def parse_command_line(args: list[str]) -> Invocation:
    if len(args) < 3 or args[0] not in ("enc", "dec"):
        raise NotHandled
    options, from_stdin, rest = [], False, args[1:]
    while len(rest) > 2:
        if rest[0] == "-f":
            options.append(rest.pop(0))
        elif rest[0] == "-P" and not from_stdin:
            from_stdin = bool(rest.pop(0))
        elif rest[0] == "-t" and re.fullmatch(r"[0-9]+(\.[0-9]*)?", rest[1]):
            options += [rest.pop(0), rest.pop(0)]
        else:
            raise NotHandled
    infile, outfile = rest
    if outfile.startswith("-") or (
        infile.startswith("-") and (infile != "-" or args[0] == "dec" or from_stdin)
    ):
        raise NotHandled  # scrypt's own usage errors, and forms Qubes never uses
    return Invocation(args[0], options, from_stdin, infile, outfile)


# --- the passphrase dialogue (scrypt's readpass) --------------------------------------------
PROG = "scrypt"  # from argv[0]: scrypt prefixes its messages with its program name


def _say(message: str) -> None:
    os.write(2, f"{PROG}: {message}\n".encode(errors="replace"))


class PassphraseUnavailable(Exception):
    """Reading the passphrase failed after consuming input; the message is scrypt's."""


def _fgets(fd: int) -> bytes:
    """fgets(buf, 2048, f) without read-ahead, so the rest of stdin stays for the data: one line,
    or its first 2047 bytes (the rest is then the next read, as in scrypt)."""
    line = bytearray()
    while not line.endswith(b"\n") and len(line) < MAXPASSLEN - 1:
        try:
            byte = os.read(fd, 1)
        except OSError as exc:
            raise PassphraseUnavailable(f"Cannot read password: {exc.strerror}") from None
        if not byte:
            break
        line += byte
    if not line:
        raise PassphraseUnavailable("EOF reading password")
    return bytes(line)


def _cut(line: bytes) -> bytes:
    return re.split(rb"[\r\n\0]", line, maxsplit=1)[0]  # scrypt cuts at CR/LF; C strings at NUL


def read_passphrase(invocation: Invocation) -> bytes:
    """From /dev/tty (prompts, echo off, confirmation for enc) or, without one or with -P, stdin."""
    tty_fd = None
    if not invocation.from_stdin:
        try:
            tty_fd = os.open("/dev/tty", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            pass
    fd = 0 if tty_fd is None else tty_fd
    saved = termios.tcgetattr(fd) if os.isatty(fd) else None
    try:
        if saved is not None:
            quiet = list(saved)
            quiet[3] = (quiet[3] & ~termios.ECHO) | termios.ECHONL
            termios.tcsetattr(fd, termios.TCSANOW, quiet)
        while True:
            if saved is not None:
                os.write(2, f"{PROMPT}: ".encode())
            first = _fgets(fd)
            if invocation.from_stdin or invocation.mode == "dec":
                return _cut(first)
            if saved is not None:
                os.write(2, f"{CONFIRM_PROMPT}: ".encode())
            if _fgets(fd).split(b"\0")[0] == first.split(b"\0")[0]:  # strcmp of the raw lines
                return _cut(first)
            os.write(2, b"Passwords mismatch, please try again\n")
    finally:
        if saved is not None:
            termios.tcsetattr(fd, termios.TCSANOW, saved)
        if tty_fd is not None:
            os.close(tty_fd)


# --- handing over to the real scrypt --------------------------------------------------------
def exec_real_scrypt(argv: list[str]) -> NoReturn:
    """Become the real scrypt; never fall back to pass-through when it is missing."""
    problem = "is missing or not executable"
    if os.path.realpath(REAL_SCRYPT) == os.path.realpath(__file__):
        problem = "is this shim itself"
    elif os.path.isfile(REAL_SCRYPT) and os.access(REAL_SCRYPT, os.X_OK):
        try:
            os.execv(REAL_SCRYPT, argv)
        except OSError as exc:
            problem = f"cannot be run ({exc.strerror})"
    _say(f"qtb-pipe shim: the real scrypt {REAL_SCRYPT} {problem}; only qtb-pipe passphrases work without it")
    sys.exit(1)


def hand_over(argv: list[str], invocation: Invocation, passphrase: bytes) -> NoReturn:
    """The real scrypt with the same arguments and the passphrase already read, as `--passphrase
    file:/dev/fd/N` (read once, no prompt): the caller sees one dialogue, as with scrypt alone."""
    read_end, write_end = os.pipe()
    os.set_inheritable(read_end, True)
    # readpass_file takes one line of at most 2047 bytes: a newline only while there is room
    os.write(write_end, passphrase + b"\n" if len(passphrase) < MAXPASSLEN - 1 else passphrase)
    os.close(write_end)
    argv = [argv[0], invocation.mode, *invocation.options, "--passphrase", f"file:/dev/fd/{read_end}"]
    exec_real_scrypt([*argv, "--", invocation.infile, invocation.outfile])


# --- the run directory (dom0 side: qtb_pipe/runs.py) ----------------------------------------
class RunDir:
    """`<STATE_DIR>/runs/<token>/`, made by the driver. Backup: the shim appends one JSON line per
    `enc` to records.jsonl. Restore: `plan` holds fixed-width lines, line 0 `qtb-plan <backup_id>`,
    then `<path> <size> <tag>` for every chunk this pass must decrypt, in stream order; the shim
    appends one byte to `accepted` per chunk it accepts (so the next one is plan line k+1) and its
    reasons to `failed`. Everything is opened without following links, in a directory that must be
    owned like `runs/` and writable by its owner only."""

    @staticmethod
    def find(token: str) -> RunDir | None:
        run = RunDir(token)
        return run if run.fd >= 0 else None

    def __init__(self, token: str) -> None:
        self.fd = -1
        try:
            runs = os.open(os.path.join(STATE_DIR, "runs"), os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        except FileNotFoundError:
            return
        try:
            self.fd = os.open(token, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=runs)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise ShimError(f"unsafe run directory {token}: {exc.strerror}") from None
        finally:
            owners = os.fstat(runs)
            os.close(runs)
        info = os.fstat(self.fd)
        if (info.st_mode | owners.st_mode) & 0o022 or info.st_uid != owners.st_uid:
            raise ShimError(f"unsafe run directory {token}: writable by others or owned by another user")
        self.owner = info.st_uid, info.st_gid

    def open(self, name: str, flags: int) -> int:
        fd = os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=self.fd)
        if os.geteuid() == 0 and os.fstat(fd).st_uid != self.owner[0]:
            os.fchown(fd, *self.owner)  # qubesd runs the shim as root; the driver reads as the owner
        return fd

    def append(self, name: str, data: bytes) -> None:
        fd = self.open(name, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)

    def record(self, record: dict[str, Any]) -> None:
        self.append("records.jsonl", (json.dumps(record, separators=(",", ":")) + "\n").encode())

    def size(self, name: str) -> int | None:
        try:
            return os.stat(name, dir_fd=self.fd, follow_symlinks=False).st_size
        except FileNotFoundError:
            return None

    def plan_line(self, number: int) -> list[str]:
        fd = self.open("plan", os.O_RDONLY)
        try:
            return os.pread(fd, PLAN_LINE, number * PLAN_LINE).decode("ascii", "replace").split()
        finally:
            os.close(fd)

    def next_expected(self, qtb: QtbPassphrase) -> tuple[int, str]:
        """(size, tag) of this chunk if it is the next one of the plan; ShimError otherwise."""
        done, refused = (self.size(name) for name in ("accepted", "refused"))
        if refused is not None:
            raise ShimError("an earlier chunk of this restore was refused; refusing the rest")
        try:
            head, entry = self.plan_line(0), self.plan_line((done or 0) + 1)
        except OSError as exc:
            raise ShimError(
                f"the run directory has no usable plan ({exc.strerror}); refusing to check less"
            ) from None
        if len(head) != 2 or head[0] != "qtb-plan":
            raise ShimError("the run directory's plan is malformed; refusing to check less")
        if qtb.backup_id is not None and qtb.backup_id != head[1]:
            raise ShimError(f"not from this backup (backup {qtb.backup_id}, the plan is for {head[1]})")
        if len(entry) != 3 or entry[0] != qtb.path or not entry[1].isdigit():
            expected = entry[0] if len(entry) == 3 else "nothing more"
            raise ShimError(f"out of order: the next chunk of this restore is {expected}")
        return int(entry[1]), entry[2]


# --- output: a temp file renamed into place once complete (and verified) --------------------
class Output:
    def __init__(self, path: str) -> None:
        folder, name = os.path.split(path)
        self.path, self.temp = path, os.path.join(folder, f".{name}.qtb-{os.getpid()}")
        try:
            if not stat.S_ISREG(os.stat(path).st_mode):
                raise ShimError(f"Cannot open output file: {path}: not a regular file")
        except FileNotFoundError:
            pass
        try:  # 0o666 & ~umask, like fopen(outfile, "wb") in the real scrypt
            self.fd = os.open(self.temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
        except OSError as exc:
            raise ShimError(f"Cannot open output file: {path}: {exc.strerror}") from None

    def write(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self.fd, view) :]
        except OSError as exc:
            raise ShimError(f"Cannot write output file: {self.path}: {exc.strerror}") from None

    def commit(self) -> None:
        """No fsync: qubesd sends the file and deletes it within the run (docs/shim.md)."""
        os.close(self.fd)
        self.fd = -1
        os.rename(self.temp, self.path)
        self.temp = self.path  # from now on, discard() takes the output back

    def discard(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
        try:
            os.unlink(self.temp)
        except OSError:
            pass


def copy_stream(in_fd: int, limit: int | None, *sinks: Any) -> None:
    """Read `in_fd` (up to `limit` bytes) into one reused buffer, handing every piece to each sink."""
    view, total = memoryview(bytearray(BUFFER_BYTES)), 0
    while limit is None or total < limit:
        want = BUFFER_BYTES if limit is None else min(BUFFER_BYTES, limit - total)
        try:
            count = os.readv(in_fd, [view[:want]])
        except OSError as exc:
            raise ShimError(f"Error reading input: {exc.strerror}") from None
        if not count:
            break
        for sink in sinks:
            sink(view[:count])
        total += count


# --- qtb mode -------------------------------------------------------------------------------
def qtb_enc(qtb: QtbPassphrase, in_fd: int, run: RunDir | None, output: Output) -> None:
    if run is None:
        raise ShimError(f"run directory {qtb.token} does not exist; refusing an unrecorded backup")
    keys = derive_keys(qtb.secret)
    hasher, header = TagHasher(keys.chunk_key, qtb.path), bytearray()
    sinks = [hasher.update, output.write]
    if qtb.path == HEADER_PATH:
        sinks.append(lambda piece: header.extend(piece[: 65536 - len(header)]))
    copy_stream(in_fd, None, *sinks)
    tag = hasher.finish()
    backup_id = qtb.backup_id or header_backup_id(bytes(header))
    if backup_id is None:
        raise ShimError("backup-header has no backup-id= line")
    output.write(make_trailer(keys, hasher.size, tag))
    output.commit()  # the record only once the output is complete
    record = {"op": "enc", "path": qtb.path, "backup_id": backup_id, "size": hasher.size, "tag": tag.hex()}
    run.record({**record, "status": "ok"})


def check_input(in_fd: int, keys: Keys) -> Trailer:
    """The trailer of a qtb-pipe file: the cheap checks, before any hashing."""
    info = os.fstat(in_fd)
    if not stat.S_ISREG(info.st_mode):
        raise ShimError("input is not a regular file")
    trailer = parse_trailer(os.pread(in_fd, TRAILER_SIZE, max(info.st_size - TRAILER_SIZE, 0)))
    if trailer is None:
        if os.pread(in_fd, len(SCRYPT_MAGIC), 0) == SCRYPT_MAGIC:
            raise ShimError("is a real-scrypt file, never part of a qtb-pipe backup")
        raise ShimError("no qtb-pipe trailer at the end: truncated, or not a qtb-pipe file")
    if not hmac.compare_digest(trailer.kcv, keys.kcv):
        raise ShimError("wrong key (written with another qtb-pipe secret)")
    if trailer.size != info.st_size - TRAILER_SIZE:
        data_bytes = info.st_size - TRAILER_SIZE
        raise ShimError(f"truncated or appended data ({data_bytes} data bytes, trailer says {trailer.size})")
    return trailer


def qtb_dec(qtb: QtbPassphrase, in_fd: int, run: RunDir | None, output: Output) -> None:
    keys = derive_keys(qtb.secret)
    trailer = check_input(in_fd, keys)
    expected = run.next_expected(qtb) if run else None  # no run directory: an emergency restore
    if expected is not None and trailer.size != expected[0]:
        raise ShimError(f"not from this backup ({trailer.size} data bytes, the manifest says {expected[0]})")
    hasher = TagHasher(keys.chunk_key, qtb.path)
    copy_stream(in_fd, trailer.size, hasher.update, output.write)
    if hasher.size != trailer.size or not hmac.compare_digest(hasher.finish(), trailer.tag):
        raise ShimError("tampered or not this file's path (tag mismatch)")
    if expected is not None and not hmac.compare_digest(expected[1], trailer.tag.hex()):
        raise ShimError("not from this backup (tag differs from the manifest)")
    if run is None:
        _say(f"qtb-pipe: {qtb.path}: warning: no qtb-pipe run directory; checked the file's own tag only")
    output.commit()
    if run is not None:
        run.append("accepted", b"+")


def qtb_mode(invocation: Invocation, qtb: QtbPassphrase, in_fd: int) -> int:
    run = output = None
    try:
        run = RunDir.find(qtb.token)
        output = Output(invocation.outfile)
        (qtb_enc if invocation.mode == "enc" else qtb_dec)(qtb, in_fd, run, output)
        return 0
    except (ShimError, OSError) as exc:
        reason = str(exc) if isinstance(exc, ShimError) else f"{exc.strerror}: {exc.filename or 'output'}"
        if output is not None:
            output.discard()
        _say(f"qtb-pipe: {qtb.path}: {reason}")
        try:  # no ok record / no acceptance is what makes the driver refuse the run anyway
            if run is not None:
                run.record({"op": invocation.mode, "path": qtb.path, "status": "failed", "error": reason})
                if invocation.mode == "dec":
                    run.append("refused", b"+")
        except OSError:
            pass
        return 1


def main(argv: list[str] | None = None) -> int:
    global PROG
    argv = list(sys.argv if argv is None else argv)
    PROG = os.path.basename(argv[0]) or "scrypt"
    try:
        invocation = parse_command_line(argv[1:])
    except NotHandled:
        exec_real_scrypt(argv)  # --version, info, usage errors, other forms: the real scrypt's business
    in_fd = 0
    if invocation.infile != "-":  # opened before the dialogue, as scrypt does
        try:
            in_fd = os.open(invocation.infile, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            exec_real_scrypt(argv)  # it says "Cannot open input file" its own way
    try:
        passphrase = read_passphrase(invocation)
        qtb = parse_qtb_passphrase(passphrase)
    except PassphraseUnavailable as exc:
        _say(str(exc))
        return 1
    except ShimError as exc:  # a passphrase that holds `qtb1:` but is not well-formed
        _say(f"qtb-pipe: {exc}")
        return 1
    if qtb is None:
        hand_over(argv, invocation, passphrase)  # in_fd stays open: it is CLOEXEC
    return qtb_mode(invocation, qtb, in_fd)


if __name__ == "__main__":
    sys.exit(main())
