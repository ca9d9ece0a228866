-- 0015: the fair claim visits its tables from a different one each call.
--
-- Found by the performance report's 10M-backlog run: one shard kept 156 of the run's
-- workflows pending until the drain timed out (10 minutes). With a backlog every shard
-- is crowded, so claims go to claim_tables with the list of crowded shards, and it
-- visited that list in order with a budget the first few tables used up: the shards
-- at the end of a worker's list were never reached while the ones before them had
-- work. Now each call starts at a random table of the list and wraps around (as it
-- already started at a random tenant within a table), so every crowded shard gets its
-- turn. The settings of 0014 are restated: CREATE OR REPLACE resets them.

CREATE OR REPLACE FUNCTION shardflow.claim_tables(
    p_tables text[], p_queues text[], p_budgets int[], p_caps int[],
    p_cap_per_queue boolean[], p_names text[], p_worker text, p_limit int,
    p_per_tenant int)
RETURNS TABLE (tenant_id text, shard_id int, workflow_id text, name text, inputs jsonb,
               fence bigint, attempts int, max_attempts int, remaining float8,
               queue text, slot int)
LANGUAGE plpgsql
-- 0014's plan guards (CREATE OR REPLACE resets a function's settings)
SET enable_seqscan = off
SET enable_sort = off
SET enable_bitmapscan = off
AS $$
#variable_conflict use_column
DECLARE
    qi int;
    k int;
    ti int;
    n_tables int := coalesce(array_length(p_tables, 1), 0);
    -- where this call starts in p_tables: a different table each time
    first_table int := floor(random() * greatest(n_tables, 1))::int;
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
        FOR k IN 0 .. n_tables - 1 LOOP
            EXIT WHEN got - n >= budget;
            ti := (first_table + k) % n_tables + 1;
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
