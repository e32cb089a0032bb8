"""Heartbeats with progress at scale: RUNNING tasks claimed by one worker,
CLIENTS clients each on a kept-alive connection heartbeating them in turn
(`POST /v1/tasks/{id}/heartbeat` with a progress percent) for SECONDS;
prints heartbeats a second and each one's p50 and p99.

    python3 bench/heartbeats.py target/release/offload DB [CLIENTS] [RUNNING] [SECONDS]

DB is `sqlite` (a fresh file) or a PostgreSQL URL (schema `probe`, made
afresh).
"""

import http.client
import os
import sys
import tempfile
import threading
import time

from probe_server import post, serve


def PROGRESS(n):
    return {} if os.environ.get("NO_PROGRESS") else {"progress": {"percent": n % 100}}


def main():
    binary, db = sys.argv[1], sys.argv[2]
    clients = int(sys.argv[3]) if len(sys.argv) > 3 else 8
    running = int(sys.argv[4]) if len(sys.argv) > 4 else 1000
    seconds = float(sys.argv[5]) if len(sys.argv) > 5 else 5.0
    with tempfile.TemporaryDirectory() as tmp, serve(binary, db, tmp) as port:
        conn = http.client.HTTPConnection("127.0.0.1", port)
        post(conn, "/v1/tasks/batch", {"tasks": [{"type": "t"}] * running})
        ids = []
        while len(ids) < running:
            claimed = post(conn, "/v1/fetch", {"worker_id": "w", "limit": running - len(ids)})
            ids += [task["id"] for task in claimed["tasks"]]
        latencies = [[] for _ in range(clients)]
        stop = time.monotonic() + seconds

        def client(k):
            conn = http.client.HTTPConnection("127.0.0.1", port)
            n = k
            while time.monotonic() < stop:
                task = ids[n % running]
                n += clients
                began = time.perf_counter()
                post(conn, f"/v1/tasks/{task}/heartbeat",
                     {"worker_id": "w", "lease_secs": 60, **PROGRESS(n)})
                latencies[k].append(time.perf_counter() - began)

        threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        every = sorted(x for each in latencies for x in each)
        p = lambda q: every[min(len(every) - 1, int(q * len(every)))] * 1000
        print(f"{clients} clients heartbeating {running} running tasks for {seconds:.0f} s: "
              f"{len(every) / seconds:,.0f} a second, p50 {p(0.5):.2f} ms, p99 {p(0.99):.2f} ms")


if __name__ == "__main__":
    main()
