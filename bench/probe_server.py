"""`offload serve` for the probes in this folder: on a free port, on a
fresh SQLite file or a fresh PostgreSQL schema; and their requests to it."""

import contextlib
import http.client
import json
import socket
import subprocess
import threading
import time
import urllib.request


@contextlib.contextmanager
def serve(binary, db, tmp, fresh=True):
    """`offload serve` on a free port, on a fresh SQLite file in `tmp` or
    PostgreSQL schema `probe` (kept as it is for another node of the same
    schema when not `fresh`); yields the port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    if db == "sqlite":
        db = f"{tmp}/probe.db"
    else:
        if fresh:
            subprocess.run(["psql", "-q", db.split("?")[0], "-c", "DROP SCHEMA IF EXISTS probe CASCADE"],
                           check=True, capture_output=True)
        db += ("&" if "?" in db else "?") + "schema=probe"
    server = subprocess.Popen([binary, "serve", "--listen", f"127.0.0.1:{port}", "--db", db],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(200):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health")
                break
            except OSError:
                time.sleep(0.05)
        yield port
    finally:
        server.terminate()
        server.wait()


def post(conn, path, body, headers=None):
    """`POST path` with a JSON body on the kept-alive connection `conn`;
    the answer's JSON (None when empty), or the probe ends on an error."""
    conn.request("POST", path, json.dumps(body),
                 {"content-type": "application/json", **(headers or {})})
    answer = conn.getresponse()
    data = answer.read()
    if answer.status >= 300:
        raise SystemExit(f"{path}: {answer.status} {data[:300]!r}")
    return json.loads(data) if data else None


def fetch_and_ack(conn, worker_id, fetch):
    """One `POST /v1/fetch` of `fetch` (its limit, wait and filters) on
    `conn` as `worker_id`, and the ack of every task it brought: the
    tasks, and when they arrived (`time.time()`, before the ack)."""
    claimed = post(conn, "/v1/fetch", {"worker_id": worker_id, **fetch})["tasks"]
    arrived = time.time()
    if claimed:
        post(conn, "/v1/ack", {"worker_id": worker_id,
                               "completed": [{"id": task["id"]} for task in claimed]})
    return claimed, arrived


@contextlib.contextmanager
def fetching(port, n, fetch_once):
    """`n` threads, each on a kept-alive connection of its own, calling
    `fetch_once(k, conn)` (k its number) over and over until the block
    ends; the block's end waits for the fetches under way, each of which
    ends within its wait, before the server does."""
    stop = threading.Event()

    def run(k):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        while not stop.is_set():
            fetch_once(k, conn)

    threads = [threading.Thread(target=run, args=(k,), daemon=True) for k in range(n)]
    for thread in threads:
        thread.start()
    try:
        yield
    finally:
        stop.set()
        for thread in threads:
            thread.join()
