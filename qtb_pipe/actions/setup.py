"""`qtb-pipe init` and `qtb-pipe config check`."""

from __future__ import annotations

import os

from .. import qubes, shim_install
from ..config import (
    Config,
    config_path,
    format_recovery_key,
    generate_secret,
    load_config,
    parse_recovery_key,
    root,
    secret_path,
    write_private,
)
from ..errors import EXIT_CONFIG, QtbError
from .backup import select_qubes

RECOVERY_TEXT = """\
Recovery key (shown once; keep it offline, e.g. on paper or in a password manager):

    {key}

Without it, no qtb-pipe backup can be restored on a new system: dom0 rejects data it cannot
authenticate. To restore after reinstalling: qtb-pipe init --recovery-key 'THE KEY'."""


def run_init(backup_qube: str, engine: str, force: bool, recovery_key: str | None) -> dict:
    cfg = Config(backup_qube=backup_qube, engine=engine)
    cfg.validate()
    if secret_path().exists() and not force:
        raise QtbError(
            f"a backup secret already exists at {secret_path()}: keep it, or use --force to replace it "
            "(backups made with the old one then need its recovery key)",
            EXIT_CONFIG,
        )
    secret = parse_recovery_key(recovery_key) if recovery_key else generate_secret()
    write_private(secret_path(), (secret + "\n").encode())
    if not config_path().exists() or force:
        write_private(config_path(), cfg.to_toml().encode(), 0o644)
    uid = os.environ.get("SUDO_UID")
    if uid and os.geteuid() == 0:  # `sudo qtb-pipe init`: the user who runs backups owns the secret
        os.chown(secret_path(), int(uid), -1)
    return {
        "config": str(config_path()),
        "secret": str(secret_path()),
        "recovery_key": None if recovery_key else format_recovery_key(secret),
    }


def run_config_check() -> dict:
    cfg = load_config()
    all_qubes = qubes.list_qubes()
    warnings: list[str] = []
    for name in sorted(set(cfg.include) & set(cfg.exclude)):
        warnings.append(f"{name} is in both include and exclude: it is excluded")
    for name in sorted(set(cfg.include + cfg.exclude) - set(all_qubes)):
        warnings.append(f"{name} is in the config but no such qube exists")
    if cfg.backup_qube not in all_qubes:
        warnings.append(f"backup qube {cfg.backup_qube} does not exist")
    if cfg.backup_qube in cfg.include:
        warnings.append(f"the backup qube {cfg.backup_qube} is in include: it is never backed up into itself")
    cleaned = Config(
        **{
            **cfg.__dict__,
            "include": [n for n in cfg.include if n in all_qubes],
            "exclude": [n for n in cfg.exclude if n in all_qubes],
        }
    )
    selection = select_qubes(cleaned, all_qubes, [], [])
    for name in selection.included:
        if all_qubes[name].running and name != "dom0":
            warnings.append(
                f"{name} is running: its volumes are saved as of its last start (shut it down first "
                "for its current state)"
            )
    status = shim_install.shim_status(root())
    if not status.qubesd_uses_shim:
        warnings.append(
            "the scrypt shim is not active: " + ("; ".join(status.problems) or "run qtb-pipe install-shim")
        )
    elif status.outdated:
        warnings.append("the installed shim is older than this qtb-pipe: run qtb-pipe install-shim")
    # qtb-pipe always runs qvm-backup --no-compress; a saved profile with compression is not used
    return {
        "backup_qube": cfg.backup_qube,
        "engine": cfg.engine,
        "included": selection.included,
        "left_out": selection.left_out,
        "warnings": warnings,
    }


def print_init(result: dict) -> None:
    print(f"wrote {result['config']} and {result['secret']} (mode 0600)")
    if result["recovery_key"]:
        print(RECOVERY_TEXT.format(key=result["recovery_key"]))


def print_config_check(result: dict) -> None:
    print(f"backup qube: {result['backup_qube']}   engine: {result['engine']}")
    print("will be backed up: " + (", ".join(result["included"]) or "(nothing)"))
    for name, why in result["left_out"].items():
        print(f"  left out: {name:<20} {why}")
    for w in result["warnings"]:
        print(f"warning: {w}")
    if not result["warnings"]:
        print("no problems found")
