#!/usr/bin/env python3
"""Many workers waiting: FETCHERS threads, each its own kept-alive
connection, long-poll `POST /v1/fetch` (`limit` 1, `wait_ms` 2,000) and ack
what they get. Then one client enqueues TASKS tasks one at a time, as fast
as it can (the rate it gets, and when the last was done), and after that
200 more one at a time to an idle server, each waited for until a fetcher
has it (pickup p50 and p99, from the request leaving the client to the
fetch's answer arriving).

    python3 bench/waiting-fetches.py target/release/offload DB FETCHERS [TASKS]

DB is `sqlite` (a fresh file) or a PostgreSQL URL, whose schema `probe`
is dropped first and used (`postgres://postgres@127.0.0.1:5432/test`).
With TYPES=1 in the environment the fetches name the tasks' type, as a
worker with a handler for it does; without, they take any type. With
OTHER_TYPES=N, N more fetchers wait as well, each for a type of its own
that no task has: the workers of an application's other handlers.
"""

import http.client
import os
import sys
import tempfile
import threading
import time

from probe_server import fetching, post, serve


def main():
    binary, db, fetchers = sys.argv[1], sys.argv[2], int(sys.argv[3])
    tasks = int(sys.argv[4]) if len(sys.argv) > 4 else 2000
    with tempfile.TemporaryDirectory() as tmp, serve(binary, db, tmp) as port:
        got = {}
        arrived = threading.Condition()

        fetch = {"limit": 1, "wait_ms": 2000}
        if os.environ.get("TYPES"):
            fetch["types"] = ["t"]

        def fetch_once(k, conn):
            claimed = post(conn, "/v1/fetch", {"worker_id": f"w{k}", **fetch})["tasks"]
            now = time.perf_counter()
            for task in claimed:
                post(conn, "/v1/ack", {"worker_id": f"w{k}", "completed": [{"id": task["id"]}]})
                with arrived:
                    got[task["id"]] = now
                    arrived.notify_all()

        def fetch_other(k, conn):
            post(conn, "/v1/fetch", {"worker_id": f"o{k}", "types": [f"other-{k}"],
                                     "limit": 1, "wait_ms": 2000})

        others = int(os.environ.get("OTHER_TYPES", "0"))
        with fetching(port, others, fetch_other), fetching(port, fetchers, fetch_once):
            time.sleep(2)
            client = http.client.HTTPConnection("127.0.0.1", port)
            started = time.perf_counter()
            for _ in range(tasks):
                post(client, "/v1/tasks", {"type": "t"})
            enqueued = time.perf_counter() - started
            with arrived:
                while len(got) < tasks:
                    arrived.wait(1)
            print(f"{fetchers} fetchers waiting: {tasks} single enqueues at {tasks / enqueued:.0f} a second, "
                  f"all done after {time.perf_counter() - started:.2f} s")
            pickups = []
            for _ in range(200):
                time.sleep(0.01)
                sent = time.perf_counter()
                task = post(client, "/v1/tasks", {"type": "t"})
                with arrived:
                    while task["id"] not in got:
                        arrived.wait(5)
                pickups.append(got[task["id"]] - sent)
            pickups.sort()
            print(f"{fetchers} fetchers waiting: pickup p50 {pickups[100] * 1000:.2f} ms, "
                  f"p99 {pickups[198] * 1000:.2f} ms")


if __name__ == "__main__":
    main()
