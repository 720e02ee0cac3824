"""The restore side: `qvm-backup-restore` (facts §1, §3, §4).

Three retrievals through qubes.Restore (header files; qubes.xml; the selected qubes' paths,
templates first), each written by the qfile unpacker under a size/count limit; header
decrypt-and-compare; `scrypt dec -f IN OUT` per file over a pty; strict chunk order; inner tar
extraction into the target volumes; dom0 home into ~/home-restore-<date>/dom0-home/<user>/.
"""

from __future__ import annotations

import errno
import os
import queue
import resource
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import qrexec, storage
from .backup import HEADER_KEYS
from .scrypt_pty import UnexpectedPrompt, finish, launch_scrypt
from .world import Qube, SimError, World, parse_qubes_xml

HEADER_QUBES_XML_MAX_SIZE = 1024 * 1024
# The unpacker runs with `-w 500 MiB` (restore.py ~l.1065-1068): before each file it waits until
# the disk has the file's size plus this much free. A local file goes through tar's checkpoint loop
# upstream (~l.1069-1085); the sim unpacks it the same way as from a qube (docs/fidelity.md).
FREE_SPACE_KEPT = 500 * 1024 * 1024
# the loggers of qubesadmin/backup/restore.py (BackupRestore ~l.1010, ExtractWorker ~l.438)
BACKUP_LOG = "qubesadmin.backup"
EXTRACT_LOG = "qubesadmin.backup.extract"


@dataclass
class RestoreOptions:
    verify_only: bool = False
    rename_conflicting: bool = False
    skip_conflicting: bool = False
    skip_broken: bool = False
    ignore_missing: bool = False
    skip_dom0_home: bool = False
    ignore_username_mismatch: bool = False
    ignore_size_limit: bool = False
    exclude: list[str] = field(default_factory=list)
    vms: list[str] = field(default_factory=list)


@dataclass
class ToRestore:
    vm: Qube
    name: str
    template: str | None
    problems: list[str] = field(default_factory=list)
    restored: Qube | None = None

    @property
    def subdir(self) -> str:
        return self.vm.features.get("backup-path", "")

    @property
    def size(self) -> int:
        return int(self.vm.features.get("backup-size", "0") or 0)


def parse_header(data: bytes) -> dict[str, str]:
    """Parse an (unverified) backup header as strictly as Qubes does."""
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise SimError("Non-ASCII characters in backup header") from None
    header: dict[str, str] = {}
    for line in text.splitlines():
        if line.count("=") != 1:
            raise SimError("Invalid backup header")
        key, value = line.strip().split("=", 1)
        if not all(c.isalnum() or c == "-" for c in key) or not key.isascii():
            raise SimError("Invalid backup header (key)")
        if key not in HEADER_KEYS:
            continue
        if not all(c.isalnum() or c == "-" for c in value) or not value.isascii():
            raise SimError("Invalid backup header (value)")
        if key in header:
            raise SimError(f"Duplicated header line: {key}")
        header[key] = value
    for key in ("version", "encrypted", "compressed", "hmac-algorithm", "backup-id"):
        if key not in header:
            raise SimError(f"Backup header lack '{key.replace('-', '_')}' info")
    if header["version"] != "4":
        raise SimError(f"Unsupported backup version {header['version']}")
    return header


class Restore:
    def __init__(
        self,
        world: World,
        backup_vm: str | None,
        location: str,
        passphrase: str,
        options: RestoreOptions,
        log,
    ) -> None:
        self.world, self.backup_vm, self.location = world, backup_vm, location
        self.passphrase, self.options, self.log = passphrase, options, log
        # ~/QubesIncoming/backup#restore/tmpXXXX since R4.2 (restore.py ~l.988-997, commit 1033752)
        incoming = world.dom0_home / "QubesIncoming/backup#restore"
        incoming.mkdir(parents=True, exist_ok=True)
        self.tmpdir = Path(tempfile.mkdtemp(dir=incoming))
        self.env = world.dom0_env()  # qvm-backup-restore runs scrypt from the user's PATH
        self.header: dict[str, str] = {}
        self.retrieval: subprocess.Popen | None = None

    # --- retrieval ------------------------------------------------------------------------
    def _retrieve(self, prefixes: list[str], limit_count: int, limit_bytes: int, on_file) -> None:
        """One qubes.Restore call (or a local file read), files written by the unpacker."""
        if self.backup_vm:
            proc = qrexec.start_service(self.world, self.backup_vm, "qubes.Restore", stdout=subprocess.PIPE)
            proc.stdin.write(self.location.replace("\r", "").replace("\n", "").encode() + b"\n")
            proc.stdin.write((" ".join(prefixes) + "\n").encode())
            proc.stdin.close()
            stream = proc.stdout
        else:
            tar2qfile = [str(Path(qrexec._tar2qfile_wrapper(self.world))), *prefixes]
            try:
                with open(self.location, "rb") as local:
                    proc = subprocess.Popen(
                        tar2qfile,
                        stdin=local,
                        stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE,
                        start_new_session=True,
                    )
            except OSError as e:
                raise SimError(
                    f"unable to read the qubes backup file {self.location}: {e.strerror}"
                ) from None
            stream = proc.stdout
        self.retrieval = proc
        try:
            qrexec.unpack_qfile(stream, self.tmpdir, limit_bytes, limit_count, on_file, FREE_SPACE_KEPT)
        except qrexec.UnpackError as e:
            qrexec.kill_service(proc)
            if e.code == errno.EDQUOT and limit_bytes == HEADER_QUBES_XML_MAX_SIZE:
                return  # tar2qfile ignores EDQUOT and exits 0: the header retrieval sees no file (R8)
            if e.code == errno.EDQUOT:
                raise SimError(
                    "retrieved backup size exceed expected size, if you believe this is ok, "
                    "use --ignore-size-limit option"
                ) from None
            vm_stderr = proc.stderr.read(1024).decode(errors="replace") if proc.stderr else ""
            raise SimError(
                f"unable to read the qubes backup file {self.location} ({e.code}): {vm_stderr}"
            ) from None
        finally:
            stream.close()
        err = proc.stderr.read(1024).decode(errors="replace")
        if proc.wait() != 0:
            raise SimError(f"unable to read the qubes backup file {self.location} ({proc.returncode}): {err}")

    def _retrieve_files(self, files: list[str]) -> None:
        got: list[str] = []
        self._retrieve(files, len(files), HEADER_QUBES_XML_MAX_SIZE, got.append)
        if sorted(got) != sorted(files):
            raise SimError(f"unexpected files in archive: got {got!r}, expected {files!r}")

    def _decrypt(self, name: str, output: str | None = None) -> str:
        """scrypt dec -f over a pty; the passphrase binds file and backup (facts §1)."""
        orig = name.rsplit(".", 1)[0]
        full_in, full_out = self.tmpdir / name, self.tmpdir / (output or orig)
        if orig == "backup-header":
            pp = f"backup-header!{self.passphrase}"
        else:
            pp = f"{self.header['backup-id']}!{orig}!{self.passphrase}"
        try:
            proc = launch_scrypt(["scrypt", "dec", "-f", str(full_in), str(full_out)], pp, self.env)
        except (OSError, UnexpectedPrompt) as e:
            raise SimError(f"failed to decrypt {full_in}: {e}") from None
        code, err = finish(proc)
        if code != 0:
            full_out.unlink(missing_ok=True)
            raise SimError(f"failed to decrypt {full_in}: {err}")
        full_in.unlink()
        return orig

    def load_header(self) -> None:
        self._retrieve_files(["backup-header", "backup-header.hmac"])
        try:
            self._decrypt("backup-header.hmac", "backup-header.dec")
            ok = (self.tmpdir / "backup-header").read_bytes() == (
                self.tmpdir / "backup-header.dec"
            ).read_bytes()
        except SimError:
            ok = False
        if not ok:
            raise SimError("Corrupted backup header (hmac verification failed). Is the password correct?")
        self.header = parse_header((self.tmpdir / "backup-header").read_bytes())
        (self.tmpdir / "backup-header").unlink()

    def load_qubes_xml(self) -> dict[str, Qube]:
        self._retrieve_files(["qubes.xml.000.enc"])
        self._decrypt("qubes.xml.000.enc")
        extractor = InnerExtractor(self, verify_only=False)
        data = extractor.extract_small("qubes.xml.000", "qubes.xml")
        return parse_qubes_xml(data)

    # --- selection ----------------------------------------------------------------------
    def plan(self, backup_qubes: dict[str, Qube]) -> list[ToRestore]:
        host = self.world.load_qubes()
        o = self.options
        plan: list[ToRestore] = []
        for q in backup_qubes.values():
            if q.klass == "AdminVM" or q.features.get("backup-content") != "True":
                continue
            if o.vms and q.name not in o.vms:
                continue
            plan.append(ToRestore(q, q.name, q.template))
        unknown = [n for n in o.vms if n not in backup_qubes and n != "dom0"]
        if unknown:
            raise SimError(f"VM(s) not found in the backup: {', '.join(unknown)}")
        # qubesadmin/backup/restore.py restore_info_verify (~l.1660-1750)
        names = {t.vm.name for t in plan}
        taken = set(host)
        for t in plan:
            if t.vm.name in o.exclude:
                t.problems.append("excluded")
                continue
            if not o.verify_only and t.vm.name in host:
                if o.rename_conflicting:  # new_name_for_conflicting_vm: NAME-1, NAME-2, ... (cut to 29)
                    base = t.vm.name[:29]
                    t.name = next(f"{base}-{n}" for n in range(1, 99) if f"{base}-{n}" not in taken | names)
                    taken.add(t.name)
                else:
                    t.problems.append("already-exists")
        default_template = next((q.name for q in host.values() if q.klass == "TemplateVM"), None)
        for t in plan:
            if (
                t.template
                and not (t.template in host and host[t.template].klass == "TemplateVM")
                and not any(
                    o2.vm.name == t.template and o2.vm.klass == "TemplateVM" and not o2.problems
                    for o2 in plan
                )
            ):
                if o.ignore_missing and default_template:
                    t.template = default_template
                else:
                    t.problems.append("missing-template")
            netvm = t.vm.netvm  # checked only when set explicitly (not the system default)
            if (
                netvm
                and not (netvm in host and host[netvm].provides_network)
                and not any(o2.vm.name == netvm and o2.vm.provides_network and not o2.problems for o2 in plan)
            ):
                if o.ignore_missing:
                    t.vm.netvm = None  # the property is dropped: the host's default net qube
                else:
                    t.problems.append("missing-netvm")
        # get_restore_info (~l.1783-1799) adds dom0's home after restore_info_verify, which skips dom0
        # (~l.1658-1660): the tool's VM list and -x (both `exclude`, tool ~l.299-304) never leave it
        # out; only --skip-dom0-home does
        dom0 = backup_qubes.get("dom0")
        if dom0 and dom0.features.get("backup-content") == "True" and not o.skip_dom0_home:
            t = ToRestore(dom0, "dom0", None)
            if Path(t.subdir).name != self.world.user and not o.ignore_username_mismatch:
                t.problems.append("username-mismatch")
            plan.append(t)
        return plan

    # --- data ---------------------------------------------------------------------------
    def restore_data(self, plan: list[ToRestore]) -> None:
        """qubesadmin restore_do (~l.2036-2042): an error while extracting the data is logged and the
        tool goes on to exit 0; only with --verify-only is it raised (exit 1). First, check_disk_space
        (~l.1962-1976, 1994): under 1 GiB free in the temporary directory it refuses, verify too."""
        st = os.statvfs(self.tmpdir)
        if st.f_frsize * st.f_bavail < 1024**3:
            raise SimError(f"Too little space in {self.tmpdir}, needs at least 1GB")
        try:
            self._restore_data(plan)
        except SimError as e:
            if self.options.verify_only:
                raise
            self.log(f"Error extracting data: {e}", BACKUP_LOG)

    def _restore_data(self, plan: list[ToRestore]) -> None:
        todo = [t for t in plan if not t.problems]
        todo.sort(key=lambda t: t.vm.klass != "TemplateVM")
        if not self.options.verify_only:
            self._create_qubes(todo)
        dirs = [t.subdir if t.vm.klass != "AdminVM" else str(Path(t.subdir).parent) + "/" for t in todo]
        size = sum(t.size for t in todo)
        limit_count = 2 * (10 * len(dirs) + size // (100 * 1024 * 1024))
        if self.options.ignore_size_limit:
            limit_count, size = 0, 0
        if not dirs:
            return
        extractor = InnerExtractor(self, self.options.verify_only, {t.subdir.rstrip("/"): t for t in todo})
        files: queue.Queue[str | None] = queue.Queue()
        failure: list[BaseException] = []

        def retrieve() -> None:
            try:
                self._retrieve(dirs, limit_count, size, files.put)
            except BaseException as e:  # anything, not only SimError: a lost failure would look like success
                failure.append(e)
            finally:
                files.put(None)

        worker = threading.Thread(target=retrieve, daemon=True)
        worker.start()
        try:
            while (name := files.get()) is not None:
                if not name.endswith(".enc"):
                    raise SimError(f"Invalid file extension found in archive: {name}")
                if not any(name.startswith(d) for d in dirs):
                    (self.tmpdir / name).unlink()
                    continue
                plain = self._decrypt(name)
                if self.options.verify_only:
                    (self.tmpdir / plain).unlink()
                else:
                    extractor.feed(plain)
            worker.join()
            if failure:
                raise failure[0]
            extractor.close()
        finally:
            extractor.abort()
            if worker.is_alive() and self.retrieval is not None:
                qrexec.kill_service(self.retrieval)  # stop the transfer from the qube on any failure
            worker.join()

    def _create_qubes(self, todo: list[ToRestore]) -> None:
        host = self.world.load_qubes()
        next_qid = max([q.qid for q in host.values()] + [0]) + 1
        renamed = {t.vm.name: t.name for t in todo}
        for t in todo:
            if t.vm.klass == "AdminVM":
                continue
            self.log(f"-> Restoring {t.vm.name}...", BACKUP_LOG)
            q = Qube(
                qid=next_qid,
                name=t.name,
                klass=t.vm.klass,
                label=t.vm.label,
                template=renamed.get(t.template, t.template) if t.template else None,
                netvm=renamed.get(t.vm.netvm, t.vm.netvm) if t.vm.netvm else t.vm.netvm,
                include_in_backups=t.vm.include_in_backups,
                provides_network=t.vm.provides_network,
                features=dict(t.vm.features),
                tags=list(t.vm.tags),
            )
            next_qid += 1
            host[q.name] = q
            storage.init_volumes(self.world, q.name, q.klass, self.world.default_pool)
            q.vm_dir(self.world).mkdir(parents=True, exist_ok=True)
            self.world.qube_home(q.name).mkdir(parents=True, exist_ok=True)
            t.restored = q
        self.world.save_qubes(host)

    def cleanup(self) -> None:
        shutil.rmtree(self.tmpdir, ignore_errors=True)


def _as_qubesd() -> None:
    """The volume import runs as qubesd does it (admin.vm.volume.ImportWithSize): not a child of
    qvm-backup-restore, so not bound by the file size limit its caller may have set."""
    resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))


def _send_file(src_fd: int, pipe_fd: int) -> None:
    """Copy a whole file into a pipe in the kernel: the emulator's per-byte path stays out of Python."""
    offset = 0
    while sent := os.sendfile(pipe_fd, src_fd, offset, 1 << 30):
        offset += sent


class InnerExtractor:
    """The inner tar layer: chunks of one file fed in order to one `tar -x`, strictly .000, .001…"""

    def __init__(self, restore: Restore, verify_only: bool, targets: dict[str, ToRestore] | None = None):
        self.r, self.verify_only, self.targets = restore, verify_only, targets or {}
        self.current: str | None = None
        self.proc: subprocess.Popen | None = None
        self.sink: subprocess.Popen | None = None  # the volume import behind a volume's tar
        self.volume: storage.Volume | None = None  # the volume it imports into

    def extract_small(self, chunk: str, member: str) -> bytes:
        data = (self.r.tmpdir / chunk).read_bytes()
        (self.r.tmpdir / chunk).unlink()
        cmd = self._tar_cmd(["-xO", member])
        out = subprocess.run(cmd, input=data, capture_output=True)
        if out.returncode != 0:
            raise SimError("unable to extract the qubes backup. Check extracting process errors.")
        return out.stdout

    def _tar_cmd(self, args: list[str]) -> list[str]:
        if self.r.header.get("compressed", "False").lower() in ("1", "true", "yes"):
            filt = self.r.header.get("compression-filter", "gzip")
            return ["tar", f"--use-compress-program={filt}", *args]
        return ["tar", *args]

    def feed(self, plain: str) -> None:
        base, _, number = plain.rpartition(".")
        if number == "000":
            self._finish_file()
            self._start_file(base)
        else:
            if self.current is None:  # the file's extraction ended: its later chunks are dropped
                (self.r.tmpdir / plain).unlink()
                return
            expected = f"{self.current}.{int(self._last) + 1:03d}"
            if plain != expected:
                (self.r.tmpdir / plain).unlink()
                self.abort()
                self.current = None
                tmp = self.r.tmpdir  # the worker logs the paths it was queued: under the temp directory
                self.r.log(
                    f"Unexpected file in archive: {tmp / plain}, expected {tmp / expected}", EXTRACT_LOG
                )
                return
        self._last = number
        if self.proc is not None:
            with open(self.r.tmpdir / plain, "rb") as f:
                try:
                    _send_file(f.fileno(), self.proc.stdin.fileno())
                except BrokenPipeError:
                    pass
        (self.r.tmpdir / plain).unlink()

    def _start_file(self, base: str) -> None:
        self.current = base
        subdir, _, fname = base.rpartition("/")
        if subdir == "dom0-home":
            if base not in self.targets:
                self.proc = None
                return
            home = self.r.world.dom0_home
            dest = home / time.strftime("home-restore-%Y-%m-%d-%H%M%S")  # members are dom0-home/<user>/…
            dest.mkdir(parents=True, exist_ok=True)
            self.r.log(
                f"Restoring home of user '{self.r.world.user}' to '{dest.name}' directory...", BACKUP_LOG
            )
            self.proc = subprocess.Popen(
                self._tar_cmd(["-x", "-C", str(dest)]), stdin=subprocess.PIPE, stderr=subprocess.PIPE
            )
            return
        t = self.targets.get(subdir)
        if t is None or t.restored is None:
            self.proc = None
            return
        vm_dir = t.restored.vm_dir(self.r.world)
        self.volume = next(
            (v for v in storage.volumes_of(self.r.world, t.restored.name) if f"{v.name}.img" == fname), None
        )
        self.proc = subprocess.Popen(
            self._tar_cmd(["-xO", base]),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        # Volume import by dd, not a Python loop: zero 4 KiB blocks become holes (a thin volume's view).
        self.sink = subprocess.Popen(
            ["dd", f"of={vm_dir / fname}", "bs=4096", "iflag=fullblock", "conv=sparse", "status=none"],
            stdin=self.proc.stdout,
            stderr=subprocess.PIPE,
            preexec_fn=_as_qubesd,
        )
        self.proc.stdout.close()

    def _finish_file(self) -> None:
        if self.proc is None:
            self.current = None
            return
        try:
            self.proc.stdin.close()
        except BrokenPipeError:
            pass
        err = self.proc.stderr.read().decode(errors="replace")
        code = self.proc.wait()
        sink_err, sink_code = "", 0
        if self.sink is not None:
            sink_err = self.sink.stderr.read().decode(errors="replace").strip()
            sink_code = self.sink.wait()
        volume, sink = self.volume, self.sink
        name, self.proc, self.sink, self.current, self.volume = self.current, None, None, None, None
        # the import thread's log (_handle_volume_data) and the worker's (cleanup_tar2): each its own
        if sink_code != 0:
            vm = name.rpartition("/")[0] if name else "?"
            target = self.targets.get(vm)
            self.r.log(
                f"Failed to restore volume {volume.name if volume else name} (size None) of VM "
                f"{target.name if target else vm}: {sink_err or f'import exited with {sink_code}'}",
                BACKUP_LOG,
            )
        if code != 0:  # ExtractWorker.cleanup_tar2 (~l.534-539): logged, the restore goes on
            tar_output = "\n  ".join(err.strip().splitlines())
            self.r.log(
                f"ERROR: unable to extract files for {self.r.tmpdir / f'{name}.{self._last}'}, tar output:\n"
                f"  {tar_output}",
                EXTRACT_LOG,
            )
        if code != 0 or sink_code != 0:
            return
        if sink is not None and volume is not None:  # a finished import commits (lvm import_data_end)
            storage.commit(self.r.world, volume)

    def close(self) -> None:
        self._finish_file()

    def abort(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None
        if self.sink is not None:
            self.sink.kill()
            self.sink.wait()
            self.sink = None
