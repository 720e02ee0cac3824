"""`qtb-pipe restore` and `qtb-pipe verify`: the sealed manifest is fetched and verified first, then
the stock qvm-backup-restore reads the stream from the adapter and the shim checks every chunk
against the manifest before any plaintext reaches dom0's parsers."""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

from scrypt_shim import shim

from .. import qubes, shim_install
from ..adapter import Adapter, check_snapshot_id
from ..config import Config, load_records, load_secret, root, write_private
from ..errors import EXIT_FAILED, EXIT_SHIM, EXIT_USAGE, EXIT_VERIFY, QtbError
from ..runs import Run
from ..ui import human_bytes, info


def resolve_snapshot_id(engine: str, snapshot_id: str) -> str:
    """A unique prefix (8+ characters) of a snapshot dom0 recorded stands for its full id, as in
    restic; anything else is passed on as given (the adapter resolves prefixes in its repository)."""
    ids = [sid for eng, sid in load_records() if eng == engine]
    if len(snapshot_id) < 8 or snapshot_id in ids:
        return snapshot_id
    matches = [sid for sid in ids if sid.startswith(snapshot_id)]
    return matches[0] if len(matches) == 1 else snapshot_id


def fetch_manifest(
    adapter: Adapter, snapshot_id: str, secret: str, quiet: bool, new_system: bool
) -> tuple[bytes, dict]:
    """The snapshot's sealed manifest, verified with the secret and against dom0's record."""
    sealed = adapter.manifest(snapshot_id)  # one repository open: the adapter refuses unknown/pending
    try:
        manifest = shim.verify_manifest(bytes.fromhex(secret), sealed)
    except shim.ManifestError as e:
        raise QtbError(f"snapshot {snapshot_id}: manifest rejected: {e}", EXIT_VERIFY) from None
    record = load_records().get((adapter.engine, snapshot_id))
    if record is None:
        # Without dom0's record, any genuine manifest (an older backup too) would verify: make it explicit.
        if not new_system:
            raise QtbError(
                f"dom0 has no record of snapshot {snapshot_id}: if this is a new system restoring with "
                "the recovery key, add --new-system (then check the backup date it shows)",
                EXIT_VERIFY,
            )
        info(
            f"note: dom0 has no record of snapshot {snapshot_id} (--new-system): it is backup "
            f"{manifest['backup_id']} of {manifest.get('created', '?')}, authenticated by its manifest",
            quiet,
        )
    elif (
        hashlib.sha256(sealed).hexdigest() != record.manifest_sha256
        or manifest["backup_id"] != record.backup_id
    ):
        raise QtbError(
            f"snapshot {snapshot_id}: the backup qube served a manifest that is not the one dom0 "
            "committed (another or an older backup); nothing was restored",
            EXIT_VERIFY,
        )
    return sealed, manifest


def _shim_failure(run: Run) -> str | None:
    failed = [r for r in run.records() if r.op == "dec" and r.status != "ok"]
    return f"{failed[0].path}: {failed[0].error[:300]}" if failed else None


def _restore_pass(
    cfg: Config,
    location: str,
    secret: str,
    sealed: bytes,
    manifest: dict,
    names: list[str],
    prefixes: list[str],
    options: list[str],
    as_json: bool,
) -> set[str]:
    """One stock qvm-backup-restore run with its own run directory; returns the accepted chunks.
    The shim gets the manifest and the stream prefixes this pass must see, in full and in order."""
    run = Run()
    passphrase_file = run.create(secret)
    write_private(run.dir / "manifest.json", sealed)
    write_private(run.dir / "selection.json", json.dumps({"prefixes": prefixes}).encode())
    try:
        res = qubes.qvm_backup_restore(cfg.backup_qube, location, str(passphrase_file), options, names)
        if not as_json and res.stdout:
            sys.stdout.write(qubes.printable(res.stdout.decode(errors="replace"), 100_000))
        failure = _shim_failure(run)
        if failure:
            raise QtbError(f"refused: {failure}; nothing unverified was restored", EXIT_VERIFY)
        if res.code != 0:
            raise QtbError(
                f"qvm-backup-restore failed: {qubes.one_line(res.stderr, 'no message')}", EXIT_FAILED
            )
        accepted = {r.path for r in run.records() if r.op == "dec" and r.status == "ok"}
        missing = [
            c["path"]
            for c in manifest["chunks"]
            if c["path"].startswith(tuple(prefixes)) and c["path"] not in accepted
        ]
        if missing:
            # Only the tail of the last file can get here (the shim refuses any earlier gap).
            raise QtbError(
                f"the backup qube did not serve {len(missing)} chunk(s) of the snapshot "
                f"(first: {missing[0]}): that qube is incomplete; remove it and restore again",
                EXIT_VERIFY,
            )
        return accepted
    finally:
        run.remove()


def run_restore(
    cfg: Config,
    snapshot_id: str,
    names: list[str],
    options: list[str],
    verify_only: bool,
    as_json: bool,
    single_pass: bool = False,
    new_system: bool = False,
) -> dict:
    check_snapshot_id(snapshot_id)
    secret = load_secret()
    status = shim_install.shim_status(root())
    on_path = shutil.which("scrypt")
    if not status.installed or on_path is None or Path(on_path).resolve() != status.shim_path.resolve():
        raise QtbError(
            f"qvm-backup-restore would run {on_path or 'no scrypt'}, not the qtb-pipe shim at "
            f"{status.shim_path} (run: qtb-pipe install-shim; check PATH)",
            EXIT_SHIM,
        )
    adapter = Adapter(cfg.backup_qube, cfg.engine, cfg.adapter_command)
    snapshot_id = resolve_snapshot_id(cfg.engine, snapshot_id)
    sealed, manifest = fetch_manifest(adapter, snapshot_id, secret, as_json, new_system)
    paths: dict[str, str] = manifest.get("paths") or {}
    unknown = [n for n in names if n not in manifest.get("qubes", [])]
    if unknown:
        raise QtbError(
            f"not in snapshot {snapshot_id}: {', '.join(unknown)} "
            f"(it has: {', '.join(manifest.get('qubes', []))})",
            EXIT_USAGE,
        )
    location = adapter.dump_location(snapshot_id)
    if not verify_only and not single_pass:
        # A first, verify-only pass: a backup qube that serves bad data is refused before
        # qvm-backup-restore creates any qube (the real pass re-checks everything anyway).
        info("qtb-pipe: pass 1/2, verifying every chunk before anything is restored", as_json)
        everything_selected = _prefixes(manifest, names, options, conflicts=set())
        _restore_pass(
            cfg,
            location,
            secret,
            sealed,
            manifest,
            names,
            everything_selected,
            [*options, "--verify-only"],
            True,
        )
        info("qtb-pipe: pass 2/2, restoring", as_json)
    else:
        what = "verifying" if verify_only else "restoring"
        info(
            f"qtb-pipe: {what} snapshot {snapshot_id} ({cfg.engine}, backup {manifest['backup_id']})", as_json
        )
    opts = [*options, "--verify-only"] if verify_only else options
    # qubes skipped for a name conflict are not restored, so the shim must not wait for them
    conflicts = set(qubes.list_qubes()) if "--skip-conflicting" in options and not verify_only else set()
    prefixes = _prefixes(manifest, names, options, conflicts)
    accepted = _restore_pass(cfg, location, secret, sealed, manifest, names, prefixes, opts, as_json)
    report = _per_qube(manifest, accepted, paths)
    return {
        "snapshot": snapshot_id,
        "engine": cfg.engine,
        "backup_id": manifest["backup_id"],
        "verified_only": verify_only,
        "qubes": report,
    }


def _prefixes(manifest: dict, names: list[str], options: list[str], conflicts: set[str]) -> list[str]:
    """The stream path prefixes a pass restores: the chosen qubes, less what options skip."""
    paths: dict[str, str] = manifest.get("paths") or {}
    skip = set(conflicts) | ({"dom0"} if "--skip-dom0-home" in options else set())
    return [paths[n] for n in (names or list(paths)) if n in paths and n not in skip]


def _per_qube(manifest: dict, accepted: set[str], paths: dict[str, str]) -> dict:
    report = {}
    for name, prefix in paths.items():
        chunks = [c for c in manifest["chunks"] if c["path"].startswith(prefix)]
        ok = [c for c in chunks if c["path"] in accepted]
        report[name] = {"chunks": len(chunks), "verified": len(ok), "bytes": sum(c["size"] for c in ok)}
    return report


def print_report(result: dict) -> None:
    verb = "verified" if result["verified_only"] else "restored"
    for name, r in result["qubes"].items():
        if r["verified"]:
            print(f"  {name:<24} {r['verified']}/{r['chunks']} chunks {verb}, {human_bytes(r['bytes'])}")
        else:
            print(f"  {name:<24} not selected")
