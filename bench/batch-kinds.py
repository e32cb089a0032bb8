#!/usr/bin/env python3
"""Batch enqueue of tasks of different kinds: ten batches of 1,000 each
(`Prefer: return=minimal`), one client, and the rate of each kind: plain
tasks, new unique keys, keys already held (kept, then replaced), labels,
owners, delays, priorities, a queue a task.

    python3 bench/batch-kinds.py target/release/offload DB

DB is `sqlite` (a fresh file) or a PostgreSQL URL, whose schema `probe`
is dropped first and used (`postgres://postgres@127.0.0.1:5432/test`).
"""

import http.client
import sys
import tempfile
import time

from probe_server import post, serve


def main():
    binary, db = sys.argv[1], sys.argv[2]
    with tempfile.TemporaryDirectory() as tmp, serve(binary, db, tmp) as port:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)

        def batches(label, make, rounds=10):
            started = time.perf_counter()
            for r in range(rounds):
                post(conn, "/v1/tasks/batch", {"tasks": [make(r, i) for i in range(1000)]},
                     {"prefer": "return=minimal"})
            print(f"  {label:<34} {rounds * 1000 / (time.perf_counter() - started):9,.0f} tasks a second")

        batches("plain", lambda r, i: {"type": "t"})
        batches("unique keys, new", lambda r, i: {"type": "t", "unique_key": f"k{r}-{i}"})
        batches("unique keys, held, kept", lambda r, i: {"type": "t", "unique_key": f"k{r}-{i}"})
        batches("unique keys, held, replaced",
                lambda r, i: {"type": "t", "unique_key": f"k{r}-{i}", "on_conflict": "replace"})
        batches("labels", lambda r, i: {"type": "t", "labels": {"project": f"p{i % 10}", "user": f"u{i}"}})
        batches("owners", lambda r, i: {"type": "t", "owner": f"user-{i % 100}"})
        batches("delayed", lambda r, i: {"type": "t", "delay_secs": 3600 + i})
        batches("priorities", lambda r, i: {"type": "t", "priority": 1 + i % 10})
        batches("a queue a task", lambda r, i: {"type": "t", "queue": f"q{r}-{i}"})


if __name__ == "__main__":
    main()
