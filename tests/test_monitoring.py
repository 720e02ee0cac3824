"""Monitoring pings (issue 12): the backup qube tells a healthchecks-style URL that a backup run
started and how it ended; a server that is down never fails a backup. Against a real HTTP server
on loopback."""

from __future__ import annotations

import http.server
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from drivertools import install_attacker, mutate, qtb, qtb_json, remove_attacker
from qtb_adapters.config import load_config
from qtb_adapters.errors import RepositoryMissingError


@contextmanager
def ping_server() -> Iterator[tuple[str, list[tuple[str, bytes]]]]:
    """A loopback HTTP server that records each request's path and body and answers 200 OK."""
    received: list[tuple[str, bytes]] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            received.append((self.path, self.rfile.read(int(self.headers["Content-Length"] or 0))))
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"OK")

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", received
    finally:
        server.shutdown()
        server.server_close()


def set_monitoring(world, table: str) -> None:
    config = world.qube_home("backup") / ".config/qtb-pipe/adapter.toml"
    text = config.read_text().split("\n[monitoring]\n")[0]
    config.write_text(f"{text}\n[monitoring]\n{table}\n")


@pytest.mark.parametrize("engine", ["restic"])
def test_a_backup_run_pings_start_and_its_outcome_and_a_dead_server_fails_nothing(backed_up, engine):
    world = backed_up.world
    with ping_server() as (url, received):
        set_monitoring(world, f'ping_url = "{url}/check-uuid"\ntimeout = 5')
        mutate(world, "work")
        night = qtb_json(world, "backup", "-x", "dom0")
        assert [q for q, r in night["qubes"].items() if r["status"] == "backed up"] == ["work"]
        assert [path for path, _ in received] == ["/check-uuid/start", "/check-uuid"]
        assert received[1][1].startswith(b"1 qube(s) backed up: ")
        # one qube fails (its commit answer is a lie): the run ends with /fail and the reason
        install_attacker(world, {"answer": {"commit": {"id": "bad id!"}}})
        assert qtb(world, "backup", "--full", "vault", check=False).returncode == 1
        remove_attacker(world)
        assert [path for path, _ in received[2:]] == ["/check-uuid/start", "/check-uuid/fail"]
        assert b"1 qube(s) not backed up: vault" in received[3][1]
        port = url.rsplit(":", 1)[1]
    # the server is gone (connection refused): the backup still succeeds
    set_monitoring(world, f'ping_url = "http://127.0.0.1:{port}/check-uuid"\ntimeout = 2')
    assert qtb_json(world, "backup", "--full", "vault")["qubes"]["vault"]["status"] == "backed up"
    answer = world.run("qtb-adapter", "ping", "success", "--json", inside="backup")
    result = json.loads(answer.stdout)
    assert answer.returncode == 0 and result["sent"] is False and "failed" in result["warnings"][0]
    assert "check-uuid" not in answer.stdout.decode()  # the URL's secret path stays in the backup qube


@pytest.mark.parametrize(
    "table", ['ping_url = "ftp://x/y"', 'ping_url = "http://x/a b"', "timeout = 0", 'color = "red"']
)
def test_a_bad_monitoring_table_is_refused(tmp_path, table):
    config = tmp_path / "adapter.toml"
    config.write_text(f'[restic]\nrepository = "/r"\npassword_file = "/p"\n\n[monitoring]\n{table}\n')
    with pytest.raises(RepositoryMissingError, match=r"\[monitoring\]"):
        load_config(config, "restic", ["restic", "borg"])
