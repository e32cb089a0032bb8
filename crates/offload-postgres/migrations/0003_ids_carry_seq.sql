-- Offload's PostgreSQL schema, version 3: ids carry their row's seq.
--
-- A task's id is now a UUIDv7 whose rand_b holds its seq
-- (offload_core::id_carrying_seq), so a lookup by id is a seek of the
-- primary key. The unique index of ids cost each insert, and each update
-- that changes a state (a claim, a completion: neither is HOT), an entry
-- and its cleanup: in bench/postgres-floor a claim and a completion cost
-- PostgreSQL 16.6-17.0 us a task with it, 14.0-14.5 us with this version.
-- The index now holds only the rows whose ids do not carry their seq: the
-- tasks stored before this version, and any that a node of an older
-- version inserts while a cluster is being upgraded.

-- Whether a row's id carries its seq: its last eight bytes are the seq
-- under the variant bits. Evaluated for each insert and each update that
-- is not HOT, so it stays in bytes (a version through text cost a claim and
-- a completion 1.3 us).
CREATE FUNCTION offload_id_carries_seq(id uuid, seq bigint) RETURNS boolean
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    AS $$ SELECT substring(uuid_send(id) from 9) = int8send(seq | (-9223372036854775807 - 1)) $$;

CREATE UNIQUE INDEX offload_tasks_id_not_carrying_seq ON offload_tasks (id)
    WHERE NOT offload_id_carries_seq(id, seq);
ALTER TABLE offload_tasks DROP CONSTRAINT offload_tasks_id_key;

-- A blocked task's dependencies are found by seq too. A dependency row
-- whose task was deleted counted as met before (nothing joined it); it is
-- dropped, which keeps that.
ALTER TABLE offload_task_deps ADD COLUMN dep_seq bigint;
UPDATE offload_task_deps d SET dep_seq = t.seq FROM offload_tasks t WHERE t.id = d.dep_id;
DELETE FROM offload_task_deps WHERE dep_seq IS NULL;
ALTER TABLE offload_task_deps ALTER COLUMN dep_seq SET NOT NULL;
