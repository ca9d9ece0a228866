-- 0002: shard ownership leases for shard-aware workers; named queues with priorities,
-- concurrency and rate limits; tenant-fair claiming.

-- Which worker owns (polls) each of this node's shards. A lease is valid while its
-- owner's heartbeat row in shardflow.workers is live: owning shards costs no writes
-- beyond the worker's own heartbeat. epoch counts ownership changes.
CREATE TABLE shardflow.shard_leases (
    shard_id    int PRIMARY KEY,
    owner       text,
    epoch       bigint NOT NULL DEFAULT 0,
    acquired_at timestamptz
);

-- Queue definitions are written by every Engine on open (upsert) and kept on every
-- node. Limits are cluster-wide figures; each node enforces its share, in proportion
-- to the shards it holds (ceil), so no cross-node coordination sits on the claim path.

CREATE TABLE shardflow.queues (
    name               text PRIMARY KEY,
    -- queues are claimed from in priority order (higher first)
    priority           int NOT NULL DEFAULT 0,
    -- most workflows of the queue running at once, cluster-wide (null: no limit)
    concurrency        int CHECK (concurrency > 0),
    -- most workflows of one tenant of the queue running at once (null: no limit)
    tenant_concurrency int CHECK (tenant_concurrency > 0),
    -- most workflows of the queue started per second, cluster-wide (null: no limit)
    rate_per_sec       float8 CHECK (rate_per_sec > 0),
    paused             boolean NOT NULL DEFAULT false,
    updated_at         timestamptz NOT NULL DEFAULT now()
);
INSERT INTO shardflow.queues (name) VALUES ('default');

-- Token bucket of each rate-limited queue on this node (its share of the rate).
CREATE TABLE shardflow.queue_tokens (
    name        text PRIMARY KEY,
    tokens      float8 NOT NULL,
    refilled_at timestamptz NOT NULL DEFAULT now()
);

-- Claims walk one queue at a time, tenant by tenant, over pending rows only: the index
-- stays as small as the backlog and leads with the queue, then the tenant.
CREATE INDEX workflows_pending_queue_idx
    ON shardflow.workflows (queue, tenant_id, priority DESC, ready_at)
    WHERE status = 'pending';
CREATE INDEX workflows_running_queue_idx
    ON shardflow.workflows (queue, tenant_id)
    WHERE status = 'running';
-- Per-tenant concurrency limits count a tenant's running workflows.
CREATE INDEX workflows_running_tenant_idx
    ON shardflow.workflows (tenant_id)
    WHERE status = 'running';

-- Claim up to p_limit ready workflows from shards p_shards. Queues are visited in
-- priority order, each within its budget on this node (concurrency share minus running,
-- rate tokens); within a queue, in each shard, tenants are visited in turn from a
-- random starting point (a loose index scan: one probe per tenant, whatever its
-- backlog), at most p_per_tenant each per call and never above the tenant cap
-- (p_tenant_cap from the engine, the queue's tenant_concurrency, whichever is lower).
-- A tenant with a million queued workflows thus cannot starve one with a single one.
CREATE FUNCTION shardflow.claim_fair(
    p_shards int[], p_names text[], p_worker text, p_limit int, p_per_tenant int,
    p_tenant_cap int)
RETURNS TABLE (tenant_id text, shard_id int, workflow_id text, name text, inputs jsonb,
               fence bigint, attempts int, max_attempts int, remaining float8)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    q record;
    s int;
    t text;
    start_key text;
    wrapped boolean;
    got int := 0;
    budget int;
    tokens float8;
    cap int;
    take int;
    n int;
    share float8;
    -- a variable, not now() inline: Citus refuses volatile functions inside COALESCE
    v_now timestamptz := now();
BEGIN
    -- this node's share of cluster-wide queue limits
    SELECT count(*) FILTER (WHERE m.node = i.node_name)::float8 / greatest(count(*), 1)
      INTO share
      FROM shardflow.shard_map m, shardflow.node_info i;
    share := coalesce(nullif(share, 0), 1);
    FOR q IN SELECT * FROM shardflow.queues WHERE NOT paused
             ORDER BY priority DESC, name LOOP
        EXIT WHEN got >= p_limit;
        budget := p_limit - got;
        IF q.concurrency IS NOT NULL THEN
            SELECT count(*) INTO n FROM shardflow.workflows w
             WHERE w.status = 'running' AND w.queue = q.name;
            budget := least(budget, ceil(q.concurrency * share)::int - n);
        END IF;
        IF q.rate_per_sec IS NOT NULL THEN
            -- refill this node's bucket (burst: one second of its share)
            INSERT INTO shardflow.queue_tokens AS b (name, tokens, refilled_at)
            VALUES (q.name, q.rate_per_sec * share, v_now)
            ON CONFLICT (name) DO UPDATE
               SET tokens = least(q.rate_per_sec * share,
                                  b.tokens + q.rate_per_sec * share
                                  * extract(epoch FROM v_now - b.refilled_at)),
                   refilled_at = v_now
            RETURNING b.tokens INTO tokens;
            budget := least(budget, floor(tokens)::int);
        END IF;
        CONTINUE WHEN budget <= 0;
        cap := nullif(least(nullif(p_tenant_cap, 0), q.tenant_concurrency), 0);
        n := got;
        FOREACH s IN ARRAY p_shards LOOP
            EXIT WHEN got - n >= budget;
            -- a shard that just moved away (stale map of the caller) has no partition
            CONTINUE WHEN to_regclass('shardflow.workflows_s' || s) IS NULL;
            start_key := md5(random()::text);
            t := start_key;
            wrapped := false;
            LOOP
                EXIT WHEN got - n >= budget;
                -- each shard's own partition by name: planning a query on the parent
                -- would open every partition of this node, per shard, per claim
                EXECUTE format(
                    'SELECT w.tenant_id FROM shardflow.%I w WHERE w.status = ''pending'' '
                    'AND w.queue = $1 AND w.tenant_id > $2 ORDER BY w.tenant_id LIMIT 1',
                    'workflows_s' || s)
                   INTO t USING q.name, t;
                IF t IS NULL THEN
                    EXIT WHEN wrapped;
                    -- wrap around to the tenants before the random starting point
                    wrapped := true;
                    t := '';
                    CONTINUE;
                END IF;
                EXIT WHEN wrapped AND t > start_key;
                take := least(p_per_tenant, budget - (got - n));
                IF cap IS NOT NULL THEN
                    EXECUTE format(
                        'SELECT count(*) FROM shardflow.%I w WHERE w.tenant_id = $1 '
                        'AND w.status = ''running'' AND ($2 OR w.queue = $3)',
                        'workflows_s' || s)
                       INTO take USING t, q.tenant_concurrency IS NULL, q.name;
                    take := least(p_per_tenant, budget - (got - n), cap - take);
                END IF;
                CONTINUE WHEN take <= 0;
                RETURN QUERY EXECUTE format(
                    'WITH picked AS ('
                    '    SELECT w.tenant_id, w.workflow_id, w.shard_id FROM shardflow.%1$I w'
                    '     WHERE w.tenant_id = $1 AND w.status = ''pending'' AND w.queue = $2'
                    '       AND w.ready_at <= $3 AND w.name = ANY($4)'
                    '     ORDER BY w.priority DESC, w.ready_at LIMIT $5'
                    '       FOR UPDATE SKIP LOCKED)'
                    ' UPDATE shardflow.%1$I w'
                    '    SET status = ''running'', owner = $6, fence = w.fence + 1,'
                    '        attempts = w.attempts + 1, started_at = coalesce(w.started_at, $3),'
                    '        updated_at = $3, reason = NULL'
                    '   FROM picked p'
                    '  WHERE w.tenant_id = p.tenant_id AND w.workflow_id = p.workflow_id'
                    ' RETURNING w.tenant_id, w.shard_id, w.workflow_id, w.name, w.inputs,'
                    '           w.fence, w.attempts, w.max_attempts,'
                    '           extract(epoch FROM w.deadline_at - $3)::float8',
                    'workflows_s' || s)
                   USING t, q.name, v_now, p_names, take, p_worker;
                GET DIAGNOSTICS take = ROW_COUNT;
                got := got + take;
            END LOOP;
        END LOOP;
        IF q.rate_per_sec IS NOT NULL AND got > n THEN
            UPDATE shardflow.queue_tokens SET tokens = tokens - (got - n) WHERE name = q.name;
        END IF;
    END LOOP;
END
$$;
