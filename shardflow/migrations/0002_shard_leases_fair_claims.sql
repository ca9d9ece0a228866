-- 0002: shard ownership leases for shard-aware workers, and tenant-fair claiming.

-- Which worker owns (polls) each of this node's shards. A lease is valid while its
-- owner's heartbeat row in shardflow.workers is live: owning shards costs no writes
-- beyond the worker's own heartbeat. epoch counts ownership changes.
CREATE TABLE shardflow.shard_leases (
    shard_id    int PRIMARY KEY,
    owner       text,
    epoch       bigint NOT NULL DEFAULT 0,
    acquired_at timestamptz
);

-- Claims walk pending work tenant by tenant (see claim_fair); the old priority-ordered
-- index is replaced by one led by tenant.
DROP INDEX shardflow.workflows_pending_idx;
CREATE INDEX workflows_pending_tenant_idx
    ON shardflow.workflows (tenant_id, priority DESC, ready_at)
    WHERE status = 'pending';
-- Per-tenant concurrency limits count a tenant's running workflows.
CREATE INDEX workflows_running_tenant_idx
    ON shardflow.workflows (tenant_id)
    WHERE status = 'running';

-- Claim up to p_limit ready workflows from the shards p_shards, tenant-fairly: in each
-- shard, tenants with ready work are visited in turn from a random starting point (a
-- loose index scan: one probe per tenant, whatever each tenant's backlog), taking at
-- most p_per_tenant from each per call, and none from a tenant already running
-- p_tenant_cap workflows (0 = no cap). A tenant with a million queued workflows thus
-- cannot starve one that starts a single workflow.
CREATE FUNCTION shardflow.claim_fair(
    p_shards int[], p_names text[], p_worker text, p_limit int, p_per_tenant int,
    p_tenant_cap int)
RETURNS TABLE (tenant_id text, shard_id int, workflow_id text, name text, inputs jsonb,
               fence bigint, attempts int, max_attempts int, remaining float8)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    s int;
    t text;
    start_key text := md5(random()::text);
    wrapped boolean;
    got int := 0;
    take int;
    n int;
    -- a variable, not now() inline: Citus refuses volatile functions inside COALESCE
    v_now timestamptz := now();
BEGIN
    FOREACH s IN ARRAY p_shards LOOP
        EXIT WHEN got >= p_limit;
        t := start_key;
        wrapped := false;
        LOOP
            EXIT WHEN got >= p_limit;
            SELECT w.tenant_id INTO t FROM shardflow.workflows w
             WHERE w.shard_id = s AND w.status = 'pending' AND w.tenant_id > t
             ORDER BY w.tenant_id LIMIT 1;
            IF NOT FOUND THEN
                EXIT WHEN wrapped;
                -- wrap around to the tenants before the random starting point
                wrapped := true;
                t := '';
                CONTINUE;
            END IF;
            EXIT WHEN wrapped AND t > start_key;
            take := least(p_per_tenant, p_limit - got);
            IF p_tenant_cap > 0 THEN
                SELECT count(*) INTO n FROM shardflow.workflows w
                 WHERE w.shard_id = s AND w.tenant_id = t AND w.status = 'running';
                take := least(take, p_tenant_cap - n);
            END IF;
            CONTINUE WHEN take <= 0;
            RETURN QUERY
            WITH picked AS (
                SELECT w.tenant_id, w.workflow_id, w.shard_id
                  FROM shardflow.workflows w
                 WHERE w.shard_id = s AND w.tenant_id = t AND w.status = 'pending'
                   AND w.ready_at <= v_now AND w.name = ANY(p_names)
                 ORDER BY w.priority DESC, w.ready_at
                 LIMIT take
                   FOR UPDATE SKIP LOCKED
            )
            UPDATE shardflow.workflows w
               SET status = 'running', owner = p_worker, fence = w.fence + 1,
                   attempts = w.attempts + 1, started_at = coalesce(w.started_at, v_now),
                   updated_at = v_now, reason = NULL
              FROM picked p
             WHERE w.tenant_id = p.tenant_id AND w.workflow_id = p.workflow_id
               AND w.shard_id = p.shard_id
            RETURNING w.tenant_id, w.shard_id, w.workflow_id, w.name, w.inputs, w.fence,
                      w.attempts, w.max_attempts,
                      extract(epoch FROM w.deadline_at - v_now)::float8;
            GET DIAGNOSTICS n = ROW_COUNT;
            got := got + n;
        END LOOP;
    END LOOP;
END
$$;
