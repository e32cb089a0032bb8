#!/usr/bin/env python3
"""Claims across many queues: TASKS tasks of type `t`, task i in queue
`c{i % QUEUES}`, burned down by FETCHERS threads (each its own kept-alive
connection) fetching up to 1,000 at a time and acking what came, until a
fetch is empty. Prints the burn-down's time, the median fetch, and how
many tasks were claimed (and claimed twice: never, or it is a bug).

    python3 bench/many-queues.py target/release/offload DB TASKS QUEUES FETCHERS MODE [LIMITED]

DB is `sqlite` (a fresh file) or a PostgreSQL URL, whose schema `probe`
is dropped first and used (`postgres://postgres@127.0.0.1:5432/test`).
MODE says what each fetch names: `all` (neither queues nor types),
`named` (the first 1,000 queues), `typed` (the type). LIMITED, if given,
limits every queue to that many running tasks first.
"""

import http.client
import json
import statistics
import sys
import tempfile
import threading
import time

from probe_server import post, serve


def main():
    binary, db = sys.argv[1], sys.argv[2]
    tasks, queues, fetchers = (int(a) for a in sys.argv[3:6])
    mode = sys.argv[6]
    limited = int(sys.argv[7]) if len(sys.argv) > 7 else None
    with tempfile.TemporaryDirectory() as tmp, serve(binary, db, tmp) as port:
        client = http.client.HTTPConnection("127.0.0.1", port)

        for start in range(0, tasks, 1000):
            batch = [{"type": "t", "queue": f"c{i % queues}"}
                     for i in range(start, min(tasks, start + 1000))]
            post(client, "/v1/tasks/batch", {"tasks": batch}, {"Prefer": "return=minimal"})
        if limited:
            for q in range(queues):
                client.request("PATCH", f"/v1/queues/c{q}", json.dumps({"concurrency": limited}),
                               {"content-type": "application/json"})
                answer = client.getresponse()
                answer.read()
                assert answer.status < 300, answer.status
        seen, twice, fetch_times = set(), [0], []
        lock = threading.Lock()
        named = [f"c{q}" for q in range(min(queues, 1000))]

        def fetcher(k):
            conn = http.client.HTTPConnection("127.0.0.1", port)
            while True:
                body = {"worker_id": f"w{k}", "limit": 1000}
                if mode == "named":
                    body["queues"] = named
                if mode == "typed":
                    body["types"] = ["t"]
                started = time.perf_counter()
                claimed = post(conn, "/v1/fetch", body)["tasks"]
                fetch_times.append(time.perf_counter() - started)
                if not claimed:
                    return
                ids = [task["id"] for task in claimed]
                with lock:
                    twice[0] += sum(1 for i in ids if i in seen)
                    seen.update(ids)
                post(conn, "/v1/ack", {"worker_id": f"w{k}", "completed": [{"id": i} for i in ids]})

        started = time.perf_counter()
        threads = [threading.Thread(target=fetcher, args=(k,)) for k in range(fetchers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        took = time.perf_counter() - started
        print(f"{mode}, {queues} queues, {fetchers} fetchers: burn-down {took:.1f} s, "
              f"fetch p50 {statistics.median(fetch_times) * 1000:.1f} ms, "
              f"claimed {len(seen)} of {tasks}, twice {twice[0]}")


if __name__ == "__main__":
    main()
