#!/usr/bin/env python3
"""A dashboard's lists under a backlog: how long `GET /v1/tasks` takes for
one page of each state, and of a few filters, when newer tasks of other
states sit in front of the ones it lists.

    python3 bench/lists.py target/release/offload DB [PENDING]

DB is `sqlite` (a fresh file) or a PostgreSQL URL, whose schema `probe`
is dropped first and used (`postgres://postgres@127.0.0.1:5432/test`).
Enqueues 2,000 tasks of type `old` and runs them (1,500 completed, 500
failed for good), then PENDING (default 100,000) newer tasks of type `new`
left pending, then asks each list 20 times on a kept-alive connection:
the median and the slowest, in ms, and how many tasks a page held.

With ANALYZE_EARLY=1 (PostgreSQL), the table is `ANALYZE`d (by psql) once
the 2,000 have run, and each list asked 20 times, before the pending
tasks come: the node's sessions plan the lists while completed tasks are
most of the table, as autovacuum's statistics say of a quiet one.
"""

import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from probe_server import post, serve


def main():
    binary, db = sys.argv[1], sys.argv[2]
    pending = int(sys.argv[3]) if len(sys.argv) > 3 else 100_000
    with tempfile.TemporaryDirectory() as tmp, serve(binary, db, tmp) as port:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        for _ in range(2):
            post(conn, "/v1/tasks/batch", {"tasks": [{"type": "old", "max_attempts": 1}] * 1000},
                 {"prefer": "return=minimal"})
        done = 0
        while done < 2000:
            claimed = post(conn, "/v1/fetch", {"worker_id": "w", "limit": 500})["tasks"]
            ids = [task["id"] for task in claimed]
            failing = [i for k, i in enumerate(ids) if (done + k) % 4 == 3]
            post(conn, "/v1/ack", {
                "worker_id": "w",
                "completed": [{"id": i} for i in ids if i not in failing],
                "failed": [{"id": i, "error": {"message": "no"}, "retry": False} for i in failing],
            })
            done += len(ids)
        lists = [
            "state=completed",
            "state=failed",
            "state=completed,failed",
            "state=pending",
            "type=old",
            "",
        ]
        if os.environ.get("ANALYZE_EARLY") == "1":
            subprocess.run(["psql", "-q", "-d", db.split("?")[0], "-c",
                            "ANALYZE probe.offload_tasks"], check=True)
            for query in lists:
                for _ in range(20):
                    conn.request("GET", f"/v1/tasks?{query}&limit=50")
                    conn.getresponse().read()
        for start in range(0, pending, 1000):
            post(conn, "/v1/tasks/batch",
                 {"tasks": [{"type": "new"}] * min(1000, pending - start)},
                 {"prefer": "return=minimal"})
        print(f"{pending} pending tasks newer than 1,500 completed and 500 failed")
        for query in lists:
            times = []
            for _ in range(20):
                started = time.perf_counter()
                conn.request("GET", f"/v1/tasks?{query}&limit=50")
                answer = conn.getresponse()
                page = json.loads(answer.read())
                times.append((time.perf_counter() - started) * 1000)
                if answer.status != 200:
                    raise SystemExit(f"{query}: {answer.status} {page}")
            print(f"  ?{query or '(all)':<24} median {statistics.median(times):7.2f} ms, "
                  f"slowest {max(times):7.2f} ms, {len(page['tasks'])} tasks")


if __name__ == "__main__":
    main()
