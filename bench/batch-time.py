#!/usr/bin/env python3
"""The time one batch enqueue takes at a running server, client overhead
kept small: one prepared body of 1,000 tasks posted again and again on one
connection, the answer read as bytes and not parsed.

    python3 bench/batch-time.py [URL] [POSTS]

URL defaults to http://127.0.0.1:6490, POSTS to 60. Prints the median time
of a post in milliseconds, leaving out the first five (the first batch of a
server prepares its statements and grows its buffers). Compare two builds by
running each server in turn on a fresh database.
"""

import http.client
import json
import statistics
import sys
import time
import urllib.parse

BATCH = 1000
WARM_UP = 5


def main():
    url = urllib.parse.urlsplit(sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:6490")
    posts = sys.argv[2] if len(sys.argv) > 2 else "60"
    if not posts.isdigit() or int(posts) <= WARM_UP:
        sys.exit(f"bench/batch-time.py: POSTS must be a whole number above {WARM_UP}; got {posts!r}")
    posts = int(posts)
    body = json.dumps(
        {"tasks": [{"type": "bench.noop", "payload": {"n": i, "data": "x" * 32}} for i in range(BATCH)]}
    )
    conn = http.client.HTTPConnection(url.hostname, url.port or 80)
    times = []
    for _ in range(posts):
        started = time.perf_counter()
        try:
            conn.request("POST", "/v1/tasks/batch", body, {"Content-Type": "application/json"})
            response = conn.getresponse()
            answer = response.read()
        except OSError as e:
            sys.exit(f"bench/batch-time.py: cannot reach {url.geturl()}: {e}")
        times.append(time.perf_counter() - started)
        if response.status != 201:
            sys.exit(f"bench/batch-time.py: the server answered {response.status}: {answer[:300]!r}")
    print(f"{statistics.median(times[WARM_UP:]) * 1000:.3f}")


if __name__ == "__main__":
    main()
