#!/usr/bin/env python3
"""Tasks of one type while another type has a backlog: a node started on
an empty database whose queue is set up first and whose worker polls
for `fast` tasks from the start (so that the node's sessions plan their
claims on an empty table), then BACKLOG pending `bulk` tasks
that nobody fetches, then SAMPLES `fast` tasks enqueued, fetched and
acked one after another. Prints the fetch's and the ack's p50 and p99.

    python3 bench/behind-a-backlog.py target/release/offload DB [BACKLOG] [SAMPLES]
    KNOWN=3 python3 bench/behind-a-backlog.py target/release/offload POSTGRES_URL …

With KNOWN=N (PostgreSQL), N `fast` tasks are enqueued first and the
table `ANALYZE`d (by psql) while it holds them, as autovacuum does early
in a table's life, then they are fetched and acked, so the node's
sessions plan their writes on a table PostgreSQL knows to be tiny. With
QUIET=N (PostgreSQL), N tasks scheduled an hour ahead over three queues
and three types are enqueued first and the table analyzed while nothing
is pending, as a quiet application's table is. With ANY_TYPE=1 the
worker's fetches name the queue `default` and no type and take one task,
whichever comes first (a `bulk` one once the backlog is in), so the
claims walk the types pending in the queue. BACKLOG_TYPE names the
backlog's type (`bulk` unless given; `fast` puts the backlog ahead of
the fetches' own tasks, in their pair, and each fetch takes one).

DB is `sqlite` (a fresh file) or a PostgreSQL URL (schema `probe`, made
afresh). A session's plan of a statement is made at its first run: a
claim first planned on an empty table kept a plan that walked every
pending task ahead of its type's (migration 6 of the PostgreSQL store).
"""

import http.client
import os
import subprocess
import sys
import tempfile
import time

from probe_server import post, serve


def main():
    binary, db = sys.argv[1], sys.argv[2]
    backlog = int(sys.argv[3]) if len(sys.argv) > 3 else 100000
    samples = int(sys.argv[4]) if len(sys.argv) > 4 else 300
    with tempfile.TemporaryDirectory() as tmp, serve(binary, db, tmp) as port:
        conn = http.client.HTTPConnection("127.0.0.1", port)
        any_type = os.environ.get("ANY_TYPE") == "1"
        backlog_type = os.environ.get("BACKLOG_TYPE", "bulk")
        # One task a fetch where the backlog is of what the fetch takes.
        fetch = {"worker_id": "w", "queues": ["default"], "limit": 1} if any_type else \
            {"worker_id": "w", "types": ["fast"], "limit": 1 if backlog_type == "fast" else 10}
        # The queue is set up before anything is enqueued, as an
        # application may do at its start, and the node's connections plan
        # their claims from it while nothing is stored.
        conn.request("PATCH", "/v1/queues/default", '{"concurrency": null}',
                     {"content-type": "application/json"})
        answer = conn.getresponse()
        answer.read()
        if answer.status != 200:
            raise SystemExit(f"PATCH /v1/queues/default: {answer.status}")
        known = int(os.environ.get("KNOWN", "0"))
        quiet = int(os.environ.get("QUIET", "0"))
        if quiet:
            post(conn, "/v1/tasks/batch", {"tasks": [
                {"type": f"t{i % 3}", "queue": f"q{i // 3 % 3}", "delay_secs": 3600}
                for i in range(quiet)]})
        if known:
            post(conn, "/v1/tasks/batch", {"tasks": [{"type": "fast"}] * known})
        if (known or quiet) and db.startswith("postgres"):
            subprocess.run(["psql", "-q", "-d", db.split("?")[0], "-c",
                            "ANALYZE probe.offload_tasks"], check=True)
            for _ in range(known):
                done = [{"id": task["id"]} for task in post(conn, "/v1/fetch", fetch)["tasks"]]
                if done:
                    post(conn, "/v1/ack", {"worker_id": "w", "completed": done})
        for _ in range(20):
            post(conn, "/v1/fetch", fetch)
        for first in range(0, backlog, 1000):
            post(conn, "/v1/tasks/batch",
                 {"tasks": [{"type": backlog_type}] * min(1000, backlog - first)},
                 {"prefer": "return=minimal"})
        took, acked = [], []
        for _ in range(samples):
            post(conn, "/v1/tasks", {"type": "fast"})
            t0 = time.perf_counter()
            tasks = post(conn, "/v1/fetch", fetch)["tasks"]
            took.append(time.perf_counter() - t0)
            if len(tasks) != 1:
                raise SystemExit(f"a fetch brought {len(tasks)} tasks, not one")
            t0 = time.perf_counter()
            post(conn, "/v1/ack", {"worker_id": "w", "completed": [{"id": tasks[0]["id"]}]})
            acked.append(time.perf_counter() - t0)

    def spread(times):
        times.sort()
        return (f"p50 {1000 * times[len(times) // 2]:.2f} ms, "
                f"p99 {1000 * times[int(len(times) * 0.99)]:.2f} ms")

    print(f"{backlog} {backlog_type} tasks pending: a fetch of one {'' if any_type else 'fast '}task "
          f"{spread(took)}; "
          f"its ack {spread(acked)}")


if __name__ == "__main__":
    main()
