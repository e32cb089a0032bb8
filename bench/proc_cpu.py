"""What bench/cpu-split.py and bench/pg-share.py share: CPU time read from
/proc, and an `offload serve` of the release build started on a free port."""

import glob
import http.client
import os
import socket
import subprocess
import time

OFFLOAD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "target", "release", "offload")


def cpu_ticks(pid):
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def postgres_ticks():
    """PostgreSQL's processes' CPU now; a backend's leaves with the backend."""
    total = 0
    for proc in glob.glob("/proc/[0-9]*"):
        try:
            if open(proc + "/comm").read().startswith("postgres"):
                total += cpu_ticks(os.path.basename(proc))
        except OSError:
            pass  # gone meanwhile
    return total


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
