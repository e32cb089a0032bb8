#!/usr/bin/env python3
"""Many open event streams: TASK_STREAMS `GET /v1/tasks/{id}/events`,
each on a task of its own that stays pending, and FILTERED streams
`GET /v1/events?queue=idle`, then `offload bench --url` against the same
server (TASKS a phase, 2,000 stored); its figures, and how many events the
streams heard (one each: the task as it was when the stream began).

    python3 bench/event-streams.py target/release/offload DB TASK_STREAMS FILTERED [TASKS] [--other-node]

DB is `sqlite` (a fresh file) or a PostgreSQL URL, whose schema `probe`
is dropped first and used (`postgres://postgres@127.0.0.1:5432/test`).
With `--other-node` (PostgreSQL) the streams are opened on a second node
of the same schema, which hears the first's changes by notification.
"""

import contextlib
import http.client
import json
import socket
import subprocess
import sys
import tempfile
import threading
import time

from probe_server import post, serve


def open_streams(port, paths, heard):
    """One thread a stream, counting the events it hears in `heard`."""
    def listen(i, path):
        stream = socket.create_connection(("127.0.0.1", port))
        stream.sendall(f"GET {path} HTTP/1.1\r\nHost: offload\r\n\r\n".encode())
        for line in stream.makefile("rb"):
            if line.startswith(b"event:"):
                heard[i] += 1

    for i, path in enumerate(paths):
        threading.Thread(target=listen, args=(i, path), daemon=True).start()


def main():
    args = [a for a in sys.argv[1:] if a != "--other-node"]
    other_node = "--other-node" in sys.argv
    binary, db, task_streams, filtered = args[0], args[1], int(args[2]), int(args[3])
    tasks = args[4] if len(args) > 4 else "20000"
    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(tempfile.TemporaryDirectory())
        port = stack.enter_context(serve(binary, db, tmp))
        watched_port = stack.enter_context(serve(binary, db, tmp, fresh=False)) if other_node else port
        client = http.client.HTTPConnection("127.0.0.1", port)
        ids = []
        while len(ids) < task_streams:
            n = min(1000, task_streams - len(ids))
            batch = {"tasks": [{"type": "idle", "queue": "idle"}] * n}
            ids += [task["id"] for task in post(client, "/v1/tasks/batch", batch)["tasks"]]
        paths = [f"/v1/tasks/{id}/events" for id in ids] + ["/v1/events?queue=idle"] * filtered
        heard = [0] * len(paths)
        open_streams(watched_port, paths, heard)
        time.sleep(2)
        print(f"{task_streams} task streams and {filtered} filtered streams open"
              f"{' on another node' if other_node else ''}; events heard {sum(heard)}", flush=True)
        bench = subprocess.run([binary, "bench", "--url", f"http://127.0.0.1:{port}", "--tasks", tasks,
                                "--stored", "2000", "--json"], capture_output=True, text=True, check=True)
        figures = json.loads(bench.stdout)
        for key in ("enqueue_single_per_sec", "enqueue_batch_per_sec", "process_http_per_sec"):
            print(f"{key}: {figures[key]:.0f}")
        print(f"pickup_ms: p50 {figures['pickup_ms']['p50']:.3f}, p99 {figures['pickup_ms']['p99']:.3f}")
        print(f"events heard after the bench: {sum(heard)}")


if __name__ == "__main__":
    main()
