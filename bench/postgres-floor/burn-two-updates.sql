-- Only the two updates, each batch's tasks known in advance: no lookup,
-- no lock, no index to keep.
CREATE OR REPLACE PROCEDURE burn() LANGUAGE plpgsql AS $$
DECLARE seqs bigint[];
BEGIN
  FOR i IN 1..40 LOOP
    SELECT array_agg(g) INTO seqs FROM generate_series((i - 1) * 500 + 1, i * 500) g;
    UPDATE offload_tasks t SET state = 3, attempt = 1, started_at = 2, updated_at = 2,
           lease_expires_at = 100, deadline_at = 100, worker_id = 'w1'
      FROM UNNEST(seqs) u(seq) WHERE t.seq = u.seq;
    COMMIT;
    UPDATE offload_tasks t SET state = 4, finished_at = 3, updated_at = 3, lease_expires_at = NULL
      FROM UNNEST(seqs) u(seq) WHERE t.seq = u.seq;
    COMMIT;
  END LOOP;
END $$;
