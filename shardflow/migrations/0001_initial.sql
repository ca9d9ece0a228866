-- 0001: node identity, shard map, workers, and the tenant-partitioned workflow tables.
--
-- Every workflow table leads with tenant_id and carries shard_id, the tenant's logical
-- shard (shardflow.shard_of). The tables are LIST-partitioned by shard_id and a node
-- creates partitions only for the shards it holds (shardflow.ensure_shard), so a row
-- sent to the wrong node finds no partition and Postgres refuses it (SQLSTATE 23514).

CREATE FUNCTION shardflow.shard_of(tenant text, shard_count int) RETURNS int
    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
    RETURN ((('x' || left(md5(tenant), 8))::bit(32)::bigint) % shard_count)::int;

COMMENT ON FUNCTION shardflow.shard_of(text, int) IS
    'Logical shard of a tenant: first 32 bits of md5(tenant) modulo the shard count. '
    'The Python client computes the same (shardflow.routing.shard_of).';

-- One row: who this node is and how many logical shards the cluster has.
CREATE TABLE shardflow.node_info (
    singleton   boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    node_name   text NOT NULL,
    shard_count int NOT NULL CHECK (shard_count > 0),
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- The whole shard map, stored on every node so any node can answer "where is shard s".
-- epoch grows when a shard moves, so clients can tell a stale cached map.
CREATE TABLE shardflow.shard_map (
    shard_id int PRIMARY KEY,
    node     text NOT NULL,
    epoch    bigint NOT NULL DEFAULT 1
);

-- Live workers, one heartbeat row per worker per node: a worker's lease on all the
-- workflows it runs on this node is renewed by one write, not one per workflow.
CREATE TABLE shardflow.workers (
    worker_id        text PRIMARY KEY,
    host             text NOT NULL,
    pid              int NOT NULL,
    workflow_names   text[] NOT NULL DEFAULT '{}',
    started_at       timestamptz NOT NULL DEFAULT now(),
    heartbeat_at     timestamptz NOT NULL DEFAULT now(),
    lease_expires_at timestamptz NOT NULL
);

CREATE TABLE shardflow.workflows (
    tenant_id    text NOT NULL,
    shard_id     int NOT NULL,
    workflow_id  text NOT NULL,
    name         text NOT NULL,
    queue        text NOT NULL DEFAULT 'default',
    priority     int NOT NULL DEFAULT 0,
    status       text NOT NULL DEFAULT 'pending'
                 CHECK (status IN ('pending', 'running', 'succeeded', 'failed', 'cancelled', 'dead')),
    inputs       jsonb NOT NULL,
    output       jsonb,
    error        jsonb,
    parent_id    text,
    -- claims so far; past max_attempts the workflow goes to the dead-letter status 'dead'
    attempts     int NOT NULL DEFAULT 0,
    max_attempts int NOT NULL DEFAULT 20,
    -- the worker holding the workflow, and the fencing token it got when it claimed it:
    -- every checkpoint write checks the fence, so a worker that lost the workflow to
    -- another one cannot write after the takeover.
    owner        text,
    fence        bigint NOT NULL DEFAULT 0,
    -- a pending workflow is not claimed before ready_at (durable sleep, retry backoff)
    ready_at     timestamptz NOT NULL DEFAULT now(),
    deadline_at  timestamptz,
    -- human-readable reason a workflow is still pending (e.g. no worker registers it)
    reason       text,
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    started_at   timestamptz,
    finished_at  timestamptz,
    PRIMARY KEY (tenant_id, workflow_id, shard_id)
) PARTITION BY LIST (shard_id);

-- Recovery looks up running workflows by owner.
CREATE INDEX workflows_running_owner_idx ON shardflow.workflows (owner)
    WHERE status = 'running';
CREATE INDEX workflows_parent_idx ON shardflow.workflows (tenant_id, parent_id)
    WHERE parent_id IS NOT NULL;
CREATE INDEX workflows_created_idx ON shardflow.workflows (tenant_id, created_at);

-- Step checkpoints: one row per step position (seq) of a workflow.
CREATE TABLE shardflow.steps (
    tenant_id   text NOT NULL,
    shard_id    int NOT NULL,
    workflow_id text NOT NULL,
    seq         int NOT NULL,
    name        text NOT NULL,
    kind        text NOT NULL
                CHECK (kind IN ('step', 'transaction', 'sleep', 'recv', 'send', 'child',
                                'child_result', 'set_event', 'patch')),
    status      text NOT NULL CHECK (status IN ('started', 'done', 'error', 'waiting')),
    output      jsonb,
    error       jsonb,
    -- executions of a non-transactional step: attempts - 1 are re-runs after a crash
    attempts    int NOT NULL DEFAULT 1,
    -- in-process retries of the step (with backoff) before its recorded outcome
    retries     int NOT NULL DEFAULT 0,
    wake_at     timestamptz,
    created_at  timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz,
    PRIMARY KEY (tenant_id, workflow_id, seq, shard_id)
) PARTITION BY LIST (shard_id);

CREATE SEQUENCE shardflow.message_seq;

-- Messages sent to a workflow; a recv deletes the message in the transaction that
-- checkpoints it, so each message is delivered exactly once.
CREATE TABLE shardflow.messages (
    tenant_id       text NOT NULL,
    shard_id        int NOT NULL,
    workflow_id     text NOT NULL,
    topic           text NOT NULL,
    msg_id          bigint NOT NULL DEFAULT nextval('shardflow.message_seq'),
    payload         jsonb,
    idempotency_key text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, workflow_id, topic, msg_id, shard_id)
) PARTITION BY LIST (shard_id);

CREATE UNIQUE INDEX messages_idempotency_idx
    ON shardflow.messages (tenant_id, workflow_id, idempotency_key, shard_id)
    WHERE idempotency_key IS NOT NULL;

-- Key/value events a workflow publishes (set_event) and others read (get_event).
CREATE TABLE shardflow.events (
    tenant_id   text NOT NULL,
    shard_id    int NOT NULL,
    workflow_id text NOT NULL,
    key         text NOT NULL,
    value       jsonb,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, workflow_id, key, shard_id)
) PARTITION BY LIST (shard_id);

-- Tables partitioned by shard; ensure_shard creates one partition of each per shard.
CREATE TABLE shardflow.sharded_tables (
    table_name text PRIMARY KEY,
    -- storage parameters for the partitions: hot queue tables vacuum early and often
    storage    text NOT NULL DEFAULT ''
);
INSERT INTO shardflow.sharded_tables (table_name, storage) VALUES
    ('workflows', 'fillfactor = 80, autovacuum_vacuum_scale_factor = 0.02, autovacuum_vacuum_threshold = 200, autovacuum_analyze_scale_factor = 0.05'),
    ('steps', 'autovacuum_vacuum_scale_factor = 0.05'),
    ('messages', 'autovacuum_vacuum_scale_factor = 0.02, autovacuum_vacuum_threshold = 100'),
    ('events', '');

-- Create (idempotently) this node's partitions of shard p_shard. Each partition also
-- checks that the tenant really hashes to the shard, so a client with a wrong shard
-- count or a buggy hash cannot file a tenant under the wrong shard.
CREATE FUNCTION shardflow.ensure_shard(p_shard int, p_shard_count int) RETURNS void
    LANGUAGE plpgsql AS $$
DECLARE
    t record;
    part text;
BEGIN
    FOR t IN SELECT table_name, storage FROM shardflow.sharded_tables ORDER BY table_name LOOP
        part := format('%s_s%s', t.table_name, p_shard);
        -- a shard moving back finds its old, emptied partition refusing rows: drop it
        IF to_regclass(format('shardflow.%I', part)) IS NOT NULL AND EXISTS (
               SELECT 1 FROM pg_constraint
                WHERE conname = part || '_moved_away'
                  AND conrelid = to_regclass(format('shardflow.%I', part))) THEN
            EXECUTE format('DROP TABLE shardflow.%I', part);
        END IF;
        IF to_regclass(format('shardflow.%I', part)) IS NULL THEN
            EXECUTE format(
                'CREATE TABLE shardflow.%I PARTITION OF shardflow.%I FOR VALUES IN (%s) %s',
                part, t.table_name, p_shard,
                CASE WHEN t.storage = '' THEN '' ELSE format('WITH (%s)', t.storage) END);
            EXECUTE format(
                'ALTER TABLE shardflow.%I ADD CONSTRAINT %I CHECK (shardflow.shard_of(tenant_id, %s) = %s)',
                part, part || '_tenant_shard', p_shard_count, p_shard);
        END IF;
    END LOOP;
END
$$;

-- Drop this node's partitions of a shard (after the shard moved away).
CREATE FUNCTION shardflow.drop_shard(p_shard int) RETURNS void
    LANGUAGE plpgsql AS $$
DECLARE
    t record;
BEGIN
    FOR t IN SELECT table_name FROM shardflow.sharded_tables LOOP
        EXECUTE format('DROP TABLE IF EXISTS shardflow.%I', format('%s_s%s', t.table_name, p_shard));
    END LOOP;
END
$$;

-- Operators' view: one row per workflow with its age and progress.
CREATE VIEW shardflow.workflow_status AS
SELECT w.tenant_id, w.shard_id, w.workflow_id, w.name, w.queue, w.status, w.attempts,
       w.owner, w.created_at, w.finished_at,
       coalesce(w.finished_at, now()) - w.created_at AS age,
       (SELECT count(*) FROM shardflow.steps s
         WHERE s.tenant_id = w.tenant_id AND s.workflow_id = w.workflow_id
           AND s.shard_id = w.shard_id AND s.status = 'done') AS steps_done,
       w.reason
  FROM shardflow.workflows w;
