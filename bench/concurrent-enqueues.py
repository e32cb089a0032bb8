#!/usr/bin/env python3
"""Single enqueues from many clients at once, as a web application's
request handlers make them: CLIENTS processes, each on a kept-alive
connection posting one task at a time (`POST /v1/tasks`) for SECONDS;
prints enqueues a second and each one's p50 and p99.

    python3 bench/concurrent-enqueues.py target/release/offload DB [CLIENTS] [SECONDS]

DB is `sqlite` (a fresh file) or a PostgreSQL URL (schema `probe`, made
afresh).
"""

import multiprocessing
import socket
import sys
import tempfile
import time

from probe_server import serve

BODY = b'{"type": "probe.noop", "payload": {"n": 1}}'
# Written out once and read back with as little parsing as will do:
# http.client cost the clients more CPU than the server spent.
REQUEST = (b"POST /v1/tasks HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
           b"content-length: %d\r\n\r\n%s" % (len(BODY), BODY))


def answer(sock, buffered):
    """Reads one answer off `sock`; its status and the bytes read past it."""
    while b"\r\n\r\n" not in buffered:
        buffered += sock.recv(65536)
    head, rest = buffered.split(b"\r\n\r\n", 1)
    length = int(head.lower().split(b"content-length:", 1)[1].split(b"\r\n", 1)[0])
    while len(rest) < length:
        rest += sock.recv(65536)
    return int(head[9:12]), rest[length:]


def client(port, seconds, start, out):
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    latencies = []
    buffered = b""
    while time.time() < start:
        time.sleep(0.001)
    end = start + seconds
    while time.time() < end:
        t0 = time.perf_counter()
        sock.sendall(REQUEST)
        status, buffered = answer(sock, buffered)
        if status != 201:
            raise SystemExit(f"enqueue answered {status}")
        latencies.append(time.perf_counter() - t0)
    out.put(latencies)


def main():
    binary, db = sys.argv[1], sys.argv[2]
    clients = int(sys.argv[3]) if len(sys.argv) > 3 else 16
    seconds = float(sys.argv[4]) if len(sys.argv) > 4 else 5.0
    with tempfile.TemporaryDirectory() as tmp, serve(binary, db, tmp) as port:
        out = multiprocessing.Queue()
        start = time.time() + 1.0
        procs = [multiprocessing.Process(target=client, args=(port, seconds, start, out))
                 for _ in range(clients)]
        for p in procs:
            p.start()
        latencies = []
        for _ in procs:
            latencies.extend(out.get())
        for p in procs:
            p.join()
    latencies.sort()
    n = len(latencies)
    print(f"{clients} clients: {n / seconds:,.0f} enqueues a second, "
          f"p50 {1000 * latencies[n // 2]:.2f} ms, p99 {1000 * latencies[int(n * 0.99)]:.2f} ms")


if __name__ == "__main__":
    main()
