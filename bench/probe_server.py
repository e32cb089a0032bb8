"""`offload serve` for the probes in this folder: on a free port, on a
fresh SQLite file or a fresh PostgreSQL schema."""

import contextlib
import socket
import subprocess
import time
import urllib.request


@contextlib.contextmanager
def serve(binary, db, tmp):
    """`offload serve` on a free port, on a fresh SQLite file in `tmp` or
    PostgreSQL schema `probe`; yields the port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    if db == "sqlite":
        db = f"{tmp}/probe.db"
    else:
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
