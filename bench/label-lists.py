#!/usr/bin/env python3
"""Lists filtered by label under a backlog: how long `GET
/v1/tasks?label=` takes for one page when the label is rare, middling or
common among the tasks in front of its own.

    python3 bench/label-lists.py target/release/offload DB [NEWER]

DB is `sqlite` (a fresh file) or a PostgreSQL URL, whose schema `probe`
is dropped first and used (`postgres://postgres@127.0.0.1:5432/test`).
Enqueues 100 tasks labelled `p: rare`, then NEWER (default 100,000)
tasks, every 100th labelled `p: mid`, every other one of the rest `p:
common`, the others without labels; all left pending. Then asks each
list 10 times on a kept-alive connection (the median and the slowest, in
ms, and how many tasks a page held), and pages through every task of `p:
mid` (the whole walk's time).
"""

import http.client
import json
import statistics
import sys
import tempfile
import time

from probe_server import post, serve


def get(conn, path):
    conn.request("GET", path)
    answer = conn.getresponse()
    page = json.loads(answer.read())
    if answer.status != 200:
        raise SystemExit(f"{path}: {answer.status} {page}")
    return page


def main():
    binary, db = sys.argv[1], sys.argv[2]
    newer = int(sys.argv[3]) if len(sys.argv) > 3 else 100_000
    with tempfile.TemporaryDirectory() as tmp, serve(binary, db, tmp) as port:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        minimal = {"prefer": "return=minimal"}
        post(conn, "/v1/tasks/batch", {"tasks": [{"type": "t", "labels": {"p": "rare"}}] * 100},
             minimal)

        def labelled(n):
            if n % 100 == 0:
                return {"type": "t", "labels": {"p": "mid"}}
            if n % 2 == 0:
                return {"type": "t", "labels": {"p": "common"}}
            return {"type": "t"}

        for start in range(0, newer, 1000):
            post(conn, "/v1/tasks/batch",
                 {"tasks": [labelled(n) for n in range(start, min(start + 1000, newer))]},
                 minimal)
        print(f"100 tasks of p: rare behind {newer} newer")
        for query in ["label=p:rare", "label=p:mid", "label=p:common", "label=p:none",
                      "state=pending&label=p:rare", "type=t&label=p:rare"]:
            times = []
            for _ in range(10):
                started = time.perf_counter()
                page = get(conn, f"/v1/tasks?{query}&limit=50")
                times.append((time.perf_counter() - started) * 1000)
            print(f"  ?{query:<28} median {statistics.median(times):7.2f} ms, "
                  f"slowest {max(times):7.2f} ms, {len(page['tasks'])} tasks")
        started, pages, seen, cursor = time.perf_counter(), 0, 0, None
        while True:
            page = get(conn, "/v1/tasks?label=p:mid&limit=50"
                       + (f"&cursor={cursor}" if cursor else ""))
            pages, seen, cursor = pages + 1, seen + len(page["tasks"]), page["next_cursor"]
            if not cursor:
                break
        print(f"  every page of p: mid: {seen} tasks in {pages} pages, "
              f"{(time.perf_counter() - started) * 1000:.0f} ms")


if __name__ == "__main__":
    main()
