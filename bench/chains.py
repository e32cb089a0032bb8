#!/usr/bin/env python3
"""Workflows of steps: CHAINS chains of LENGTH tasks, each step depending
on the one before, run by one worker per chain that fetches one task at a
time (a long poll) and acks it. A step can start only once the step
before is acknowledged, so a chain's time is its steps' hand-overs end to
end: the ack, the dependent's move to pending, the waiting fetch woken
and its claim. Prints the time a step, from each ack's answer to the
next step's arrival (median and 99th percentile) and overall.

    python3 bench/chains.py target/release/offload DB [CHAINS] [LENGTH]

DB is `sqlite` (a fresh file) or a PostgreSQL URL, whose schema `probe`
is dropped first and used (`postgres://postgres@127.0.0.1:5432/test`).
"""

import http.client
import statistics
import sys
import tempfile
import threading
import time

from probe_server import post, serve


def enqueue_chain(conn, chain, length):
    """The chain's steps, in order, each depending on the one before; each
    step has a type of its own chain's, so that each worker takes its own."""
    ids = []
    for _ in range(length):
        spec = {"type": f"chain-{chain}"}
        if ids:
            spec["depends_on"] = [ids[-1]]
        ids.append(post(conn, "/v1/tasks", spec)["id"])
    return ids


def run_chain(port, chain, length, gaps, errors):
    """Fetches and acks the chain's steps one at a time, noting for each
    step after the first how long after the last ack's answer it came."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    acked_at = None
    for step in range(length):
        tasks = post(conn, "/v1/fetch", {"worker_id": f"w{chain}", "types": [f"chain-{chain}"],
                                         "limit": 1, "wait_ms": 10_000})["tasks"]
        arrived = time.perf_counter()
        if len(tasks) != 1:
            errors.append(f"chain {chain}: step {step} did not come within 10 s")
            return
        if acked_at is not None:
            gaps.append(arrived - acked_at)
        post(conn, "/v1/ack", {"worker_id": f"w{chain}", "completed": [{"id": tasks[0]["id"]}]})
        acked_at = time.perf_counter()


def main():
    binary, db = sys.argv[1], sys.argv[2]
    chains = int(sys.argv[3]) if len(sys.argv) > 3 else 1
    length = int(sys.argv[4]) if len(sys.argv) > 4 else 500
    with tempfile.TemporaryDirectory() as tmp, serve(binary, db, tmp) as port:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        for chain in range(chains):
            enqueue_chain(conn, chain, length)
        gaps, errors = [], []
        workers = [threading.Thread(target=run_chain, args=(port, c, length, gaps, errors))
                   for c in range(chains)]
        started = time.perf_counter()
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        took = time.perf_counter() - started
        if errors:
            raise SystemExit("; ".join(errors))
        gaps.sort()
        print(f"{chains} chain(s) of {length}: {took:.2f} s, {took / length * 1000:.2f} ms a step; "
              f"from an ack's answer to the next step p50 {statistics.median(gaps) * 1000:.2f} ms, "
              f"p99 {gaps[int(len(gaps) * 0.99)] * 1000:.2f} ms")


if __name__ == "__main__":
    main()
