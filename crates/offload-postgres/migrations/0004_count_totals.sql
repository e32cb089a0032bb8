-- Offload's PostgreSQL schema, version 4: the folded counts apart from the
-- ledger.
--
-- The leader folded the whole counts ledger into one row per (queue, type,
-- state) every second, deleting and inserting every row, changed or not:
-- with 100,000 (queue, type) pairs holding finished tasks, an idle node's
-- PostgreSQL spent a fifth of a core on it, and every pass left as many
-- dead rows behind. The ledger (`offload_counts`) now only holds what
-- transactions appended since the last pass; the leader moves those rows
-- into the totals here, updating the rows of the pairs they name and no
-- other. A count is the sum over both tables. A node of an earlier version
-- still appends to the ledger and folds it into itself, which the sum over
-- both counts right; its own reads, of the ledger alone, miss what the
-- totals hold until it is upgraded.
CREATE TABLE offload_count_totals (
    queue text     NOT NULL,
    type  text     NOT NULL,
    state smallint NOT NULL,
    n     bigint   NOT NULL,
    PRIMARY KEY (queue, type, state)
);

-- The totals that fell to nothing, for the leader to delete after a pass.
CREATE INDEX offload_count_totals_emptied ON offload_count_totals (queue) WHERE n = 0;
