"""The shim inside the emulated Qubes: stock qvm-backup / qvm-backup-restore, no engine involved."""

from __future__ import annotations

import secrets
import subprocess
from pathlib import Path

from simtools import Sim
from test_qubes_sim import BACKED_UP, backup_to_dir, members, restore

from qtb_pipe import runs


def qtb_passphrase(world: Sim, tmp_path: Path, secret: bytes, run_dir: bool = True) -> Path:
    """What the driver does before a run: a run directory and the qtb passphrase."""
    token = secrets.token_hex(16)
    if run_dir:
        (world.dom0 / "var/lib/qtb-pipe/runs" / token).mkdir(parents=True)
    path = tmp_path / f"pp-{token}"
    path.write_text(runs.make_user_passphrase(token, secret) + "\n")
    return path


def test_shim_round_trip_byte_exact_and_gui_backup_still_encrypted(
    world: Sim, fresh_world: Sim, tmp_path: Path
):
    world.run("qtb-pipe", "install-shim", check=True)
    secret = secrets.token_bytes(32)
    qtb_pp = qtb_passphrase(world, tmp_path, secret)
    stream = backup_to_dir(world, qtb_pp, "--no-compress")
    # pass-through: the header chunk is the plaintext header plus the trailer
    hmac_member = subprocess.run(
        ["tar", "-i", "-xO", "-f", str(stream), "backup-header.hmac"], capture_output=True, check=True
    ).stdout
    assert hmac_member.startswith(b"version=4\n") and hmac_member[-56:-48] == b"QTBPIPE1"
    fresh_world.run("qtb-pipe", "install-shim", check=True)
    # no run directory (an emergency restore): per-chunk tags only, with a warning
    restore_pp = qtb_passphrase(fresh_world, tmp_path, secret, run_dir=False)
    proc = restore(fresh_world, restore_pp, stream, "--ignore-size-limit", "--ignore-missing")
    assert proc.returncode == 0, proc.stderr.decode()
    assert fresh_world.digest(*BACKED_UP, restored_home=True) == world.digest(*BACKED_UP)

    # "from the GUI": an ordinary passphrase goes to the real scrypt, output really encrypted
    gui_pp = tmp_path / "gui"
    gui_pp.write_text("an ordinary passphrase\n")
    gui_stream = backup_to_dir(world, gui_pp)
    listing = members(gui_stream, "-i")
    for name in listing[1:]:
        data = subprocess.run(
            ["tar", "-i", "-xO", "-f", str(gui_stream), name], capture_output=True, check=True
        ).stdout
        assert data[:6] == b"scrypt", name
    # ... and it restores through the shim (dec of real-scrypt files goes to the real scrypt)
    proc = restore(world, gui_pp, gui_stream, "--verify-only")
    assert proc.returncode == 0, proc.stderr.decode()
