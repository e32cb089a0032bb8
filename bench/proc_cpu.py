"""What bench/cpu-split.py and bench/pg-share.py share: CPU time read from
/proc, and an `offload serve` of the release build (or of the binary the
environment's OFFLOAD names, to compare two builds) started on a free
port."""

import glob
import http.client
import os
import socket
import subprocess
import time

OFFLOAD = os.environ.get("OFFLOAD") or os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "..", "target", "release", "offload")


def cpu_ticks(pid):
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


# PostgreSQL's processes that are not a connection's backend, by the
# title each sets (`postgres: 15/main: walwriter`).
POSTGRES_AUXILIARY = ("checkpointer", "background writer", "walwriter", "autovacuum launcher",
                      "autovacuum worker", "logical replication launcher", "archiver", "stats collector")


def postgres_ticks_by_role():
    """PostgreSQL's processes' CPU now, by role: `backends` for the
    connections' processes, `postmaster`, or the auxiliary process's own
    title. A backend's CPU leaves with the backend."""
    by_role = {}
    for proc in glob.glob("/proc/[0-9]*"):
        try:
            if not open(proc + "/comm").read().startswith("postgres"):
                continue
            title = open(proc + "/cmdline").read().replace("\0", " ").strip()
            ticks = cpu_ticks(os.path.basename(proc))
        except OSError:
            continue  # gone meanwhile
        if not title.startswith("postgres:"):
            role = "postmaster"
        else:
            role = next((name for name in POSTGRES_AUXILIARY if name in title), "backends")
        by_role[role] = by_role.get(role, 0) + ticks
    return by_role


def postgres_ticks():
    """PostgreSQL's processes' CPU now; a backend's leaves with the backend."""
    return sum(postgres_ticks_by_role().values())


def start_offload(db):
    """`offload serve` on `db`; returns the process, its port and a
    connection to it once it accepts one."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([OFFLOAD, "serve", "--db", db, "--listen", f"127.0.0.1:{port}"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(100):
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port)
            conn.connect()
            return server, port, conn
        except OSError:
            if server.poll() is not None:
                raise SystemExit(f"offload serve exited ({server.returncode}) on {db}")
            time.sleep(0.1)
    server.kill()
    raise SystemExit(f"offload serve did not accept a connection on port {port}")
