"""The installed shim driven over a pty exactly as qubesd and qvm-backup-restore drive scrypt."""

from __future__ import annotations

import os
import shutil
import struct
from pathlib import Path

import pytest
from shimtools import (
    PROMPT_CONFIRM,
    PROMPT_ENTER,
    REAL_SCRYPT,
    ShimWorld,
    compute_tag,
    converse,
    make_world,
    run_like_qubes,
    run_without_tty,
    seal_chunk,
    shim_with_fake_real_scrypt,
)

from qtb_pipe import shim_install
from scrypt_shim import shim

BACKUP_ID = "20261124T003908-3222"
OLDER_BACKUP_ID = "20261101T010203-1111"
MiB = 1024 * 1024


@pytest.fixture
def world(tmp_path: Path) -> ShimWorld:
    return make_world(tmp_path)


def pattern(size: int, seed: int = 0) -> bytes:
    """Cheap non-repeating-looking data (os.urandom of 100 MiB costs more than the test itself)."""
    block = bytes((i * 131 + seed * 17 + (i >> 8)) & 0xFF for i in range(65536))
    return (block * (size // len(block) + 1))[:size]


def write_plan_for(world: ShimWorld, backup_id: str, files: dict[str, bytes]) -> None:
    """A restore plan holding `files` (path -> data, in stream order), as the driver writes it."""
    keys = shim.derive_keys(world.secret)
    chunks = [
        {"path": path, "size": len(data), "tag": compute_tag(keys.chunk_key, path, data).hex()}
        for path, data in files.items()
    ]
    world.write_plan(backup_id, chunks)


def assert_refused(result, world: ShimWorld, path: str, reason: str, out: Path) -> None:
    """Non-zero exit, ONE stderr line naming the file and the reason, no output file."""
    assert result.returncode != 0, result
    lines = result.stderr.decode().splitlines()
    assert len(lines) == 1, result.stderr
    assert path in lines[0] and reason in lines[0], lines[0]
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.qtb-")]  # no temp left


# --- round trips ------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 511, 512 * 3 + 7, 1 * MiB + 1, 100 * MiB])
def test_chunk_round_trip(world: ShimWorld, size: int) -> None:
    data = pattern(size)
    path = "vm12/private.img.000"
    encrypted = world.enc(BACKUP_ID, path, data)
    blob = encrypted.read_bytes()
    assert blob == seal_chunk(world.secret, path, data)  # input plus the trailer, nothing else
    assert blob[:size] == data and len(blob) == size + shim.TRAILER_SIZE
    del blob

    (enc_record,) = world.start_restore(BACKUP_ID)
    out = world.work / "restored"
    result = world.dec(BACKUP_ID, path, encrypted, out)
    assert (result.returncode, result.stderr) == (0, b"")
    assert out.read_bytes() == data
    assert world.accepted() == 1 and world.records() == []
    assert enc_record == {
        "op": "enc",
        "path": path,
        "backup_id": BACKUP_ID,
        "size": size,
        "tag": compute_tag(shim.derive_keys(world.secret).chunk_key, path, data).hex(),
        "status": "ok",
    }


def test_header_file_to_file_round_trip(world: ShimWorld) -> None:
    header = f"version=4\nencrypted=True\ncompressed=False\nbackup-id={BACKUP_ID}\n".encode()
    plain = world.work / "backup-header"
    plain.write_bytes(header)
    hmac_file = world.work / "backup-header.hmac"
    result = run_like_qubes([world.shim, "enc", plain, hmac_file], world.passphrase(None, "backup-header"))
    assert (result.returncode, result.stderr) == (0, b"")
    assert hmac_file.read_bytes() == seal_chunk(world.secret, "backup-header", header)
    # the header's record takes its backup_id from the header's backup-id= line
    assert world.records()[0]["backup_id"] == BACKUP_ID

    world.start_restore(BACKUP_ID)
    decrypted = world.work / "backup-header.dec"
    result = world.dec(None, "backup-header", hmac_file, decrypted)
    assert result.returncode == 0
    assert decrypted.read_bytes() == header


def test_forms_qubes_never_uses_go_to_the_real_scrypt_untouched(world: ShimWorld) -> None:
    """Only Qubes' call forms are handled; stdout output, `dec -`, --passphrase, -m/-M… are the
    real scrypt's, from the first byte: the result is exactly what the real scrypt gives."""
    fake_shim, log = shim_with_fake_real_scrypt(world)
    source = world.work / "in"
    source.write_bytes(b"payload")
    for args in (
        ["enc", "-"],
        ["dec", "-", "out"],
        ["enc", "--passphrase", "env:X", "in", "out"],
        ["enc", "-m", "0.1", "in", "out"],
        ["enc", "-fP", "in", "out"],
        ["enc", "in", "-"],
    ):
        log.unlink(missing_ok=True)
        result = run_without_tty([fake_shim, *args], b"pw\n", cwd=world.work)
        assert result.returncode == 0, args
        assert log.read_text().splitlines() == args  # argv as given, no passphrase read first


def test_qtb_data_starting_with_scrypt_magic_stays_in_qtb_mode(world: ShimWorld) -> None:
    data = b"scrypt\x00 looks like a real scrypt header" * 10
    encrypted = world.enc(BACKUP_ID, "vm5/private.img.000", data)
    world.start_restore(BACKUP_ID)
    out = world.work / "out"
    result = world.dec(BACKUP_ID, "vm5/private.img.000", encrypted, out)
    assert (result.returncode, result.stderr) == (0, b"") and out.read_bytes() == data


def test_passphrase_from_stdin_lines_then_data_without_tty(world: ShimWorld) -> None:
    """No tty: scrypt reads two passphrase lines from stdin, and the data follows on the same stdin."""
    out = world.work / "c.enc"
    line = world.passphrase(BACKUP_ID, "vm1/private.img.000").encode() + b"\n"
    result = run_without_tty([world.shim, "enc", "-", out], line + line + b"DATA\nmore")
    assert (result.returncode, result.stderr) == (0, b"")
    assert out.read_bytes() == seal_chunk(world.secret, "vm1/private.img.000", b"DATA\nmore")


def test_P_form_of_qubes_own_tests(world: ShimWorld) -> None:
    """upstream Qubes tests: `scrypt enc -P -t 0.1 IN OUT`, passphrase on stdin without newline."""
    passphrase = world.passphrase(BACKUP_ID, "vm1/private.img.000")
    source = world.work / "in"
    source.write_bytes(b"payload")
    out = world.work / "p.enc"
    result = run_without_tty([world.shim, "enc", "-P", "-t", "0.1", source, out], passphrase.encode())
    assert result.returncode == 0 and out.read_bytes() == seal_chunk(
        world.secret, "vm1/private.img.000", b"payload"
    )


def test_unchanged_data_under_new_backup_id_is_byte_identical(world: ShimWorld) -> None:
    data = pattern(2 * MiB + 5, seed=9)
    first = world.enc(OLDER_BACKUP_ID, "vm3/private.img.001", data, world.work / "first.enc")
    world.new_run()  # another backup: new token, new backup_id
    second = world.enc(BACKUP_ID, "vm3/private.img.001", data, world.work / "second.enc")
    assert first.read_bytes() == second.read_bytes()


# --- hand-over to the real scrypt --------------------------------------------------------------------


def test_non_qtb_passphrase_gives_real_scrypt_file(world: ShimWorld) -> None:
    data = pattern(100_000, seed=1)
    out = world.work / "real.enc"
    result = run_like_qubes([world.shim, "enc", "-t", "0.1", "-", out], "correct horse", stdin_data=data)
    # exactly one prompt sequence: the real scrypt got the passphrase without prompting again
    assert (result.returncode, result.stderr) == (0, b"")
    assert out.read_bytes().startswith(b"scrypt")
    back = world.work / "real.out"
    result = run_like_qubes([REAL_SCRYPT, "dec", "-f", out, back], "correct horse")
    assert result.returncode == 0 and back.read_bytes() == data
    assert world.records() == []  # nothing recorded for non-qtb runs


def test_non_qtb_without_tty_hands_over_the_rest_of_stdin(world: ShimWorld) -> None:
    """No tty, data on stdin after the two passphrase lines: the real scrypt must get exactly the data."""
    out = world.work / "real.enc"
    result = run_without_tty([world.shim, "enc", "-t", "0.1", "-", out], b"pw\npw\nDATA\nmore")
    assert (result.returncode, result.stderr) == (0, b"")
    back = run_without_tty([REAL_SCRYPT, "dec", "-P", out], b"pw")
    assert back.stdout == b"DATA\nmore"


def test_non_qtb_header_form_and_wrong_passphrase_pass_through(world: ShimWorld) -> None:
    source = world.work / "backup-header"
    source.write_bytes(b"version=4\n")
    out = world.work / "backup-header.hmac"
    result = run_like_qubes([world.shim, "enc", "-t", "0.1", source, out], "backup-header!userpass")
    assert (result.returncode, result.stderr) == (0, b"")
    wrong = run_like_qubes([world.shim, "dec", "-f", out, world.work / "x"], "backup-header!nope")
    assert (wrong.returncode, wrong.stderr) == (1, b"scrypt: Passphrase is incorrect\n")  # real scrypt's


def test_real_scrypt_file_decrypts_through_shim(world: ShimWorld) -> None:
    data = pattern(70_000, seed=2)
    source = world.work / "in"
    source.write_bytes(data)
    made_by_real = world.work / "old.enc"
    result = run_like_qubes([REAL_SCRYPT, "enc", "-t", "0.1", source, made_by_real], "old passphrase")
    assert result.returncode == 0
    out = world.work / "out"
    result = run_like_qubes([world.shim, "dec", "-f", made_by_real, out], "old passphrase")
    assert (result.returncode, result.stderr) == (0, b"")
    assert out.read_bytes() == data
    # with a qtb-pipe passphrase a real scrypt file is refused: that passphrase never reaches the real scrypt
    out2 = world.work / "out2"
    qtb_try = world.dec(BACKUP_ID, "vm1/private.img.000", made_by_real, out2)
    assert_refused(qtb_try, world, "vm1/private.img.000", "is a real-scrypt file, never part of a qtb", out2)


# A hostile backup qube can serve an scrypt-format "chunk" with huge logN/r/p (Qubes passes -f).
HOSTILE_SCRYPT_FILE = b"scrypt\x00" + bytes([40]) + struct.pack(">II", 8, 32) + b"\x00" * 89


def test_real_scrypt_file_with_qtb_passphrase_never_reaches_the_real_scrypt(world: ShimWorld) -> None:
    fake_shim, log = shim_with_fake_real_scrypt(world)
    hostile = world.work / "vm1_private.img.000.enc"
    hostile.write_bytes(HOSTILE_SCRYPT_FILE)
    path = "vm1/private.img.000"
    out = world.work / "out"
    # the passphrase is read first (Qubes' usual single prompt), then the file is refused
    result = run_like_qubes([fake_shim, "dec", "-f", hostile, out], world.passphrase(BACKUP_ID, path))
    assert_refused(result, world, path, "is a real-scrypt file, never part of a qtb-pipe backup", out)
    assert not log.exists()
    (record,) = world.records()
    assert record["status"] == "failed" and "real-scrypt" in str(record["error"])
    shutil.rmtree(world.run_dir)  # the same without a run directory (emergency restore)
    result = run_like_qubes([fake_shim, "dec", "-f", hostile, out], world.passphrase(BACKUP_ID, path))
    assert_refused(result, world, path, "is a real-scrypt file", out)
    assert not log.exists()

    # an old backup's own passphrase: handed to the real scrypt after the one prompt, as before
    result = run_like_qubes([fake_shim, "dec", "-f", hostile, out], "20261101T010203-1111!vm1/x.000!old")
    assert (result.returncode, result.stderr) == (0, b"")
    logged = log.read_text().splitlines()
    assert logged[:2] == ["dec", "-f"] and logged[2] == "--passphrase"
    assert logged[4:] == ["--", str(hostile), str(out), "20261101T010203-1111!vm1/x.000!old"]


def test_long_non_qtb_passphrase_lines_are_what_the_real_scrypt_makes_of_them(world: ShimWorld) -> None:
    """scrypt reads lines with fgets(2048): a longer line is its first 2047 bytes (the rest is the
    next read). The shim reads them the same way and hands such a passphrase over, not refusing it."""
    long_line = b"x" * 3000
    source = world.work / "in"
    source.write_bytes(b"payload")
    for number, program in enumerate((REAL_SCRYPT, world.shim)):
        out = world.work / f"long-{number}.enc"
        made = run_without_tty([program, "enc", "-P", "-t", "0.1", source, out], long_line + b"\n")
        assert (made.returncode, made.stderr) == (0, b""), program
        back = run_without_tty([REAL_SCRYPT, "dec", "-P", out], long_line[:2047])
        assert back.stdout == b"payload", program


@pytest.mark.parametrize("path_length", [1960, 2100])  # fgets cuts inside / before the qtb1: part
def test_long_qtb_passphrase_line_never_reaches_the_real_scrypt_whole(
    world: ShimWorld, path_length: int
) -> None:
    fake_shim, log = shim_with_fake_real_scrypt(world)
    path = "vm1/" + "p" * (path_length - 8) + ".000"
    passphrase = world.passphrase(BACKUP_ID, path)
    assert len(passphrase) > 2047
    chunk = world.work / "c.enc"
    chunk.write_bytes(seal_chunk(world.secret, path, b"data"))
    out = world.work / "out"
    result = run_like_qubes([fake_shim, "dec", "-f", chunk, out], passphrase)
    assert not out.exists() and world.secret.hex().encode() not in result.stderr
    if log.exists():  # cut before `qtb1:`: the real scrypt got the first 2047 bytes, never the secret
        assert world.secret.hex() not in log.read_text() and path_length == 2100
    else:  # cut inside the qtb-pipe part: refused
        assert result.returncode == 1 and b"well-formed qtb-pipe" in result.stderr


def test_cut_qtb_passphrase_is_refused_never_handed_over(world: ShimWorld) -> None:
    fake_shim, log = shim_with_fake_real_scrypt(world)
    chunk = world.work / "c.enc"
    chunk.write_bytes(b"data")
    cut = world.passphrase(BACKUP_ID, "vm1/private.img.000")[:-20]
    result = run_like_qubes([fake_shim, "dec", chunk, world.work / "out"], cut)
    assert result.returncode == 1 and result.stderr.count(b"\n") == 1 and not log.exists()
    assert cut.encode() not in result.stderr


def test_tty_mismatch_dialogue_matches_real_scrypt(world: ShimWorld) -> None:
    script = [
        (PROMPT_ENTER, b"first\n"),
        (PROMPT_CONFIRM, b"other\n"),
        (b"Passwords mismatch, please try again\n" + PROMPT_ENTER, b"agreed\n"),
        (PROMPT_CONFIRM, b"agreed\n"),
    ]
    for number, program in enumerate((REAL_SCRYPT, world.shim)):
        out = world.work / f"{number}.enc"
        result = converse([program, "enc", "-t", "0.1", "-", out], script, stdin_data=b"x")
        assert (result.returncode, result.stderr) == (0, b""), program
        back = run_like_qubes([REAL_SCRYPT, "dec", out], "agreed")
        assert back.stdout == b"x"


@pytest.mark.parametrize(
    ("args", "stdin"),
    [
        ([], b""),
        (["frobnicate"], b""),
        (["enc"], b""),
        (["enc", "-x", "in"], b""),
        (["enc", "-t"], b""),
        (["enc", "--logN", "10", "in", "out"], b""),
        (["enc", "-P", "-", "out"], b"pw"),
        (["dec", "does-not-exist", "out"], b"pw\n"),
        (["enc", "in", "out", "extra"], b""),
        (["--version"], b""),
        (["enc", "in", "out"], b"only one line\n"),  # no tty: EOF before the confirmation
        (["enc", "in", "out"], b""),  # no tty: EOF at once
        (["dec", "-P", "empty.enc", "out"], b"pw"),  # not an scrypt file, not qtb: real scrypt's message
    ],
)
def test_errors_match_real_scrypt_byte_for_byte(world: ShimWorld, args: list[str], stdin: bytes) -> None:
    (world.work / "in").write_bytes(b"data")
    (world.work / "empty.enc").write_bytes(b"")
    results = []
    for program in (REAL_SCRYPT, world.shim):
        proc = run_without_tty([program, *args], stdin, cwd=world.work)
        results.append((proc.returncode, proc.stdout, proc.stderr))
    assert results[0] == results[1]
    assert results[0][0] != 0 or args == ["--version"]


def test_missing_real_scrypt_at_run_time(world: ShimWorld) -> None:
    broken = world.work / "scrypt-without-real"
    broken.write_bytes(shim_install.render_shim(world.work / "no-such-scrypt", world.state_dir))
    broken.chmod(0o755)
    out = world.work / "out.enc"
    result = run_like_qubes([broken, "enc", "-", out], "not a qtb passphrase", stdin_data=b"secret data")
    assert result.returncode == 1
    assert result.stderr.count(b"\n") == 1 and b"no-such-scrypt is missing" in result.stderr
    assert not out.exists()  # never pass-through
    # qtb-pipe runs do not need the real scrypt
    data_path = "vm2/private.img.000"
    ok = run_like_qubes(
        [broken, "enc", "-", out], world.passphrase(BACKUP_ID, data_path), stdin_data=b"secret data"
    )
    assert ok.returncode == 0 and out.read_bytes() == seal_chunk(world.secret, data_path, b"secret data")
    # a real scrypt file cannot be restored without the real scrypt: refused after the prompt
    real_file = world.work / "real.enc"
    real_file.write_bytes(b"scrypt\x00" + b"\x00" * 200)
    refused = run_like_qubes([broken, "dec", "-f", real_file, world.work / "o"], "pw")
    assert refused.returncode == 1 and refused.stderr.count(b"\n") == 1
    assert b"no-such-scrypt is missing" in refused.stderr


# --- qtb-mode enc failures ---------------------------------------------------------------------------


def test_enc_without_run_directory_fails(world: ShimWorld) -> None:
    world.run_dir.rmdir()
    out = world.work / "c.enc"
    result = run_like_qubes(
        [world.shim, "enc", "-", out], world.passphrase(BACKUP_ID, "vm1/private.img.000"), stdin_data=b"abc"
    )
    assert result.returncode == 1 and b"does not exist" in result.stderr and not out.exists()


def test_enc_header_without_backup_id_records_failure(world: ShimWorld) -> None:
    source = world.work / "backup-header"
    source.write_bytes(b"version=4\n")
    out = world.work / "backup-header.hmac"
    result = run_like_qubes([world.shim, "enc", source, out], world.passphrase(None, "backup-header"))
    assert result.returncode == 1 and not out.exists()
    (record,) = world.records()
    assert record["status"] == "failed" and "backup-id" in str(record["error"])


@pytest.mark.parametrize(
    "prefix", ["not-an-id!vm1/x.000", "20261124T003908-3222!../x.000", "20261124T003908-3222!vm1/x", "other"]
)
def test_malformed_qtb_prefix_is_refused_not_passed_through(world: ShimWorld, prefix: str) -> None:
    fake_shim, log = shim_with_fake_real_scrypt(world)
    out = world.work / "c.enc"
    answer = f"{prefix}!{world.user_passphrase}"
    result = run_like_qubes([fake_shim, "enc", "-", out], answer, stdin_data=b"abc")
    assert result.returncode == 1 and b"not a well-formed qtb-pipe" in result.stderr
    assert not out.exists() and not log.exists()


def test_enc_into_missing_directory_records_failure(world: ShimWorld) -> None:
    out = world.work / "no-such-dir" / "c.enc"
    result = run_like_qubes(
        [world.shim, "enc", "-", out], world.passphrase(BACKUP_ID, "vm1/private.img.000"), stdin_data=b"abc"
    )
    assert result.returncode == 1 and result.stderr.count(b"\n") == 1
    assert b"Cannot open output file" in result.stderr
    (record,) = world.records()
    assert record["status"] == "failed" and record["path"] == "vm1/private.img.000"


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: qubesd runs the shim as root")
def test_records_file_belongs_to_the_run_directory_owner(world: ShimWorld) -> None:
    os.chown(world.run_dir.parent, 4321, 4322)
    os.chown(world.run_dir, 4321, 4322)
    world.enc(BACKUP_ID, "vm1/private.img.000", b"abc")
    info = (world.run_dir / "records.jsonl").stat()
    assert (info.st_uid, info.st_gid, info.st_mode & 0o777) == (4321, 4322, 0o600)


# --- the run directory must be the driver's ---------------------------------------------------------


@pytest.mark.parametrize(
    "spoil",
    [
        lambda run: run.chmod(0o777),  # writable by others
        lambda run: run.parent.chmod(0o777),  # runs/ writable by others
        lambda run: (run.rename(run.with_name("elsewhere")), run.symlink_to(run.with_name("elsewhere"))),
        lambda run: os.chown(run, 4321, 4321) if os.geteuid() == 0 else pytest.skip("needs root"),
        lambda run: (run / "records.jsonl").symlink_to(run.parent / "target"),
        lambda run: (run.parent.rename(run.parent.with_name("moved")), run.parent.symlink_to("moved")),
    ],
    ids=[
        "run-writable",
        "runs-writable",
        "run-symlink",
        "run-other-owner",
        "records-symlink",
        "runs-symlink",
    ],
)
def test_unsafe_run_directory_is_refused(world: ShimWorld, spoil) -> None:
    spoil(world.run_dir)
    out = world.work / "c.enc"
    passphrase = world.passphrase(BACKUP_ID, "vm1/private.img.000")
    result = run_like_qubes([world.shim, "enc", "-", out], passphrase, stdin_data=b"abc")
    assert result.returncode == 1 and result.stderr.count(b"\n") == 1 and not out.exists(), result.stderr
    assert not (world.run_dir.parent / "target").exists()


# --- qtb-mode dec: detection -------------------------------------------------------------------------

PATH = "vm12/private.img.000"


@pytest.fixture
def chunk(world: ShimWorld) -> tuple[Path, bytes]:
    data = pattern(5000, seed=4)
    encrypted = world.enc(BACKUP_ID, PATH, data)
    world.new_run()  # restores run in their own run, with the pass's plan
    write_plan_for(world, BACKUP_ID, {PATH: data})
    return encrypted, data


def edited(world: ShimWorld, source: Path, blob: bytes) -> Path:
    target = world.work / ("edited-" + source.name)
    target.write_bytes(blob)
    return target


def test_flipped_byte(world: ShimWorld, chunk: tuple[Path, bytes]) -> None:
    encrypted, data = chunk
    for position in (0, 4999, 5000 + 30):  # first byte, last data byte, a byte of the tag
        world.new_run()  # a refusal ends a run
        write_plan_for(world, BACKUP_ID, {PATH: data})
        blob = bytearray(encrypted.read_bytes())
        blob[position] ^= 0x40
        out = world.work / "out"
        result = world.dec(BACKUP_ID, PATH, edited(world, encrypted, bytes(blob)), out)
        assert_refused(result, world, PATH, "tampered", out)
    assert world.accepted() == 0


@pytest.mark.parametrize(
    "damage",
    [
        lambda blob: blob[:1000] + blob[-shim.TRAILER_SIZE :],  # trailer kept, data cut short
        lambda blob: blob[:-10],  # trailer cut
        lambda blob: b"",
        lambda blob: blob + b"extra",  # appended
        lambda blob: blob * 2,
    ],
    ids=["data-cut", "trailer-cut", "empty", "appended", "doubled"],
)
def test_truncated_or_appended(world: ShimWorld, chunk: tuple[Path, bytes], damage) -> None:
    encrypted, _ = chunk
    out = world.work / "out"
    result = world.dec(BACKUP_ID, PATH, edited(world, encrypted, damage(encrypted.read_bytes())), out)
    assert_refused(result, world, PATH, "", out)
    assert (
        b"truncated" in result.stderr
        or b"appended" in result.stderr
        or b"no qtb-pipe trailer" in result.stderr
    )


def test_size_is_checked_before_hashing(world: ShimWorld, chunk: tuple[Path, bytes]) -> None:
    encrypted, _ = chunk
    keys = shim.derive_keys(world.secret)
    forged = b"x" * 4000 + shim.make_trailer(keys, 4000, bytes(32))  # self-consistent length, bad tag
    out = world.work / "out"
    result = world.dec(BACKUP_ID, PATH, edited(world, encrypted, forged), out)
    assert_refused(result, world, PATH, "not from this backup (4000 data bytes, the manifest says 5000)", out)


def test_tag_from_another_path(world: ShimWorld, chunk: tuple[Path, bytes]) -> None:
    encrypted, data = chunk
    out = world.work / "out"
    other = "vm13/private.img.000"
    write_plan_for(world, BACKUP_ID, {other: data})  # same size, so only the tag can tell
    assert_refused(world.dec(BACKUP_ID, other, encrypted, out), world, other, "not this file's path", out)


def test_wrong_secret(world: ShimWorld, chunk: tuple[Path, bytes]) -> None:
    encrypted, _ = chunk
    world.secret = bytes(32)
    out = world.work / "out"
    assert_refused(world.dec(BACKUP_ID, PATH, encrypted, out), world, PATH, "wrong key", out)
    shutil.rmtree(world.run_dir)  # emergency restore: the trailer's key check value tells too
    assert_refused(world.dec(BACKUP_ID, PATH, encrypted, out), world, PATH, "wrong key", out)


def test_chunk_from_older_backup_at_same_path(world: ShimWorld, chunk: tuple[Path, bytes]) -> None:
    old_encrypted, _ = chunk  # made by an older backup with the same path
    write_plan_for(world, BACKUP_ID, {PATH: pattern(5000, seed=5)})
    out = world.work / "out"
    result = world.dec(BACKUP_ID, PATH, old_encrypted, out)
    assert_refused(result, world, PATH, "not from this backup", out)
    (record,) = world.records()
    assert record["status"] == "failed" and record["op"] == "dec"


def test_plan_of_another_backup(world: ShimWorld, chunk: tuple[Path, bytes]) -> None:
    encrypted, data = chunk
    write_plan_for(world, OLDER_BACKUP_ID, {PATH: data})
    out = world.work / "out"
    result = world.dec(BACKUP_ID, PATH, encrypted, out)
    assert_refused(result, world, PATH, "not from this backup", out)
    assert OLDER_BACKUP_ID.encode() in result.stderr


def test_chunk_not_in_the_plan(world: ShimWorld, chunk: tuple[Path, bytes]) -> None:
    encrypted, _ = chunk
    write_plan_for(world, BACKUP_ID, {"vm12/private.img.001": b"x"})
    out = world.work / "out"
    assert_refused(
        world.dec(BACKUP_ID, PATH, encrypted, out),
        world,
        PATH,
        "the next chunk of this restore is vm12/private.img.001",
        out,
    )


def test_without_run_directory_checks_tag_and_warns(world: ShimWorld, chunk: tuple[Path, bytes]) -> None:
    """Emergency / paranoid-mode restore: no run directory, the per-chunk tag only, one warning line."""
    encrypted, data = chunk
    shutil.rmtree(world.run_dir)
    out = world.work / "out"
    result = world.dec(BACKUP_ID, PATH, encrypted, out)
    assert result.returncode == 0 and out.read_bytes() == data
    assert result.stderr.count(b"\n") == 1 and b"warning" in result.stderr
    broken = bytearray(encrypted.read_bytes())
    broken[1] ^= 1
    out.unlink()
    refused = world.dec(BACKUP_ID, PATH, edited(world, encrypted, bytes(broken)), out)
    assert refused.returncode == 1 and not out.exists()


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda run_dir: (run_dir / "plan").unlink(), "no usable plan"),
        (lambda run_dir: (run_dir / "plan").write_text("nonsense\n"), "plan is malformed"),
        (lambda run_dir: ((run_dir / "plan").unlink(), (run_dir / "plan").mkdir()), "no usable plan"),
    ],
)
def test_run_directory_without_usable_plan_fails_closed(
    world: ShimWorld, chunk: tuple[Path, bytes], damage, reason: str
) -> None:
    """Only a missing run directory means an emergency restore; a run directory must hold the plan."""
    encrypted, _ = chunk
    damage(world.run_dir)
    out = world.work / "out"
    assert_refused(world.dec(BACKUP_ID, PATH, encrypted, out), world, PATH, reason, out)
    (record,) = world.records()
    assert record["status"] == "failed"


def test_existing_output_is_replaced_only_after_verification(
    world: ShimWorld, chunk: tuple[Path, bytes]
) -> None:
    # scrypt 1.3.1 overwrites an existing output with or without -f; so does the shim, but only when valid.
    encrypted, data = chunk
    out = world.work / "out"
    out.write_bytes(b"previous")
    blob = bytearray(encrypted.read_bytes())
    blob[7] ^= 1
    assert world.dec(BACKUP_ID, PATH, edited(world, encrypted, bytes(blob)), out).returncode == 1
    assert out.read_bytes() == b"previous"
    world.new_run()  # a refusal ends the run: try the genuine file in a new one
    write_plan_for(world, BACKUP_ID, {PATH: data})
    result = run_like_qubes([world.shim, "dec", encrypted, out], world.passphrase(BACKUP_ID, PATH))  # no -f
    assert result.returncode == 0 and out.read_bytes() == data


# --- qtb-mode dec: strict stream order ---------------------------------------------------------------


@pytest.fixture
def backup(world: ShimWorld) -> dict[str, Path]:
    """File vm1/private.img in three chunks, vm3/private.img in two, and the plan of all of them."""
    files = {
        "vm1/private.img.000": pattern(3000, 1),
        "vm1/private.img.001": pattern(3000, 2),
        "vm1/private.img.002": pattern(100, 3),
        "vm3/private.img.000": pattern(10, 4),
        "vm3/private.img.001": pattern(10, 5),
    }
    encrypted = {path: world.enc(BACKUP_ID, path, data) for path, data in files.items()}
    world.new_run()
    write_plan_for(world, BACKUP_ID, files)
    return encrypted


def serve(world: ShimWorld, backup: dict[str, Path], *paths: str) -> list[int]:
    """Exit codes of decrypting these chunks, in this order, as qvm-backup-restore would."""
    codes = []
    for path in paths:
        out = world.work / ("out-" + path.replace("/", "_"))
        out.unlink(missing_ok=True)
        codes.append(world.dec(BACKUP_ID, path, backup[path], out).returncode)
    return codes


A0, A1, A2 = (f"vm1/private.img.00{i}" for i in range(3))
B0, B1 = (f"vm3/private.img.00{i}" for i in range(2))


def test_in_order_restore_is_accepted(world: ShimWorld, backup: dict[str, Path]) -> None:
    assert serve(world, backup, *backup) == [0] * 5
    assert world.accepted() == 5 and world.records() == []


@pytest.mark.parametrize(
    "order",
    [
        [A1],  # a chunk before its predecessor
        [A0, A2],  # a skipped chunk
        [A0, A1, B0],  # a new file before the previous one is complete
        [B0],  # a whole file skipped
        [A0, A0],  # a chunk served again
        [A0, A1, A2, B0, A0, B1],  # an accepted chunk of another file served again in the middle (issue 13)
        [A0, A1, A2, B0, B1, B1],  # anything after the plan's end
        [A1, A0, A1, A2, B0, B1],  # after a refusal, nothing more, even in order
    ],
)
def test_any_other_order_is_refused_at_the_first_deviation(
    world: ShimWorld, backup: dict[str, Path], order
) -> None:
    plan = list(backup)
    deviation = next(i for i, path in enumerate(order) if i >= len(plan) or path != plan[i])
    assert serve(world, backup, *order) == [0] * deviation + [1] * (len(order) - deviation)
    assert "out of order" in world.records()[0]["error"]
    assert world.accepted() == deviation


def test_the_plan_names_what_this_pass_restores(world: ShimWorld, backup: dict[str, Path]) -> None:
    files = {path: backup[path].read_bytes()[: -shim.TRAILER_SIZE] for path in (B0, B1)}
    write_plan_for(world, BACKUP_ID, files)  # a restore of vm3 only
    assert serve(world, backup, B0, B1) == [0, 0]
    assert serve(world, backup, A0) == [1]  # not in this pass


def test_full_restore_sequence_like_qubes(world: ShimWorld) -> None:
    """Header (file to file), qubes.xml, then a VM's chunks: the order qvm-backup-restore uses."""
    header = f"version=4\nencrypted=True\ncompressed=False\nbackup-id={BACKUP_ID}\n".encode()
    plain = world.work / "backup-header"
    plain.write_bytes(header)
    hmac_file = world.work / "backup-header.hmac"
    made = run_like_qubes([world.shim, "enc", plain, hmac_file], world.passphrase(None, "backup-header"))
    assert made.returncode == 0
    chunks = {"qubes.xml.000": pattern(900, 1), "vm1/private.img.000": pattern(4000, 2)}
    files = {path: world.enc(BACKUP_ID, path, data) for path, data in chunks.items()}
    assert [r["path"] for r in world.start_restore(BACKUP_ID)] == ["backup-header", *chunks]

    header_out = world.work / "backup-header.dec"
    assert world.dec(None, "backup-header", hmac_file, header_out).returncode == 0
    assert header_out.read_bytes() == header
    for path, data in chunks.items():
        out = world.work / (path.replace("/", "_") + ".out")
        result = world.dec(BACKUP_ID, path, files[path], out)
        assert (result.returncode, result.stderr) == (0, b"")
        assert out.read_bytes() == data
    assert world.accepted() == 3
