-- 0003: claiming split in three parts so that each can run where its data lives.
--
--   queue_budgets  how many workflows each queue may start now (limits, rate tokens):
--                  reads the queue tables, which live on a shardflow node (on Citus: the
--                  coordinator);
--   claim_tables   the tenant-fair claim itself, over tables named by the caller: a
--                  node's shard partitions (workflows_s<N>) or, on Citus, the shard
--                  placements of workflows_s0 on the worker that holds them
--                  (workflows_s0_<citus shard id>), where FOR UPDATE SKIP LOCKED works
--                  (through the coordinator it needs an equality on the distribution
--                  column: citus#1985);
--   queue_spend    takes the claimed workflows' tokens out of rate-limited buckets.
--
-- claim_fair keeps its signature and does all three on one node in one round trip.

CREATE FUNCTION shardflow.queue_budgets(p_limit int, p_tenant_cap int)
RETURNS TABLE (queue text, budget int, tenant_cap int, cap_per_queue boolean,
               rate_limited boolean, concurrency_limited boolean)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    q record;
    n int;
    b int;
    tokens float8;
    share float8;
    -- a variable, not now() inline: Citus refuses volatile functions inside COALESCE
    v_now timestamptz := now();
BEGIN
    -- this node's share of cluster-wide queue limits (1 on Citus: one coordinator)
    SELECT count(*) FILTER (WHERE m.node = i.node_name)::float8 / greatest(count(*), 1)
      INTO share
      FROM shardflow.shard_map m, shardflow.node_info i;
    share := coalesce(nullif(share, 0), 1);
    FOR q IN SELECT * FROM shardflow.queues WHERE NOT paused
             ORDER BY priority DESC, name LOOP
        b := p_limit;
        IF q.concurrency IS NOT NULL THEN
            SELECT count(*) INTO n FROM shardflow.workflows w
             WHERE w.status = 'running' AND w.queue = q.name;
            b := least(b, ceil(q.concurrency * share)::int - n);
        END IF;
        IF q.rate_per_sec IS NOT NULL THEN
            -- refill this node's bucket (burst: one second of its share)
            INSERT INTO shardflow.queue_tokens AS t (name, tokens, refilled_at)
            VALUES (q.name, q.rate_per_sec * share, v_now)
            ON CONFLICT (name) DO UPDATE
               SET tokens = least(q.rate_per_sec * share,
                                  t.tokens + q.rate_per_sec * share
                                  * extract(epoch FROM v_now - t.refilled_at)),
                   refilled_at = v_now
            RETURNING t.tokens INTO tokens;
            b := least(b, floor(tokens)::int);
        END IF;
        CONTINUE WHEN b <= 0;
        queue := q.name;
        budget := b;
        tenant_cap := nullif(least(nullif(p_tenant_cap, 0), q.tenant_concurrency), 0);
        -- a queue's own tenant limit counts only that queue's running workflows; the
        -- engine-wide cap counts all of the tenant's
        cap_per_queue := q.tenant_concurrency IS NOT NULL;
        rate_limited := q.rate_per_sec IS NOT NULL;
        concurrency_limited := q.concurrency IS NOT NULL;
        RETURN NEXT;
    END LOOP;
END
$$;

-- Claim up to p_limit ready workflows from the workflow tables p_tables (names in
-- schema shardflow), queue by queue in the order given, each within its budget.
-- Within a queue, in each table, tenants are visited in turn from a random starting
-- point (a loose index scan: one probe per tenant, whatever its backlog), at most
-- p_per_tenant each per call and never above the queue's tenant cap. A tenant with a
-- million queued workflows thus cannot starve one with a single one. `slot` is the
-- 1-based position in p_tables of the table a row came from.
CREATE FUNCTION shardflow.claim_tables(
    p_tables text[], p_queues text[], p_budgets int[], p_caps int[],
    p_cap_per_queue boolean[], p_names text[], p_worker text, p_limit int,
    p_per_tenant int)
RETURNS TABLE (tenant_id text, shard_id int, workflow_id text, name text, inputs jsonb,
               fence bigint, attempts int, max_attempts int, remaining float8,
               queue text, slot int)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    qi int;
    ti int;
    tbl text;
    t text;
    start_key text;
    wrapped boolean;
    got int := 0;
    n int;
    budget int;
    take int;
    v_now timestamptz := now();
BEGIN
    FOR qi IN 1 .. coalesce(array_length(p_queues, 1), 0) LOOP
        EXIT WHEN got >= p_limit;
        budget := least(p_budgets[qi], p_limit - got);
        n := got;
        FOR ti IN 1 .. coalesce(array_length(p_tables, 1), 0) LOOP
            EXIT WHEN got - n >= budget;
            tbl := p_tables[ti];
            -- a shard that just moved away (a stale map or placement list of the
            -- caller) has no table here
            CONTINUE WHEN to_regclass('shardflow.' || quote_ident(tbl)) IS NULL;
            start_key := md5(random()::text);
            t := start_key;
            wrapped := false;
            LOOP
                EXIT WHEN got - n >= budget;
                -- each table by name: planning a query on a partitioned parent would
                -- open every partition of this node, per table, per claim
                EXECUTE format(
                    'SELECT w.tenant_id FROM shardflow.%I w WHERE w.status = ''pending'' '
                    'AND w.queue = $1 AND w.tenant_id > $2 ORDER BY w.tenant_id LIMIT 1',
                    tbl)
                   INTO t USING p_queues[qi], t;
                IF t IS NULL THEN
                    EXIT WHEN wrapped;
                    -- wrap around to the tenants before the random starting point
                    wrapped := true;
                    t := '';
                    CONTINUE;
                END IF;
                EXIT WHEN wrapped AND t > start_key;
                take := least(p_per_tenant, budget - (got - n));
                IF p_caps[qi] IS NOT NULL THEN
                    EXECUTE format(
                        'SELECT count(*) FROM shardflow.%I w WHERE w.tenant_id = $1 '
                        'AND w.status = ''running'' AND (NOT $2 OR w.queue = $3)', tbl)
                       INTO take USING t, p_cap_per_queue[qi], p_queues[qi];
                    take := least(p_per_tenant, budget - (got - n), p_caps[qi] - take);
                END IF;
                CONTINUE WHEN take <= 0;
                RETURN QUERY EXECUTE format(
                    'WITH picked AS ('
                    '    SELECT w.tenant_id, w.workflow_id FROM shardflow.%1$I w'
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
                    '           extract(epoch FROM w.deadline_at - $3)::float8, $2, $7',
                    tbl)
                   USING t, p_queues[qi], v_now, p_names, take, p_worker, ti;
                GET DIAGNOSTICS take = ROW_COUNT;
                got := got + take;
            END LOOP;
        END LOOP;
    END LOOP;
END
$$;

-- p_queues: the queue of each claimed workflow (one entry per workflow).
CREATE FUNCTION shardflow.queue_spend(p_queues text[]) RETURNS void
LANGUAGE sql AS $$
    UPDATE shardflow.queue_tokens b SET tokens = b.tokens - c.n
      FROM (SELECT q, count(*) AS n FROM unnest(p_queues) AS q GROUP BY q) c
     WHERE b.name = c.q
$$;

CREATE OR REPLACE FUNCTION shardflow.claim_fair(
    p_shards int[], p_names text[], p_worker text, p_limit int, p_per_tenant int,
    p_tenant_cap int)
RETURNS TABLE (tenant_id text, shard_id int, workflow_id text, name text, inputs jsonb,
               fence bigint, attempts int, max_attempts int, remaining float8)
LANGUAGE plpgsql AS $$
DECLARE
    qs text[];
    bs int[];
    cs int[];
    pq boolean[];
    spend text[] := '{}';
    r record;
BEGIN
    SELECT array_agg(b.queue ORDER BY b.ord), array_agg(b.budget ORDER BY b.ord),
           array_agg(b.tenant_cap ORDER BY b.ord), array_agg(b.cap_per_queue ORDER BY b.ord)
      INTO qs, bs, cs, pq
      FROM shardflow.queue_budgets(p_limit, p_tenant_cap) WITH ORDINALITY
           AS b(queue, budget, tenant_cap, cap_per_queue, rate_limited, concurrency_limited,
              ord);
    IF qs IS NULL THEN
        RETURN;
    END IF;
    FOR r IN SELECT * FROM shardflow.claim_tables(
                 ARRAY(SELECT 'workflows_s' || s FROM unnest(p_shards) AS s),
                 qs, bs, cs, pq, p_names, p_worker, p_limit, p_per_tenant) LOOP
        tenant_id := r.tenant_id;
        shard_id := r.shard_id;
        workflow_id := r.workflow_id;
        name := r.name;
        inputs := r.inputs;
        fence := r.fence;
        attempts := r.attempts;
        max_attempts := r.max_attempts;
        remaining := r.remaining;
        spend := spend || r.queue;
        RETURN NEXT;
    END LOOP;
    IF cardinality(spend) > 0 THEN
        PERFORM shardflow.queue_spend(spend);
    END IF;
END
$$;
