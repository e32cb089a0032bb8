-- The same claim and completion on the side-tables schema: the claim
-- takes its tasks out of the pending table and into the running one, the
-- completion out of the running one and into the finished one.
CREATE OR REPLACE PROCEDURE burn() LANGUAGE plpgsql AS $$
DECLARE seqs bigint[]; ids uuid[];
BEGIN
  FOR i IN 1..40 LOOP
    WITH claimed AS (
      DELETE FROM offload_ready WHERE ctid IN (
        SELECT ctid FROM offload_ready WHERE queue = 'default' AND type = 'noop'
        ORDER BY priority DESC, run_at, seq LIMIT 500 FOR UPDATE SKIP LOCKED)
      RETURNING seq)
    SELECT array_agg(seq) INTO seqs FROM claimed;
    UPDATE offload_tasks t SET state = 3, attempt = 1, started_at = 2, updated_at = 2,
           lease_expires_at = 100, deadline_at = 100, worker_id = 'w1'
      FROM UNNEST(seqs) u(seq) WHERE t.seq = u.seq;
    INSERT INTO offload_running SELECT u.seq, 'default' FROM UNNEST(seqs) u(seq);
    COMMIT;
    SELECT array_agg(id) INTO ids FROM offload_tasks WHERE seq = ANY(seqs);
    PERFORM 1 FROM offload_tasks WHERE id = ANY(ids) FOR UPDATE;
    UPDATE offload_tasks t SET state = 4, finished_at = 3, updated_at = 3, lease_expires_at = NULL
      FROM UNNEST(seqs) u(seq) WHERE t.seq = u.seq;
    DELETE FROM offload_running WHERE seq = ANY(seqs);
    INSERT INTO offload_finished SELECT 4, 3, u.seq FROM UNNEST(seqs) u(seq);
    COMMIT;
  END LOOP;
END $$;
