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


def at_set_moments(pipe, act):
    """For each (task id, moment) the pipe brings, waits for the moment
    (spinning: a sleep wakes too late), acts on the task and sends back
    what `act` returned; until the pipe brings None."""
    while (message := pipe.recv()) is not None:
        task, moment = message
        while time.monotonic() < moment:
            pass
        pipe.send(act(task))


def acker(port, pipe):
    conn = http.client.HTTPConnection("127.0.0.1", port)
    at_set_moments(pipe, lambda task: post(
        conn, "/v1/ack", {"worker_id": "w", "completed": [{"id": task}]}))


def open_stream(port, task):
    """How the task's stream went: "r" it read the task running and then
    heard it complete, "c" it read it completed, "STUCK" no end in 2 s."""
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.settimeout(2)
        s.sendall(f"GET /v1/tasks/{task}/events HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        data = b""
        try:
            while chunk := s.recv(65536):
                data += chunk
                if b'"completed"' in data and data.endswith(b"0\r\n\r\n"):
                    break
        except socket.timeout:
            return "STUCK"
    running, completed = data.find(b'"running"'), data.find(b'"completed"')
    return "r" if -1 < running < completed else "c"


def streamer(port, pipe):
    at_set_moments(pipe, lambda task: open_stream(port, task))


def main():
    binary, db, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
    lo, hi = float(sys.argv[4]), float(sys.argv[5])
    with tempfile.TemporaryDirectory() as tmp, serve(binary, db, tmp) as port:
        to_acker, acker_end = mp.Pipe()
        to_streamer, streamer_end = mp.Pipe()
        helpers = [mp.Process(target=acker, args=(port, acker_end)),
                   mp.Process(target=streamer, args=(port, streamer_end))]
        for helper in helpers:
            helper.start()
        conn = http.client.HTTPConnection("127.0.0.1", port)
        by_offset = collections.Counter()
        for _ in range(rounds):
            task = post(conn, "/v1/tasks", {"type": "t"})["id"]
            post(conn, "/v1/fetch", {"worker_id": "w", "limit": 1})
            offset = random.uniform(lo, hi)
            ack_at = time.monotonic() + 0.003
            to_acker.send((task, ack_at))
            to_streamer.send((task, ack_at + offset))
            to_acker.recv()
            by_offset[(round(offset * 1e4), to_streamer.recv())] += 1
        to_acker.send(None)
        to_streamer.send(None)
        for helper in helpers:
            helper.join()
        print(sorted(by_offset.items()))
        outcomes = collections.Counter()
        for (_, outcome), n in by_offset.items():
            outcomes[outcome] += n
        print(f"{rounds} streams opened as their task completed: {dict(outcomes)}")


if __name__ == "__main__":
    main()
