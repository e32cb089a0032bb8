-- 20,000 pending tasks of one type, as a batch enqueue leaves them, their
-- ids carrying their seqs (RESTART IDENTITY makes seq g); the
-- narrow pending table too where the schema has one.
TRUNCATE offload_tasks RESTART IDENTITY;
INSERT INTO offload_tasks (id, run_at, created_at, updated_at, attempt, max_attempts, timeout_secs,
                           state, priority, type, queue, payload)
SELECT (lpad(to_hex((extract(epoch from clock_timestamp()) * 1000)::bigint), 12, '0') || '7000'
        || to_hex(g | (-9223372036854775807 - 1)))::uuid, 1, 1, 1, 0, 3, 60, 2, 5, 'noop', 'default',
       '{"n":' || g || ',"pad":"xxxxxxxxxxxxxxxx"}'
FROM generate_series(1, 20000) g;
DO $$ BEGIN
  IF to_regclass('offload_ready') IS NOT NULL THEN
    TRUNCATE offload_ready, offload_running, offload_finished;
    INSERT INTO offload_ready SELECT queue, type, priority, run_at, seq FROM offload_tasks;
  END IF;
END $$;
VACUUM ANALYZE;
