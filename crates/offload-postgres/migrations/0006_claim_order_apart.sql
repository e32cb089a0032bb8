-- Offload's PostgreSQL schema, version 6: the claim-order index apart from
-- the claims of one (queue, type).
--
-- offload_tasks_claim_order held every pending task (WHERE state = 2), so a
-- claim of one (queue, type), which states state = 2 too, could walk it
-- and filter by queue and type instead of searching
-- offload_tasks_ready_by_type. A session plans each statement once; planned
-- on an empty table, where the smaller index looks as cheap, such a claim
-- walked every pending task ahead of its pair's first at each claim: 74 ms
-- a claim behind 100,000 pending tasks of another type, where it takes
-- well under one. The index's condition is now one that only the claim
-- over all queues (sql::CLAIM_ORDER_WINDOW) states, in the same words.
DROP INDEX offload_tasks_claim_order;
CREATE INDEX offload_tasks_claim_order ON offload_tasks (priority DESC, run_at, seq) WHERE state + 0 = 2;
