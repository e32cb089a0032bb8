"""Where the CPU of a burn-down goes, per task: PostgreSQL's processes, the
Offload server, and this client (which stands in for the workers).

Starts `offload serve` on the given database, batch-enqueues N tasks, then
fetches and acks them 500 at a time, and reads each process's CPU time from
/proc before and after the burn-down.

    python3 bench/cpu-split.py postgres://postgres@127.0.0.1:5432/DB [N]
    python3 bench/cpu-split.py sqlite:///tmp/split.db [N]
"""

import glob
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time

OFFLOAD = os.path.join(os.path.dirname(__file__), "..", "target", "release", "offload")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_ticks(pid):
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def postgres_ticks():
    total = 0
    for proc in glob.glob("/proc/[0-9]*"):
        try:
            if open(proc + "/comm").read().startswith("postgres"):
                total += cpu_ticks(os.path.basename(proc))
        except OSError:
            pass  # gone meanwhile
    return total


def main():
    db, n = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 40000
    port = free_port()
    server = subprocess.Popen([OFFLOAD, "serve", "--db", db, "--listen", f"127.0.0.1:{port}"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port)
                conn.connect()
                break
            except OSError:
                time.sleep(0.1)

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
            # left and, until autovacuum comes round, their dead row
            # versions; PostgreSQL's figure rises with them.
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
