"""Turns bench/results/*.json into bench/RESULTS.md: one table, a row per
system, the ratios to the best peer, the targets, and how it was measured.

    python3 bench/report.py bench/results                 # one run
    python3 bench/report.py bench/results/run-1 run-2 …   # several

With several runs, each figure in the tables is its median over the runs,
and each ratio is the median of the runs' own ratios: a ratio compares
figures taken in the same minutes, never one run's peer with another's."""

import json
import os
import platform
import statistics
import subprocess
import sys

runs = sys.argv[1:]
results = runs[0]  # where the disk's figures are kept


def median_of(values):
    """The median of numbers, dict by dict for nested figures (pickup_ms);
    what every run has alike (the task count, names, versions) as it is."""
    first = values[0]
    if all(v == first for v in values):
        return first
    if isinstance(first, dict):
        return {k: median_of([v[k] for v in values]) for k in first}
    if isinstance(first, (int, float)) and not isinstance(first, bool):
        return statistics.median(values)
    return first


def load_run(run, name):
    return json.load(open(os.path.join(run, f"{name}.json")))


def load(name):
    return median_of([load_run(run, name) for run in runs])


def exists(name):
    return all(os.path.exists(os.path.join(run, f"{name}.json")) for run in runs)


def systems(get):
    """Every system's figures, from `get`: Offload's runs by name, the
    peers in a list."""
    peers = [get("bullmq"), get("graphile-worker"), get("celery")]
    found = {"sqlite": get("offload-sqlite"), "postgres": get("offload-postgres"), "peers": peers}
    # BullMQ on a Redis that fsyncs its append-only file before every
    # reply: the one peer run at Offload's durability (bench/run starts
    # that Redis).
    found["durable"] = None
    if exists("bullmq-durable"):
        found["durable"] = get("bullmq-durable")
        found["durable"]["label"] = f"BullMQ {found['durable']['version']}, Redis fsync per write"
        peers.insert(1, found["durable"])
    for key, name in [("relaxed", "offload-sqlite-relaxed"), ("ids", "offload-sqlite-batch-ids")]:
        found[key] = get(name) if exists(name) else None
    return found


medians = systems(load)
sqlite, postgres, peers, durable_bullmq = medians["sqlite"], medians["postgres"], medians["peers"], medians["durable"]


def cpu():
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def disk_ms():
    """How long this disk takes to make a small write durable, measured once
    when the results are first reported and kept with them, so that writing
    the report again does not change a figure of the run."""
    kept = os.path.join(results, "disk-ms.json")
    if os.path.exists(kept):
        return json.load(open(kept))
    measured = {
        "fsync": measure_fsync_ms(),
        "direct": measure_direct_write_ms(0),
        "direct_dsync": measure_direct_write_ms(os.O_DSYNC),
    }
    with open(kept, "w") as f:
        json.dump(measured, f)
    return measured


def measure_fsync_ms():
    """A 128-byte append and its fsync: what a commit costs."""
    import time
    path = os.path.join(results, "fsync.probe")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    started = time.perf_counter()
    for _ in range(500):
        os.write(fd, b"x" * 128)
        os.fsync(fd)
    elapsed = time.perf_counter() - started
    os.close(fd)
    os.unlink(path)
    return elapsed / 500 * 1000


def measure_direct_write_ms(flags):
    """A 4 KiB write straight to the device (O_DIRECT: no page cache) over
    blocks already allocated, so that no metadata is written: the round
    trip to the disk that any durable write pays at least once."""
    import mmap
    import time
    blocks, path = 500, os.path.join(results, "direct.probe")
    page = mmap.mmap(-1, 4096)  # O_DIRECT needs an aligned buffer
    page.write(b"x" * 4096)
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    for i in range(blocks):
        os.pwrite(fd, page, i * 4096)
    os.fsync(fd)
    os.close(fd)
    fd = os.open(path, os.O_RDWR | os.O_DIRECT | flags)
    started = time.perf_counter()
    for i in range(blocks):
        os.pwrite(fd, page, i * 4096)
    elapsed = time.perf_counter() - started
    os.close(fd)
    os.unlink(path)
    return elapsed / blocks * 1000


def postgres_settings():
    """The PostgreSQL server's settings as `bench/run` read them before the
    first run, or None for results from before it did."""
    path = os.path.join(results, "postgres-settings.json")
    return json.load(open(path)) if os.path.exists(path) else None


pg = postgres_settings()
pg_durability = ("PostgreSQL (its settings not recorded with these results)" if pg is None else
                 f"PostgreSQL {pg['server_version'].split()[0]}, synchronous_commit={pg['synchronous_commit']}, "
                 f"fsync={pg['fsync']}")
fmt = lambda v: "n/a" if v is None else f"{v:,.0f}"
ms = lambda p: f"{p['p50']:.2f} / {p['p99']:.2f}"
rows = [
    ("Offload (SQLite)", sqlite["enqueue_single_per_sec"], sqlite["enqueue_batch_per_sec"],
     sqlite["process_http_per_sec"], sqlite["process_embedded_per_sec"], sqlite["pickup_ms"],
     f"{sqlite['claim_scaling']:.2f}", f"{sqlite['server_rss_mb']:.0f}", f"SQLite WAL, fdatasync before each answer ({sqlite['durability']})"),
    ("Offload (PostgreSQL)", postgres["enqueue_single_per_sec"], postgres["enqueue_batch_per_sec"],
     postgres["process_http_per_sec"], postgres["process_embedded_per_sec"], postgres["pickup_ms"],
     f"{postgres['claim_scaling']:.2f}", f"{postgres['server_rss_mb']:.0f}", pg_durability),
]
for p in peers:
    rows.append((p.get("label", f"{p['system']} {p['version']}"), p["enqueue_single_per_sec"], p["enqueue_batch_per_sec"],
                 p["process_per_sec"], None, p["pickup_ms"], "", "", p["durability"]))

print("# Benchmark results\n")
how_many = ("" if len(runs) == 1 else
            f" Each figure is the median of {len(runs)} runs, each ratio the median of the runs' own ratios.")
print(f"Written by `bench/run` (TASKS={sqlite['tasks']} per phase). Machine: {sqlite['cores']} cores, {cpu()}, "
      f"Linux {platform.release()}. Server, database and load generator share the machine. Figures are tasks "
      f"per second unless marked.{how_many}\n")
disk = disk_ms()
print(f"This disk, on average over 500 writes: a 128-byte append and its fsync {disk['fsync']:.3f} ms; "
      f"a 4 KiB write straight to the device (O_DIRECT), not flushed, {disk['direct']:.3f} ms, "
      f"and with O_DSYNC {disk['direct_dsync']:.3f} ms.\n")
if pg is not None:
    print(f"The PostgreSQL server, shared by Offload's PostgreSQL row and graphile-worker's, runs as this machine "
          f"configures it: synchronous_commit={pg['synchronous_commit']}, fsync={pg['fsync']}, "
          f"full_page_writes={pg['full_page_writes']}, autovacuum={pg['autovacuum']}; both connect over "
          f"loopback without TLS (`sslmode=disable`).\n")
print("| system | enqueue, one per request | enqueue, batch | process (HTTP for Offload) | process in process | pickup p50 / p99 ms | claim scaling | server peak MB | durability |")
print("|---|---:|---:|---:|---:|---:|---:|---:|---|")
for r in rows:
    print(f"| {r[0]} | {fmt(r[1])} | {fmt(r[2])} | {fmt(r[3])} | {fmt(r[4])} | {ms(r[5])} | {r[6]} | {r[7]} | {r[8]} |")

name = lambda p: p.get("label", p["system"])
best = lambda peers, key: max(peers, key=lambda p: p[key])
best_pickup = min(peers, key=lambda p: p["pickup_ms"]["p50"])
per_run = [systems(lambda name, run=run: load_run(run, name)) for run in runs]


def ratio(of):
    """`of` each run's figures: the median over the runs, and each run's
    own when there are several."""
    each = [of(figures) for figures in per_run]
    shown = "" if len(each) == 1 else " (runs: " + ", ".join(f"{r:.2f}" for r in each) + ")"
    return statistics.median(each), shown


def target(name, value, goal, ok):
    print(f"| {name} | {value} | {goal} | {'met' if ok else '**missed**'} |")


def against_best(label, ours_key, peer_key, goal):
    r, shown = ratio(lambda run: run["sqlite"][ours_key] / best(run["peers"], peer_key)[peer_key])
    target(label, f"{r:.2f}× {name(best(peers, peer_key))}{shown}", f"≥ {goal}×", r >= goal)


print("\n## Offload against the best peer, and the targets\n")
print("| figure | Offload | target | |")
print("|---|---|---|---|")
against_best("process over HTTP vs best peer", "process_http_per_sec", "process_per_sec", 5)
against_best("batch enqueue vs best peer", "enqueue_batch_per_sec", "enqueue_batch_per_sec", 5)
against_best("single enqueue vs best peer", "enqueue_single_per_sec", "enqueue_single_per_sec", 2)
p = sqlite["pickup_ms"]
target("pickup p50 vs best peer's p50", f"{p['p50']:.2f} ms vs {best_pickup['pickup_ms']['p50']:.2f} ms ({name(best_pickup)})",
       "below", p["p50"] < best_pickup["pickup_ms"]["p50"])
target("pickup p99", f"{p['p99']:.2f} ms", "≤ 5 ms", p["p99"] <= 5)
target("claim scaling", f"{sqlite['claim_scaling']:.2f}", "≥ 0.8", sqlite["claim_scaling"] >= 0.8)
target("server peak memory, 1M stored", f"{sqlite['server_rss_mb']:.0f} MB", "≤ 200 MB", sqlite["server_rss_mb"] <= 200)
graphile_of = lambda peers: next(p for p in peers if p["system"] == "graphile-worker")
r, shown = ratio(lambda run: run["postgres"]["process_http_per_sec"] / graphile_of(run["peers"])["process_per_sec"])
target("PostgreSQL: process vs graphile-worker", f"{r:.2f}×{shown}", "≥ 3×", r >= 3)


def side_by_side(ours_label, ours_of, peer_label, peer_of):
    """Offload and one peer at the same durability, figure by figure;
    `ours_of` and `peer_of` pick them out of a run's figures."""
    pick = lambda of: median_of([of(figures) for figures in per_run])
    ours, peer = pick(ours_of), pick(peer_of)
    print(f"| figure | {ours_label} | {peer_label} | Offload / BullMQ |")
    print("|---|---:|---:|---:|")
    for figure, key, peer_key in [
        ("enqueue, one per request", "enqueue_single_per_sec", "enqueue_single_per_sec"),
        ("enqueue, batch", "enqueue_batch_per_sec", "enqueue_batch_per_sec"),
        ("process", "process_http_per_sec", "process_per_sec"),
    ]:
        r, _ = ratio(lambda run: ours_of(run)[key] / peer_of(run)[peer_key])
        print(f"| {figure} | {fmt(ours[key])} | {fmt(peer[peer_key])} | {r:.2f}× |")
    r, _ = ratio(lambda run: ours_of(run)["pickup_ms"]["p50"] / peer_of(run)["pickup_ms"]["p50"])
    print(f"| pickup p50 (ms, lower is better) | {ours['pickup_ms']['p50']:.2f} | {peer['pickup_ms']['p50']:.2f} | {r:.2f} |")


if durable_bullmq:
    print("\n## At Offload's durability\n")
    print("The targets above compare durable Offload with the fastest peer, which")
    print("for most figures is BullMQ on a Redis that keeps nothing on disk. The one")
    print("peer run here at Offload's durability, every acknowledged write on disk")
    print("first, is BullMQ on a Redis with `appendfsync always`:\n")
    side_by_side("Offload (SQLite)", lambda run: run["sqlite"],
                 durable_bullmq["label"], lambda run: run["durable"])

if medians["ids"]:
    ids = medians["ids"]
    best_batch = best(peers, "enqueue_batch_per_sec")
    print("\n## Batch enqueue answered with ids\n")
    print("The batch figure above is answered as SPEC §4 says, with every task")
    print("(~560 bytes each, its payload included), which the load generator reads.")
    print("Asked with `Prefer: return=minimal`, the server answers the ids alone:")
    print("what BullMQ's addBulk reads back from Redis, where graphile-worker's")
    print("addJobs reads every job's row. A run of its own, the same settings;")
    print("not a target row.\n")
    print("| figure | Offload (SQLite), ids answered | best peer | Offload / best peer |")
    print("|---|---:|---:|---:|")
    r, _ = ratio(lambda run: run["ids"]["enqueue_batch_per_sec"]
                 / best(run["peers"], "enqueue_batch_per_sec")["enqueue_batch_per_sec"])
    print(f"| enqueue, batch | {fmt(ids['enqueue_batch_per_sec'])} | "
          f"{fmt(best_batch['enqueue_batch_per_sec'])} ({name(best_batch)}) | {r:.2f}× |")

if medians["relaxed"]:
    fast_of = lambda peers: next(p for p in peers if p["system"] == "BullMQ" and "label" not in p)
    fast = fast_of(peers)
    print("\n## At BullMQ's durability\n")
    print("The other way round: Offload without the fsync before each answer")
    print("(`--durability relaxed`, no fsync of the WAL at all: a change survives")
    print("`kill -9` of the server but not a power cut) against BullMQ on a Redis")
    print("that keeps nothing on disk (a restart of Redis loses every job). Not a")
    print("target row: the targets are for durable Offload.\n")
    side_by_side("Offload (SQLite), relaxed", lambda run: run["relaxed"],
                 f"{name(fast)} {fast['version']}", lambda run: fast_of(run["peers"]))

analysis = os.path.join(os.path.dirname(__file__), "analysis.md")
if os.path.exists(analysis):
    print()
    print(open(analysis).read().rstrip())
