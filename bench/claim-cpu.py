#!/usr/bin/env python3
"""The SQLite writer's CPU time for a claim and a completion, with few and
with many tasks stored: what claim scaling comes down to on the server,
without the load generator's share of the machine.

    python3 bench/claim-cpu.py BINARY [STORED] [ROUNDS]

Starts two servers of BINARY (`offload`) on free ports with fresh SQLite
databases, fills one with STORED pending tasks (default 1,000,000), and
then, ROUNDS times (default 4), puts 10,000 tasks on the other and burns
10,000 down from each, fetched and acked 100 at a time by this one client.
Prints, for each server and round, the writer thread's CPU time a task
(from /proc/PID/task/TID/schedstat, so Linux only), all the server's
threads' and the rate. The client is slow: compare the CPU times, not the
rates.
"""

import glob
import http.client
import json
import socket
import subprocess
import sys
import tempfile
import time

SAMPLE = 10_000
FETCH = 100
BATCH = json.dumps(
    {"tasks": [{"type": "bench.noop", "payload": {"n": i, "data": "x" * 32}} for i in range(1000)]}
).encode()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(conn, path, body, headers=None):
    conn.request("POST", path, body, {"Content-Type": "application/json", **(headers or {})})
    response = conn.getresponse()
    data = response.read()
    if response.status not in (200, 201):
        sys.exit(f"bench/claim-cpu.py: {path} answered {response.status}: {data[:300]!r}")
    return data


def fill(port, tasks):
    conn = http.client.HTTPConnection("127.0.0.1", port)
    for _ in range(tasks // 1000):
        post(conn, "/v1/tasks/batch", BATCH, {"Prefer": "return=minimal"})


def burn(port, tasks):
    conn = http.client.HTTPConnection("127.0.0.1", port)
    done = 0
    while done < tasks:
        fetched = json.loads(
            post(conn, "/v1/fetch", json.dumps({"worker_id": "cpu", "limit": min(FETCH, tasks - done)}))
        )["tasks"]
        if not fetched:
            sys.exit("bench/claim-cpu.py: the server ran out of tasks")
        acks = [{"id": task["id"]} for task in fetched]
        post(conn, "/v1/ack", json.dumps({"worker_id": "cpu", "completed": acks}))
        done += len(fetched)


def cpu_ns(pid):
    """CPU time so far of the server's writer thread and of all its threads."""
    writer = everything = 0
    for task in glob.glob(f"/proc/{pid}/task/*"):
        with open(f"{task}/schedstat") as stat:
            ran = int(stat.read().split()[0])
        with open(f"{task}/comm") as comm:
            if "sqlite" in comm.read():
                writer += ran
        everything += ran
    return writer, everything


def wait_healthy(port):
    for _ in range(200):
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.1)
    sys.exit(f"bench/claim-cpu.py: no server answered on port {port}")


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    binary = sys.argv[1]
    stored = int(sys.argv[2]) if len(sys.argv) > 2 else 1_000_000
    rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 4
    servers = {}
    with tempfile.TemporaryDirectory() as work:
        try:
            for name in ("few", "many"):
                port = free_port()
                process = subprocess.Popen(
                    [binary, "serve", "--db", f"sqlite://{work}/{name}.db", "--listen", f"127.0.0.1:{port}"],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                servers[name] = (process, port)
                wait_healthy(port)
            fill(servers["many"][1], stored + rounds * SAMPLE)
            for round_number in range(1, rounds + 1):
                fill(servers["few"][1], SAMPLE)
                for name, (process, port) in servers.items():
                    writer_before, everything_before = cpu_ns(process.pid)
                    started = time.perf_counter()
                    burn(port, SAMPLE)
                    elapsed = time.perf_counter() - started
                    writer_after, everything_after = cpu_ns(process.pid)
                    writer = (writer_after - writer_before) / SAMPLE / 1000
                    everything = (everything_after - everything_before) / SAMPLE / 1000
                    held = SAMPLE if name == "few" else stored
                    print(
                        f"round {round_number}, {held:>9,} stored: writer {writer:5.2f} µs a task, "
                        f"server {everything:5.2f} µs, {SAMPLE / elapsed:8,.0f} tasks/s"
                    )
        finally:
            for process, _ in servers.values():
                process.terminate()
                process.wait()


if __name__ == "__main__":
    main()
