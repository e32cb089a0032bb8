#!/usr/bin/env python3
"""Claims behind a backlog a claim may not take: BACKLOG tasks of
priority 8 in queue `big`, paused (`paused`) or limited to one running
task that one of them holds (`full`), ahead of 20,000 of priority 5 in
queue `small`; one client fetching 500 (naming neither queues nor types)
and acking them until `small` is empty, then 200 times enqueueing one
task to `small` and fetching it.

    python3 bench/held-back.py target/release/offload DB MODE [BACKLOG]

DB is `sqlite` (a fresh file) or a PostgreSQL URL, whose schema `probe`
is dropped first and used (`postgres://postgres@127.0.0.1:5432/test`).
BACKLOG defaults to 100,000. Prints the burn-down's rate and the one-task
fetches' median and slowest.
"""

import http.client
import statistics
import sys
import tempfile
import time

from probe_server import post, serve


def main():
    binary, db, mode = sys.argv[1], sys.argv[2], sys.argv[3]
    backlog = int(sys.argv[4]) if len(sys.argv) > 4 else 100_000
    with tempfile.TemporaryDirectory() as tmp, serve(binary, db, tmp) as port:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        minimal = {"prefer": "return=minimal"}
        if mode == "paused":
            post(conn, "/v1/queues/big/pause", {})
        for start in range(0, backlog, 1000):
            post(conn, "/v1/tasks/batch",
                 {"tasks": [{"type": "t", "queue": "big", "priority": 8}] * min(1000, backlog - start)},
                 minimal)
        if mode == "full":
            conn.request("PATCH", "/v1/queues/big", '{"concurrency": 1}',
                         {"content-type": "application/json"})
            conn.getresponse().read()
            post(conn, "/v1/fetch", {"worker_id": "holder", "queues": ["big"], "limit": 1})
        for _ in range(20):
            post(conn, "/v1/tasks/batch", {"tasks": [{"type": "t", "queue": "small"}] * 1000}, minimal)
        started, done = time.perf_counter(), 0
        while done < 20_000:
            claimed = post(conn, "/v1/fetch", {"worker_id": "w", "limit": 500})["tasks"]
            if any(task["queue"] != "small" for task in claimed):
                raise SystemExit("a task of queue big was claimed")
            post(conn, "/v1/ack", {"worker_id": "w", "completed": [{"id": t["id"]} for t in claimed]})
            done += len(claimed)
        rate = done / (time.perf_counter() - started)
        times = []
        for _ in range(200):
            post(conn, "/v1/tasks", {"type": "t", "queue": "small"})
            fetched = time.perf_counter()
            claimed = post(conn, "/v1/fetch", {"worker_id": "w", "limit": 1})["tasks"]
            times.append((time.perf_counter() - fetched) * 1000)
            post(conn, "/v1/ack", {"worker_id": "w", "completed": [{"id": t["id"]} for t in claimed]})
        print(f"{backlog} of big ({mode}) ahead: 20,000 of small burned down at {rate:,.0f}/s; "
              f"one fetch median {statistics.median(times):.2f} ms, slowest {max(times):.2f} ms")


if __name__ == "__main__":
    main()
