-- Every query the engine sends, one named block each, loaded once by shardflow.driver.
-- The same text runs on plain Postgres nodes and through a Citus coordinator, so: no
-- volatile or stable function next to a column in UPDATE SET / ON CONFLICT DO UPDATE
-- (use excluded.col or a parameter), and no joins of distributed with local tables.
-- Placeholders are $n (native on asyncpg). Convention: $1 tenant, $2 shard, $3 workflow id. Every workflow-table query names tenant_id
-- and shard_id: the shard prunes to one partition, the tenant keys the row.
-- Fenced writes join the workflow row FOR SHARE with the caller's fence: a recoverer's
-- takeover (an UPDATE of that row) either waits for the write to commit or, if it
-- committed first, makes the write see a new fence/status and insert nothing.

-- name: insert_workflow
-- $1 tenant, $2 shard, $3 id, $4 name, $5 queue, $6 priority, $7 inputs, $8 parent,
-- $9 max_attempts, $10 timeout seconds (null = none), $11 delay seconds, $12 notify
WITH ins AS (
INSERT INTO shardflow.workflows
    (tenant_id, shard_id, workflow_id, name, queue, priority, inputs, parent_id,
     max_attempts, deadline_at, ready_at)
VALUES ($1, $2, $3, $4, $5, $6, $7::jsonb, $8, $9,
        CASE WHEN $10::float8 IS NULL THEN NULL
             ELSE now() + make_interval(secs => $10::float8) END,
        now() + make_interval(secs => $11::float8))
ON CONFLICT (tenant_id, workflow_id, shard_id) DO NOTHING
RETURNING workflow_id
)
-- wake the shard's owner at once (LISTEN shardflow_work); polling is the fallback
SELECT workflow_id,
       CASE WHEN $12::bool AND $11::float8 = 0
            THEN pg_notify('shardflow_work', $2::text) END AS notified
  FROM ins;

-- name: insert_workflows
-- Bulk starts (migration 0008): $1 tenants, $2 shards, $3 ids, $4 names, $5 queues,
-- $6 priorities, $7 inputs, $8 max_attempts, $9 timeouts (null = none), $10 delays,
-- $11 notify. The positions of the rows inserted (others existed already).
SELECT idx FROM shardflow.insert_workflows(
    $1::text[], $2::int[], $3::text[], $4::text[], $5::text[], $6::int[], $7::text[],
    $8::int[], $9::float8[], $10::float8[], $11::bool);

-- name: get_workflow
SELECT tenant_id, shard_id, workflow_id, name, queue, priority, status, inputs, output, error,
       parent_id, attempts, max_attempts, owner, fence, ready_at, deadline_at, reason,
       created_at, updated_at, started_at, finished_at
  FROM shardflow.workflows
 WHERE tenant_id = $1 AND workflow_id = $3 AND shard_id = $2;

-- name: get_status
SELECT status, output, error
  FROM shardflow.workflows
 WHERE tenant_id = $1 AND workflow_id = $3 AND shard_id = $2;

-- name: claim_workflows
-- $1 shards, $2 workflow names this worker runs, $3 worker id, $4 batch size,
-- $5 most per tenant per call, $6 per-tenant running cap (0 = none). See claim_fast
-- (migration 0008) and claim_fair.
SELECT * FROM shardflow.claim_fast($1::int[], $2::text[], $3, $4, $5, $6);

-- name: live_workers
SELECT worker_id FROM shardflow.workers WHERE lease_expires_at > now() ORDER BY worker_id;

-- name: owned_shards
SELECT shard_id FROM shardflow.shard_leases WHERE owner = $1;

-- name: free_shards
-- Of this node's shards $1, up to $2 that no live worker owns.
SELECT s AS shard_id FROM unnest($1::int[]) AS s
 WHERE NOT EXISTS (SELECT 1 FROM shardflow.shard_leases l
                     JOIN shardflow.workers k ON k.worker_id = l.owner
                    WHERE l.shard_id = s AND k.lease_expires_at > now())
 ORDER BY s
 LIMIT $2;

-- name: acquire_shards
-- Take shards $1 for worker $2 unless a live worker owns them; two workers racing for
-- a shard serialise on its row and the second sees the first as a live owner.
INSERT INTO shardflow.shard_leases AS l (shard_id, owner, epoch, acquired_at)
SELECT s, $2, 1, now() FROM unnest($1::int[]) AS s
ON CONFLICT (shard_id) DO UPDATE
   SET owner = excluded.owner, epoch = l.epoch + 1, acquired_at = now()
 WHERE l.owner IS DISTINCT FROM excluded.owner
   AND NOT EXISTS (SELECT 1 FROM shardflow.workers k
                    WHERE k.worker_id = l.owner AND k.lease_expires_at > now())
RETURNING shard_id;

-- name: release_shards
UPDATE shardflow.shard_leases SET owner = NULL WHERE owner = $2 AND shard_id = ANY($1::int[]);

-- name: shard_owners
SELECT l.shard_id, l.owner, l.epoch, l.acquired_at,
       EXISTS (SELECT 1 FROM shardflow.workers k
                WHERE k.worker_id = l.owner AND k.lease_expires_at > now()) AS live
  FROM shardflow.shard_leases l
 ORDER BY l.shard_id;

-- name: shard_owner_names
-- Each shard's live owner and the workflows it registers: a worker claims, in shards
-- owned by a worker lacking some of its workflows, those workflows (executor
-- Worker.find_foreign_work).
SELECT l.shard_id, l.owner, k.workflow_names
  FROM shardflow.shard_leases l
  JOIN shardflow.workers k ON k.worker_id = l.owner
 WHERE k.lease_expires_at > now();

-- name: recover_orphans
-- Running workflows whose owner is not among the live workers ($2, from live_workers)
-- go back to pending. $1 shards, $3 lease seconds. Two queries rather than a join with
-- workers, so the same text runs on Citus, where workflows is distributed and workers
-- is not. A workflow claimed within the last lease period is left alone: its owner may
-- have registered after the live list was read.
-- SKIP LOCKED: a row locked by a frozen owner (a SIGSTOPped worker inside a transaction
-- step holds its workflow row FOR SHARE) is left for a later pass, once
-- end_frozen_sessions has ended that session; waiting on it here stopped recovery of
-- every other orphan. (Citus: recover_orphans_citus, no row locks in multi-shard
-- subqueries there.)
UPDATE shardflow.workflows w
   SET status = 'pending', owner = NULL, ready_at = now(), updated_at = now(),
       reason = 'recovered: worker ' || w.owner || ' stopped heartbeating'
  FROM (SELECT o.tenant_id, o.workflow_id, o.shard_id FROM shardflow.workflows o
         WHERE o.status = 'running' AND o.shard_id = ANY($1::int[])
           AND o.owner <> ALL($2::text[])
           AND o.updated_at < now() - make_interval(secs => $3::float8)
           FOR UPDATE SKIP LOCKED) x
 WHERE w.tenant_id = x.tenant_id AND w.workflow_id = x.workflow_id
   AND w.shard_id = x.shard_id AND w.status = 'running'
RETURNING w.tenant_id, w.workflow_id, w.shard_id, w.owner;

-- name: recover_orphans_citus
UPDATE shardflow.workflows w
   SET status = 'pending', owner = NULL, ready_at = now(), updated_at = now(),
       reason = 'recovered: worker ' || w.owner || ' stopped heartbeating'
 WHERE w.status = 'running' AND w.shard_id = ANY($1::int[])
   AND w.owner <> ALL($2::text[])
   AND w.updated_at < now() - make_interval(secs => $3::float8)
RETURNING w.tenant_id, w.workflow_id, w.shard_id, w.owner;

-- name: end_frozen_sessions
-- Sessions of workers that are not live ($1: tags of the live workers, the last part of
-- their ids, which their connections carry as application_name 'shardflow worker
-- <tag>') left idle inside a transaction for $2 seconds: a frozen process (SIGSTOP, a
-- paused VM) holding row locks its orphans' recovery, sends and cancels would wait on.
-- Ending the session rolls its transaction back; nothing it did is lost (its
-- checkpoints had not committed) and, fenced out, it cannot write when it wakes up.
SELECT count(pg_terminate_backend(a.pid)) AS ended
  FROM pg_stat_activity a
 WHERE a.datname = current_database()
   -- the sessions we may end: our role's, or any (not a superuser's) with
   -- pg_signal_backend (workers of several services under roles of their own)
   AND (a.usename = current_user OR pg_has_role('pg_signal_backend', 'MEMBER'))
   AND a.application_name LIKE 'shardflow worker %'
   AND a.state IN ('idle in transaction', 'idle in transaction (aborted)')
   AND a.state_change < now() - make_interval(secs => $2::float8)
   AND substr(a.application_name, 18) <> ALL($1::text[]);

-- name: live_workflow_names
SELECT DISTINCT unnest(workflow_names) AS name FROM shardflow.workers
 WHERE lease_expires_at > now();

-- name: mark_unrunnable
-- Give pending workflows that no live worker can run ($2: names live workers run) a
-- readable reason (bounded scan).
UPDATE shardflow.workflows w
   SET reason = 'no live worker registers workflow ' || quote_literal(w.name)
  FROM (SELECT tenant_id, workflow_id, shard_id FROM shardflow.workflows
         WHERE status = 'pending' AND reason IS NULL
           AND ready_at < now() - interval '5 seconds' AND shard_id = ANY($1::int[])
           AND name <> ALL($2::text[])
         LIMIT 1000) p
 WHERE w.tenant_id = p.tenant_id AND w.workflow_id = p.workflow_id AND w.shard_id = p.shard_id;

-- name: heartbeat
-- $1 worker id, $2 host, $3 pid, $4 names, $5 lease seconds
INSERT INTO shardflow.workers (worker_id, host, pid, workflow_names, lease_expires_at)
VALUES ($1, $2, $3, $4::text[], now() + make_interval(secs => $5::float8))
ON CONFLICT (worker_id) DO UPDATE
   SET heartbeat_at = now(), lease_expires_at = excluded.lease_expires_at,
       workflow_names = excluded.workflow_names;

-- name: prune_workers
DELETE FROM shardflow.workers WHERE lease_expires_at < now() - interval '1 minute';

-- name: check_inflight
-- Of the workflows this worker runs here, which are no longer its own (cancelled,
-- taken over): $1 tenants, $2 ids, $3 fences, $4 shards.
SELECT w.tenant_id, w.workflow_id, w.status
  FROM unnest($1::text[], $2::text[], $3::bigint[], $4::int[])
       AS f(tenant_id, workflow_id, fence, shard_id)
  JOIN shardflow.workflows w
    ON w.tenant_id = f.tenant_id AND w.workflow_id = f.workflow_id
   AND w.shard_id = f.shard_id
 WHERE w.status <> 'running' OR w.fence <> f.fence;

-- name: release_worker
-- Graceful stop: hand this worker's workflows back at once instead of after the lease.
-- Not a lost run: the attempt is given back (see workflows.attempts).
UPDATE shardflow.workflows
   SET status = 'pending', owner = NULL, ready_at = now(), updated_at = now(),
       attempts = greatest(attempts - 1, 0)
 WHERE owner = $1 AND status = 'running';

-- name: delete_worker
DELETE FROM shardflow.workers WHERE worker_id = $1;

-- name: load_steps
SELECT seq, name, kind, status, output, error, attempts,
       extract(epoch FROM wake_at)::float8 AS wake_at
  FROM shardflow.steps
 WHERE tenant_id = $1 AND workflow_id = $3 AND shard_id = $2
 ORDER BY seq;

-- name: step_started
-- Before a non-transactional step runs: record the attempt (a re-run after a crash
-- increments attempts, which is how re-runs are counted, never hidden).
-- $1 tenant, $2 shard, $3 id, $4 fence, $5 seq, $6 name
WITH w AS (
    SELECT 1 FROM shardflow.workflows
     WHERE tenant_id = $1 AND workflow_id = $3 AND shard_id = $2
       AND fence = $4 AND status = 'running'
       FOR SHARE
)
INSERT INTO shardflow.steps (tenant_id, shard_id, workflow_id, seq, name, kind, status)
SELECT $1, $2, $3, $5, $6, 'step', 'started' FROM w
ON CONFLICT (tenant_id, workflow_id, seq, shard_id) DO UPDATE
   SET attempts = steps.attempts + 1
 WHERE steps.status = 'started'
RETURNING attempts;

-- name: step_finished
-- $1 tenant, $2 shard, $3 id, $4 fence, $5 seq, $6 name, $7 kind, $8 status,
-- $9 output, $10 error, $11 retries
WITH w AS (
    SELECT 1 FROM shardflow.workflows
     WHERE tenant_id = $1 AND workflow_id = $3 AND shard_id = $2
       AND fence = $4 AND status = 'running'
       FOR SHARE
)
INSERT INTO shardflow.steps
    (tenant_id, shard_id, workflow_id, seq, name, kind, status, output, error, retries,
     finished_at)
SELECT $1, $2, $3, $5, $6, $7, $8, $9::jsonb, $10::jsonb, $11, now() FROM w
ON CONFLICT (tenant_id, workflow_id, seq, shard_id) DO UPDATE
   SET status = excluded.status, output = excluded.output, error = excluded.error,
       retries = excluded.retries, finished_at = excluded.finished_at
 WHERE steps.status IN ('started', 'waiting')
RETURNING 1;

-- name: insert_step_strict
-- A checkpoint that must be the first and only one at this position: used inside a
-- transaction step's own transaction, where a duplicate must abort the user's writes.
-- $1 tenant, $2 shard, $3 id, $4 fence, $5 seq, $6 name, $7 kind, $8 status,
-- $9 output, $10 error, $11 wake_at epoch seconds (nullable)
WITH w AS (
    SELECT 1 FROM shardflow.workflows
     WHERE tenant_id = $1 AND workflow_id = $3 AND shard_id = $2
       AND fence = $4 AND status = 'running'
       FOR SHARE
)
INSERT INTO shardflow.steps
    (tenant_id, shard_id, workflow_id, seq, name, kind, status, output, error, wake_at,
     finished_at)
SELECT $1, $2, $3, $5, $6, $7, $8, $9::jsonb, $10::jsonb, to_timestamp($11::float8),
       CASE WHEN $8 = 'waiting' THEN NULL ELSE now() END
  FROM w
RETURNING 1;

-- name: finish_workflow
-- $1 tenant, $2 shard, $3 id, $4 fence, $5 status, $6 output, $7 error
UPDATE shardflow.workflows
   SET status = $5, output = $6::jsonb, error = $7::jsonb, finished_at = now(),
       updated_at = now(), owner = NULL
 WHERE tenant_id = $1 AND workflow_id = $3 AND shard_id = $2
   AND fence = $4 AND status = 'running'
RETURNING 1;

-- name: checkpoint_batch
-- Group commit (migration 0008, shardflow/batcher.py): steps started ($1-$6), steps
-- finished ($7-$17), workflows finished ($18-$24), column arrays in the order of the
-- single-row queries above.
SELECT op, idx, val FROM shardflow.checkpoint_batch(
    $1::text[], $2::int[], $3::text[], $4::bigint[], $5::int[], $6::text[],
    $7::text[], $8::int[], $9::text[], $10::bigint[], $11::int[], $12::text[],
    $13::text[], $14::text[], $15::text[], $16::text[], $17::int[],
    $18::text[], $19::int[], $20::text[], $21::bigint[], $22::text[], $23::text[],
    $24::text[]);

-- name: tx_lock
-- Transaction steps in groups (migration 0010): $1 tenants, $2 shards, $3 ids,
-- $4 fences, $5 positions: (idx, owned, recorded) for each.
SELECT idx, owned, recorded FROM shardflow.tx_lock(
    $1::text[], $2::int[], $3::text[], $4::bigint[], $5::int[]);

-- name: tx_checkpoints
-- $1 tenants, $2 shards, $3 ids, $4 positions, $5 step names, $6 outputs (JSON).
SELECT shardflow.tx_checkpoints($1::text[], $2::int[], $3::text[], $4::int[], $5::text[],
                                $6::text[]);

-- name: suspend_workflow
-- Park a running workflow until $5 (epoch seconds): it is claimed again then, or
-- earlier when a message arrives for it. Waiting is not a failed attempt: the claim
-- counted this run, the park gives it back, so a workflow that sleeps a thousand times
-- or is woken by ten thousand messages never reaches max_attempts (and nobody can kill
-- another's workflow by sending to it).
UPDATE shardflow.workflows
   SET status = 'pending', owner = NULL, ready_at = to_timestamp($5::float8),
       updated_at = now(), attempts = greatest(attempts - 1, 0)
 WHERE tenant_id = $1 AND workflow_id = $3 AND shard_id = $2
   AND fence = $4 AND status = 'running'
RETURNING 1;

-- name: retry_workflow_later
-- A workflow that crashed its run (not its body) goes back to pending after a backoff.
UPDATE shardflow.workflows
   SET status = 'pending', owner = NULL, ready_at = now() + make_interval(secs => $5::float8),
       updated_at = now(), reason = $6
 WHERE tenant_id = $1 AND workflow_id = $3 AND shard_id = $2
   AND fence = $4 AND status = 'running'
RETURNING 1;

-- name: my_running
-- Workflows this worker ($1) holds on shards $2: the worker compares them with its
-- runs to find claims it never received (the connection died after the commit).
SELECT tenant_id, shard_id, workflow_id, fence
  FROM shardflow.workflows
 WHERE owner = $1 AND status = 'running' AND shard_id = ANY ($2::int[]);

-- name: backlog_pending
-- Pending workflows in shards $1 (the metrics' backlog gauge; the partial index on
-- pending rows answers it).
SELECT count(*) AS n FROM shardflow.workflows
 WHERE status = 'pending' AND shard_id = ANY ($1::int[]);

-- name: lock_workflow_row
-- send takes the receiver's row lock first, so a receiver parking itself (suspend) and
-- a sender cannot both miss each other: see context.WorkflowContext.suspend.
SELECT status FROM shardflow.workflows
 WHERE tenant_id = $1 AND workflow_id = $3 AND shard_id = $2
   FOR NO KEY UPDATE;

-- name: insert_message
-- $1 tenant, $2 shard, $3 destination id, $4 topic, $5 payload, $6 idempotency key
INSERT INTO shardflow.messages (tenant_id, shard_id, workflow_id, topic, payload,
                                idempotency_key)
VALUES ($1, $2, $3, $4, $5::jsonb, $6)
ON CONFLICT (tenant_id, workflow_id, idempotency_key, shard_id)
    WHERE idempotency_key IS NOT NULL DO NOTHING
RETURNING msg_id;

-- name: wake_workflow
-- Make a parked (pending, not yet due) workflow due now.
UPDATE shardflow.workflows
   SET ready_at = now()
 WHERE tenant_id = $1 AND workflow_id = $3 AND shard_id = $2
   AND status = 'pending' AND ready_at > now();

-- name: wake_if_messages
UPDATE shardflow.workflows w
   SET ready_at = now()
 WHERE tenant_id = $1 AND workflow_id = $3 AND shard_id = $2
   AND status = 'pending' AND ready_at > now()
   AND EXISTS (SELECT 1 FROM shardflow.messages m
                WHERE m.tenant_id = $1 AND m.workflow_id = $3 AND m.shard_id = $2
                  AND m.taken_at IS NULL);

-- name: take_message
-- $1 tenant, $2 shard, $3 id, $4 topic. Marked taken, not deleted: the row keeps its
-- idempotency key, so a send retried after this take inserts nothing (migration 0017).
UPDATE shardflow.messages
   SET taken_at = now()
 WHERE tenant_id = $1 AND workflow_id = $3 AND shard_id = $2 AND topic = $4
   AND taken_at IS NULL
   AND msg_id = (SELECT msg_id FROM shardflow.messages
                  WHERE tenant_id = $1 AND workflow_id = $3 AND shard_id = $2 AND topic = $4
                    AND taken_at IS NULL
                  ORDER BY msg_id LIMIT 1 FOR UPDATE SKIP LOCKED)
RETURNING payload;

-- name: lock_fence
-- Inside a transaction: hold the workflow row FOR SHARE if this worker still owns it.
SELECT 1 FROM shardflow.workflows
 WHERE tenant_id = $1 AND workflow_id = $3 AND shard_id = $2
   AND fence = $4 AND status = 'running'
   FOR SHARE;

-- name: update_step_done
-- $1 tenant, $2 shard, $3 id, $4 seq, $5 output
UPDATE shardflow.steps
   SET status = 'done', output = $5::jsonb, finished_at = now()
 WHERE tenant_id = $1 AND workflow_id = $3 AND shard_id = $2 AND seq = $4
   AND status = 'waiting'
RETURNING 1;

-- name: set_event
INSERT INTO shardflow.events (tenant_id, shard_id, workflow_id, key, value)
VALUES ($1, $2, $3, $4, $5::jsonb)
ON CONFLICT (tenant_id, workflow_id, key, shard_id) DO UPDATE
   SET value = excluded.value, updated_at = excluded.updated_at;

-- name: get_event
SELECT value FROM shardflow.events
 WHERE tenant_id = $1 AND workflow_id = $3 AND shard_id = $2 AND key = $4;

-- name: cancel_tree
-- Cancel a workflow and, recursively, its children (children share the tenant and so
-- the shard). $4 is the error to record.
WITH RECURSIVE tree AS (
    SELECT workflow_id FROM shardflow.workflows
     WHERE tenant_id = $1 AND workflow_id = $3 AND shard_id = $2
    UNION
    SELECT c.workflow_id FROM shardflow.workflows c JOIN tree t ON c.parent_id = t.workflow_id
     WHERE c.tenant_id = $1 AND c.shard_id = $2
)
UPDATE shardflow.workflows w
   SET status = 'cancelled', error = $4::jsonb, owner = NULL, finished_at = now(),
       updated_at = now(),
       -- the descendants say whose cancel took them: resume_tree resumes only those
       reason = CASE WHEN w.workflow_id = $3 THEN w.reason
                     ELSE 'cancelled with ' || $3 END
  FROM tree
 WHERE w.tenant_id = $1 AND w.shard_id = $2 AND w.workflow_id = tree.workflow_id
   AND w.status IN ('pending', 'running')
RETURNING w.workflow_id;

-- name: resume_tree
-- Resume workflow $3 (cancelled, failed or dead) and, recursively, its descendants
-- that the cancel of $3 took with it (a cancel cascades to the whole tree: a resumed
-- parent would wait forever on children left cancelled; children cancelled for their
-- own reasons, their own deadline or a cancel of their own, stay cancelled). A
-- deadline that has passed ($4, now as epoch seconds) is dropped, else the old
-- deadline would cancel the workflow again at once; one still ahead is kept.
WITH RECURSIVE tree AS (
    SELECT workflow_id FROM shardflow.workflows
     WHERE tenant_id = $1 AND workflow_id = $3 AND shard_id = $2
       AND status IN ('cancelled', 'failed', 'dead')
    UNION
    SELECT c.workflow_id FROM shardflow.workflows c JOIN tree t ON c.parent_id = t.workflow_id
     WHERE c.tenant_id = $1 AND c.shard_id = $2 AND c.status = 'cancelled'
       AND c.reason LIKE 'cancelled with %'
)
UPDATE shardflow.workflows w
   SET status = 'pending', owner = NULL, ready_at = now(), finished_at = NULL,
       error = NULL, output = NULL, attempts = 0, updated_at = now(), reason = 'resumed',
       deadline_at = CASE WHEN w.deadline_at > to_timestamp($4::float8)
                          THEN w.deadline_at END
  FROM tree, shardflow.workflows o
 WHERE w.tenant_id = $1 AND w.shard_id = $2 AND w.workflow_id = tree.workflow_id
   AND o.tenant_id = $1 AND o.shard_id = $2 AND o.workflow_id = tree.workflow_id
   AND w.status IN ('cancelled', 'failed', 'dead')
-- o is the row before this update: the position of the step whose failure ended it
RETURNING w.workflow_id, (o.error->>'step_seq')::int AS step_seq;

-- name: resume_failed_steps
-- The failed step that ended each resumed workflow runs again ($3 ids, $4 the step
-- positions their errors recorded, see resume_tree): replaying its recorded error would
-- fail it forever, also once the outage that failed it is over. Only that step: a
-- failed step the workflow caught and went on from is history its code branched on,
-- and re-running it would change that history (NonDeterminismError). An external step
-- goes back to 'started', so its next run counts as a re-run (steps.attempts); a failed
-- transaction step's row goes (its writes never committed).
WITH ended AS (
    SELECT e.workflow_id, e.seq FROM unnest($3::text[], $4::int[]) AS e(workflow_id, seq)
     WHERE e.seq IS NOT NULL
), redo AS (
    UPDATE shardflow.steps s
       SET status = 'started', error = NULL, finished_at = NULL
      FROM ended
     WHERE s.tenant_id = $1 AND s.shard_id = $2 AND s.workflow_id = ended.workflow_id
       AND s.seq = ended.seq AND s.kind = 'step' AND s.status = 'error'
    RETURNING 1
)
DELETE FROM shardflow.steps s
 USING ended
 WHERE s.tenant_id = $1 AND s.shard_id = $2 AND s.workflow_id = ended.workflow_id
   AND s.seq = ended.seq AND s.kind = 'transaction' AND s.status = 'error';

-- name: fork_workflow
-- Copy workflow $3 as $4 with the checkpoints of steps before $5. A fork is a new root
-- (no parent_id: cancelling the original's parent must not cancel the fork). One row
-- (forked = 0) when $4 exists already: the caller refuses, never adopting it.
WITH src AS (
    INSERT INTO shardflow.workflows
        (tenant_id, shard_id, workflow_id, name, queue, priority, inputs, parent_id,
         max_attempts, reason)
    SELECT tenant_id, shard_id, $4, name, queue, priority, inputs, NULL, max_attempts,
           'forked from ' || workflow_id || ' at step ' || $5::int
      FROM shardflow.workflows
     WHERE tenant_id = $1 AND workflow_id = $3 AND shard_id = $2 AND status <> 'purged'
    ON CONFLICT DO NOTHING
    RETURNING workflow_id
), copied AS (
    INSERT INTO shardflow.steps
        (tenant_id, shard_id, workflow_id, seq, name, kind, status, output, error, attempts,
         retries, wake_at, finished_at)
    SELECT s.tenant_id, s.shard_id, src.workflow_id, s.seq, s.name, s.kind, s.status,
           s.output, s.error, s.attempts, s.retries, s.wake_at, s.finished_at
      FROM shardflow.steps s, src
     WHERE s.tenant_id = $1 AND s.workflow_id = $3 AND s.shard_id = $2 AND s.seq < $5::int
       AND s.status IN ('done', 'error')
    RETURNING 1
)
SELECT count(*)::int AS forked FROM src;

-- name: list_workflows
-- $1 tenant (null = all), $2 status, $3 name, $4 limit, $5 shards of this node,
-- $6 / $7 created at or after / before (epoch seconds; null = unbounded)
SELECT tenant_id, workflow_id, name, queue, status, attempts, owner, parent_id,
       created_at, started_at, finished_at, reason
  FROM shardflow.workflows
 WHERE ($1::text IS NULL OR tenant_id = $1)
   AND ($2::text IS NULL OR status = $2)
   AND ($3::text IS NULL OR name = $3)
   AND shard_id = ANY($5::int[])
   AND ($6::float8 IS NULL OR created_at >= to_timestamp($6::float8))
   AND ($7::float8 IS NULL OR created_at < to_timestamp($7::float8))
 ORDER BY created_at DESC
 LIMIT $4;

-- name: list_steps
SELECT seq, name, kind, status, output, error, attempts, retries, created_at, finished_at
  FROM shardflow.steps
 WHERE tenant_id = $1 AND workflow_id = $3 AND shard_id = $2
 ORDER BY seq;

-- name: read_shard_map
SELECT shard_id, node, epoch FROM shardflow.shard_map ORDER BY shard_id;

-- name: shard_map_epoch
SELECT coalesce(max(epoch), 0) AS epoch FROM shardflow.shard_map;

-- name: upsert_queue
INSERT INTO shardflow.queues (name, priority, concurrency, tenant_concurrency, rate_per_sec)
VALUES ($1, $2, $3, $4, $5)
ON CONFLICT (name) DO UPDATE
   SET priority = excluded.priority, concurrency = excluded.concurrency,
       tenant_concurrency = excluded.tenant_concurrency,
       rate_per_sec = excluded.rate_per_sec, updated_at = excluded.updated_at;

-- name: list_queues
SELECT name, priority, concurrency, tenant_concurrency, rate_per_sec, paused
  FROM shardflow.queues
 ORDER BY priority DESC, name;

-- name: set_queue_paused
UPDATE shardflow.queues SET paused = $2 WHERE name = $1 RETURNING name;

-- name: queue_budgets
-- $1 batch size, $2 engine-wide per-tenant cap (0 = none). See migration 0003.
SELECT * FROM shardflow.queue_budgets($1, $2);

-- name: claim_tables
-- $1 tables, $2 queues, $3 budgets, $4 tenant caps, $5 caps count only the queue,
-- $6 workflow names, $7 worker id, $8 batch size, $9 most per tenant. See migration 0003.
SELECT * FROM shardflow.claim_tables($1::text[], $2::text[], $3::int[], $4::int[],
                                     $5::bool[], $6::text[], $7, $8, $9);

-- name: claim_lock
-- Citus, queues with a concurrency limit: budget and claim under one cluster-wide lock
-- on the coordinator, held until the claim on the Citus worker has committed, so the
-- next claimer's running count includes it and the limit is exact.
SELECT pg_advisory_xact_lock(6012785263591211008);

-- name: queue_spend
SELECT shardflow.queue_spend($1::text[]);

-- name: citus_placements
-- Placements of the workflow tables' shards ($1: the partitions, e.g.
-- {shardflow.workflows_s0}) on active primary Citus nodes, read on the coordinator.
SELECT sh.shardid::int AS unit, sh.logicalrelid::regclass::text AS tbl, n.nodename, n.nodeport
  FROM pg_dist_shard sh
  JOIN pg_dist_placement p ON p.shardid = sh.shardid
  JOIN pg_dist_node n ON n.groupid = p.groupid
 WHERE sh.logicalrelid = ANY ($1::regclass[])
   AND n.noderole = 'primary' AND n.isactive AND p.shardstate = 1
 ORDER BY sh.shardid;

-- name: status_node
-- `shardflow status`, per node: backlog, the last minute's throughput, the oldest
-- pending workflow, live workers. An operator's command: it may scan a node's rows.
SELECT (SELECT count(*) FROM shardflow.workflows WHERE status = 'pending') AS pending,
       (SELECT count(*) FROM shardflow.workflows WHERE status = 'running') AS running,
       (SELECT count(*) FROM shardflow.workflows
         WHERE status = 'succeeded' AND finished_at > now() - interval '1 minute') AS done_1m,
       (SELECT count(*) FROM shardflow.workflows
         WHERE status IN ('failed', 'dead')
           AND finished_at > now() - interval '1 minute') AS failed_1m,
       (SELECT min(created_at) FROM shardflow.workflows WHERE status = 'pending')
           AS oldest_pending,
       (SELECT count(*) FROM shardflow.workers WHERE lease_expires_at > now())
           AS live_workers,
       pg_is_in_recovery() AS in_recovery;

-- name: status_shards
-- Per shard of this node: backlog and the live worker that owns (polls) it.
SELECT s.shard_id, coalesce(b.pending, 0) AS pending, coalesce(b.running, 0) AS running,
       (SELECT l.owner FROM shardflow.shard_leases l
          JOIN shardflow.workers k ON k.worker_id = l.owner
         WHERE l.shard_id = s.shard_id AND k.lease_expires_at > now()) AS owner
  FROM shardflow.shard_map s
  JOIN shardflow.node_info i ON i.node_name = s.node
  LEFT JOIN (SELECT shard_id, count(*) FILTER (WHERE status = 'pending') AS pending,
                    count(*) FILTER (WHERE status = 'running') AS running
               FROM shardflow.workflows WHERE status IN ('pending', 'running')
              GROUP BY shard_id) b ON b.shard_id = s.shard_id
 ORDER BY s.shard_id;

-- name: tenants_top
-- The heaviest tenants of this node: backlog, then the last minute's completions.
SELECT tenant_id,
       count(*) FILTER (WHERE status = 'pending') AS pending,
       count(*) FILTER (WHERE status = 'running') AS running,
       count(*) FILTER (WHERE status = 'succeeded') AS done_1m,
       min(created_at) FILTER (WHERE status = 'pending') AS oldest_pending
  FROM shardflow.workflows
 WHERE status IN ('pending', 'running')
    OR (status = 'succeeded' AND finished_at > now() - interval '1 minute')
 GROUP BY tenant_id
 ORDER BY count(*) FILTER (WHERE status IN ('pending', 'running')) DESC,
          count(*) FILTER (WHERE status = 'succeeded') DESC, tenant_id
 LIMIT $1;

-- name: grant_tenant
-- $1 role, $2 tenant: see migration 0004.
SELECT shardflow.grant_tenant($1, $2) AS granted;

-- name: purge_finished
-- $1 shards, $2 most workflows per shard per call: (shard_id, purged) for each shard
-- that lost some. See migrations 0005 and 0007.
SELECT shard_id, purged FROM shardflow.purge_finished_shards($1::int[], $2);

-- name: vacuum_partitions
-- After a purge (migration 0007): {tables} is filled in by the driver with quoted
-- partition names of the shards that lost rows. Not in a transaction (VACUUM).
VACUUM (SKIP_LOCKED) {tables};

-- name: set_retention
INSERT INTO shardflow.retention AS r (tenant_id, keep_seconds) VALUES ($1, $2)
ON CONFLICT (tenant_id) DO UPDATE SET keep_seconds = excluded.keep_seconds,
                                      updated_at = excluded.updated_at;

-- name: set_idempotency_window
-- $1 tenant ('*': the default), $2 seconds a purged workflow's id stays taken (migration
-- 0018). The retention row must exist (set_retention first).
UPDATE shardflow.retention SET idempotency_seconds = $2, updated_at = now()
 WHERE tenant_id = $1;

-- name: clear_retention
DELETE FROM shardflow.retention WHERE tenant_id = $1;

-- name: list_retention
SELECT tenant_id, keep_seconds, idempotency_seconds, updated_at
  FROM shardflow.retention ORDER BY tenant_id;

-- name: upsert_schedule
-- $1 tenant, $2 shard, $3 schedule id, $4 cron, $5 workflow name, $6 inputs, $7 queue,
-- $8 catch-up, $9 first run (epoch seconds)
INSERT INTO shardflow.schedules AS s (tenant_id, shard_id, schedule_id, cron, workflow_name,
                                      inputs, queue, catch_up, next_run_at)
VALUES ($1, $2, $3, $4, $5, $6::jsonb, $7, $8, to_timestamp($9::float8))
ON CONFLICT (tenant_id, schedule_id) DO UPDATE
   SET cron = excluded.cron, workflow_name = excluded.workflow_name,
       inputs = excluded.inputs, queue = excluded.queue, catch_up = excluded.catch_up,
       next_run_at = excluded.next_run_at;

-- name: due_schedules
-- $1 shards. Due, unpaused schedules, oldest first.
SELECT tenant_id, shard_id, schedule_id, cron, workflow_name, inputs::text AS inputs, queue,
       catch_up, next_run_at, extract(epoch FROM now())::float8 AS now
  FROM shardflow.schedules
 WHERE NOT paused AND next_run_at <= now() AND shard_id = ANY ($1::int[])
 ORDER BY next_run_at
 LIMIT 100;

-- name: advance_schedule
-- $1 tenant, $3 schedule id, $4 the next_run_at read (guard), $5 new next run (epoch),
-- $6 last tick fired (epoch), $7 ticks fired. No row: another worker fired it first.
UPDATE shardflow.schedules
   SET next_run_at = to_timestamp($5::float8), last_run_at = to_timestamp($6::float8),
       fired = fired + $7
 WHERE tenant_id = $1 AND schedule_id = $3 AND shard_id = $2 AND next_run_at = $4
RETURNING 1;

-- name: list_schedules
-- $1 tenant (null: all), $2 shards of this node.
SELECT tenant_id, schedule_id, cron, workflow_name, queue, catch_up, paused, next_run_at,
       last_run_at, fired
  FROM shardflow.schedules
 WHERE ($1::text IS NULL OR tenant_id = $1) AND shard_id = ANY ($2::int[])
 ORDER BY tenant_id, schedule_id;

-- name: pause_schedule
-- $1 tenant, $2 shard, $3 schedule id, $4 paused, $5 next run if resumed (epoch)
UPDATE shardflow.schedules
   SET paused = $4,
       next_run_at = CASE WHEN $4 THEN next_run_at ELSE to_timestamp($5::float8) END
 WHERE tenant_id = $1 AND schedule_id = $3 AND shard_id = $2
RETURNING 1;
