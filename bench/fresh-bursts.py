#!/usr/bin/env python3
"""Bursts on a fresh node, with its workers already waiting: how fast they
are done. FETCHERS threads, each its own kept-alive connection, long-poll
`POST /v1/fetch` (`limit` 500, `wait_ms` 1,000) and ack what they get.

    python3 bench/fresh-bursts.py target/release/offload DB trickle TASKS FETCHERS [WARM]
    python3 bench/fresh-bursts.py target/release/offload DB due TASKS FETCHERS

`trickle`: WARM tasks (default 30) one at a time, each waited for until a
worker acked it, then TASKS in batches of 1,000; prints the rate from the
first batch sent to the last task acked. `due`: TASKS tasks enqueued in
batches with one `run_at` a few seconds ahead; prints when the workers got
them, after that `run_at` (first, p50, p99, last).

DB is `sqlite` (a fresh file) or a PostgreSQL URL, whose schema `probe` is
dropped first and used (`postgres://postgres@127.0.0.1:5432/test`).
"""

import datetime
import http.client
import sys
import tempfile
import threading
import time

from probe_server import fetch_and_ack, fetching, post, serve


def enqueue(conn, tasks, task):
    for start in range(0, tasks, 1000):
        post(conn, "/v1/tasks/batch", {"tasks": [task] * min(1000, tasks - start)})


def main():
    binary, db, mode = sys.argv[1], sys.argv[2], sys.argv[3]
    tasks, fetchers = int(sys.argv[4]), int(sys.argv[5])
    warm = int(sys.argv[6]) if len(sys.argv) > 6 else 30
    with tempfile.TemporaryDirectory() as tmp, serve(binary, db, tmp) as port:
        acked, lock = [], threading.Lock()

        def fetch_once(k, conn):
            claimed, now = fetch_and_ack(conn, f"w{k}", {"limit": 500, "wait_ms": 1000})
            if claimed:
                with lock:
                    acked.extend([now] * len(claimed))

        def wait_for(count, limit):
            while len(acked) < count and time.time() < limit:
                time.sleep(0.005)

        with fetching(port, fetchers, fetch_once):
            client = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
            if mode == "trickle":
                for i in range(warm):
                    post(client, "/v1/tasks", {"type": "t"})
                    wait_for(i + 1, time.time() + 30)
                started = time.time()
                enqueue(client, tasks, {"type": "t"})
                wait_for(warm + tasks, started + 600)
                took = time.time() - started
                print(f"{warm} tasks one at a time, then {tasks} to {fetchers} fetchers: "
                      f"all done after {took:.1f} s, {tasks / took:.0f} a second")
            else:
                due = time.time() + 5 + tasks / 20000
                run_at = datetime.datetime.fromtimestamp(due, datetime.timezone.utc)
                run_at = run_at.isoformat(timespec="milliseconds").replace("+00:00", "Z")
                enqueue(client, tasks, {"type": "t", "run_at": run_at})
                wait_for(tasks, due + 600)
                got = sorted(acked)
                at = [got[min(len(got) - 1, int(p * len(got)))] - due for p in (0, 0.5, 0.99)]
                print(f"{tasks} tasks due at once, {fetchers} fetchers: got after run_at "
                      f"first {at[0]:.3f} s, p50 {at[1]:.3f}, p99 {at[2]:.3f}, "
                      f"last {got[-1] - due:.3f}")


if __name__ == "__main__":
    main()
