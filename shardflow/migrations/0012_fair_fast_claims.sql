-- 0012: fast claims keep tenants fair on every claim, and "fresh" is never wrong.
--
-- A review found that the fast claim (0008/0010) read at most p_per_tenant rows of a
-- shard when the claim spanned many shards, so a tenant could never exceed the cap
-- there and a shard crowded by a flood was never noticed: a small tenant queued
-- behind it waited for the flood to drain. Now every shard is read one row past the
-- cap, crowded shards are left out of the fast path entirely, and part of the batch is
-- kept for the fair, tenant-by-tenant claim of those shards (claim_fast runs it).
-- "fresh" (no checkpoints to read) now also requires a first claim: the NOT EXISTS
-- runs on the statement's snapshot, which may miss the checkpoints of a row claimed,
-- run and handed back by another worker while this claim ran.

CREATE OR REPLACE FUNCTION shardflow.claim_oldest(
    p_shards int[], p_queue text, p_names text[], p_worker text, p_limit int,
    p_per_tenant int)
RETURNS TABLE (tenant_id text, shard_id int, workflow_id text, name text, inputs jsonb,
               fence bigint, attempts int, max_attempts int, remaining float8,
               fresh boolean, crowded boolean)
LANGUAGE plpgsql
SET plan_cache_mode = force_generic_plan
SET jit = off
SET enable_hashjoin = off
SET enable_mergejoin = off
SET enable_seqscan = off
SET enable_sort = off
AS $$
#variable_conflict use_column
DECLARE
    v_now timestamptz := now();
    -- rows read per shard: enough for the batch from a few busy shards, not the whole
    -- batch from every shard (a backlog would make each claim read shards x batch)
    -- and always more than p_per_tenant, so that a shard crowded by one tenant shows
    v_per_shard int := greatest(p_per_tenant + 1, least(
        p_limit, ceil(p_limit * 2.0 / greatest(cardinality(p_shards), 1))::int));
BEGIN
    RETURN QUERY
    WITH cand AS MATERIALIZED (
        SELECT c.tenant_id, c.shard_id, c.workflow_id, c.priority, c.ready_at,
               row_number() OVER (PARTITION BY c.tenant_id
                                  ORDER BY c.priority DESC, c.ready_at) AS rn
          FROM unnest(p_shards) AS s(sh),
               LATERAL (SELECT w.tenant_id, w.shard_id, w.workflow_id, w.priority,
                               w.ready_at
                          FROM shardflow.workflows w
                         WHERE w.shard_id = s.sh AND w.status = 'pending'
                           AND w.queue = p_queue AND w.ready_at <= v_now
                           AND w.name = ANY(p_names)
                         ORDER BY w.priority DESC, w.ready_at
                         LIMIT v_per_shard) AS c
    ), crowded AS (
        SELECT DISTINCT cand.shard_id FROM cand WHERE cand.rn > p_per_tenant
    ), picked AS (
        -- crowded shards are left to the fair claim, with part of the batch kept for
        -- it (the caller runs it for what this leaves), so a busy rest of the node
        -- cannot take the whole batch while a small tenant waits behind a flood
        SELECT cand.tenant_id, cand.shard_id, cand.workflow_id FROM cand
         WHERE cand.rn <= p_per_tenant
           AND cand.shard_id NOT IN (SELECT x.shard_id FROM crowded x)
         ORDER BY cand.priority DESC, cand.ready_at
         -- kept: up to half the batch, the cap of one tenant plus one more per
         -- crowded shard (the flood's share and at least one other tenant's)
         LIMIT greatest(0, p_limit - least(ceil(p_limit / 2.0)::int,
                                          (p_per_tenant + 1)
                                          * (SELECT count(*) FROM crowded)::int))
    ), claimed AS (
        UPDATE shardflow.workflows w
           SET status = 'running', owner = p_worker, fence = w.fence + 1,
               attempts = w.attempts + 1, started_at = coalesce(w.started_at, v_now),
               updated_at = v_now, reason = NULL
          FROM picked p
         WHERE w.tenant_id = p.tenant_id AND w.workflow_id = p.workflow_id
           AND w.shard_id = p.shard_id
           -- candidates were read without locks (locking every one would write to
           -- rows we do not take); the UPDATE re-checks the status of each row it
           -- takes after any concurrent change (a recoverer, another claimer in a
           -- shard handover), so a row is never claimed twice
           AND w.status = 'pending'
        RETURNING w.tenant_id, w.shard_id, w.workflow_id, w.name, w.inputs, w.fence,
                  w.attempts, w.max_attempts,
                  extract(epoch FROM w.deadline_at - v_now)::float8 AS remaining,
                  -- no checkpoints yet (a first run, not a fork or a resume): the
                  -- worker need not read any
                  -- (a first claim: a row handed back and claimed again meanwhile has
                  -- more attempts, and may have checkpoints this snapshot cannot see)
                  w.attempts = 1 AND NOT EXISTS (SELECT 1 FROM shardflow.steps s
                               WHERE s.tenant_id = w.tenant_id
                                 AND s.workflow_id = w.workflow_id
                                 AND s.shard_id = w.shard_id) AS fresh
    )
    SELECT c.*, false FROM claimed c
    UNION ALL
    -- one marker row per crowded shard (workflow_id NULL): the caller claims the rest
    -- of its budget there fairly
    SELECT NULL, x.shard_id, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, true
      FROM crowded x;
END
$$;
