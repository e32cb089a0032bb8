#!/usr/bin/env python3
"""Tasks that fail before they succeed: TASKS tasks (default 20,000) run
four times over by one client fetching 500 and acking them, failed with
an error message of MESSAGE characters (default 4) and `retry_in_secs` 0
in the first three rounds, completed in the fourth; each round's rate,
and the share of it spent in fetches. A task's error history grows by one
entry a round, and every claim and ack carries it.

    python3 bench/retries.py target/release/offload DB [TASKS] [MESSAGE]

DB is `sqlite` (a fresh file) or a PostgreSQL URL, whose schema `probe`
is dropped first and used (`postgres://postgres@127.0.0.1:5432/test`).
"""

import http.client
import sys
import tempfile
import time

from probe_server import post, serve


def main():
    binary, db = sys.argv[1], sys.argv[2]
    tasks = int(sys.argv[3]) if len(sys.argv) > 3 else 20_000
    message = "x" * (int(sys.argv[4]) if len(sys.argv) > 4 else 4)
    with tempfile.TemporaryDirectory() as tmp, serve(binary, db, tmp) as port:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        for start in range(0, tasks, 1000):
            post(conn, "/v1/tasks/batch",
                 {"tasks": [{"type": "t", "max_attempts": 10}] * min(1000, tasks - start)},
                 {"prefer": "return=minimal"})
        for round_ in range(4):
            started, fetching, done = time.perf_counter(), 0.0, 0
            while done < tasks:
                fetched = time.perf_counter()
                claimed = post(conn, "/v1/fetch",
                               {"worker_id": "w", "limit": 500, "wait_ms": 2000})["tasks"]
                fetching += time.perf_counter() - fetched
                if round_ < 3:
                    ack = {"failed": [{"id": t["id"], "error": {"message": message},
                                       "retry_in_secs": 0} for t in claimed]}
                else:
                    ack = {"completed": [{"id": t["id"]} for t in claimed]}
                post(conn, "/v1/ack", {"worker_id": "w", **ack})
                done += len(claimed)
            elapsed = time.perf_counter() - started
            print(f"round {round_} ({'failed' if round_ < 3 else 'completed'}, "
                  f"{round_} errors a task before): {tasks / elapsed:,.0f} a second, "
                  f"fetches {fetching / elapsed:.0%} of it")


if __name__ == "__main__":
    main()
