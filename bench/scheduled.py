#!/usr/bin/env python3
"""Tasks that come due: FETCHERS threads, each its own kept-alive
connection, long-poll `POST /v1/fetch` (`limit` 1,000, `wait_ms` 2,000) and
ack what they get. One client enqueues TASKS tasks in batches of 1,000,
each with a `run_at` spread evenly over SPREAD seconds starting 3 s from
then (SPREAD 0: all due at the same moment). Each task's lateness is
when a fetch's answer brought it less its `run_at` (SPEC §1.3: within
100 ms); the probe prints its smallest, p50, p99 and largest, how many came later
than 100 ms, and the server's CPU time over the wait.

    python3 bench/scheduled.py target/release/offload DB FETCHERS TASKS SPREAD

DB is `sqlite` (a fresh file) or a PostgreSQL URL, whose schema `probe`
is dropped first and used (`postgres://postgres@127.0.0.1:5432/test`).
"""

import datetime
import http.client
import subprocess
import sys
import tempfile
import threading
import time

from probe_server import fetch_and_ack, fetching, post, serve


def rfc3339(at):
    return datetime.datetime.fromtimestamp(at, datetime.timezone.utc).isoformat()


def server_cpu_secs(port):
    """User and system CPU seconds of the process listening on `port`."""
    pid = subprocess.run(["fuser", f"{port}/tcp"], capture_output=True, text=True).stdout.split()[0]
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100


def main():
    binary, db = sys.argv[1], sys.argv[2]
    fetchers, tasks, spread = int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
    with tempfile.TemporaryDirectory() as tmp, serve(binary, db, tmp) as port:
        due, got = {}, {}
        arrived = threading.Condition()

        def fetch_once(k, conn):
            claimed, now = fetch_and_ack(conn, f"w{k}", {"limit": 1000, "wait_ms": 2000})
            with arrived:
                for task in claimed:
                    got[task["id"]] = now
                arrived.notify_all()

        with fetching(port, fetchers, fetch_once):
            client = http.client.HTTPConnection("127.0.0.1", port)
            first = time.time() + 3
            for start in range(0, tasks, 1000):
                batch = []
                for i in range(start, min(start + 1000, tasks)):
                    at = first + (spread * i / tasks if spread else 0)
                    batch.append({"type": "t", "run_at": rfc3339(at)})
                for task, sent in zip(post(client, "/v1/tasks/batch", {"tasks": batch})["tasks"], batch):
                    due[task["id"]] = datetime.datetime.fromisoformat(sent["run_at"]).timestamp()
            if time.time() > first:
                raise SystemExit("the enqueues took longer than 3 s; fewer tasks")
            cpu_before = server_cpu_secs(port)
            with arrived:
                while len(got) < tasks:
                    arrived.wait(1)
            cpu = server_cpu_secs(port) - cpu_before
            late = sorted(got[id] - due[id] for id in due)
            over = sum(1 for lateness in late if lateness > 0.1)
            print(f"{fetchers} fetchers, {tasks} tasks due over {spread} s: lateness smallest {late[0] * 1000:.1f} ms, p50 "
                  f"{late[len(late) // 2] * 1000:.1f} ms, p99 {late[len(late) * 99 // 100] * 1000:.1f} ms, "
                  f"largest {late[-1] * 1000:.1f} ms; {over} later than 100 ms; "
                  f"server CPU {cpu:.2f} s")


if __name__ == "__main__":
    main()
