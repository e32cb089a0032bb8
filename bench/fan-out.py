#!/usr/bin/env python3
"""Dependencies at scale: DEPENDENTS tasks that each wait for one parent
(fan-out), and DEPENDENTS tasks each waiting for all of 100 parents (fan-in,
100 being the most `depends_on` may name), the parents completed in one
ack, then again with the parents acked one at a time. How long the acks
took, and how long until a worker fetching 1,000 at a time had every
dependent.

    python3 bench/fan-out.py target/release/offload DB [DEPENDENTS]

DB is `sqlite` (a fresh file) or a PostgreSQL URL, whose schema `probe`
is dropped first and used (`postgres://postgres@127.0.0.1:5432/test`).
"""

import http.client
import sys
import tempfile
import time

from probe_server import post, serve


def run_dependents(conn, label, parent_ids, dependents, one_by_one=False):
    """Enqueues `dependents` tasks depending on every one of
    `parent_ids`, runs the parents (one fetch, and one ack, or an ack
    each when `one_by_one`) and fetches the dependents until all have
    come; prints the times."""
    for start in range(0, dependents, 1000):
        batch = [{"type": "child", "depends_on": parent_ids}] * min(1000, dependents - start)
        post(conn, "/v1/tasks/batch", {"tasks": batch}, {"prefer": "return=minimal"})
    parents = post(conn, "/v1/fetch", {"worker_id": "w", "types": ["parent"], "limit": 1000})["tasks"]
    assert len(parents) == len(parent_ids), len(parents)
    started = time.perf_counter()
    for acked in ([[t] for t in parents] if one_by_one else [parents]):
        post(conn, "/v1/ack", {"worker_id": "w", "completed": [{"id": t["id"]} for t in acked]})
    acked = time.perf_counter() - started
    got = 0
    while got < dependents:
        tasks = post(conn, "/v1/fetch", {"worker_id": "w", "types": ["child"], "limit": 1000,
                                         "wait_ms": 5000})["tasks"]
        if not tasks:
            raise SystemExit(f"{label}: {got} of {dependents} dependents came")
        post(conn, "/v1/ack", {"worker_id": "w", "completed": [{"id": t["id"]} for t in tasks]})
        got += len(tasks)
    print(f"{label}: the parents' acks {acked * 1000:.0f} ms, every dependent run "
          f"{(time.perf_counter() - started) * 1000:.0f} ms after it began")


def main():
    binary, db = sys.argv[1], sys.argv[2]
    dependents = int(sys.argv[3]) if len(sys.argv) > 3 else 10_000
    with tempfile.TemporaryDirectory() as tmp, serve(binary, db, tmp) as port:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
        parent = post(conn, "/v1/tasks", {"type": "parent"})["id"]
        run_dependents(conn, f"fan-out, {dependents} on one parent", [parent], dependents)
        parents = [task["id"] for task in
                   post(conn, "/v1/tasks/batch", {"tasks": [{"type": "parent"}] * 100})["tasks"]]
        run_dependents(conn, f"fan-in, {dependents} on the same 100 parents", parents, dependents)
        parents = [task["id"] for task in
                   post(conn, "/v1/tasks/batch", {"tasks": [{"type": "parent"}] * 100})["tasks"]]
        run_dependents(conn, f"fan-in, {dependents} on 100 parents acked one at a time", parents,
                       dependents, one_by_one=True)


if __name__ == "__main__":
    main()
