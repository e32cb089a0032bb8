"""PostgreSQL's CPU time a task while tasks are processed, for Offload on
PostgreSQL and for graphile-worker alike, each under its own benchmark's
processing phase (`offload bench`'s HTTP workers; graphile-worker's
burn-down processes):

    python3 bench/pg-share.py offload postgres://postgres@127.0.0.1:5432/DB [TASKS]
    python3 bench/pg-share.py graphile postgres://postgres@127.0.0.1:5432/DB [TASKS]

Offload: starts `offload serve` on DB and points `offload bench --url` at
it, reading the completed count (`GET /v1/stats`) every 20 ms; the phase is
from the first completion to the 2×TASKS-th. graphile-worker: runs
bench/peers/graphile-worker/bench.mjs with GW_BENCH_MARKS, which marks its
burn-down of 2×TASKS jobs on stderr. Either way PostgreSQL's processes'
CPU (utime + stime from /proc) over the phase, divided by its tasks, and
the rate. Use a database made for each run (`createdb`).
"""

import json
import os
import signal
import subprocess
import sys
import time

from proc_cpu import OFFLOAD, postgres_ticks_by_role, start_offload

HERE = os.path.dirname(os.path.abspath(__file__))
HZ = os.sysconf("SC_CLK_TCK")


def postgres_seconds():
    """PostgreSQL's processes' CPU seconds now, by role."""
    return {role: ticks / HZ for role, ticks in postgres_ticks_by_role().items()}


def report(tasks, before, after, wall):
    """The rate, and PostgreSQL's CPU a task in all and by role (roles
    that spent nothing left out)."""
    spent = {role: after.get(role, 0) - before.get(role, 0) for role in after}
    roles = ", ".join(f"{role} {1e6 * cpu / tasks:.1f}" for role, cpu in
                      sorted(spent.items(), key=lambda kv: -kv[1]) if cpu > 0)
    print(f"{tasks} tasks in {wall:.2f} s ({tasks / wall:,.0f} a second); "
          f"PostgreSQL {1e6 * sum(spent.values()) / tasks:.1f} us of CPU a task ({roles})")


def offload(db, n):
    server, port, conn = start_offload(db)
    try:
        bench = subprocess.Popen([OFFLOAD, "bench", "--url", f"http://127.0.0.1:{port}", "--tasks", str(n),
                                  "--stored", "10000", "--json"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        def completed():
            conn.request("GET", "/v1/stats")
            return json.loads(conn.getresponse().read())["total"]["completed"]

        start = None
        while bench.poll() is None:
            done, cpu, t = completed(), postgres_seconds(), time.time()
            if start is None and done > 0:
                start = (done, cpu, t)
            if start is not None and done >= 2 * n:
                report(done - start[0], start[1], cpu, t - start[2])
                break
            time.sleep(0.02)
        else:
            sys.exit(f"offload bench exited ({bench.returncode}) before {2 * n} tasks were completed")
        bench.wait()
    finally:
        server.send_signal(signal.SIGINT)
        server.wait()


def graphile(db, n):
    peer = subprocess.Popen(["node", os.path.join(HERE, "peers", "graphile-worker", "bench.mjs"), str(n)],
                            env={**os.environ, "DATABASE_URL": db, "GW_BENCH_MARKS": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    marks = {}
    for line in peer.stderr:
        if line.startswith("burn-down "):
            marks[line.split()[1]] = (postgres_seconds(), time.time())
        else:
            sys.stderr.write(line)  # the peer's own errors
    peer.wait()
    if "end" not in marks:
        sys.exit(f"bench.mjs exited ({peer.returncode}) without marking its burn-down's end")
    (cpu0, t0), (cpu1, t1) = marks["start"], marks["end"]
    report(2 * n, cpu0, cpu1, t1 - t0)


def main():
    which, db = sys.argv[1], sys.argv[2]
    n = int(sys.argv[3]) if len(sys.argv) > 3 else 20000
    {"offload": offload, "graphile": graphile}[which](db, n)


main()
