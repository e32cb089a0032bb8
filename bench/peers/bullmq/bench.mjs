// BullMQ on Redis, the same workload as `offload bench`: no-op jobs with a
// small JSON payload. Prints one JSON line with the same keys.
//
// Settings: BullMQ's own recommendations for throughput — completed jobs
// removed at once (removeOnComplete), high worker concurrency, addBulk for
// batches. Redis runs as the machine starts it (no RDB, no AOF) unless
// REDIS_PORT names another: bench/run also starts one that fsyncs its
// append-only file before every reply, for a row at Offload's durability.
import { Queue, Worker } from "bullmq";
import { createRequire } from "node:module";

const require = createRequire(import.meta.url);
const version = require("bullmq/package.json").version;
const connection = { host: "127.0.0.1", port: Number(process.env.REDIS_PORT ?? 6379) };
const N = Number(process.argv[2] ?? 20000);
const payload = { user_id: 42, template: "welcome", locale: "en" };
const jobOptions = { removeOnComplete: true, removeOnFail: true };
const PICKUP_SAMPLES = Math.min(N, 1000);

const rate = (count, ms) => count / (ms / 1000);
const now = () => performance.now();

async function main() {
  const queue = new Queue("offload-bench", { connection });
  await queue.waitUntilReady();
  await queue.obliterate({ force: true });

  let t = now();
  for (let i = 0; i < N; i++) await queue.add("noop", payload, jobOptions);
  const enqueueSingle = rate(N, now() - t);

  t = now();
  for (let done = 0; done < N; done += 1000) {
    const size = Math.min(1000, N - done);
    await queue.addBulk(Array.from({ length: size }, () => ({ name: "noop", data: payload, opts: jobOptions })));
  }
  const enqueueBatch = rate(N, now() - t);

  // Burn down the 2N jobs just enqueued.
  const total = 2 * N;
  let processed = 0;
  let finish;
  const allDone = new Promise((resolve) => (finish = resolve));
  t = now();
  const worker = new Worker(
    "offload-bench",
    async () => {
      processed += 1;
      if (processed === total) finish();
    },
    { connection, concurrency: 500, removeOnComplete: { count: 0 } },
  );
  await allDone;
  const processRate = rate(total, now() - t);
  await worker.close();

  // Pickup: an idle worker, jobs one after another.
  let started;
  const pickupWorker = new Worker(
    "offload-bench-pickup",
    async () => {
      started?.(now());
    },
    { connection, concurrency: 4, removeOnComplete: { count: 0 } },
  );
  const pickupQueue = new Queue("offload-bench-pickup", { connection });
  await pickupQueue.obliterate({ force: true });
  await pickupWorker.waitUntilReady();
  await new Promise((r) => setTimeout(r, 200));
  const latencies = [];
  for (let i = 0; i < PICKUP_SAMPLES; i++) {
    const began = new Promise((resolve) => (started = resolve));
    const sent = now();
    await pickupQueue.add("pickup", { n: 1 }, jobOptions);
    latencies.push((await began) - sent);
    await new Promise((r) => setTimeout(r, 1));
  }
  await pickupWorker.close();
  latencies.sort((a, b) => a - b);
  const at = (q) => latencies[Math.min(latencies.length, Math.max(1, Math.ceil(latencies.length * q))) - 1];

  const persistence = await redisPersistence(queue);
  console.log(
    JSON.stringify({
      system: "BullMQ",
      version,
      store: "redis",
      durability: persistence,
      tasks: N,
      enqueue_single_per_sec: enqueueSingle,
      enqueue_batch_per_sec: enqueueBatch,
      process_per_sec: processRate,
      pickup_ms: { p50: at(0.5), p99: at(0.99) },
    }),
  );
  await queue.close();
  await pickupQueue.close();
}

async function redisPersistence(queue) {
  const client = await queue.client;
  const [, aof] = await client.config("GET", "appendonly");
  const [, save] = await client.config("GET", "save");
  const [, fsync] = await client.config("GET", "appendfsync");
  const version = (await client.info("server")).match(/redis_version:(\S+)/)[1];
  const aofSync = aof === "yes" ? ` appendfsync=${fsync},` : "";
  return `Redis ${version}, appendonly=${aof},${aofSync} save="${save}"`;
}

main().then(
  () => process.exit(0),
  (e) => {
    console.error(e);
    process.exit(1);
  },
);
