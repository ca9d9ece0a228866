-- 0013: the hot UPDATEs reach their rows by TID, whatever the statistics said when
-- their plans were made.
--
-- Found by EXPLAIN of the cached generic plans: a plan made while the table statistics
-- said "no pending rows" (after a VACUUM or ANALYZE of a quiet node: the bench does one
-- before every run) claimed with "read every pending row of every partition of the
-- node through the ready index, keep them, and match them to the picked rows": per
-- claim, work that grows with the backlog, for as long as the connection lives. The
-- checkpoint batch's "workflows finished" UPDATE did the same with the running rows
-- (the running index, then a nested loop comparing keys: 5% of Postgres's CPU in
-- memcmp under load). With statistics that small, a scan of an empty partial index
-- costs no more than a key probe, so the planner takes it, and a generic plan is
-- never remade while the statistics do not change.
--
-- A TID cannot be planned badly: update_claimed and update_finished update rows by
-- the TIDs their callers read (seq scans, index scans and bitmap scans are off in
-- them, so a TID scan per row is the only plan). The callers find the rows with key
-- probes in LATERAL subqueries that cannot be flattened. Concurrency: a row updated
-- since it was read has a new TID; the UPDATE follows it to the newest version and
-- re-checks its own conditions there (status and fence), as any UPDATE in READ
-- COMMITTED does, so a claim never takes a row that is no longer pending and a finish
-- never writes over a new owner's run.

CREATE FUNCTION shardflow.update_claimed(
    p_tenant text[], p_shard int[], p_wf text[], p_tid tid[], p_worker text,
    p_now timestamptz)
RETURNS TABLE (tenant_id text, shard_id int, workflow_id text, name text, inputs jsonb,
               fence bigint, attempts int, max_attempts int, remaining float8)
LANGUAGE plpgsql
SET plan_cache_mode = force_generic_plan
SET jit = off
SET enable_seqscan = off
SET enable_indexscan = off
SET enable_indexonlyscan = off
SET enable_bitmapscan = off
SET enable_hashjoin = off
SET enable_mergejoin = off
SET enable_material = off
AS $$
BEGIN
    RETURN QUERY
    UPDATE shardflow.workflows w
       SET status = 'running', owner = p_worker, fence = w.fence + 1,
           attempts = w.attempts + 1, started_at = coalesce(w.started_at, p_now),
           updated_at = p_now, reason = NULL
      FROM unnest(p_tenant, p_shard, p_wf, p_tid) AS p(t, sh, wf, tid)
     WHERE w.ctid = p.tid AND w.shard_id = p.sh AND w.tenant_id = p.t
       AND w.workflow_id = p.wf AND w.status = 'pending'
    RETURNING w.tenant_id, w.shard_id, w.workflow_id, w.name, w.inputs, w.fence,
              w.attempts, w.max_attempts,
              extract(epoch FROM w.deadline_at - p_now)::float8;
END
$$;

CREATE FUNCTION shardflow.update_finished(
    p_tenant text[], p_shard int[], p_wf text[], p_fence bigint[], p_tid tid[],
    p_status text[], p_output text[], p_error text[], p_idx int[])
RETURNS TABLE (idx int)
LANGUAGE plpgsql
SET plan_cache_mode = force_generic_plan
SET jit = off
SET enable_seqscan = off
SET enable_indexscan = off
SET enable_indexonlyscan = off
SET enable_bitmapscan = off
SET enable_hashjoin = off
SET enable_mergejoin = off
SET enable_material = off
AS $$
BEGIN
    RETURN QUERY
    UPDATE shardflow.workflows w
       SET status = i.st, output = i.o::jsonb, error = i.e::jsonb, finished_at = now(),
           updated_at = now(), owner = NULL
      FROM unnest(p_tenant, p_shard, p_wf, p_fence, p_tid, p_status, p_output, p_error,
                  p_idx) AS i(t, sh, wf, fe, tid, st, o, e, ix)
     WHERE w.ctid = i.tid AND w.shard_id = i.sh AND w.tenant_id = i.t
       AND w.workflow_id = i.wf AND w.fence = i.fe AND w.status = 'running'
    RETURNING i.ix;
END
$$;

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
        SELECT c.tenant_id, c.shard_id, c.workflow_id, c.priority, c.ready_at, c.tid,
               row_number() OVER (PARTITION BY c.tenant_id
                                  ORDER BY c.priority DESC, c.ready_at) AS rn
          FROM unnest(p_shards) AS s(sh),
               LATERAL (SELECT w.tenant_id, w.shard_id, w.workflow_id, w.priority,
                               w.ready_at, w.ctid AS tid
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
        SELECT cand.tenant_id, cand.shard_id, cand.workflow_id, cand.tid FROM cand
         WHERE cand.rn <= p_per_tenant
           AND cand.shard_id NOT IN (SELECT x.shard_id FROM crowded x)
         ORDER BY cand.priority DESC, cand.ready_at
         -- kept: up to half the batch, the cap of one tenant plus one more per
         -- crowded shard (the flood's share and at least one other tenant's)
         LIMIT greatest(0, p_limit - least(ceil(p_limit / 2.0)::int,
                                          (p_per_tenant + 1)
                                          * (SELECT count(*) FROM crowded)::int))
    ), claimed AS (
        -- by TID (update_claimed): the candidates were read without locks (locking
        -- every one would write to rows we do not take); the UPDATE re-checks the
        -- status of each row it takes after any concurrent change (a recoverer,
        -- another claimer in a shard handover), so a row is never claimed twice, and
        -- a row changed since it was read (a new version, a new TID) is left for the
        -- next claim
        SELECT u.*,
               -- no checkpoints yet (a first run, not a fork or a resume): the worker
               -- need not read any (a first claim: a row handed back and claimed again
               -- meanwhile has more attempts, and may have checkpoints this snapshot
               -- cannot see)
               u.attempts = 1 AND st.one IS NULL AS fresh
          FROM (SELECT array_agg(p.tenant_id) AS t, array_agg(p.shard_id) AS sh,
                       array_agg(p.workflow_id) AS wf, array_agg(p.tid) AS tid
                  FROM picked p) AS a
         CROSS JOIN LATERAL shardflow.update_claimed(a.t, a.sh, a.wf, a.tid, p_worker,
                                                     v_now) AS u
          -- a probe per row; NOT EXISTS became a hashed subplan that read every step
          -- row of the node per claim when planned on small statistics
          LEFT JOIN LATERAL (SELECT 1 AS one FROM shardflow.steps s
                              WHERE s.tenant_id = u.tenant_id
                                AND s.workflow_id = u.workflow_id
                                AND s.shard_id = u.shard_id
                              LIMIT 1) AS st ON true
    )
    SELECT c.*, false FROM claimed c
    UNION ALL
    -- one marker row per crowded shard (workflow_id NULL): the caller claims the rest
    -- of its budget there fairly
    SELECT NULL, x.shard_id, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, true
      FROM crowded x;
END
$$;

CREATE OR REPLACE FUNCTION shardflow.checkpoint_batch(
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
        -- each row found by its key (a probe per row: the lateral subquery cannot be
        -- flattened into a join the planner could turn into a scan), then updated by
        -- its TID (update_finished)
        RETURN QUERY
        WITH x AS MATERIALIZED (
            SELECT i.*, l.tid
              FROM unnest(wf_tenant, wf_shard, wf_wf, wf_fence, wf_status, wf_output,
                          wf_error) WITH ORDINALITY AS i(t, sh, wf, fe, st, o, e, ix),
                   LATERAL (SELECT w.ctid AS tid FROM shardflow.workflows w
                             WHERE w.tenant_id = i.t AND w.workflow_id = i.wf
                               AND w.shard_id = i.sh AND w.fence = i.fe
                               AND w.status = 'running'
                            OFFSET 0) AS l
        )
        SELECT 3, u.idx, 1
          FROM (SELECT array_agg(x.t) AS t, array_agg(x.sh) AS sh, array_agg(x.wf) AS wf,
                       array_agg(x.fe) AS fe, array_agg(x.tid) AS tid,
                       array_agg(x.st) AS st, array_agg(x.o) AS o, array_agg(x.e) AS e,
                       array_agg(x.ix::int) AS ix
                  FROM x) AS a,
               LATERAL shardflow.update_finished(a.t, a.sh, a.wf, a.fe, a.tid, a.st, a.o,
                                                 a.e, a.ix) AS u;
    END IF;
END
$$;

CREATE OR REPLACE FUNCTION shardflow.tx_lock(
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
    SELECT i.ix::int, l.ok IS NOT NULL, r.one IS NOT NULL
      FROM unnest(p_tenant, p_shard, p_wf, p_fence, p_seq)
           WITH ORDINALITY AS i(t, sh, wf, fe, sq, ix)
      LEFT JOIN LATERAL (SELECT 1 AS ok FROM shardflow.workflows w
                          WHERE w.tenant_id = i.t AND w.workflow_id = i.wf
                            AND w.shard_id = i.sh AND w.fence = i.fe
                            AND w.status = 'running'
                            FOR SHARE) AS l ON true
      LEFT JOIN LATERAL (SELECT 1 AS one FROM shardflow.steps s
                          WHERE s.tenant_id = i.t AND s.workflow_id = i.wf
                            AND s.shard_id = i.sh AND s.seq = i.sq
                          LIMIT 1) AS r ON true;
END
$$;
