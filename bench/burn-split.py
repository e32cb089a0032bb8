#!/usr/bin/env python3
"""Where the machine's time goes while `offload bench`'s workers burn tasks
down over HTTP: each thread's CPU a task, the writer's share of a core, and
how much of the two cores sat idle.

    python3 bench/burn-split.py target/release/offload [TASKS] [SERVE FLAGS...]

Starts `offload serve` on a fresh SQLite database, points `offload bench
--url … --tasks TASKS --stored 10000 --json` at it, and samples every
thread's run time (/proc/PID/task/TID/schedstat), /proc/stat and the
server's completed count every 50 ms, and the WAL file's size. The
processing phase is the span
from the first completed task to 98% of its 2 x TASKS; the figures are
over that span. The sampling costs a little CPU of its own.
"""

import glob
import os
import json
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def threads(pid):
    """Run time (ns) and run-queue wait (ns) by thread name and id."""
    out = {}
    for task in glob.glob(f"/proc/{pid}/task/*"):
        try:
            name = open(task + "/comm").read().strip() + ":" + task.rsplit("/", 1)[1]
            run, wait = open(task + "/schedstat").read().split()[:2]
            out[name] = (int(run), int(wait))
        except OSError:
            pass
    return out


def main():
    binary = sys.argv[1]
    tasks = int(sys.argv[2]) if len(sys.argv) > 2 else 40000
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        server = subprocess.Popen(
            [binary, "serve", "--listen", f"127.0.0.1:{port}", "--db", f"sqlite://{tmp}/burn.db"]
            + sys.argv[3:],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for _ in range(200):
            try:
                urllib.request.urlopen(url + "/health")
                break
            except OSError:
                time.sleep(0.05)
        bench = subprocess.Popen(
            [binary, "bench", "--url", url, "--tasks", str(tasks), "--stored", "10000", "--json"],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        samples = []
        wal_peak = 0
        while bench.poll() is None:
            try:
                wal_peak = max(wal_peak, os.stat(f"{tmp}/burn.db-wal").st_size)
            except OSError:
                pass
            try:
                stats = json.load(urllib.request.urlopen(url + "/v1/stats"))
                done = stats["types"].get("bench.noop", {}).get("completed", 0)
            except OSError:
                done = -1
            cpu = [int(x) for x in open("/proc/stat").readline().split()[1:9]]
            samples.append((time.time(), done, cpu, threads(server.pid), threads(bench.pid)))
            time.sleep(0.05)
        report = json.loads(bench.stdout.read() or "{}")
        server.terminate()
        server.wait()

    first = next(s for s in samples if s[1] > 0)
    last = next(s for s in samples if s[1] >= 2 * tasks * 0.98)
    n, span = last[1] - first[1], last[0] - first[0]
    print(f"{n} tasks in {span:.2f} s ({n / span:,.0f} a second, sampled; bench said {report.get('process_http_per_sec', 0):,.0f})")
    for label, at in (("server", 3), ("bench", 4)):
        for name in sorted(last[at]):
            run = last[at][name][0] - first[at].get(name, (0, 0))[0]
            wait = last[at][name][1] - first[at].get(name, (0, 0))[1]
            if run / n > 50:  # ns a task
                print(f"  {label:6} {name:28} {run / n / 1000:6.2f} µs a task, {100 * run / 1e9 / span:5.1f}% of a core, waited to run {100 * wait / 1e9 / span:4.1f}%")
    delta = [b - a for a, b in zip(first[2], last[2])]
    total = sum(delta) or 1
    names = ["user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal"]
    print(f"  WAL file at most {wal_peak / 2**20:.1f} MiB")
    print("  machine: " + ", ".join(f"{k} {100 * v / total:.1f}%" for k, v in zip(names, delta)))


if __name__ == "__main__":
    main()
