"""Where the CPU of a burn-down goes, per task: PostgreSQL's processes, the
Offload server, and this client (which stands in for the workers).

Starts `offload serve` on the given database, batch-enqueues N tasks, then
fetches and acks them 500 at a time, and reads each process's CPU time from
/proc before and after the burn-down.

    python3 bench/cpu-split.py postgres://postgres@127.0.0.1:5432/DB [N]
    python3 bench/cpu-split.py sqlite:///tmp/split.db [N]
"""

import json
import os
import signal
import sys
import time

from proc_cpu import cpu_ticks, postgres_ticks, start_offload


def main():
    db, n = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 40000
    server, _, conn = start_offload(db)
    try:
        def post(path, body):
            conn.request("POST", path, body=json.dumps(body), headers={"content-type": "application/json"})
            answer = conn.getresponse()
            data = answer.read()
            if answer.status not in (200, 201):
                sys.exit(f"{path}: {answer.status} {data[:300]!r}")
            return json.loads(data)

        conn.request("GET", "/v1/stats")
        stored = sum(json.loads(conn.getresponse().read())["total"].values())
        if stored:
            # A database reused between runs keeps the tasks earlier runs
            # left and their dead row versions, until a vacuum (never, where
            # autovacuum is off); PostgreSQL's figure rises with them.
            print(f"warning: the database already holds {stored} tasks; "
                  "a database made for this run gives a figure comparable with others", file=sys.stderr)
        for i in range(n // 1000):
            post("/v1/tasks/batch", {"tasks": [{"type": "noop", "payload": {"n": i * 1000 + j}} for j in range(1000)]})
        time.sleep(3)  # let the enqueue's after-work settle
        pg0, server0, me0, t0 = postgres_ticks(), cpu_ticks(server.pid), os.times(), time.time()
        done = 0
        while done < n:
            tasks = post("/v1/fetch", {"worker_id": "split", "limit": 500})["tasks"]
            if not tasks:
                break
            post("/v1/ack", {"worker_id": "split", "completed": [{"id": t["id"]} for t in tasks]})
            done += len(tasks)
        pg1, server1, me1, t1 = postgres_ticks(), cpu_ticks(server.pid), os.times(), time.time()
        hz = os.sysconf("SC_CLK_TCK")
        per_task = lambda ticks: 1e6 * ticks / hz / done
        me = 1e6 * (me1.user + me1.system - me0.user - me0.system) / done
        print(f"{done} tasks in {t1 - t0:.2f} s; CPU per task: PostgreSQL {per_task(pg1 - pg0):.1f} us, "
              f"Offload server {per_task(server1 - server0):.1f} us, this client {me:.1f} us")
    finally:
        server.send_signal(signal.SIGINT)
        server.wait()


main()
