#!/usr/bin/python3
"""qtb-pipe's `scrypt` shim: authenticated pass-through for Qubes backups, real scrypt for all else.

Installed as `scrypt` ahead of the real one on qubesd's PATH (usually /usr/local/bin/scrypt), it
accepts scrypt 1.3.1's command line and passphrase dialogue byte for byte. The passphrase decides:

* A qtb-pipe passphrase (`backup-header!qtb1:<token>:<secret>` or
  `<backup_id>!<path>!qtb1:<token>:<secret>`, see docs/design.md) selects qtb mode. `enc` copies the
  data unchanged, appends a 56-byte trailer whose HMAC tag binds secret, path and data, and records
  the file in the run directory. `dec` checks the file against the sealed manifest the driver left in
  the run directory (membership, size, order) and against its tag before a single plaintext byte
  reaches the output path.
* Any other passphrase goes to the real scrypt (REAL_SCRYPT) with the same arguments; the passphrase
  already read is handed over on a pipe, so the caller sees one prompt sequence. A passphrase that
  holds `qtb1:` but is not a well-formed qtb-pipe one is refused, never handed over.

Standard library only and self-contained: it is copied alone into dom0 (and into the management
DispVM's template for paranoid-mode restores). The driver imports the key and manifest functions
from here (`from scrypt_shim import shim`) so they exist exactly once.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import mmap
import os
import re
import stat
import struct
import sys
import tempfile
import termios
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn

# Rewritten by `qtb-pipe install-shim` (qtb_pipe/shim_install.py); each must stay on one line.
# INSTALLED_DIRS: the directories that installation had to create, removed again by uninstall-shim.
REAL_SCRYPT = "/usr/bin/scrypt"
STATE_DIR = "/var/lib/qtb-pipe"
INSTALLED_DIRS: list[str] = []

SHIM_MARKER = "qtb-pipe scrypt shim"  # shim_install recognises its own file by this line
SHIM_VERSION = "1"

TRAILER_MAGIC = b"QTBPIPE1"
TRAILER_SIZE = 56  # magic (8) + kcv (8) + data length u64be (8) + tag (32)
SCRYPT_MAGIC = b"scrypt"  # first bytes of every file the real scrypt writes
HEADER_PATH = "backup-header"
QUBES_XML_FILE = "qubes.xml"  # chunk path qubes.xml.000
MANIFEST_FORMAT = "qtb-pipe-manifest-1"
MAX_MANIFEST_BYTES = 16 * 1024 * 1024
MAX_HEADER_BYTES = 1024 * 1024  # a Qubes backup-header is a few hundred bytes
MAX_TRAILER_CANDIDATES = 64  # displaced-trailer search (emergency mode only): candidates tried
MAXPASSLEN = 2048  # scrypt reads a passphrase line with fgets(buf, 2048): at most 2047 bytes
COPY_BUFFER_BYTES = 1024 * 1024

PROMPT = "Please enter passphrase"
CONFIRM_PROMPT = "Please confirm passphrase"
USER_PART_MARK = "qtb1:"
USER_PART_RE = re.compile(r"qtb1:([0-9a-f]{32}):([0-9a-f]{64})")
BACKUP_ID_RE = re.compile(r"[0-9]{8}T[0-9]{6}-[0-9]+")
CHUNK_RE = re.compile(r"(?P<file>.+)\.(?P<index>[0-9]{3,})")
HEX_TAG_RE = re.compile(r"[0-9a-f]{64}")
# The sealed manifest, byte for byte: SEALED_PREFIX + canonical(body) + ',"seal":"<64 hex>"}'
SEALED_PREFIX = b'{"manifest":'
SEALED_SUFFIX_RE = re.compile(rb',"seal":"([0-9a-f]{64})"\}')
SEALED_SUFFIX_SIZE = 75


# ----------------------------------------------------------------------------------------------------
# Errors


class ShimError(Exception):
    """Something the shim refuses to do; the message is the one-line reason shown on stderr."""


class QtbPassphraseError(ShimError):
    """A passphrase that holds (or may hold) a qtb-pipe user part but is not a well-formed one."""


class VerificationError(ShimError):
    """Data, trailer, manifest or order failed a check."""


class ManifestError(VerificationError):
    """The sealed manifest (or the run's selection) is missing, malformed, too large or forged."""


# ----------------------------------------------------------------------------------------------------
# Keys, passphrase, tags, trailer, manifest (design.md)


@dataclass(frozen=True)
class Keys:
    chunk_key: bytes
    manifest_key: bytes
    kcv: bytes  # key check value: lets dec say "wrong key" instead of "tampered"


def _hmac(key: bytes, message: bytes) -> bytes:
    return hmac.new(key, message, hashlib.sha256).digest()


def derive_keys(secret: bytes) -> Keys:
    """Derive the per-purpose keys from the 32-byte dom0 secret (design.md, "Keys")."""
    chunk_key = _hmac(secret, b"qtb-pipe v1 chunk")
    return Keys(
        chunk_key=chunk_key,
        manifest_key=_hmac(secret, b"qtb-pipe v1 manifest"),
        kcv=_hmac(chunk_key, b"qtb-pipe v1 kcv")[:8],
    )


@dataclass(frozen=True)
class QtbPassphrase:
    """What Qubes' per-file passphrase `<prefix>!qtb1:<token>:<secret>` tells the shim."""

    path: str  # e.g. "backup-header", "qubes.xml.000", "vm12/private.img.003"
    backup_id: str | None  # None for the header (its backup_id is inside the header itself)
    token: str  # 32 lowercase hex digits: names the run directory
    secret: bytes  # 32 bytes


def make_user_passphrase(token: str, secret: bytes) -> str:
    """The passphrase the driver hands to qvm-backup / qvm-backup-restore for one run."""
    passphrase = f"{USER_PART_MARK}{token}:{secret.hex()}"
    if not USER_PART_RE.fullmatch(passphrase):
        raise ValueError("token must be 32 lowercase hex digits and the secret 32 bytes")
    return passphrase


def parse_qtb_passphrase(passphrase: bytes | str) -> QtbPassphrase | None:
    """The qtb-pipe parts of a per-file passphrase; None only if it does not contain `qtb1:` at all.

    Qubes builds `backup-header!<P>` or `<backup_id>!<path>!<P>`. A passphrase holding `qtb1:` must
    end in exactly `qtb1:<32 hex>:<64 hex>` (lowercase, as the driver writes it) after a well-formed
    prefix, else QtbPassphraseError: handing it to the real scrypt could leak (part of) the secret,
    or produce an unrecorded backup.
    """
    if isinstance(passphrase, bytes):
        passphrase = passphrase.decode("utf-8", "surrogateescape")  # undecodable bytes fail below
    if USER_PART_MARK not in passphrase:
        return None
    prefix, bang, user_part = passphrase.rpartition("!")
    match = USER_PART_RE.fullmatch(user_part)
    if match is None:
        raise QtbPassphraseError("passphrase holds 'qtb1:' but does not end in a well-formed qtb-pipe part")
    token, secret_hex = match.groups()
    secret = bytes.fromhex(secret_hex)
    try:
        prefix.encode("utf-8")
    except UnicodeEncodeError:
        raise QtbPassphraseError("qtb-pipe passphrase whose Qubes file prefix is not UTF-8") from None
    if not bang:
        raise QtbPassphraseError("qtb-pipe passphrase without the Qubes file prefix (<backup_id>!<path>!)")
    if prefix == HEADER_PATH:
        return QtbPassphrase(HEADER_PATH, None, token, secret)
    backup_id, _, path = prefix.partition("!")
    if not BACKUP_ID_RE.fullmatch(backup_id):
        raise QtbPassphraseError(f"qtb-pipe passphrase with a malformed backup id {backup_id!r}")
    parts = path.split("/")
    if "\0" in path or any(part in ("", ".", "..") for part in parts):
        raise QtbPassphraseError(f"qtb-pipe passphrase with a malformed file path {path!r}")
    return QtbPassphrase(path, backup_id, token, secret)


class TagHasher:
    """Incremental tag = HMAC-SHA256(chunk_key, "qtb-pipe v1 tag\\0" + path + "\\0" + data + u64be(len))."""

    def __init__(self, chunk_key: bytes, path: str) -> None:
        self._mac = hmac.new(chunk_key, b"qtb-pipe v1 tag\0" + path.encode("utf-8") + b"\0", hashlib.sha256)
        self.size = 0

    def update(self, data: bytes | memoryview) -> None:
        self._mac.update(data)
        self.size += len(data)

    def finish(self) -> bytes:
        self._mac.update(struct.pack(">Q", self.size))
        return self._mac.digest()


def compute_tag(chunk_key: bytes, path: str, data: bytes) -> bytes:
    """The tag of one whole file's data (see TagHasher for the streaming form)."""
    hasher = TagHasher(chunk_key, path)
    hasher.update(data)
    return hasher.finish()


@dataclass(frozen=True)
class Trailer:
    kcv: bytes
    size: int
    tag: bytes


def make_trailer(keys: Keys, size: int, tag: bytes) -> bytes:
    return TRAILER_MAGIC + keys.kcv + struct.pack(">Q", size) + tag


def parse_trailer(raw: bytes) -> Trailer | None:
    """Split 56 trailer bytes; None when they do not start with the trailer magic."""
    if len(raw) != TRAILER_SIZE or not raw.startswith(TRAILER_MAGIC):
        return None
    (size,) = struct.unpack(">Q", raw[16:24])
    return Trailer(kcv=raw[8:16], size=size, tag=raw[24:56])


def seal_chunk(secret: bytes, path: str, data: bytes) -> bytes:
    """What a qtb-pipe `enc` writes for `data` at `path`: the data, then the trailer."""
    keys = derive_keys(secret)
    return data + make_trailer(keys, len(data), compute_tag(keys.chunk_key, path, data))


def canonical_json(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def seal_manifest(secret: bytes, manifest: dict[str, Any]) -> bytes:
    """`{"manifest":<canonical body>,"seal":"<hex HMAC(manifest_key, canonical body)>"}`, exactly."""
    body = canonical_json(manifest)
    seal = _hmac(derive_keys(secret).manifest_key, body).hex().encode()
    return SEALED_PREFIX + body + b',"seal":"' + seal + b'"}'


def verify_manifest(secret: bytes, data: bytes) -> dict[str, Any]:
    """Check a sealed manifest's size, form and seal over the raw bytes, then parse it. ManifestError."""
    if len(data) > MAX_MANIFEST_BYTES:
        raise ManifestError(f"manifest larger than {MAX_MANIFEST_BYTES} bytes")
    body, suffix = data[len(SEALED_PREFIX) : -SEALED_SUFFIX_SIZE], data[-SEALED_SUFFIX_SIZE:]
    seal = SEALED_SUFFIX_RE.fullmatch(suffix)
    if seal is None or not data.startswith(SEALED_PREFIX) or len(data) < len(SEALED_PREFIX) + len(suffix):
        raise ManifestError('manifest is not in the sealed form {"manifest":…,"seal":"<64 hex>"}')
    expected = _hmac(derive_keys(secret).manifest_key, body).hex().encode()
    if not hmac.compare_digest(seal[1], expected):
        raise ManifestError("manifest seal does not verify (forged, or sealed with another secret)")
    try:
        manifest = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise ManifestError(f"manifest is not JSON ({exc})") from None
    # A valid seal means the driver wrote it; the shape check guards against driver bugs only.
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise ManifestError(f"manifest format is not {MANIFEST_FORMAT}")
    if not isinstance(manifest.get("backup_id"), str) or not isinstance(manifest.get("chunks"), list):
        raise ManifestError("manifest lacks backup_id or chunks")
    for chunk in manifest["chunks"]:
        if not (
            isinstance(chunk, dict)
            and isinstance(chunk.get("path"), str)
            and type(chunk.get("size")) is int
            and chunk["size"] >= 0
            and isinstance(chunk.get("tag"), str)
            and HEX_TAG_RE.fullmatch(chunk["tag"])
        ):
            raise ManifestError(f"malformed manifest chunk entry {chunk!r:.200}")
    return manifest


def split_chunk_path(path: str) -> tuple[str, int | None]:
    """`vm12/private.img.003` -> ("vm12/private.img", 3); paths without a chunk number -> (path, None)."""
    match = CHUNK_RE.fullmatch(path)
    if match is None:
        return path, None
    return match["file"], int(match["index"])


def header_backup_id(header: bytes) -> str | None:
    """The value of the `backup-id=` line of a Qubes backup-header, if any."""
    for line in header.splitlines():
        key, sep, value = line.partition(b"=")
        if sep and key == b"backup-id":
            return value.decode("ascii", "replace")
    return None


# ----------------------------------------------------------------------------------------------------
# scrypt 1.3.1's command line


class CommandLineNotHandled(Exception):
    """Anything the shim does not parse exactly like scrypt: the real scrypt gets the untouched argv."""


@dataclass
class Invocation:
    mode: str  # "enc" or "dec"
    options: list[str]  # normalised options except the passphrase choice, e.g. ["-f", "-t", "0.1"]
    passphrase_method: str  # tty-stdin | stdin-once | tty-once | env | file
    passphrase_arg: str
    infile: str  # "-" = stdin
    outfile: str | None  # None = stdout (scrypt 1.3.1 takes a literal "-" here as a file name)


FLAG_OPTIONS = {"-f", "-v", "-P"}
VALUE_OPTIONS = {"-M", "-m", "-p", "-r", "-t"}
LONG_VALUE_OPTIONS = {"--logN", "--passphrase"}
DECIMAL_RE = re.compile(r"[0-9]+(\.[0-9]*)?|\.[0-9]+")


def parse_command_line(args: list[str]) -> Invocation:
    """Parse `enc|dec [options] infile [outfile]` like scrypt's getopt (combined flags, -t0.1, --opt=v).

    Anything unusual raises CommandLineNotHandled; the caller then runs the real scrypt before reading
    anything, so its own error messages and exit codes reach the user unchanged.
    """
    if not args or args[0] not in ("enc", "dec"):
        raise CommandLineNotHandled
    parsed: list[tuple[str, str | None]] = []
    position = 1
    while position < len(args):
        arg = args[position]
        if arg == "--":
            position += 1
            break
        if not arg.startswith("-") or arg == "-":
            break
        position += 1
        if arg.startswith("--"):
            name, has_value, value = arg.partition("=")
            if name not in LONG_VALUE_OPTIONS:
                raise CommandLineNotHandled
            if not has_value:
                if position >= len(args):
                    raise CommandLineNotHandled
                value, position = args[position], position + 1
            parsed.append((name, value))
            continue
        letters = arg[1:]
        while letters:
            name, letters = "-" + letters[0], letters[1:]
            if name in FLAG_OPTIONS:
                parsed.append((name, None))
            elif name in VALUE_OPTIONS:
                if not letters:
                    if position >= len(args):
                        raise CommandLineNotHandled
                    letters, position = args[position], position + 1
                parsed.append((name, letters))
                letters = ""
            else:
                raise CommandLineNotHandled
    operands = args[position:]
    if len(operands) not in (1, 2):
        raise CommandLineNotHandled
    return _build_invocation(args[0], parsed, operands)


def _build_invocation(mode: str, parsed: list[tuple[str, str | None]], operands: list[str]) -> Invocation:
    options: list[str] = []
    method, method_arg = "", ""
    work_parameters = set()
    for name, value in parsed:
        if name in ("-P", "--passphrase"):
            if method:
                raise CommandLineNotHandled  # "You can only enter one --passphrase or -P argument"
            method, method_arg = ("stdin-once", "") if name == "-P" else _parse_passphrase_method(value or "")
            continue
        if value is not None and not _option_value_ok(name, value):
            raise CommandLineNotHandled
        if name in ("--logN", "-r", "-p"):
            work_parameters.add(name)
        options += [name] if value is None else [name, value]
    if work_parameters and len(work_parameters) != 3:
        raise CommandLineNotHandled  # "If --logN is set, -r and -p must also be set", etc.
    method = method or "tty-stdin"
    if method == "stdin-once" and operands[0] == "-":
        raise CommandLineNotHandled  # "Cannot read both passphrase and input file from standard input"
    return Invocation(
        mode, options, method, method_arg, operands[0], operands[1] if len(operands) > 1 else None
    )


def _parse_passphrase_method(value: str) -> tuple[str, str]:
    kind, colon, arg = value.partition(":")
    if colon and kind == "dev" and arg in ("tty-stdin", "stdin-once", "tty-once"):
        return arg, ""
    if colon and kind in ("env", "file"):
        return kind, arg
    raise CommandLineNotHandled


def _option_value_ok(name: str, value: str) -> bool:
    # Only plain decimal forms inside scrypt's ranges; odd spellings go to the real scrypt to judge.
    if name == "-M":
        return re.fullmatch(r"[0-9]+[kMGTPE]?B?", value) is not None
    if not DECIMAL_RE.fullmatch(value):
        return False
    number = float(value)
    limits = {"--logN": (10, 40), "-r": (1, 32), "-p": (1, 32), "-m": (0, 0.5), "-t": (0, float("inf"))}
    low, high = limits[name]
    integer_only = name in ("--logN", "-r", "-p")
    return low <= number <= high and (not integer_only or value.isdigit())


# ----------------------------------------------------------------------------------------------------
# The passphrase dialogue (scrypt's readpass / readpass_file)


PROG = "scrypt"  # set from argv[0] in main(); scrypt prefixes its messages with its program name


def _say(message: str) -> None:
    os.write(2, f"{PROG}: {message}\n".encode(errors="replace"))


class PassphraseUnavailable(Exception):
    """Reading the passphrase failed after consuming input; the message is scrypt's."""


def _read_line(fd: int) -> bytes | None:
    """fgets(buf, 2048, ...) without read-ahead: the rest of stdin stays for the data or the real scrypt.

    Where fgets would cut a longer line, the shim refuses instead: the lost part may be a qtb-pipe
    user part, and a cut one must never reach the real scrypt.
    """
    line = bytearray()
    while not line.endswith(b"\n"):
        if len(line) == MAXPASSLEN - 1:
            raise QtbPassphraseError(f"passphrase line longer than {MAXPASSLEN - 2} bytes; refused")
        byte = os.read(fd, 1)
        if not byte:
            break
        line += byte
    return bytes(line) if line else None


def _as_passphrase(line: bytes) -> bytes:
    # scrypt cuts at the first CR or LF, and C strings end at the first NUL.
    return re.split(rb"[\r\n\0]", line, maxsplit=1)[0]


def read_terminal_or_stdin(devtty: bool, confirm: bool) -> bytes:
    """scrypt's readpass(): /dev/tty if wanted and available, else stdin; prompts only on a terminal."""
    tty_fd = None
    if devtty:
        try:
            tty_fd = os.open("/dev/tty", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            tty_fd = None
    fd = tty_fd if tty_fd is not None else 0
    saved_attrs = None
    try:
        if os.isatty(fd):
            saved_attrs = termios.tcgetattr(fd)
            quiet = list(saved_attrs)
            quiet[3] = (quiet[3] & ~termios.ECHO) | termios.ECHONL
            termios.tcsetattr(fd, termios.TCSANOW, quiet)
        while True:
            first = _prompted_line(fd, PROMPT, saved_attrs is not None)
            if not confirm:
                return _as_passphrase(first)
            second = _prompted_line(fd, CONFIRM_PROMPT, saved_attrs is not None)
            if first.split(b"\0")[0] == second.split(b"\0")[0]:
                return _as_passphrase(first)
            os.write(2, b"Passwords mismatch, please try again\n")
    finally:
        if saved_attrs is not None:
            termios.tcsetattr(fd, termios.TCSANOW, saved_attrs)
        if tty_fd is not None:
            os.close(tty_fd)


def _prompted_line(fd: int, prompt: str, on_terminal: bool) -> bytes:
    if on_terminal:
        os.write(2, f"{prompt}: ".encode())
    try:
        line = _read_line(fd)
    except OSError as exc:
        raise PassphraseUnavailable(f"Cannot read password: {exc.strerror}") from None
    if line is None:
        raise PassphraseUnavailable("EOF reading password")
    return line


def read_passphrase_file(path: str) -> bytes | None:
    """scrypt's readpass_file(): one line of at most 2047 bytes; None if scrypt would refuse it."""
    try:
        with open(path, "rb") as passfile:
            content = passfile.read(2 * MAXPASSLEN)
    except OSError:
        return None
    first_line_end = content.find(b"\n")
    first_line_len = MAXPASSLEN - 1 if first_line_end < 0 else min(first_line_end + 1, MAXPASSLEN - 1)
    if len(content) > first_line_len:
        return None  # "line too long, or more than 1 line"
    return _as_passphrase(content)


def read_passphrase(invocation: Invocation) -> bytes | None:
    """The passphrase as scrypt would read it, or None when only the real scrypt can tell the error.

    None is returned only before any input was consumed, so handing the untouched argv to the real
    scrypt then reproduces its exact message. Failures after reading raise PassphraseUnavailable.
    """
    method = invocation.passphrase_method
    if method == "env":
        return os.environb.get(invocation.passphrase_arg.encode())  # used verbatim, as scrypt does
    if method == "file":
        return read_passphrase_file(invocation.passphrase_arg)
    if method == "tty-once":
        try:
            os.close(os.open("/dev/tty", os.O_RDONLY | os.O_CLOEXEC))
        except OSError:
            return None  # scrypt: "fopen(/dev/tty): ..."
    return read_terminal_or_stdin(
        devtty=method != "stdin-once",
        confirm=method == "tty-stdin" and invocation.mode == "enc",
    )


# ----------------------------------------------------------------------------------------------------
# Handing over to the real scrypt


def exec_real_scrypt(argv: list[str], pass_fd: int | None = None) -> NoReturn:
    """Replace this process by the real scrypt; never fall back to pass-through when it is missing."""
    problem = None
    if not (os.path.isfile(REAL_SCRYPT) and os.access(REAL_SCRYPT, os.X_OK)):
        problem = "is missing or not executable"
    elif os.path.realpath(REAL_SCRYPT) == os.path.realpath(__file__):
        problem = "is this shim itself"
    if problem is None:
        if pass_fd is not None:
            os.set_inheritable(pass_fd, True)
        try:
            os.execv(REAL_SCRYPT, argv)
        except OSError as exc:
            problem = f"cannot be run ({exc.strerror})"
    _say(f"qtb-pipe shim: the real scrypt {REAL_SCRYPT} {problem}; only qtb-pipe passphrases work without it")
    sys.exit(1)


def hand_over(argv: list[str], invocation: Invocation, passphrase: bytes) -> NoReturn:
    """Run the real scrypt with the same arguments and the passphrase already read, without prompting.

    The passphrase goes through a pipe as `--passphrase file:/dev/fd/N` (scrypt reads such a file
    once, even for enc). An env: passphrase was not consumed, so the original argv does the job.
    """
    if invocation.passphrase_method == "env":
        exec_real_scrypt(argv)
    read_end, write_end = os.pipe()
    # readpass_file accepts one line of at most 2047 bytes: a newline only while there is room for it
    os.write(write_end, passphrase + b"\n" if len(passphrase) < MAXPASSLEN - 1 else passphrase)
    os.close(write_end)
    operands = [invocation.infile] + ([invocation.outfile] if invocation.outfile is not None else [])
    new_argv = [argv[0], invocation.mode, *invocation.options, "--passphrase", f"file:/dev/fd/{read_end}"]
    exec_real_scrypt([*new_argv, "--", *operands], pass_fd=read_end)


# ----------------------------------------------------------------------------------------------------
# qtb mode: run directory, records, output


def _run_dir(token: str) -> str:
    return os.path.join(STATE_DIR, "runs", token)


def append_record(run_dir: str, record: dict[str, Any]) -> None:
    """Append one JSON line to `<run_dir>/records.jsonl` and make it durable."""
    path = os.path.join(run_dir, "records.jsonl")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        if os.fstat(fd).st_size == 0 and os.geteuid() == 0:
            # qubesd runs the shim as root, the driver reads records as the user owning the run dir.
            owner = os.stat(run_dir)
            os.fchown(fd, owner.st_uid, owner.st_gid)
        os.write(fd, (json.dumps(record, separators=(",", ":")) + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def _try_append(run_dir: str, record: dict[str, Any]) -> None:
    try:
        append_record(run_dir, record)
    except OSError:
        pass  # the failure already makes the run incomplete: the driver finds no ok record


def read_records(run_dir: str) -> list[dict[str, Any]]:
    try:
        with open(os.path.join(run_dir, "records.jsonl"), "rb") as records:
            lines = records.read().splitlines()
    except FileNotFoundError:
        return []
    result = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a torn line from a crash; the driver judges the run from the other lines
        if isinstance(record, dict):
            result.append(record)
    return result


class Output:
    """Where qtb-mode output goes: a temp file renamed into place on success, or written directly.

    Regular (or new) output paths get a temp file in the same directory, so nothing ever appears at
    the path until it is complete and verified. stdout and special files (FIFOs, devices) cannot be
    renamed onto; `direct` tells dec to verify fully before writing anything there.
    """

    def __init__(self, outfile: str | None) -> None:
        self.outfile = outfile
        self.temp_path: str | None = None
        self.committed_path: str | None = None  # renamed into place; discard() removes it again
        self.fd = 1
        self.direct = outfile is None
        if outfile is None:
            return
        try:
            info = os.stat(outfile)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise ShimError(f"Cannot open output file: {outfile}: {exc.strerror}") from None
        if stat.S_ISDIR(info.st_mode):
            raise ShimError(f"Cannot open output file: {outfile}: Is a directory")
        self.direct = not stat.S_ISREG(info.st_mode)

    def open(self) -> None:
        if self.outfile is None:
            return
        try:
            if self.direct:
                self.fd = os.open(self.outfile, os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC)
                return
            directory, name = os.path.split(os.path.abspath(self.outfile))
            for attempt in range(100):
                candidate = os.path.join(directory, f".{name}.qtb-{os.getpid()}-{attempt}")
                try:
                    # 0o666 & ~umask, like fopen(outfile, "wb") in the real scrypt
                    self.fd = os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
                except FileExistsError:
                    continue
                self.temp_path = candidate
                return
            raise ShimError(f"Cannot open output file: {self.outfile}: no free temporary name")
        except OSError as exc:
            raise ShimError(f"Cannot open output file: {self.outfile}: {exc.strerror}") from None

    def write(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self.fd, view) :]
        except OSError as exc:
            raise ShimError(f"Cannot write output file: {self.outfile or 'stdout'}: {exc.strerror}") from None

    def commit(self) -> None:
        """Close the output and rename it into place. No fsync: qubesd sends the file and deletes it
        within the same run, and a crash ends that run anyway (an uncommitted backup); forcing
        100 MiB to disk per chunk only cost time (benchmarks/results)."""
        if self.outfile is None:
            return
        os.close(self.fd)
        self.fd = -1
        if self.temp_path is not None:
            os.rename(self.temp_path, self.outfile)
            self.temp_path, self.committed_path = None, self.outfile

    def discard(self) -> None:
        """Leave no output file behind (bytes already sent to stdout or a device cannot be taken back)."""
        if self.outfile is not None and self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        for path in (self.temp_path, self.committed_path):
            if path is not None:
                try:
                    os.unlink(path)
                except OSError:
                    pass
        self.temp_path = self.committed_path = None


def copy_stream(in_fd: int, limit: int | None, *sinks: Callable[[memoryview], object]) -> None:
    """Read `in_fd` (up to `limit` bytes) into one reused buffer, handing every piece to each sink."""
    view = memoryview(bytearray(COPY_BUFFER_BYTES))
    reader = open(in_fd, "rb", buffering=0, closefd=False)  # noqa: SIM115 - must not close in_fd
    total = 0
    while limit is None or total < limit:
        wanted = COPY_BUFFER_BYTES if limit is None else min(COPY_BUFFER_BYTES, limit - total)
        count = reader.readinto(view[:wanted])
        if not count:
            break
        for sink in sinks:
            sink(view[:count])
        total += count


# ----------------------------------------------------------------------------------------------------
# qtb mode: enc


def qtb_enc(invocation: Invocation, qtb: QtbPassphrase, in_fd: int) -> int:
    run_dir = _run_dir(qtb.token)
    if not os.path.isdir(run_dir):
        _say(f"qtb-pipe: {qtb.path}: run directory {run_dir} does not exist; refusing an unrecorded backup")
        return 1
    keys = derive_keys(qtb.secret)
    output: Output | None = None
    try:
        output = Output(invocation.outfile)
        output.open()
        hasher = TagHasher(keys.chunk_key, qtb.path)
        header = bytearray()
        sinks = [hasher.update, output.write]
        if qtb.path == HEADER_PATH:
            sinks.append(lambda piece: header.extend(piece[: MAX_HEADER_BYTES - len(header)]))
        try:
            copy_stream(in_fd, None, *sinks)
        except OSError as exc:
            raise ShimError(f"Error reading input: {exc.strerror}") from None
        tag = hasher.finish()
        backup_id = qtb.backup_id if qtb.backup_id is not None else header_backup_id(bytes(header))
        if backup_id is None:
            raise ShimError("backup-header has no backup-id= line")
        output.write(make_trailer(keys, hasher.size, tag))
        output.commit()
        record = {
            "op": "enc",
            "path": qtb.path,
            "backup_id": backup_id,
            "size": hasher.size,
            "tag": tag.hex(),
            "status": "ok",
        }
        append_record(run_dir, record)  # only after the output is complete (design.md)
    except (ShimError, OSError) as exc:
        reason = str(exc) if isinstance(exc, ShimError) else f"{exc.strerror}: {exc.filename or 'output'}"
        if output is not None:
            output.discard()
        _say(f"qtb-pipe: {qtb.path}: {reason}")
        _try_append(run_dir, {"op": "enc", "path": qtb.path, "status": "failed", "error": reason})
        return 1
    return 0


# ----------------------------------------------------------------------------------------------------
# qtb mode: dec


def _read_run_file(run_dir: str, name: str) -> bytes | None:
    """A file the driver left in the run directory (at most MAX_MANIFEST_BYTES + 1 bytes); None if absent."""
    path = os.path.join(run_dir, name)
    try:
        with open(path, "rb") as run_file:
            return run_file.read(MAX_MANIFEST_BYTES + 1)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ManifestError(f"cannot read {path}: {exc.strerror}") from None


@dataclass
class RunManifest:
    """The verified manifest of a restore/verify run and what this pass must restore."""

    body: dict[str, Any]
    files: dict[str, list[str]]  # file name -> its chunk paths, both in manifest (stream) order
    expected: set[str]  # the files this pass must restore (selection.json)


def load_run_manifest(run_dir: str, secret: bytes) -> RunManifest:
    """manifest.json (required: a run directory without it fails closed) and selection.json."""
    data = _read_run_file(run_dir, "manifest.json")
    if data is None:
        raise ManifestError("the run directory has no manifest.json; refusing to check less")
    body = verify_manifest(secret, data)
    files: dict[str, list[str]] = {}
    for chunk in body["chunks"]:
        files.setdefault(split_chunk_path(chunk["path"])[0], []).append(chunk["path"])
    raw = _read_run_file(run_dir, "selection.json")
    if raw is None:
        return RunManifest(body, files, set(files))
    try:
        prefixes = json.loads(raw)["prefixes"]
        well_formed = isinstance(prefixes, list) and all(isinstance(p, str) for p in prefixes)
    except (ValueError, RecursionError, TypeError, KeyError):
        well_formed = False
    if not well_formed:
        raise ManifestError('selection.json is not {"prefixes": [strings]}')
    prefix_tuple = tuple(prefixes)
    expected = {HEADER_PATH, QUBES_XML_FILE}
    expected |= {name for name, paths in files.items() if any(p.startswith(prefix_tuple) for p in paths)}
    return RunManifest(body, files, expected)


def check_against_manifest(
    qtb: QtbPassphrase, manifest: RunManifest, records: list[dict[str, Any]]
) -> dict[str, Any]:
    """Membership and order rules (design.md, "Run directories"); returns the chunk's manifest entry."""
    backup_id = manifest.body["backup_id"]
    if qtb.backup_id is not None and qtb.backup_id != backup_id:
        raise VerificationError(
            f"not from this backup (passphrase names backup {qtb.backup_id}, manifest is for {backup_id})"
        )
    entry = next((chunk for chunk in manifest.body["chunks"] if chunk["path"] == qtb.path), None)
    if entry is None:
        raise VerificationError("not from this backup (no such file in the manifest)")
    accepted = {r.get("path") for r in records if r.get("op") == "dec" and r.get("status") == "ok"}
    file_name, index = split_chunk_path(qtb.path)
    if index:  # chunk k >= 1 comes right after chunk k-1
        previous = f"{file_name}.{index - 1:03d}"
        if previous not in accepted:
            raise VerificationError(f"out of order: {previous} was not accepted before it")
        return entry
    for other, paths in manifest.files.items():  # a first chunk: every expected file before it is done
        if other == file_name:
            break
        missing = next((path for path in paths if path not in accepted), None)
        if other in manifest.expected and missing is not None:
            raise VerificationError(
                f"out of order: {other} was not served before {file_name} (missing {missing})"
            )
    return entry


def _trailer_at(in_fd: int, offset: int) -> Trailer | None:
    return parse_trailer(os.pread(in_fd, TRAILER_SIZE, offset)) if offset >= 0 else None


def _ends_data(trailer: Trailer | None, keys: Keys, offset: int) -> bool:
    """Is this a trailer of ours that belongs exactly at `offset` (its length field says so)?"""
    return trailer is not None and trailer.kcv == keys.kcv and trailer.size == offset


def _wrong_size(in_fd: int, total: int, expected: int, trailer: Trailer | None, keys: Keys) -> ShimError:
    """The file is not as long as its manifest entry says: why, as precisely as two small reads tell."""
    expected_total = expected + TRAILER_SIZE
    if total > expected_total and _ends_data(_trailer_at(in_fd, expected), keys, expected):
        return VerificationError(f"appended data ({total - expected_total} bytes after the trailer)")
    if _ends_data(trailer, keys, total - TRAILER_SIZE):
        return VerificationError(
            f"not from this backup ({total - TRAILER_SIZE} data bytes, the manifest says {expected})"
        )
    word = "truncated" if total < expected_total else "appended data"
    return VerificationError(f"{word} ({total} bytes, expected {expected_total})")


def _find_displaced_trailer(in_fd: int, total: int, keys: Keys) -> int | None:
    """Offset of a trailer followed by extra bytes, to report "appended data" without a manifest.

    Only the last MAX_TRAILER_CANDIDATES occurrences of magic+kcv are tried: a crafted file must not
    make this walk millions of them.
    """
    if total < TRAILER_SIZE:
        return None
    needle = TRAILER_MAGIC + keys.kcv
    with mmap.mmap(in_fd, total, prot=mmap.PROT_READ) as mapped:
        end = total - TRAILER_SIZE + len(needle)  # a trailer must fit before the end
        for _ in range(MAX_TRAILER_CANDIDATES):
            position = mapped.rfind(needle, 0, end)
            if position < 0:
                return None
            if struct.unpack_from(">Q", mapped, position + 16)[0] == position:
                return position
            end = position + len(needle) - 1
    return None


def _spool_to_temp_file(in_fd: int) -> int:
    """Copy a non-seekable input to an anonymous temp file: dec must verify all of it before output."""
    with tempfile.TemporaryFile(prefix="qtb-pipe-dec-") as spool:  # unlinked, 0600
        copy_stream(in_fd, None, spool.write)
        spool.flush()
        return os.dup(spool.fileno())


def _exists(path: str) -> bool:
    """False only when nothing is there: an unreadable run directory must fail closed, not skip checks."""
    try:
        os.stat(path)
    except FileNotFoundError:
        return False
    except OSError:
        pass
    return True


def qtb_dec(invocation: Invocation, qtb: QtbPassphrase, in_fd: int) -> int:
    run_dir = _run_dir(qtb.token)
    have_run_dir = _exists(run_dir)  # none at all: emergency restore, the chunk's own tag only
    label = f"qtb-pipe: {qtb.path} ({invocation.infile})"
    output: Output | None = None
    size: int | None = None  # the data size a trailer at the end implies, for a failed record
    try:
        try:
            output = Output(invocation.outfile)
            if in_fd == 0 or not stat.S_ISREG(os.fstat(in_fd).st_mode):
                in_fd = _spool_to_temp_file(in_fd)  # stdin may be a pipe, or a file not at offset 0
            total = os.fstat(in_fd).st_size
            if os.pread(in_fd, len(SCRYPT_MAGIC), 0) == SCRYPT_MAGIC:
                # a qtb-pipe file whose data starts with "scrypt" still ends in our trailer magic
                tail = os.pread(in_fd, len(TRAILER_MAGIC), max(total - TRAILER_SIZE, 0))
                if total < TRAILER_SIZE or tail != TRAILER_MAGIC:
                    raise VerificationError("is a real-scrypt file, never part of a qtb-pipe backup")
            trailer = _trailer_at(in_fd, total - TRAILER_SIZE)
        except OSError as exc:
            raise ShimError(f"Error reading input: {exc.strerror}") from None
        keys = derive_keys(qtb.secret)
        size = None if trailer is None else total - TRAILER_SIZE
        entry: dict[str, Any] | None = None
        if have_run_dir:  # cheap checks first: nothing is hashed for a chunk the manifest rules out
            entry = check_against_manifest(qtb, load_run_manifest(run_dir, qtb.secret), read_records(run_dir))
            if total != entry["size"] + TRAILER_SIZE:
                raise _wrong_size(in_fd, total, entry["size"], trailer, keys)
        if trailer is None:
            if entry is not None:  # the length is right, so the trailer itself was damaged
                raise VerificationError("tampered (qtb-pipe trailer damaged)")
            displaced = _find_displaced_trailer(in_fd, total, keys)
            if displaced is not None:
                raise VerificationError(
                    f"appended data ({total - displaced - TRAILER_SIZE} bytes after the trailer)"
                )
            raise VerificationError("no qtb-pipe trailer at the end: truncated, or not a qtb-pipe file")
        if not hmac.compare_digest(trailer.kcv, keys.kcv):
            raise VerificationError("wrong key (written with another qtb-pipe secret)")
        if trailer.size != size:
            word = "truncated" if trailer.size > size else "appended data"
            raise VerificationError(f"{word} ({size} data bytes, trailer says {trailer.size})")

        # Stream once: hash, and (for a renameable output) write a temp file that only a full match keeps.
        hasher = TagHasher(keys.chunk_key, qtb.path)
        sinks = [hasher.update]
        if not output.direct:
            output.open()
            sinks.append(output.write)
        os.lseek(in_fd, 0, os.SEEK_SET)
        copy_stream(in_fd, size, *sinks)
        if hasher.size != size or not hmac.compare_digest(hasher.finish(), trailer.tag):
            raise VerificationError("tampered or not this file's path (tag mismatch)")
        if entry is not None and not hmac.compare_digest(entry["tag"], trailer.tag.hex()):
            raise VerificationError("not from this backup (tag differs from the manifest)")
        if entry is None:
            _say(
                f"{label}: warning: no qtb-pipe run directory; checked the file's own tag only "
                "(a chunk of another backup, reordered or missing chunks cannot be detected)"
            )

        if output.direct:  # stdout or a special file: now verified, copy it there
            output.open()
            os.lseek(in_fd, 0, os.SEEK_SET)
            copy_stream(in_fd, size, output.write)
        output.commit()
        if have_run_dir:
            append_record(run_dir, {"op": "dec", "path": qtb.path, "size": size, "status": "ok"})
    except (ShimError, OSError) as exc:
        reason = str(exc) if isinstance(exc, ShimError) else exc.strerror
        if output is not None:
            output.discard()
        _say(f"{label}: {reason}")
        if have_run_dir:
            record: dict[str, Any] = {"op": "dec", "path": qtb.path, "status": "failed", "error": reason}
            if size is not None:
                record["size"] = size
            _try_append(run_dir, record)
        return 1
    return 0


# ----------------------------------------------------------------------------------------------------
# Entry point


def main(argv: list[str] | None = None) -> int:
    global PROG
    argv = list(sys.argv if argv is None else argv)
    PROG = os.path.basename(argv[0]) or "scrypt"
    try:
        invocation = parse_command_line(argv[1:])
    except CommandLineNotHandled:
        exec_real_scrypt(argv)  # info, --version, usage errors: all the real scrypt's business

    # Open the input before the dialogue, as scrypt does: a missing file must not prompt first.
    in_fd = 0
    if invocation.infile != "-":
        try:
            in_fd = os.open(invocation.infile, os.O_RDONLY | os.O_CLOEXEC)
            if stat.S_ISDIR(os.fstat(in_fd).st_mode):
                raise IsADirectoryError
        except OSError:
            exec_real_scrypt(argv)  # it prints "Cannot open input file: ..." its own way

    # The passphrase decides, for dec too: a real-scrypt file is handed over only with a passphrase
    # that holds no qtb-pipe secret (backups made before the shim restore with their own passphrase).
    try:
        passphrase = read_passphrase(invocation)
        qtb = parse_qtb_passphrase(passphrase) if passphrase is not None else None
    except PassphraseUnavailable as exc:
        _say(str(exc))
        return 1
    except QtbPassphraseError as exc:
        _say(f"qtb-pipe: {exc}")
        return 1
    if passphrase is None:
        exec_real_scrypt(argv)
    if qtb is None:
        if in_fd != 0:
            os.close(in_fd)
        hand_over(argv, invocation, passphrase)
    if invocation.mode == "enc":
        return qtb_enc(invocation, qtb, in_fd)
    return qtb_dec(invocation, qtb, in_fd)


if __name__ == "__main__":
    sys.exit(main())
