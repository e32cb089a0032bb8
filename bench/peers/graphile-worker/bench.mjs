// graphile-worker on PostgreSQL, the same workload as `offload bench`:
// no-op jobs with a small JSON payload. Prints one JSON line with the same
// keys.
//
// Settings: its documented fast path — the local queue (size concurrency+1)
// and batched completion and failure (completeJobBatchDelay and
// failJobBatchDelay 0), addJobs for batches, concurrency 24.
import { Logger, makeWorkerUtils, run } from "graphile-worker";
import { readFileSync } from "node:fs";
import pg from "pg";

const version = JSON.parse(
  readFileSync(new URL("./node_modules/graphile-worker/package.json", import.meta.url)),
).version;
const connectionString = process.env.DATABASE_URL;
const N = Number(process.argv[2] ?? 20000);
const CONCURRENCY = 24;
const payload = { user_id: 42, template: "welcome", locale: "en" };
const PICKUP_SAMPLES = Math.min(N, 1000);
const schema = `gw_bench_${process.pid}`;
const preset = {
  worker: {
    connectionString,
    schema,
    concurrentJobs: CONCURRENCY,
    maxPoolSize: CONCURRENCY + 4,
    localQueue: { size: CONCURRENCY + 1 },
    completeJobBatchDelay: 0,
    failJobBatchDelay: 0,
    pollInterval: 2000,
  },
};

// Its default logger prints a line per job; the other systems print none.
const logger = new Logger(() => () => {});

const rate = (count, ms) => count / (ms / 1000);
const now = () => performance.now();

async function main() {
  const utils = await makeWorkerUtils({ preset, logger });
  await utils.migrate();

  let t = now();
  for (let i = 0; i < N; i++) await utils.addJob("noop", payload);
  const enqueueSingle = rate(N, now() - t);

  t = now();
  for (let done = 0; done < N; done += 1000) {
    const size = Math.min(1000, N - done);
    await utils.addJobs(Array.from({ length: size }, () => ({ identifier: "noop", payload })));
  }
  const enqueueBatch = rate(N, now() - t);

  const total = 2 * N;
  let processed = 0;
  let finish;
  const allDone = new Promise((resolve) => (finish = resolve));
  let started;
  t = now();
  const runner = await run({
    preset,
    noHandleSignals: true,
    logger,
    taskList: {
      noop: async () => {
        processed += 1;
        if (processed === total) finish();
      },
      pickup: async () => {
        started?.(now());
      },
    },
  });
  await allDone;
  const processRate = rate(total, now() - t);

  await new Promise((r) => setTimeout(r, 300));
  const latencies = [];
  for (let i = 0; i < PICKUP_SAMPLES; i++) {
    const began = new Promise((resolve) => (started = resolve));
    const sent = now();
    await utils.addJob("pickup", { n: 1 });
    latencies.push((await began) - sent);
    await new Promise((r) => setTimeout(r, 1));
  }
  latencies.sort((a, b) => a - b);
  const at = (q) => latencies[Math.min(latencies.length, Math.max(1, Math.ceil(latencies.length * q))) - 1];
  await runner.stop();

  const client = new pg.Client({ connectionString });
  await client.connect();
  const sync = (await client.query("SHOW synchronous_commit")).rows[0].synchronous_commit;
  const fsync = (await client.query("SHOW fsync")).rows[0].fsync;
  const server = (await client.query("SHOW server_version")).rows[0].server_version;
  await client.query(`DROP SCHEMA IF EXISTS ${schema} CASCADE`);
  await client.end();
  await utils.release();

  console.log(
    JSON.stringify({
      system: "graphile-worker",
      version,
      store: "postgres",
      durability: `PostgreSQL ${server}, synchronous_commit=${sync}, fsync=${fsync}`,
      tasks: N,
      enqueue_single_per_sec: enqueueSingle,
      enqueue_batch_per_sec: enqueueBatch,
      process_per_sec: processRate,
      pickup_ms: { p50: at(0.5), p99: at(0.99) },
    }),
  );
}

main().then(
  () => process.exit(0),
  (e) => {
    console.error(e);
    process.exit(1);
  },
);
