#!/usr/bin/env python3
"""Workers that die holding tasks: one client enqueues TASKS tasks in
batches of 1,000 (`max_attempts` 2), fetches them all with `lease_secs` 1
and never acks them, as a worker killed mid-burst leaves its claims. Each
task's lateness is when its attempt was failed `lease_expired` (the `at`
of its last error, the server's clock) less the lease its fetch was given
(SPEC §1.3: acted on within a second). The probe prints their smallest,
p50, p99 and largest, how many came later than a second, how long after
the last lease ran out no task was running any more (polled every 10 ms),
and the server's CPU time over the wait.

    python3 bench/leases.py target/release/offload DB TASKS

DB is `sqlite` (a fresh file) or a PostgreSQL URL, whose schema `probe`
is dropped first and used (`postgres://postgres@127.0.0.1:5432/test`).
"""

import datetime
import http.client
import json
import sys
import tempfile
import time

from probe_server import post, serve
from scheduled import server_cpu_secs


def parse(at):
    return datetime.datetime.fromisoformat(at.replace("Z", "+00:00")).timestamp()


def get(conn, path):
    conn.request("GET", path)
    answer = conn.getresponse()
    data = answer.read()
    if answer.status != 200:
        raise SystemExit(f"{path}: {answer.status} {data[:300]!r}")
    return json.loads(data)


def main():
    binary, db, tasks = sys.argv[1], sys.argv[2], int(sys.argv[3])
    with tempfile.TemporaryDirectory() as tmp, serve(binary, db, tmp) as port:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        for start in range(0, tasks, 1000):
            batch = [{"type": "lease", "max_attempts": 2, "payload": {"n": n}}
                     for n in range(start, min(start + 1000, tasks))]
            post(conn, "/v1/tasks/batch", {"tasks": batch}, {"prefer": "return=minimal"})
        leases = {}
        while len(leases) < tasks:
            claimed = post(conn, "/v1/fetch", {"worker_id": "dies", "limit": 1000,
                                               "lease_secs": 1})["tasks"]
            if not claimed:
                raise SystemExit(f"fetched {len(leases)} of {tasks}, then nothing")
            for task in claimed:
                leases[task["id"]] = parse(task["lease_expires_at"])
        last_lease = max(leases.values())
        cpu_before = server_cpu_secs(port)
        while get(conn, "/v1/stats")["total"]["running"] > 0:
            time.sleep(0.01)
        none_running = time.time()
        cpu = server_cpu_secs(port) - cpu_before

        lateness, cursor = [], None
        while True:
            page = get(conn, "/v1/tasks?state=scheduled,pending&limit=1000"
                       + (f"&cursor={cursor}" if cursor else ""))
            for task in page["tasks"]:
                error = task["errors"][-1]
                assert error["kind"] == "lease_expired", error
                lateness.append(parse(error["at"]) - leases[task["id"]])
            cursor = page["next_cursor"]
            if not cursor:
                break
        if len(lateness) != tasks:
            raise SystemExit(f"{len(lateness)} of {tasks} tasks were retried")
        lateness.sort()
        ms = [1000 * x for x in lateness]
        print(f"{tasks} leases: lateness smallest {ms[0]:.1f} ms, p50 {ms[len(ms) // 2]:.1f}, "
              f"p99 {ms[int(len(ms) * 0.99)]:.1f}, largest {ms[-1]:.1f}; "
              f"{sum(x > 1000 for x in ms)} past a second; none running "
              f"{1000 * (none_running - last_lease):.0f} ms after the last lease; "
              f"server CPU {cpu:.2f} s")


if __name__ == "__main__":
    main()
