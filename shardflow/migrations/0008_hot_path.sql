-- 0008: group commit. A worker's checkpoint writes on one node (steps started and
-- finished, workflows finished) are gathered while the previous batch commits and
-- written by one call, in one transaction: one commit (one WAL flush) and one round
-- trip for many workflows, each of which still waits for its own checkpoint to be
-- durable before it goes on. Every row keeps the single-row statements' rules
-- (queries.sql: step_started, step_finished, finish_workflow): the write happens only
-- while the workflow is running under the caller's fence, and the workflow row is read
-- FOR SHARE so a recoverer's takeover either waits for the batch to commit or makes it
-- write nothing for that workflow.
--
-- Why statements over the partitioned parents and a forced generic plan: one statement
-- per batch must reach rows of many shards. Planned once per session (generic plan),
-- each row is one index probe into its own partition (run-time pruning of the nested
-- loop's inner Append). The plan is made once per connection, from the statistics of
-- that moment: hash joins, merge joins and sequential scans are off so that a plan made
-- while a partition was empty (a seq scan is cheapest then) never turns into a scan
-- of a big partition later. Sorts are off in the claim, so that the ready index gives
-- the order. JIT is off: the disabled plan types add a huge cost to the estimates,
-- which would make every call JIT-compile its plan (seconds).
--
-- Result rows: (op, idx, val) for each input that was written: op 1 = step started
-- (val = attempts so far), 2 = step finished, 3 = workflow finished; idx is the
-- 1-based position in that op's arrays. An input without a result row was fenced out.

CREATE FUNCTION shardflow.checkpoint_batch(
    st_tenant text[], st_shard int[], st_wf text[], st_fence bigint[], st_seq int[],
    st_name text[],
    fi_tenant text[], fi_shard int[], fi_wf text[], fi_fence bigint[], fi_seq int[],
    fi_name text[], fi_kind text[], fi_status text[], fi_output text[], fi_error text[],
    fi_retries int[],
    wf_tenant text[], wf_shard int[], wf_wf text[], wf_fence bigint[], wf_status text[],
    wf_output text[], wf_error text[])
RETURNS TABLE (op int, idx int, val int)
LANGUAGE plpgsql
SET plan_cache_mode = force_generic_plan
SET jit = off
SET enable_hashjoin = off
SET enable_mergejoin = off
SET enable_seqscan = off
AS $$
BEGIN
    IF cardinality(st_tenant) > 0 THEN
        RETURN QUERY
        WITH ok AS MATERIALIZED (
            SELECT i.* FROM unnest(st_tenant, st_shard, st_wf, st_fence, st_seq, st_name)
                            WITH ORDINALITY AS i(t, sh, wf, fe, sq, nm, ix),
                   LATERAL (SELECT 1 FROM shardflow.workflows w
                             WHERE w.tenant_id = i.t AND w.workflow_id = i.wf
                               AND w.shard_id = i.sh AND w.fence = i.fe
                               AND w.status = 'running'
                               FOR SHARE) AS l
        ), ins AS (
            INSERT INTO shardflow.steps AS s
                (tenant_id, shard_id, workflow_id, seq, name, kind, status)
            SELECT ok.t, ok.sh, ok.wf, ok.sq, ok.nm, 'step', 'started' FROM ok
            ON CONFLICT (tenant_id, workflow_id, seq, shard_id) DO UPDATE
               SET attempts = s.attempts + 1
             WHERE s.status = 'started'
            RETURNING s.tenant_id, s.shard_id, s.workflow_id, s.seq, s.attempts
        )
        SELECT 1, ok.ix::int, ins.attempts
          FROM ins JOIN ok ON ok.t = ins.tenant_id AND ok.wf = ins.workflow_id
                          AND ok.sq = ins.seq AND ok.sh = ins.shard_id;
    END IF;
    IF cardinality(fi_tenant) > 0 THEN
        RETURN QUERY
        WITH ok AS MATERIALIZED (
            SELECT i.* FROM unnest(fi_tenant, fi_shard, fi_wf, fi_fence, fi_seq, fi_name,
                                   fi_kind, fi_status, fi_output, fi_error, fi_retries)
                            WITH ORDINALITY AS i(t, sh, wf, fe, sq, nm, kd, st, o, e, r, ix),
                   LATERAL (SELECT 1 FROM shardflow.workflows w
                             WHERE w.tenant_id = i.t AND w.workflow_id = i.wf
                               AND w.shard_id = i.sh AND w.fence = i.fe
                               AND w.status = 'running'
                               FOR SHARE) AS l
        ), ins AS (
            INSERT INTO shardflow.steps AS s
                (tenant_id, shard_id, workflow_id, seq, name, kind, status, output, error,
                 retries, finished_at)
            SELECT ok.t, ok.sh, ok.wf, ok.sq, ok.nm, ok.kd, ok.st, ok.o::jsonb, ok.e::jsonb,
                   ok.r, now()
              FROM ok
            ON CONFLICT (tenant_id, workflow_id, seq, shard_id) DO UPDATE
               SET status = excluded.status, output = excluded.output,
                   error = excluded.error, retries = excluded.retries,
                   finished_at = excluded.finished_at
             WHERE s.status IN ('started', 'waiting')
            RETURNING s.tenant_id, s.shard_id, s.workflow_id, s.seq
        )
        SELECT 2, ok.ix::int, 1
          FROM ins JOIN ok ON ok.t = ins.tenant_id AND ok.wf = ins.workflow_id
                          AND ok.sq = ins.seq AND ok.sh = ins.shard_id;
    END IF;
    IF cardinality(wf_tenant) > 0 THEN
        RETURN QUERY
        UPDATE shardflow.workflows w
           SET status = i.st, output = i.o::jsonb, error = i.e::jsonb, finished_at = now(),
               updated_at = now(), owner = NULL
          FROM unnest(wf_tenant, wf_shard, wf_wf, wf_fence, wf_status, wf_output, wf_error)
               WITH ORDINALITY AS i(t, sh, wf, fe, st, o, e, ix)
         WHERE w.tenant_id = i.t AND w.workflow_id = i.wf AND w.shard_id = i.sh
           AND w.fence = i.fe AND w.status = 'running'
        RETURNING 3, i.ix::int, 1;
    END IF;
END
$$;

-- Claims in one statement over all the shards the caller owns on this node. The fair
-- claim (claim_tables) visits each shard partition and, in it, each tenant by a loose
-- index scan, with dynamic SQL planned per probe: fair whatever the backlog, but ~2
-- planned statements per claimed workflow. The fast path takes, from every shard at
-- once, the oldest ready rows by a new index on (queue, priority, ready_at) of pending
-- rows, and at most p_per_tenant per tenant. If the per-tenant limit left some rows of
-- a shard behind, that shard is crowded by a few tenants: the rest of the budget is
-- claimed from those shards by the fair claim, so a flood still cannot starve a
-- tenant with one workflow. Queues with a per-tenant running cap use the fair claim.
CREATE INDEX workflows_ready_idx
    ON shardflow.workflows (queue, priority DESC, ready_at)
    WHERE status = 'pending';

CREATE FUNCTION shardflow.claim_oldest(
    p_shards int[], p_queue text, p_names text[], p_worker text, p_limit int,
    p_per_tenant int)
RETURNS TABLE (tenant_id text, shard_id int, workflow_id text, name text, inputs jsonb,
               fence bigint, attempts int, max_attempts int, remaining float8,
               crowded boolean)
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
                  extract(epoch FROM w.deadline_at - v_now)::float8 AS remaining
    )
    SELECT c.*, false FROM claimed c
    UNION ALL
    -- one marker row per crowded shard (workflow_id NULL): the caller claims the rest
    -- of its budget there fairly
    SELECT NULL, x.shard_id, NULL, NULL, NULL, NULL, NULL, NULL, NULL, true FROM crowded x;
END
$$;

-- claim_fair's signature: budgets per queue, the fast path, the fair claim over the
-- crowded shards for what is left, the rate tokens spent.
CREATE FUNCTION shardflow.claim_fast(
    p_shards int[], p_names text[], p_worker text, p_limit int, p_per_tenant int,
    p_tenant_cap int)
RETURNS TABLE (tenant_id text, shard_id int, workflow_id text, name text, inputs jsonb,
               fence bigint, attempts int, max_attempts int, remaining float8)
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
                remaining := r.remaining;
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
                remaining := r.remaining;
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

-- Starts in bulk: engine.start_many, and concurrent engine.start calls gathered like
-- checkpoints (shardflow/batcher.py). One statement and one commit for many rows;
-- each start still returns only once its row is committed. Rows that already existed
-- (the same tenant and id) are skipped, as by insert_workflow. Returns the 1-based
-- positions of the rows inserted; one NOTIFY per shard that got runnable work.
CREATE FUNCTION shardflow.insert_workflows(
    p_tenant text[], p_shard int[], p_id text[], p_name text[], p_queue text[],
    p_priority int[], p_inputs text[], p_max_attempts int[], p_timeout float8[],
    p_delay float8[], p_notify boolean)
RETURNS TABLE (idx int)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_now timestamptz := now();
BEGIN
    RETURN QUERY
    WITH ins AS (
        INSERT INTO shardflow.workflows AS w
            (tenant_id, shard_id, workflow_id, name, queue, priority, inputs,
             max_attempts, deadline_at, ready_at)
        SELECT i.t, i.sh, i.id, i.nm, i.q, i.pr, i.inp::jsonb, i.ma,
               v_now + make_interval(secs => i.tmo),
               v_now + make_interval(secs => i.dl)
          FROM unnest(p_tenant, p_shard, p_id, p_name, p_queue, p_priority, p_inputs,
                      p_max_attempts, p_timeout, p_delay)
               AS i(t, sh, id, nm, q, pr, inp, ma, tmo, dl)
        ON CONFLICT (tenant_id, workflow_id, shard_id) DO NOTHING
        RETURNING w.tenant_id, w.workflow_id
    )
    -- the first position of each row inserted (a batch may hold the same start twice)
    SELECT min(x.ix)::int
      FROM ins
      JOIN unnest(p_tenant, p_id) WITH ORDINALITY AS x(t, id, ix)
        ON x.t = ins.tenant_id AND x.id = ins.workflow_id
     GROUP BY ins.tenant_id, ins.workflow_id;
    IF p_notify THEN
        -- wake the owners of the shards with work due now (LISTEN shardflow_work);
        -- a shard whose rows all existed already gets a harmless extra wake-up
        PERFORM pg_notify('shardflow_work', u.s::text)
           FROM (SELECT DISTINCT s FROM unnest(p_shard, p_delay) AS d(s, dl)
                  WHERE dl = 0) AS u;
    END IF;
END
$$;
