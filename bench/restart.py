#!/usr/bin/env python3
"""A SQLite node restarted with many tasks stored: enqueues TASKS pending
tasks in batches of 1,000 into a fresh file, stops the node (`term`: SIGTERM;
`kill`: SIGKILL, as a crash), starts it again and prints how long it took
to answer `/health`, how long its first fetch then took, and its peak
resident memory.

    python3 bench/restart.py target/release/offload TASKS term|kill
"""

import http.client
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

from probe_server import post


def start(binary, db):
    """`offload serve` on `db` and a free port: the process, its port, and
    the seconds until it answered `/health`."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    started = time.perf_counter()
    server = subprocess.Popen([binary, "serve", "--listen", f"127.0.0.1:{port}", "--db", db],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = started + 120
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health")
            return server, port, time.perf_counter() - started
        except OSError:
            if time.perf_counter() > deadline or server.poll() is not None:
                server.kill()
                raise SystemExit("the node did not come up")
            time.sleep(0.01)


def peak_rss_mb(pid):
    with open(f"/proc/{pid}/status") as status:
        line = next(line for line in status if line.startswith("VmHWM"))
    return int(line.split()[1]) // 1024


def main():
    binary, tasks, how = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    with tempfile.TemporaryDirectory() as tmp:
        db = f"{tmp}/probe.db"
        server, port, _ = start(binary, db)
        conn = http.client.HTTPConnection("127.0.0.1", port)
        began = time.perf_counter()
        for start_at in range(0, tasks, 1000):
            batch = [{"type": "t", "payload": {"n": n}}
                     for n in range(start_at, min(start_at + 1000, tasks))]
            post(conn, "/v1/tasks/batch", {"tasks": batch})
        print(f"{tasks} tasks enqueued in {time.perf_counter() - began:.1f} s; "
              f"the file {os.path.getsize(db) / 1e6:.0f} MB")
        if how == "kill":
            server.kill()
        else:
            server.terminate()
        server.wait()
        server, port, up = start(binary, db)
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port)
            began = time.perf_counter()
            claimed = post(conn, "/v1/fetch", {"worker_id": "w", "limit": 1})["tasks"]
            fetched = time.perf_counter() - began
            print(f"restarted after {'SIGKILL' if how == 'kill' else 'SIGTERM'}: /health answered "
                  f"after {up:.2f} s, the first fetch ({len(claimed)} task) took "
                  f"{fetched * 1000:.1f} ms; peak memory {peak_rss_mb(server.pid)} MB")
        finally:
            server.terminate()
            server.wait()


if __name__ == "__main__":
    main()
