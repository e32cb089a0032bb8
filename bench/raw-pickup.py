#!/usr/bin/env python3
"""Pickup through bare sockets: a thread long-polls `POST /v1/fetch` for one
task of type `raw.pickup` on a kept-alive connection and acks what it gets;
the main thread enqueues one task at a time on another and waits until the
fetch has it, then 1 ms, as `offload bench`'s pickup phase does. Prints the
p50 and p99 from the enqueue request leaving to the fetch's whole answer
arriving: the server's part of a pickup with next to no client around it,
to hold beside `offload bench --url URL`'s pickup on the same server.

    python3 bench/raw-pickup.py http://127.0.0.1:PORT [SAMPLES]
"""

import json
import socket
import sys
import threading
import time


def connect(address):
    sock = socket.create_connection(address)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def exchange(sock, path, body):
    """One POST on a kept-alive connection; the answer's status and body."""
    data = json.dumps(body).encode()
    sock.sendall(
        b"POST %s HTTP/1.1\r\nhost: offload\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\n\r\n%s" % (path.encode(), len(data), data)
    )
    buf = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("the server closed the connection")
        buf += chunk
        head, sep, rest = buf.partition(b"\r\n\r\n")
        if not sep:
            continue
        lines = head.split(b"\r\n")
        length = next(
            int(line.split(b":", 1)[1])
            for line in lines
            if line.lower().startswith(b"content-length:")
        )
        if len(rest) >= length:
            return int(lines[0].split(b" ")[1]), rest[:length]


def main():
    address = sys.argv[1].removeprefix("http://").rstrip("/")
    host, port = address.rsplit(":", 1)
    address = (host, int(port))
    samples = int(sys.argv[2]) if len(sys.argv) > 2 else 1000
    fetched = []

    def worker():
        sock = connect(address)
        while len(fetched) < samples:
            status, body = exchange(
                sock,
                "/v1/fetch",
                {"worker_id": "raw-pickup", "types": ["raw.pickup"], "limit": 1, "wait_ms": 30000},
            )
            arrived = time.perf_counter()
            if status != 200:
                raise RuntimeError(f"fetch answered {status}: {body!r}")
            tasks = json.loads(body)["tasks"]
            if not tasks:
                continue
            fetched.append(arrived)
            exchange(sock, "/v1/ack", {"worker_id": "raw-pickup", "completed": [{"id": tasks[0]["id"]}]})

    fetcher = threading.Thread(target=worker, daemon=True)
    fetcher.start()
    # Let the first long poll reach the server.
    time.sleep(0.3)
    sock = connect(address)
    sent = []
    for _ in range(samples):
        before = len(fetched)
        sent.append(time.perf_counter())
        status, body = exchange(sock, "/v1/tasks", {"type": "raw.pickup", "payload": {"n": 1}})
        if status != 201:
            raise RuntimeError(f"enqueue answered {status}: {body!r}")
        while len(fetched) == before:
            if not fetcher.is_alive():
                raise RuntimeError("the fetching thread stopped")
            time.sleep(0.0002)
        time.sleep(0.001)
    fetcher.join()
    latencies = sorted((got - left) * 1000 for left, got in zip(sent, fetched))
    p50 = latencies[len(latencies) // 2]
    p99 = latencies[max(0, int(len(latencies) * 0.99) - 1)]
    print(f"raw pickup p50 {p50:.3f} ms, p99 {p99:.3f} ms ({samples} samples)")


if __name__ == "__main__":
    main()
