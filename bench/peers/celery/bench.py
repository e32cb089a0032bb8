"""Celery on Redis, the same workload as `offload bench`. Prints one JSON
line with the same keys.

Celery has no bulk enqueue; "batch" here is a group of 1,000 signatures sent
with one apply_async, its documented way to send many tasks at once.
Processing is timed from the first task's start to the last one's, so the
worker's start-up is not counted against it.
"""

import json
import math
import os
import subprocess
import sys
import time

import celery
from celery import group

from bench_app import app, noop, notes, pickup

N = int(sys.argv[1]) if len(sys.argv) > 1 else 20000
PAYLOAD = {"user_id": 42, "template": "welcome", "locale": "en"}
PICKUP_SAMPLES = min(N, 1000)


def worker():
    return subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "bench_app", "worker", "--pool=prefork",
         f"--concurrency={os.cpu_count()}", "-O", "fair", "--without-heartbeat",
         "--without-gossip", "--without-mingle", "--loglevel=WARNING"],
        cwd=os.path.dirname(os.path.abspath(__file__)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def main():
    app.control.purge()
    notes.flushdb()
    total = 2 * N

    started = time.perf_counter()
    for _ in range(N):
        noop.apply_async((PAYLOAD, total))
    enqueue_single = N / (time.perf_counter() - started)

    started = time.perf_counter()
    for done in range(0, N, 1000):
        size = min(1000, N - done)
        group(noop.s(PAYLOAD, total) for _ in range(size)).apply_async()
    enqueue_batch = N / (time.perf_counter() - started)

    process = worker()
    try:
        deadline = time.time() + 3600
        while notes.get("last") is None:
            if time.time() > deadline:
                raise SystemExit("Celery did not finish in an hour")
            time.sleep(0.05)
        first, last = float(notes.get("first")), float(notes.get("last"))
        process_rate = (total - 1) / (last - first)

        latencies = []
        time.sleep(0.3)
        for _ in range(PICKUP_SAMPLES):
            sent = time.time()
            pickup.apply_async((1,))
            _, began = notes.blpop("started", timeout=30)
            latencies.append((float(began) - sent) * 1000)
            time.sleep(0.001)
        latencies.sort()
        at = lambda q: latencies[min(len(latencies), max(1, math.ceil(len(latencies) * q))) - 1]
    finally:
        process.terminate()
        process.wait()

    info = notes.info("server")
    persistence = notes.config_get("appendonly")["appendonly"], notes.config_get("save")["save"]
    print(json.dumps({
        "system": "Celery",
        "version": celery.__version__,
        "store": "redis",
        "durability": f"Redis {info['redis_version']}, appendonly={persistence[0]}, save=\"{persistence[1]}\"",
        "tasks": N,
        "enqueue_single_per_sec": enqueue_single,
        "enqueue_batch_per_sec": enqueue_batch,
        "process_per_sec": process_rate,
        "pickup_ms": {"p50": at(0.5), "p99": at(0.99)},
    }))


if __name__ == "__main__":
    main()
