#!/usr/bin/env python3
"""Writes of one task a request from many clients at once: CLIENTS
processes, each on a kept-alive connection, for SECONDS; prints writes a
second and each one's p50 and p99.

    python3 bench/concurrent-writes.py target/release/offload DB [CLIENTS] [SECONDS] [WHAT]

WHAT is `enqueue` (the default: `POST /v1/tasks`, as a web application's
request handlers enqueue), `keyed` (the same, each task with a unique key
of its own, which takes a transaction where a task without one takes one
statement on PostgreSQL; `STORED=N` in the environment enqueues N tasks
with keys of their own first, which stay pending), `dependent` (the
same, each task depending on one task enqueued first, which stays
pending, so each is blocked; a dependency is read and locked, as a key's
holder is), `process` (a task fetched, one at a time, and completed, as
workers that fetch one task for each free slot do: 40,000 tasks over the
clients, and 2,000 a client at least, are enqueued first) or `complete` (`POST /v1/tasks/{id}/complete`,
as workers that report each task on its own do: 40,000 tasks over the
clients, and 2,000 a client at least, are enqueued and fetched for them
first; a client that runs out says so). DB is `sqlite` (a fresh file) or a
PostgreSQL URL (schema `probe`, made afresh).
"""

import http.client
import itertools
import json
import multiprocessing
import os
import socket
import sys
import tempfile
import time

from probe_server import post, serve

TASKS = 40000
LEAST_A_CLIENT = 2000


def request(path, body):
    """A request written out once and read back with as little parsing as
    will do: http.client cost the clients more CPU than the server spent."""
    body = body.encode()
    return (b"POST %s HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\n\r\n%s" % (path.encode(), len(body), body))


ENQUEUE = request("/v1/tasks", '{"type": "probe.noop", "payload": {"n": 1}}')


def answer(sock, buffered):
    """Reads one answer off `sock`; its status, its body and the bytes read
    past it."""
    while b"\r\n\r\n" not in buffered:
        buffered += sock.recv(65536)
    head, rest = buffered.split(b"\r\n\r\n", 1)
    length = int(head.lower().split(b"content-length:", 1)[1].split(b"\r\n", 1)[0])
    while len(rest) < length:
        rest += sock.recv(65536)
    return int(head[9:12]), rest[:length], rest[length:]


def processed(sock, buffered, worker):
    """Fetches one task as `worker` and completes it; the bytes read past
    the last answer, or None when the fetch found none."""
    sock.sendall(request("/v1/fetch", json.dumps({"worker_id": worker, "limit": 1})))
    status, body, buffered = answer(sock, buffered)
    if status != 200:
        raise SystemExit(f"the fetch answered {status}")
    tasks = json.loads(body)["tasks"]
    if not tasks:
        return None
    sock.sendall(request(f"/v1/tasks/{tasks[0]['id']}/complete", json.dumps({"worker_id": worker})))
    status, _, buffered = answer(sock, buffered)
    if status != 200:
        raise SystemExit(f"the completion answered {status}")
    return buffered


def keyed(index):
    """Enqueues of tasks with unique keys of client `index`'s own."""
    n = 0
    while True:
        n += 1
        yield request("/v1/tasks", '{"type": "probe.noop", "payload": {"n": 1}, '
                      f'"unique_key": "c{index}-{n}"}}')


def client(port, seconds, start, out, held, what, index):
    """Writes until `start + seconds`: enqueues (of dependents, the request
    `held`), or completions of the tasks `held` (fetched as worker `w<i>`)
    while they last."""
    if what == "complete":
        requests = iter([request(f"/v1/tasks/{task_id}/complete", json.dumps({"worker_id": worker}))
                         for worker, task_id in held])
    elif what == "keyed":
        requests = keyed(index)
    elif what == "dependent":
        requests = itertools.repeat(held)
    else:
        requests = None
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    latencies = []
    buffered = b""
    while time.time() < start:
        time.sleep(0.001)
    end = start + seconds
    while what == "process" and time.time() < end:
        t0 = time.perf_counter()
        buffered = processed(sock, buffered, f"w{index}")
        if buffered is None:
            print(f"a client ran out of tasks after {time.time() - start:.1f} s", file=sys.stderr)
            break
        latencies.append(time.perf_counter() - t0)
    while what != "process" and time.time() < end:
        sent = ENQUEUE if requests is None else next(requests, None)
        if sent is None:
            print(f"a client ran out of tasks after {time.time() - start:.1f} s", file=sys.stderr)
            break
        t0 = time.perf_counter()
        sock.sendall(sent)
        status, _, buffered = answer(sock, buffered)
        if status not in (200, 201):
            raise SystemExit(f"the write answered {status}")
        latencies.append(time.perf_counter() - t0)
    out.put(latencies)


def main():
    binary, db = sys.argv[1], sys.argv[2]
    clients = int(sys.argv[3]) if len(sys.argv) > 3 else 16
    seconds = float(sys.argv[4]) if len(sys.argv) > 4 else 5.0
    what = sys.argv[5] if len(sys.argv) > 5 else "enqueue"
    if what not in ("enqueue", "keyed", "dependent", "complete", "process"):
        raise SystemExit(f"WHAT is enqueue, keyed, dependent, complete or process, not {what!r}")
    with tempfile.TemporaryDirectory() as tmp, serve(binary, db, tmp) as port:
        held = [[] for _ in range(clients)]
        stored = int(os.environ.get("STORED", "0"))
        if what == "keyed" and stored:
            conn = http.client.HTTPConnection("127.0.0.1", port)
            for first in range(0, stored, 1000):
                post(conn, "/v1/tasks/batch", {"tasks": [
                    {"type": "probe.noop", "unique_key": f"s{n}"}
                    for n in range(first, min(first + 1000, stored))]})
        if what == "dependent":
            conn = http.client.HTTPConnection("127.0.0.1", port)
            parent = post(conn, "/v1/tasks", {"type": "probe.parent"})["id"]
            held = [request("/v1/tasks", json.dumps({"type": "probe.noop", "depends_on": [parent]}))
                    for _ in range(clients)]
        if what == "complete":
            conn = http.client.HTTPConnection("127.0.0.1", port)
            each = max(TASKS // clients, LEAST_A_CLIENT)
            for i in range(clients):
                for _ in range(0, each, 1000):
                    post(conn, "/v1/tasks/batch", {"tasks": [{"type": "probe.noop"}] * 1000})
                while len(held[i]) < each:
                    fetched = post(conn, "/v1/fetch", {"worker_id": f"w{i}", "limit": 1000, "lease_secs": 3600})
                    held[i] += [(f"w{i}", task["id"]) for task in fetched["tasks"]]
        if what == "process":
            conn = http.client.HTTPConnection("127.0.0.1", port)
            for _ in range(0, max(TASKS, LEAST_A_CLIENT * clients), 1000):
                post(conn, "/v1/tasks/batch", {"tasks": [{"type": "probe.noop"}] * 1000})
        out = multiprocessing.Queue()
        start = time.time() + 1.0
        procs = [multiprocessing.Process(target=client, args=(port, seconds, start, out, held[i], what, i))
                 for i in range(clients)]
        for p in procs:
            p.start()
        latencies = []
        for _ in procs:
            latencies.extend(out.get())
        for p in procs:
            p.join()
    latencies.sort()
    n = len(latencies)
    label = {"enqueue": "enqueues", "keyed": "keyed enqueues", "dependent": "dependent enqueues",
             "complete": "completes", "process": "tasks fetched and completed"}[what]
    print(f"{clients} clients: {n / seconds:,.0f} {label} a second, "
          f"p50 {1000 * latencies[n // 2]:.2f} ms, p99 {1000 * latencies[int(n * 0.99)]:.2f} ms")


if __name__ == "__main__":
    main()
