"""The emulated Qubes (qubes_sim) against the facts file, with the real scrypt and GNU tar."""

from __future__ import annotations

import errno
import io
import os
import re
import shutil
import subprocess
import tarfile
from pathlib import Path

import attacker
import pytest
from simtools import Sim, make_world

from qubes_sim import qrexec

BACKED_UP = ("debian-12", "work", "personal", "vault", "dom0")


def backup_to_dir(
    world: Sim, passphrase_file: Path, *extra: str, vms: tuple[str, ...] = (), env: dict | None = None
) -> Path:
    target = world.qube_home("backup") / "backups"
    target.mkdir(exist_ok=True)
    before = set(target.iterdir())
    world.run(
        "qvm-backup",
        "-y",
        "-p",
        str(passphrase_file),
        *extra,
        "-d",
        "backup",
        str(target),
        *vms,
        env=env,
        check=True,
    )
    (new,) = set(target.iterdir()) - before
    return new


def restore(
    world: Sim,
    passphrase_file: Path,
    location: Path | str,
    *extra: str,
    vms: tuple[str, ...] = (),
    env: dict | None = None,
):
    argv = ["qvm-backup-restore", "-p", str(passphrase_file), *extra, "-d", "backup", str(location), *vms]
    return world.run(*argv, env=env)


def members(stream: Path, *flags: str) -> list[str]:
    out = subprocess.run(["tar", *flags, "-t", "-f", str(stream)], capture_output=True, check=True)
    return out.stdout.decode().split()


def test_stock_round_trip_with_real_scrypt(world: Sim, fresh_world: Sim, passphrase_file: Path):
    stream = backup_to_dir(world, passphrase_file)
    proc = restore(fresh_world, passphrase_file, stream)
    assert proc.returncode == 1 and b"NetVMs are missing" in proc.stderr  # sys-net is not in the backup
    proc = restore(fresh_world, passphrase_file, stream, "--ignore-missing")
    assert proc.returncode == 0, proc.stderr.decode()
    assert fresh_world.digest(*BACKED_UP, restored_home=True) == world.digest(*BACKED_UP)
    # where real Qubes leaves dom0's home (facts: ~/home-restore-<date>/dom0-home/<user>/), looked at
    # directly, not through the sim's own digest
    (user,) = [d.name for d in (world.dom0 / "home").iterdir()]
    (restored,) = (fresh_world.dom0 / "home" / user).glob("home-restore-*/dom0-home/*")
    assert restored.name == user and any(p.is_file() for p in restored.rglob("*"))
    # every chunk really is a scrypt file (magic bytes), not plaintext
    listing = members(stream, "-i")
    assert all(name.endswith(".enc") for name in listing[2:])


def test_a_missing_template_or_net_qube_is_refused_also_verify_only(
    world: Sim, fresh_world: Sim, passphrase_file: Path
):
    """Facts §4 (qvm_backup_restore.py handle_broken, restore.py restore_info_verify): a qube whose
    template (or explicit net qube) is neither on the host nor restored with it is refused, with
    --verify-only too, unless --skip-broken (it is left out) or --ignore-missing."""
    stream = backup_to_dir(world, passphrase_file, vms=("debian-12", "work", "vault"))
    for extra in ((), ("--verify-only",)):
        proc = restore(fresh_world, passphrase_file, stream, *extra, vms=("vault",))
        assert proc.returncode == 1 and b"TemplateVMs are missing" in proc.stderr, (extra, proc.stderr)
        proc = restore(fresh_world, passphrase_file, stream, *extra, vms=("debian-12", "work"))
        assert proc.returncode == 1 and b"NetVMs are missing" in proc.stderr, (extra, proc.stderr)
    proc = restore(fresh_world, passphrase_file, stream, "--skip-broken", vms=("debian-12", "work"))
    assert proc.returncode == 0, proc.stderr.decode()
    restored = fresh_world.digest()["qubes"]
    assert "debian-12" in restored and "work" not in restored  # the broken one left out


def test_stream_layout_matches_qubes_order(world: Sim, passphrase_file: Path):
    stream = backup_to_dir(world, passphrase_file)
    listing = members(stream, "-i")
    assert listing[:3] == ["backup-header", "backup-header.hmac", "qubes.xml.000.enc"]
    # template (qid 1) root+private, AppVMs by qid (sys-net and backup excluded), dom0 home last
    assert listing[-1] == "dom0-home/user.000.enc"
    dirs = [n.split("/")[0] for n in listing[3:]]
    assert dirs == sorted(dirs, key=lambda d: (d == "dom0-home", int(d[2:]) if d.startswith("vm") else 0))
    assert "vm1/root.img.000.enc" in listing and "vm1/private.img.000.enc" in listing
    assert not any(n.startswith(("vm2/", "vm6/")) for n in listing)  # sys-net, backup: not included
    # files are complete, in chunk order, before the next file
    chunks = [n for n in listing if n.startswith("vm1/root.img.")]
    assert chunks == [f"vm1/root.img.{i:03d}.enc" for i in range(len(chunks))] and len(chunks) >= 2
    # one independent archive per file: plain tar stops after the first
    assert members(stream) == ["backup-header"]


def test_wrong_passphrase_fails_like_qubes(world: Sim, passphrase_file: Path, tmp_path: Path):
    stream = backup_to_dir(world, passphrase_file)
    wrong = tmp_path / "wrong"
    wrong.write_text("not the passphrase\n")
    proc = restore(world, wrong, stream, "--verify-only")
    assert proc.returncode != 0
    assert b"Corrupted backup header (hmac verification failed). Is the password correct?" in proc.stderr


def test_flipped_byte_fails_to_decrypt(world: Sim, passphrase_file: Path):
    stream = backup_to_dir(world, passphrase_file, "--no-compress")
    data = bytearray(stream.read_bytes())
    at = data.find(b"vm3/private.img.000.enc")
    assert at > 0
    data[at + 4096] ^= 0x01  # inside that member's data (past its pax and ustar headers)
    stream.write_bytes(bytes(data))
    proc = restore(world, passphrase_file, stream, "--verify-only", "--ignore-size-limit")
    assert proc.returncode != 0
    assert b"failed to decrypt" in proc.stderr and b"vm3/private.img.000.enc" in proc.stderr


def test_data_failures_are_logged_and_exit_0_unless_verify_only(world: Sim, passphrase_file: Path):
    """As qubesadmin's restore: a chunk that does not decrypt, or a chunk out of order, is logged and
    the tool exits 0 (only --verify-only exits 1); the qube is created, its volume never imported."""
    stream = backup_to_dir(world, passphrase_file, "--no-compress")
    items = attacker.members(stream.read_bytes())
    names = [info.name for info, _ in items]
    # a genuine chunk of another file between two chunks of the template's root volume
    at = names.index("vm1/root.img.001.enc")
    foreign = names.index("vm3/private.img.000.enc")
    reordered = [*items[:at], items[foreign], *[x for i, x in enumerate(items[at:], at) if i != foreign]]
    stream.write_bytes(attacker.serialise(reordered))
    args = ("--ignore-size-limit", "--rename-conflicting")
    proc = restore(world, passphrase_file, stream, *args, vms=("debian-12", "work"))
    assert proc.returncode == 0, proc.stderr.decode()
    text = proc.stderr.decode()
    # the root volume's inner tar is closed at the foreign .000 (cut short), its next chunk unexpected
    assert re.search(
        r"qubesadmin\.backup\.extract: ERROR: unable to extract files for \S+/vm1/root\.img\.000", text
    )
    assert re.search(
        r"qubesadmin\.backup\.extract: Unexpected file in archive: \S+/vm1/root\.img\.001, expected "
        r"\S+/vm3/private\.img\.001",
        text,
    ), text
    data = bytearray(stream.read_bytes())
    at = data.find(b"vm1/root.img.000.enc")
    data[at + 4096] ^= 0x01
    stream.write_bytes(bytes(data))
    proc = restore(world, passphrase_file, stream, *args, vms=("debian-12",))
    assert (
        proc.returncode == 0 and b"qubesadmin.backup: Error extracting data: failed to decrypt" in proc.stderr
    )
    proc = restore(world, passphrase_file, stream, *args, "--verify-only", vms=("debian-12",))
    assert proc.returncode == 1 and b"qvm-backup-restore: error: failed to decrypt" in proc.stderr


def test_uncompressed_from_qube_hits_size_limit(tmp_path: Path, fresh_world: Sim, passphrase_file: Path):
    # GNU tar's inner format (file pools): headers and padding make the stream larger than the disk
    # usage that backup-size counts (facts §3). qubes.tarwriter's (LVM thin) is compact instead.
    world = make_world(tmp_path / "file-pool", "--pool", "varlibqubes")
    stream = backup_to_dir(world, passphrase_file, "--no-compress")
    proc = restore(fresh_world, passphrase_file, stream, "--ignore-missing", "--verify-only")
    assert proc.returncode == 1
    assert b"qvm-backup-restore: error: retrieved backup size exceed expected size" in proc.stderr
    # without --verify-only restore_do only logs it, and exits 0 (restore.py ~l.2039-2042)
    proc = restore(fresh_world, passphrase_file, stream, "--ignore-missing")
    assert proc.returncode == 0
    assert (
        b"qubesadmin.backup: Error extracting data: retrieved backup size exceed expected size" in proc.stderr
    )
    # a failed restore leaves created qubes behind (as Qubes does): restore the data into a new world
    again = make_world(fresh_world.root.parent / "fresh2", "--bare")
    proc = restore(again, passphrase_file, stream, "--ignore-size-limit", "--ignore-missing")
    assert proc.returncode == 0, proc.stderr.decode()
    assert again.digest(*BACKED_UP, restored_home=True) == world.digest(*BACKED_UP)


def test_a_restore_makes_its_volumes_in_the_default_pool(tmp_path: Path, world: Sim, passphrase_file: Path):
    """Facts V8: qvm-backup-restore gives no pool, so new volumes go to qubes-prefs'
    default_pool_<volume> (here the pool `init --pool` chose), which `qubes-prefs NAME` prints."""
    stream = backup_to_dir(world, passphrase_file, "--no-compress", vms=("debian-12",))  # root and private
    fresh = make_world(tmp_path / "reflink", "--bare", "--pool", "reflink")
    assert fresh.run("qubes-prefs", "default_pool_private").stdout == b"reflink\n"
    listed = fresh.run("qubes-prefs").stdout.decode().splitlines()
    assert "default_pool_root      D  reflink" in listed and len(listed) == 4
    assert fresh.run("qubes-prefs", "no_such").returncode == 2
    assert world.run("qvm-prefs", "sys-net", "netvm").stdout == b""  # None: no line at all (l.148-149)
    proc = restore(fresh, passphrase_file, stream)
    assert proc.returncode == 0, proc.stderr.decode()
    for volume in ("root", "private"):
        assert fresh.run("qvm-volume", "info", f"debian-12:{volume}", "pool").stdout == b"reflink\n"


def test_location_command_failure_fails_backup_with_its_stderr(world: Sim, passphrase_file: Path):
    script = world.root / "qubes/backup/usr/local/bin/failing-store"
    script.write_text(
        "#!/bin/sh\nhead -c 100000 >/dev/null\necho 'store: repository is locked' >&2\nexit 3\n"
    )
    script.chmod(0o755)
    proc = world.run("qvm-backup", "-y", "-p", str(passphrase_file), "-d", "backup", "failing-store --x")
    assert proc.returncode != 0
    assert b"store: repository is locked" in proc.stderr


def test_location_command_gets_stream_and_its_stdout_is_discarded(world: Sim, passphrase_file: Path):
    out = world.qube_home("backup") / "via-command"
    script = world.root / "qubes/backup/usr/local/bin/keep-stream"
    script.write_text('#!/bin/sh\necho "noise on stdout"\ncat > "$1"\n')
    script.chmod(0o755)
    # quotes and word splitting as in `eval "set -- $LOCATION"`
    proc = world.run(
        "qvm-backup",
        "-y",
        "-p",
        str(passphrase_file),
        "-d",
        "backup",
        f"keep-stream '{out}'",
        check=True,
    )
    assert members(out, "-i")[0] == "backup-header"
    assert b"noise" not in out.read_bytes()[:512]
    # what the service and the command print on stdout, qubesd discards
    assert (
        b"noise" not in proc.stdout + proc.stderr and b"Starting Backupcopy" not in proc.stdout + proc.stderr
    )


def test_a_location_that_is_no_command_fails_with_nothing_to_say(world: Sim, passphrase_file: Path):
    """qubes.Backup prints "Invalid command X" on its stdout (discarded) and exits 1: dom0 sees only
    qubesd's message with an empty detail (docs/qubes-facts.md R6)."""
    proc = world.run("qvm-backup", "-y", "-p", str(passphrase_file), "-d", "backup", "no-such-tool --x")
    assert proc.returncode == 1
    assert proc.stderr.endswith(b"Backup error: Writing backup to VM backup failed: \n"), proc.stderr
    assert b"Invalid command" not in proc.stderr


def test_restore_reruns_command_and_writer_sees_epipe(world: Sim, passphrase_file: Path):
    stream = backup_to_dir(world, passphrase_file)
    log = world.qube_home("backup") / "serve.log"
    script = world.root / "qubes/backup/usr/local/bin/serve"
    script.write_text(f'#!/bin/bash\ncat "$1"\necho "exit=$?" >> {log}\n')
    script.chmod(0o755)
    proc = restore(world, passphrase_file, f"serve {stream}", "--verify-only")
    assert proc.returncode == 0, proc.stderr.decode()
    runs = log.read_text().split()
    assert len(runs) == 3  # header files; qubes.xml; the qubes' data
    assert runs[0] != "exit=0"  # tar2qfile stopped after the header files: the writer got EPIPE


def test_qubesd_resolves_scrypt_in_usr_local_bin_first(world: Sim, passphrase_file: Path):
    calls = world.root / "scrypt-calls"
    wrapper = world.dom0 / "usr/local/bin/scrypt"
    wrapper.write_text(f'#!/bin/sh\necho "$*" >> {calls}\nexec {world.dom0}/usr/bin/scrypt "$@"\n')
    wrapper.chmod(0o755)
    stream = backup_to_dir(world, passphrase_file)
    lines = calls.read_text().splitlines()
    assert lines[0].startswith("enc ") and lines[0].endswith("backup-header.hmac")
    chunk_calls = [ln for ln in lines[1:]]
    assert all(ln.split()[-2] == "-" and ln.split()[-1].endswith(".enc") for ln in chunk_calls)
    calls.write_text("")
    assert restore(world, passphrase_file, stream, "--verify-only").returncode == 0
    assert all(ln.startswith("dec -f ") for ln in calls.read_text().splitlines())


def test_chunk_scrypt_failure_is_ignored_like_qubesd(world: Sim, passphrase_file: Path):
    wrapper = world.dom0 / "usr/local/bin/scrypt"
    # answers the dialogue like scrypt, then fails on one chunk
    wrapper.write_text(
        '#!/bin/bash\ncase "$*" in *vm3/private.img.000.enc)\n'
        "  printf 'Please enter passphrase: ' >&2; read -r p </dev/tty\n"
        "  printf 'Please confirm passphrase: ' >&2; read -r p </dev/tty\n"
        '  head -c 1000 > "${@: -1}"; cat >/dev/null; exit 1;;\nesac\n'
        f'exec {world.dom0}/usr/bin/scrypt "$@"\n'
    )
    wrapper.chmod(0o755)
    # a partial output file and exit 1: qvm-backup still succeeds (a missing file would fail its tar)
    stream = backup_to_dir(world, passphrase_file)
    assert "vm3/private.img.000.enc" in members(stream, "-i")
    assert "exited 1" in (world.dom0 / "var/log/qubes/qubesd.log").read_text()


def test_conflicting_names(world: Sim, passphrase_file: Path):
    stream = backup_to_dir(world, passphrase_file, vms=("work",))
    proc = restore(world, passphrase_file, stream)
    assert proc.returncode == 1 and b"Remove VMs with conflicting names" in proc.stderr
    proc = restore(world, passphrase_file, stream, "--skip-conflicting")
    assert proc.returncode == 0
    assert "work-1" not in world.digest()["qubes"]
    proc = restore(world, passphrase_file, stream, "--rename-conflicting")
    assert proc.returncode == 0, proc.stderr.decode()
    digest = world.digest("work", "work-1")["qubes"]  # qvm-backup-restore's NAME-1
    assert digest["work-1"]["files"] == digest["work"]["files"]


def test_vm_list_exclusions_and_skip_dom0_home(world: Sim, fresh_world: Sim, passphrase_file: Path):
    stream = backup_to_dir(world, passphrase_file)
    proc = restore(
        fresh_world, passphrase_file, stream, "--skip-dom0-home", "-x", "personal", vms=("vault", "debian-12")
    )
    assert proc.returncode == 0, proc.stderr.decode()
    restored = fresh_world.digest()["qubes"]
    assert set(restored) == {"backup", "vault", "debian-12"}
    assert not list(fresh_world.dom0.joinpath("home/user").glob("home-restore-*"))
    proc = restore(fresh_world, passphrase_file, stream, "--skip-conflicting", vms=("vault",))
    assert proc.returncode == 0, proc.stderr.decode()
    # naming qubes does not leave dom0's home out: only --skip-dom0-home does (docs/qubes-facts.md R4)
    assert list(fresh_world.dom0.joinpath("home/user").glob("home-restore-*/dom0-home/user"))


def test_a_dom0_user_name_mismatch_is_refused_unless_ignored_and_verify_only_skips_the_home(
    world: Sim, tmp_path: Path, passphrase_file: Path
):
    """qvm_backup_restore.py handle_broken (~l.197-213, v4.4.0): only a restore of dom0's home is
    refused; --verify-only goes on without the home (not good_to_go, so its data is not read)."""
    stream = backup_to_dir(world, passphrase_file, vms=("vault", "dom0"))
    other = make_world(tmp_path / "alice", "--bare", "--user", "alice")
    proc = restore(other, passphrase_file, stream, vms=("dom0",))
    assert proc.returncode == 1
    # the tools' default verbosity logs "%(name)s: %(message)s", the tool as "app" (docs/qubes-facts.md R3)
    assert proc.stderr.decode().splitlines()[-2:] == [
        "app: *** Dom0 username mismatch! This can break some settings! ***",
        "qvm-backup-restore: error: Skip restoring the dom0 home directory (--skip-dom0-home), or pass "
        "--ignore-username-mismatch to continue anyway.",
    ]
    assert b"username in backup and dom0 mismatch" in proc.stdout
    damaged = tmp_path / "damaged"  # its dom0-home chunk fails where read: here it is not
    shutil.copyfile(stream, damaged)
    with tarfile.open(stream, ignore_zeros=True) as tar:  # one archive per file
        chunk = next(m for m in tar if m.name.startswith("dom0-home/") and m.name.endswith(".enc"))
    with open(damaged, "r+b") as f:
        f.seek(chunk.offset_data + chunk.size // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 1]))
    assert restore(world, passphrase_file, damaged, "--verify-only", vms=("dom0",)).returncode == 1
    proc = restore(other, passphrase_file, damaged, "--verify-only", vms=("dom0",))
    assert proc.returncode == 0, proc.stderr.decode()
    proc = restore(other, passphrase_file, stream, "--ignore-username-mismatch", vms=("dom0",))
    assert proc.returncode == 0, proc.stderr.decode()
    assert b"NOTE: The archived dom0 home directory will be restored to a new directory" in proc.stderr
    assert list(other.dom0.joinpath("home/alice").glob("home-restore-*/dom0-home/user"))


def test_init_is_deterministic_and_mutate_changes_content(tmp_path: Path):
    a = make_world(tmp_path / "a", "--seed", "3")
    b = make_world(tmp_path / "b", "--seed", "3")
    assert a.digest() == b.digest()
    subprocess.run(["qubes-sim", "mutate", str(b.root), "--percent", "2"], check=True, capture_output=True)
    before, after = a.digest(), b.digest()
    for name in ("debian-12", "work"):
        assert before["qubes"][name]["files"]["private.img"] != after["qubes"][name]["files"]["private.img"]
    assert len(after["dom0-home"]) > len(before["dom0-home"])


def test_more_appvms_share_the_same_size(tmp_path: Path):
    """--appvms N (the benchmarks' night on 30 qubes): N more AppVMs like personal, in the same MiB."""
    plain = make_world(tmp_path / "plain", "--size-mib", "16")
    more = make_world(tmp_path / "more", "--size-mib", "16", "--appvms", "3")
    rows = more.run("qvm-ls", "--raw-data", "--fields", "name,class,qid", check=True).stdout.decode().split()
    apps = sorted(r for r in rows if r.startswith("app-"))
    assert apps == ["app-1|AppVM|7", "app-2|AppVM|8", "app-3|AppVM|9"]
    q = more.digest("app-2")["qubes"]["app-2"]
    assert q["template"] == "debian-12" and "private.img" in q["files"]
    assert more.run("qvm-prefs", "app-2", "netvm", check=True).stdout.strip() == b"sys-net"

    def volumes(w: Sim) -> int:
        return sum(f.stat().st_size for f in w.dom0.glob("var/lib/qubes/*/*/*.img"))

    assert abs(volumes(more) - volumes(plain)) < 0.05 * volumes(plain)
    proc = subprocess.run(["qubes-sim", "init", str(tmp_path / "x"), "--appvms", "201"], capture_output=True)
    assert proc.returncode == 2 and b"not a number from 0 to 200: '201'" in proc.stderr


@pytest.mark.slow
def test_default_work_factor_is_qubesd_call(world: Sim, passphrase_file: Path):
    """With no test switch, chunks use scrypt's own default (~5 s, ~GBs per call)."""
    default = {"QUBES_SIM_TEST_SCRYPT_MAXTIME": None, "QUBES_SIM_TEST_CHUNK_SIZE": None}
    fast = backup_to_dir(world, passphrase_file, vms=("vault",))
    slow = backup_to_dir(world, passphrase_file, vms=("vault",), env=default)

    def log_n(stream: Path) -> int:
        data = subprocess.run(
            ["tar", "-i", "-xO", "-f", str(stream), "vm5/notes.txt.000.enc"], capture_output=True, check=True
        ).stdout
        assert data[:6] == b"scrypt"
        return data[7]

    assert log_n(slow) >= log_n(fast) + 4  # 16x the work (or more) of the -t 0.1 test setting
    proc = restore(world, passphrase_file, slow, "--verify-only", env=default)
    assert proc.returncode == 0, proc.stderr.decode()


def test_qubes_xml_over_the_cap_from_a_qube_is_an_unexpected_empty_file_list(
    world: Sim, passphrase_file: Path
):
    """docs/qubes-facts.md R8: no "too large" message, the header retrieval just gets no file."""
    from qubes_sim.world import World

    sim = World(world.root)
    host = sim.load_qubes()
    host["vault"].features["big-note"] = "x" * (1100 * 1024)
    sim.save_qubes(host)
    stream = backup_to_dir(world, passphrase_file, "--no-compress", vms=("vault",))
    proc = restore(world, passphrase_file, stream, "--verify-only", "--ignore-size-limit")
    assert proc.returncode == 1
    assert proc.stderr.decode().endswith(
        "qvm-backup-restore: error: unexpected files in archive: got [], expected ['qubes.xml.000.enc']\n"
    ), proc.stderr


def test_the_unpacker_never_overwrites_a_file_and_exits_with_its_errno(tmp_path: Path):
    """qrexec-lib/unpack.c opens O_EXCL and exits with errno: a name served twice before its first
    copy was removed is EEXIST (17), not a second file and not a silent end."""
    stream = io.BytesIO()
    for _ in range(2):
        qrexec.write_frame(stream, b"vm1/root.img.000.enc", 3)
        stream.write(b"abc")
    stream.seek(0)
    got: list[str] = []
    with pytest.raises(qrexec.UnpackError) as failed:
        qrexec.unpack_qfile(stream, tmp_path, 0, 0, got.append)
    assert failed.value.code == errno.EEXIST and got == ["vm1/root.img.000.enc"]
    assert (tmp_path / "vm1/root.img.000.enc").read_bytes() == b"abc"
