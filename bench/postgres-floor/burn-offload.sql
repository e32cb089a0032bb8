-- Offload's claim and completion, in the statements' shape: the claim
-- locks the oldest pending tasks and updates them, the completion locks
-- the claimed tasks by the seqs their ids carry and updates them.
CREATE OR REPLACE PROCEDURE burn() LANGUAGE plpgsql AS $$
DECLARE seqs bigint[];
BEGIN
  FOR i IN 1..40 LOOP
    SELECT array_agg(seq) INTO seqs FROM (
      SELECT seq FROM offload_tasks WHERE state = 2 AND queue = 'default' AND type = 'noop'
      ORDER BY priority DESC, run_at, seq LIMIT 500 FOR UPDATE SKIP LOCKED) claimed;
    UPDATE offload_tasks t SET state = 3, attempt = 1, started_at = 2, updated_at = 2,
           lease_expires_at = 100, deadline_at = 100, worker_id = 'w1'
      FROM UNNEST(seqs) u(seq) WHERE t.seq = u.seq;
    COMMIT;
    PERFORM 1 FROM offload_tasks WHERE seq = ANY(seqs) FOR UPDATE;
    UPDATE offload_tasks t SET state = 4, finished_at = 3, updated_at = 3, lease_expires_at = NULL
      FROM UNNEST(seqs) u(seq) WHERE t.seq = u.seq;
    COMMIT;
  END LOOP;
END $$;
