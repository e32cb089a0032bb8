"""The Celery app of the benchmark: a no-op task that notes, in Redis, when
it ran, so the producer can measure processing and pickup from outside."""

import os
import time

import redis
from celery import Celery

REDIS = f"redis://127.0.0.1:{os.environ.get('REDIS_PORT', '6379')}"
app = Celery("offload_bench", broker=f"{REDIS}/1")
app.conf.update(
    # Celery's own advice for many short tasks: no result backend, a high
    # prefetch, acks before running (the default), no events.
    task_ignore_result=True,
    worker_prefetch_multiplier=128,
    worker_send_task_events=False,
    task_default_queue="offload_bench",
    broker_connection_retry_on_startup=True,
)
notes = redis.Redis.from_url(f"{REDIS}/2")


@app.task(name="noop")
def noop(payload, total):
    done = notes.incr("done")
    if done == 1:
        notes.set("first", time.time())
    if done == total:
        notes.set("last", time.time())


@app.task(name="pickup")
def pickup(n):
    notes.rpush("started", time.time())
