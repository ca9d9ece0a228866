-- 0010: cheaper rows on the hot path.
--
-- * One index of running workflows instead of three (owner; queue, tenant; tenant, from
--   0001 and 0002): every claim wrote an entry in each. What they served still has an
--   index: a tenant's running count (leading column), a queue's running count and the
--   rows of an owner (running rows are few: bounded by the workers' concurrency).
-- * Claims say which claimed workflows have no checkpoints yet (a first run), so the
--   worker skips reading their steps: one statement less per workflow.

CREATE INDEX workflows_running_idx ON shardflow.workflows (tenant_id, queue, owner)
    WHERE status = 'running';
DROP INDEX shardflow.workflows_running_owner_idx;
DROP INDEX shardflow.workflows_running_queue_idx;
DROP INDEX shardflow.workflows_running_tenant_idx;

-- the result gains "fresh": claim_fast first (it calls claim_oldest when it runs)
DROP FUNCTION shardflow.claim_fast(int[], text[], text, int, int, int);
DROP FUNCTION shardflow.claim_oldest(int[], text, text[], text, int, int);

CREATE FUNCTION shardflow.claim_oldest(
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
    v_per_shard int := least(p_limit, greatest(
        p_per_tenant, ceil(p_limit * 2.0 / greatest(cardinality(p_shards), 1))::int));
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
    ), picked AS (
        SELECT cand.tenant_id, cand.shard_id, cand.workflow_id FROM cand
         WHERE cand.rn <= p_per_tenant
         ORDER BY cand.priority DESC, cand.ready_at
         LIMIT p_limit
    ), crowded AS (
        SELECT DISTINCT cand.shard_id FROM cand WHERE cand.rn > p_per_tenant
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
                  NOT EXISTS (SELECT 1 FROM shardflow.steps s
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

-- claim_fair's signature: budgets per queue, the fast path, the fair claim over the
-- crowded shards for what is left, the rate tokens spent.
CREATE FUNCTION shardflow.claim_fast(
    p_shards int[], p_names text[], p_worker text, p_limit int, p_per_tenant int,
    p_tenant_cap int)
RETURNS TABLE (tenant_id text, shard_id int, workflow_id text, name text, inputs jsonb,
               fence bigint, attempts int, max_attempts int, remaining float8,
               fresh boolean)
LANGUAGE plpgsql AS $$
DECLARE
    b record;
    r record;
    got int := 0;
    n int;
    crowded int[];
    spend text[] := '{}';
BEGIN
    FOR b IN SELECT * FROM shardflow.queue_budgets(p_limit, p_tenant_cap) LOOP
        EXIT WHEN got >= p_limit;
        n := 0;
        crowded := '{}';
        IF b.tenant_cap IS NULL THEN
            FOR r IN SELECT * FROM shardflow.claim_oldest(
                         p_shards, b.queue, p_names, p_worker,
                         least(b.budget, p_limit - got), p_per_tenant) LOOP
                IF r.crowded THEN
                    crowded := crowded || r.shard_id;
                    CONTINUE;
                END IF;
                tenant_id := r.tenant_id; shard_id := r.shard_id;
                workflow_id := r.workflow_id; name := r.name; inputs := r.inputs;
                fence := r.fence; attempts := r.attempts; max_attempts := r.max_attempts;
                remaining := r.remaining; fresh := r.fresh;
                n := n + 1;
                RETURN NEXT;
            END LOOP;
        ELSE
            crowded := p_shards;  -- a tenant cap needs the fair claim's counting
        END IF;
        IF cardinality(crowded) > 0 AND n < least(b.budget, p_limit - got) THEN
            FOR r IN SELECT * FROM shardflow.claim_tables(
                         ARRAY(SELECT 'workflows_s' || s FROM unnest(crowded) AS s),
                         ARRAY[b.queue], ARRAY[least(b.budget, p_limit - got) - n],
                         ARRAY[b.tenant_cap], ARRAY[b.cap_per_queue], p_names, p_worker,
                         least(b.budget, p_limit - got) - n, p_per_tenant) LOOP
                tenant_id := r.tenant_id; shard_id := r.shard_id;
                workflow_id := r.workflow_id; name := r.name; inputs := r.inputs;
                fence := r.fence; attempts := r.attempts; max_attempts := r.max_attempts;
                remaining := r.remaining; fresh := NULL;  -- unknown: read
                n := n + 1;
                RETURN NEXT;
            END LOOP;
        END IF;
        got := got + n;
        IF b.rate_limited AND n > 0 THEN
            spend := spend || array_fill(b.queue, ARRAY[n]);
        END IF;
    END LOOP;
    IF cardinality(spend) > 0 THEN
        PERFORM shardflow.queue_spend(spend);
    END IF;
END
$$;

-- Transaction steps in groups (shardflow/batcher.py, TxBatcher): one transaction runs
-- the transaction steps of many workflows, each in a savepoint of its own. First
-- tx_lock reads every workflow row FOR SHARE with its fence (a takeover now waits for
-- this transaction, and nobody else writes these workflows' checkpoints) and says
-- which positions are already recorded; then each step's writes run; then
-- tx_checkpoints records every step that succeeded, in one statement; then one commit.
-- Plain inserts: after the lock and the check no other checkpoint can exist at those
-- positions, so the user's writes and their checkpoint still commit together.
CREATE FUNCTION shardflow.tx_lock(
    p_tenant text[], p_shard int[], p_wf text[], p_fence bigint[], p_seq int[])
RETURNS TABLE (idx int, owned boolean, recorded boolean)
LANGUAGE plpgsql
SET plan_cache_mode = force_generic_plan
SET jit = off
SET enable_hashjoin = off
SET enable_mergejoin = off
SET enable_seqscan = off
AS $$
BEGIN
    RETURN QUERY
    SELECT i.ix::int, l.ok IS NOT NULL,
           EXISTS (SELECT 1 FROM shardflow.steps s
                    WHERE s.tenant_id = i.t AND s.workflow_id = i.wf AND s.shard_id = i.sh
                      AND s.seq = i.sq)
      FROM unnest(p_tenant, p_shard, p_wf, p_fence, p_seq)
           WITH ORDINALITY AS i(t, sh, wf, fe, sq, ix)
      LEFT JOIN LATERAL (SELECT 1 AS ok FROM shardflow.workflows w
                          WHERE w.tenant_id = i.t AND w.workflow_id = i.wf
                            AND w.shard_id = i.sh AND w.fence = i.fe
                            AND w.status = 'running'
                            FOR SHARE) AS l ON true;
END
$$;

CREATE FUNCTION shardflow.tx_checkpoints(
    p_tenant text[], p_shard int[], p_wf text[], p_seq int[], p_name text[],
    p_output text[])
RETURNS void LANGUAGE sql AS $$
    INSERT INTO shardflow.steps
        (tenant_id, shard_id, workflow_id, seq, name, kind, status, output, finished_at)
    SELECT t, sh, wf, sq, nm, 'transaction', 'done', o::jsonb, now()
      FROM unnest(p_tenant, p_shard, p_wf, p_seq, p_name, p_output) AS i(t, sh, wf, sq, nm, o)
$$;
