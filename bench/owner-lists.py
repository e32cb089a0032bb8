#!/usr/bin/env python3
"""One owner's lists among another's many: 100 tasks of owner `small`,
then 100,000 newer ones of owner `big`, all run to completion, then each
list asked 10 times (a page of 50): the median, in ms, and how many tasks
the page held.

    python3 bench/owner-lists.py target/release/offload DB

DB is `sqlite` (a fresh file) or a PostgreSQL URL, whose schema `probe`
is dropped first and used (`postgres://postgres@127.0.0.1:5432/test`).
"""

import http.client
import json
import statistics
import sys
import tempfile
import time

from probe_server import post, serve

def main():
    binary, db = sys.argv[1], sys.argv[2]
    with tempfile.TemporaryDirectory() as tmp, serve(binary, db, tmp) as port:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        post(c, "/v1/tasks/batch", {"tasks": [{"type": "t", "owner": "small", "labels": {"p": "rare"}}] * 100}, {"prefer": "return=minimal"})
        for _ in range(100):
            post(c, "/v1/tasks/batch", {"tasks": [{"type": "t", "owner": "big", "labels": {"p": "common"}}] * 1000}, {"prefer": "return=minimal"})
        done = 0
        while done < 100100:
            ts = post(c, "/v1/fetch", {"worker_id": "w", "limit": 1000})["tasks"]
            if not ts: break
            post(c, "/v1/ack", {"worker_id": "w", "completed": [{"id": t["id"]} for t in ts]})
            done += len(ts)
        for q in ["state=completed,failed", "state=failed,cancelled", "state=completed", "state=failed&owner=big", "state=failed,cancelled&owner=big", "state=pending&owner=big", "owner=small", "state=completed&owner=small", "owner=small&type=t", "label=p:rare", "state=completed&label=p:rare", "state=completed&owner=big", "owner=nobody", "state=completed&owner=nobody"]:
            times = []
            for _ in range(10):
                t0 = time.perf_counter(); c.request("GET", f"/v1/tasks?{q}&limit=50"); r = c.getresponse(); page = json.loads(r.read()); times.append((time.perf_counter()-t0)*1000)
            print(f"  ?{q:<32} median {statistics.median(times):7.2f} ms, {len(page['tasks'])} tasks")


if __name__ == "__main__":
    main()
