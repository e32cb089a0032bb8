"""A task's event stream opened as its task completes: does it end? ROUNDS
times, a task is enqueued and fetched; then one process acks it and
another opens `GET /v1/tasks/{id}/events` at moments apart by a random
offset between LO and HI seconds (the stream's minus the ack's), each
waiting for its moment. Prints, by offset in tenths of a millisecond,
whether the stream read the task running (then heard it complete), read
it completed, or was still open 2 s later (STUCK: it missed the change).

    python3 bench/stream-race.py target/release/offload DB ROUNDS LO HI

DB is `sqlite` (a fresh file) or a PostgreSQL URL (schema `probe`, made
afresh); `-0.001 0.0005` spans the moment of the ack's commit here.
"""

import collections
import http.client
import multiprocessing as mp
import random
import socket
import sys
import tempfile
import time

from probe_server import post, serve


def until(t):
    while time.monotonic() < t:
        pass

def acker(port, pipe):
    conn = http.client.HTTPConnection("127.0.0.1", port)
    while True:
        msg = pipe.recv()
        if msg is None:
            return
        tid, at = msg
        until(at)
        post(conn, "/v1/ack", {"worker_id": "w", "completed": [{"id": tid}]})
        pipe.send(True)

def streamer(port, pipe):
    while True:
        msg = pipe.recv()
        if msg is None:
            return
        tid, at = msg
        until(at)
        s = socket.create_connection(("127.0.0.1", port))
        s.settimeout(2)
        s.sendall(f"GET /v1/tasks/{tid}/events HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        data = b""
        outcome = None
        try:
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
                if b'"completed"' in data and data.endswith(b"0\r\n\r\n"):
                    break
            r, c = data.find(b'"running"'), data.find(b'"completed"')
            outcome = "r" if r != -1 and r < c else "c"
        except socket.timeout:
            outcome = "STUCK"
        s.close()
        pipe.send(outcome)

if __name__ == "__main__":
    binary, db, rounds, lo, hi = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5])
    with tempfile.TemporaryDirectory() as tmp, serve(binary, db, tmp) as port:
        a_here, a_there = mp.Pipe()
        s_here, s_there = mp.Pipe()
        procs = [mp.Process(target=acker, args=(port, a_there)), mp.Process(target=streamer, args=(port, s_there))]
        for p in procs:
            p.start()
        conn = http.client.HTTPConnection("127.0.0.1", port)
        seen = collections.Counter()
        for i in range(rounds):
            tid = post(conn, "/v1/tasks", {"type": "t"})["id"]
            post(conn, "/v1/fetch", {"worker_id": "w", "limit": 1})
            d = random.uniform(lo, hi)
            t0 = time.monotonic() + 0.003
            a_here.send((tid, t0))
            s_here.send((tid, t0 + d))
            a_here.recv()
            seen[(round(d * 1e4), s_here.recv())] += 1
        a_here.send(None); s_here.send(None)
        for p in procs:
            p.join()
        print(sorted(seen.items()))
        by = collections.Counter(o for (_, o), n in seen.items() for _ in range(n))
        print(f"{rounds} streams opened as their task completed: {dict(by)}")
