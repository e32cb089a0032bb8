// graphile-worker on PostgreSQL, the same workload as `offload bench`:
// no-op jobs with a small JSON payload. Prints one JSON line with the same
// keys.
//
// Settings: those of graphile-worker's own performance page
// (worker.graphile.org/docs/performance): concurrency 24, a pool of 25,
// the local queue with room for 500 jobs, batched completion and failure
// (completeJobBatchDelay and failJobBatchDelay 0), addJobs for batches; and,
// as that page scales out, one worker process per core for the burn-down
// (Node runs a process's jobs on one thread: on 2 cores two processes
// processed 35-50% more than one, four less than two). The pickup phase
// keeps one worker in this process, as the other systems' pickup does.
import { Logger, makeWorkerUtils, run } from "graphile-worker";
import { fork } from "node:child_process";
import { once } from "node:events";
import { readFileSync } from "node:fs";
import { availableParallelism } from "node:os";
import { fileURLToPath } from "node:url";
import pg from "pg";

const version = JSON.parse(
  readFileSync(new URL("./node_modules/graphile-worker/package.json", import.meta.url)),
).version;
const connectionString = process.env.DATABASE_URL;
const N = Number(process.argv[2] ?? 20000);
const CONCURRENCY = 24;
const WORKER_PROCESSES = availableParallelism();
const payload = { user_id: 42, template: "welcome", locale: "en" };
const PICKUP_SAMPLES = Math.min(N, 1000);
// A forked burn-down process is given its parent's schema.
const schema = process.env.GW_BENCH_SCHEMA ?? `gw_bench_${process.pid}`;
const preset = {
  worker: {
    connectionString,
    schema,
    concurrentJobs: CONCURRENCY,
    maxPoolSize: CONCURRENCY + 1,
    localQueue: { size: 500 },
    completeJobBatchDelay: 0,
    failJobBatchDelay: 0,
    pollInterval: 2000,
  },
};

// Its default logger prints a line per job; the other systems print none.
const logger = new Logger(() => () => {});

const rate = (count, ms) => count / (ms / 1000);
const now = () => performance.now();

// Statistics for every table of this run's schema, as autovacuum would
// have gathered them in a deployment; on a connection of `utils`' pool.
const analyzeSchema = (utils) =>
  utils.withPgClient(async (client) => {
    const { rows } = await client.query("SELECT tablename FROM pg_tables WHERE schemaname = $1", [schema]);
    for (const { tablename } of rows) {
      await client.query(`ANALYZE ${client.escapeIdentifier(schema)}.${client.escapeIdentifier(tablename)}`);
    }
  });

// A worker with the settings above, running `taskList`; the burn-down's
// processes and the pickup phase both start theirs here.
const startWorker = (taskList) => run({ preset, noHandleSignals: true, logger, taskList });

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

  // graphile-worker's claim is planned from the table's statistics, which
  // only ANALYZE gathers. A deployment has them, from autovacuum; a table
  // filled seconds ago does not, nor does any table where autovacuum is off
  // (bench/RESULTS.md states the server's setting). Without them its
  // burn-down processed 14% fewer jobs a second (median of five alternating
  // runs). Offload's statements run generic plans, which need none.
  await analyzeSchema(utils);
  // Burn down the 2N jobs just enqueued.
  const total = 2 * N;
  const processRate = rate(total, await burnDown(total));

  let started;
  const runner = await startWorker({
    pickup: async () => {
      started?.(now());
    },
  });

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

// Forks the burn-down's worker processes, starts them together once each
// has loaded, and resolves with the milliseconds they took to run `total`
// jobs between them.
async function burnDown(total) {
  const children = Array.from({ length: WORKER_PROCESSES }, () =>
    fork(fileURLToPath(import.meta.url), ["--burn-down"], {
      env: { ...process.env, GW_BENCH_SCHEMA: schema },
    }),
  );
  // A process that dies fails the run instead of leaving it waiting.
  const died = Promise.race(
    children.map((child) =>
      once(child, "exit").then(([code]) => {
        throw new Error(`a burn-down process exited early (code ${code})`);
      }),
    ),
  );
  died.catch(() => {});
  await Promise.race([Promise.all(children.map((child) => once(child, "message"))), died]);
  let processed = 0;
  let finish;
  const allDone = Promise.race([new Promise((resolve) => (finish = resolve)), died]);
  for (const child of children) {
    child.on("message", (ran) => {
      processed += ran;
      if (processed >= total) finish();
    });
  }
  // GW_BENCH_MARKS: say on stderr when the burn-down starts and ends, for
  // bench/pg-share.py to read PostgreSQL's CPU time over it, and keep the
  // processes' connections a moment after the end, until it has read it: a
  // backend's CPU time leaves /proc with the backend.
  const mark = async (what) => {
    if (!process.env.GW_BENCH_MARKS) return;
    process.stderr.write(`burn-down ${what}\n`);
    if (what === "end") await new Promise((r) => setTimeout(r, 500));
  };
  await mark("start");
  const t = now();
  for (const child of children) child.send("go");
  await allDone;
  const ms = now() - t;
  await mark("end");
  const exited = children.map((child) => once(child, "exit"));
  for (const child of children) child.send("stop");
  await Promise.all(exited);
  return ms;
}

// A burn-down process: says it has loaded, runs `noop` jobs from its
// parent's "go" to its "stop", and reports how many ran, once per turn of
// the event loop.
async function burnDownProcess() {
  const nextMessage = () => new Promise((resolve) => process.once("message", resolve));
  let ran = 0;
  let reporting = false;
  const report = () => {
    process.send(ran);
    ran = 0;
    reporting = false;
  };
  process.send("loaded");
  await nextMessage();
  const runner = await startWorker({
    noop: async () => {
      ran += 1;
      if (!reporting) {
        reporting = true;
        setImmediate(report);
      }
    },
  });
  await nextMessage();
  await runner.stop();
}

(process.argv[2] === "--burn-down" ? burnDownProcess() : main()).then(
  () => process.exit(0),
  (e) => {
    console.error(e);
    process.exit(1);
  },
);
