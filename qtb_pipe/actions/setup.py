"""`qtb-pipe init` and `qtb-pipe config check`."""

from __future__ import annotations

import dataclasses
import datetime
import os
import shlex
from pathlib import Path

from .. import config, qubes, shim_install
from ..adapter import Adapter
from ..config import Config, config_path, load_config, load_secret, root, secret_path, write_private
from ..errors import EXIT_CONFIG, EXIT_QUBE, EXIT_VERIFY, QtbError
from ..ui import warn
from .backup import plan_backup, planned, print_qubes, select_qubes
from .restore import fetch_manifest

RECOVERY_TEXT = """\
Recovery key (shown once; keep it offline, e.g. on paper or in a password manager):

    {key}

Without it, no qtb-pipe backup can be restored on a new system: dom0 rejects data it cannot
authenticate. To restore after reinstalling: qtb-pipe init --recovery-key 'THE KEY'.
Write the whole recovery sheet (this key, the repository, its engine password): qtb-pipe recovery-kit"""

SHEET = """\
qtb-pipe recovery sheet, written {date}. Keep it offline: with it, anyone can read every backup.

Recovery key (dom0's backup secret):
    {key}

Repository: {engine} {engine_version}, in the backup qube '{backup_qube}':
    {repository}
Engine password:
    {password}
{borg_key}
To restore on a new system:
 1. Create the backup qube '{backup_qube}' and install qtb-adapter in it (README). In it:
      mkdir -p ~/.config/qtb-pipe && printf '%s\\n' {password_q} > {password_file}
      chmod 600 {password_file}
      qtb-adapter init --engine {engine} --repo {repository_q} --password-file {password_file}
 2. In dom0, after installing qtb-pipe:
      qtb-pipe init --backup-qube {backup_qube} --engine {engine} --recovery-key {key}
      qtb-pipe install-shim
 3. qtb-pipe restore --all --new-system
    Before reading any data it names what stands in the way: qubes of the same name on the new
    system (add --skip-conflicting or --rename-conflicting), a template or net qube that was not
    backed up (add --ignore-missing).
"""


def run_init(backup_qube: str | None, engine: str | None, force: bool, recovery_key: str | None) -> dict:
    """The first run writes the secret and the config. Run again without --force, it changes the
    backup qube or engine given and keeps the secret and every other setting."""
    cfg = load_config() if config_path().exists() and not force else Config()
    cfg.backup_qube, cfg.engine = backup_qube or cfg.backup_qube, engine or cfg.engine
    cfg.validate()
    if cfg.backup_qube not in qubes.list_qubes():
        raise QtbError(
            f"there is no qube named {cfg.backup_qube!r} (qvm-ls lists them): create it first", EXIT_QUBE
        )
    keep_secret = secret_path().exists() and not force
    if keep_secret and recovery_key:
        raise QtbError(
            f"a backup secret already exists at {secret_path()}: add --force to replace it with the "
            "recovery key's (backups made with the old one then need the old key)",
            EXIT_CONFIG,
        )
    try:  # the README sets up the backup qube first; a dom0 set up first is told, not refused
        adapter, warnings = Adapter(cfg.backup_qube, cfg.engine, cfg.adapter_command).version(), []
    except QtbError as e:
        adapter, warnings = None, [f"{e}: set qtb-adapter up there (README, step 1) before the first backup"]
    secret, checked = "", None
    if not keep_secret:
        secret = config.parse_recovery_key(recovery_key) if recovery_key else config.generate_secret()
        checked = key_opens_newest(cfg, secret) if recovery_key else None
        write_private(secret_path(), (secret + "\n").encode())
    write_private(config_path(), cfg.to_toml().encode(), 0o644)
    config.state_dir().mkdir(mode=0o700, parents=True, exist_ok=True)  # the records and run directories
    uid = os.environ.get("SUDO_UID")
    if uid and os.geteuid() == 0:  # `sudo qtb-pipe init`: the user who runs backups owns both
        for owned in (secret_path(), config.state_dir()):
            os.chown(owned, int(uid), -1)
    return {
        "config": str(config_path()),
        "secret": str(secret_path()),
        "secret_kept": keep_secret,
        "recovery_key": None if recovery_key or keep_secret else config.format_recovery_key(secret),
        "key_checked_against": checked,
        "adapter": adapter,
        "warnings": warnings,
    }


def key_opens_newest(cfg: Config, secret: str) -> str | None:
    """A recovery key must open the newest manifest in the repository, when there is one to fetch:
    returns that snapshot, None when nothing could be fetched (a repository not set up yet)."""
    adapter = Adapter(cfg.backup_qube, cfg.engine, cfg.adapter_command)
    try:
        newest = max(adapter.complete(), key=lambda s: s.time).snapshot
        fetch_manifest(adapter, newest, secret, True, True)  # and against dom0's record, if it has one
    except ValueError:  # no complete snapshot
        return None
    except QtbError as e:
        if e.code != EXIT_VERIFY:  # the backup qube did not answer: nothing to check against
            return None
        raise QtbError(
            f"the recovery key does not open snapshot {newest}, the newest in the {cfg.engine} "
            f"repository ({e}): another system's key, or the manifest was tampered with; nothing written",
            EXIT_VERIFY,
        ) from None
    return newest


def run_recovery_kit(cfg: Config, output: str | None) -> dict:
    """The recovery sheet: dom0's key and what the backup qube needs (qtb-adapter recovery-info)."""
    found = Adapter(cfg.backup_qube, cfg.engine, cfg.adapter_command).recovery_info()
    key = config.format_recovery_key(load_secret())
    password_file = f"~/.config/qtb-pipe/{cfg.engine}.password"
    borg_key = f"Borg key (borg key import --paper):\n{found['key_export']}\n" if found["key_export"] else ""
    sheet = SHEET.format(
        date=datetime.datetime.now(datetime.UTC).isoformat(timespec="minutes"),
        **found,
        key=key,
        engine=cfg.engine,
        backup_qube=cfg.backup_qube,
        borg_key=borg_key,
        password_q=shlex.quote(found["password"] or ""),
        repository_q=shlex.quote(found["repository"] or ""),
        password_file=password_file,
    )
    if output:
        write_private(Path(output), sheet.encode())
    return {"recovery_key": key, "engine": cfg.engine, "backup_qube": cfg.backup_qube, **found,
            "written_to": output, "sheet": sheet}  # fmt: skip


def print_recovery_kit(result: dict) -> None:
    written = result["written_to"]
    print(f"wrote the recovery sheet to {written} (mode 0600)" if written else result["sheet"])


def run_config_check() -> dict:
    cfg = load_config()
    all_qubes = qubes.list_qubes()
    warnings: list[str] = []
    errors: list[str] = []  # what makes `qtb-pipe backup` refuse to run
    for name in sorted(set(cfg.include) & set(cfg.exclude)):
        warnings.append(f"{name} is in both include and exclude: it is excluded")
    for name in sorted(set(cfg.include + cfg.exclude) - set(all_qubes)):
        errors.append(f"{name} is in the config but no such qube exists")
    if cfg.backup_qube not in all_qubes:
        errors.append(f"backup qube {cfg.backup_qube} does not exist")
    if cfg.backup_qube in cfg.include:
        warnings.append(f"the backup qube {cfg.backup_qube} is in include: it is never backed up into itself")
    # the errors above name the unknown qubes; the selection is shown without them
    cleaned = dataclasses.replace(cfg, include=[n for n in cfg.include if n in all_qubes])
    cleaned.exclude = [n for n in cfg.exclude if n in all_qubes]
    selection = select_qubes(cleaned, all_qubes, [], [])
    for name in selection.included:
        if all_qubes[name].running and name != "dom0":
            warnings.append(
                f"{name} is running: its volumes are saved as of its last start (shut it down first "
                "for its current state)"
            )
    status = shim_install.shim_status(root())
    if not status["active"]:
        errors.append("the scrypt shim: " + ("; ".join(status["problems"]) or "run qtb-pipe install-shim"))
    elif not status["up_to_date"]:
        warnings.append("the scrypt shim is not this version's: run qtb-pipe install-shim")
    # qtb-pipe always runs qvm-backup --no-compress; a saved profile with compression is not used
    return {
        "backup_qube": cfg.backup_qube,
        "engine": cfg.engine,
        "included": selection.included,
        "left_out": selection.left_out,
        "qubes": planned(plan_backup(cfg.engine, selection.included, full=False)),
        "errors": errors,
        "warnings": warnings,
    }


def print_init(result: dict) -> None:
    for warning in result["warnings"]:
        warn(warning)
    if found := result["adapter"]:
        print(f"backup qube '{found['qube']}' answers: qtb-adapter {found['adapter_version']}, "
              f"{found['engine']} {found['engine_version']}")  # fmt: skip
    if result["secret_kept"]:
        print(f"wrote {result['config']}; kept the backup secret {result['secret']}")
    else:
        print(f"wrote {result['config']} and {result['secret']} (mode 0600)")
    if result["recovery_key"]:
        print(RECOVERY_TEXT.format(key=result["recovery_key"]))
    if result["key_checked_against"]:
        print(
            f"the recovery key opens {result['key_checked_against']}, the newest snapshot in the repository"
        )
    elif not result["secret_kept"] and not result["recovery_key"]:
        print("the recovery key was not checked: no snapshot to check it on (is the backup qube running?)")


def print_config_check(result: dict) -> None:
    print(f"backup qube: {result['backup_qube']}   engine: {result['engine']}")
    print_qubes(result["qubes"])
    if not result["qubes"]:
        print("  nothing would be backed up")
    for name, why in result["left_out"].items():
        print(f"  left out: {name:<20} {why}")
    for w in result["warnings"]:
        print(f"warning: {w}")
    for e in result["errors"]:
        print(f"error: {e}")
    if not result["warnings"] and not result["errors"]:
        print("no problems found")
