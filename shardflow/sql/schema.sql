CREATE SCHEMA shardflow;
CREATE FUNCTION shardflow.checkpoint_batch(st_tenant text[], st_shard integer[], st_wf text[], st_fence bigint[], st_seq integer[], st_name text[], fi_tenant text[], fi_shard integer[], fi_wf text[], fi_fence bigint[], fi_seq integer[], fi_name text[], fi_kind text[], fi_status text[], fi_output text[], fi_error text[], fi_retries integer[], wf_tenant text[], wf_shard integer[], wf_wf text[], wf_fence bigint[], wf_status text[], wf_output text[], wf_error text[]) RETURNS TABLE(op integer, idx integer, val integer)
    LANGUAGE plpgsql
    SET plan_cache_mode TO 'force_generic_plan'
    SET jit TO 'off'
    SET enable_hashjoin TO 'off'
    SET enable_mergejoin TO 'off'
    SET enable_seqscan TO 'off'
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
CREATE FUNCTION shardflow.claim_fair(p_shards integer[], p_names text[], p_worker text, p_limit integer, p_per_tenant integer, p_tenant_cap integer) RETURNS TABLE(tenant_id text, shard_id integer, workflow_id text, name text, inputs jsonb, fence bigint, attempts integer, max_attempts integer, remaining double precision)
    LANGUAGE plpgsql
    AS $$
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
CREATE FUNCTION shardflow.claim_fast(p_shards integer[], p_names text[], p_worker text, p_limit integer, p_per_tenant integer, p_tenant_cap integer) RETURNS TABLE(tenant_id text, shard_id integer, workflow_id text, name text, inputs jsonb, fence bigint, attempts integer, max_attempts integer, remaining double precision, fresh boolean)
    LANGUAGE plpgsql
    SET plan_cache_mode TO 'force_generic_plan'
    AS $$
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
CREATE FUNCTION shardflow.claim_oldest(p_shards integer[], p_queue text, p_names text[], p_worker text, p_limit integer, p_per_tenant integer) RETURNS TABLE(tenant_id text, shard_id integer, workflow_id text, name text, inputs jsonb, fence bigint, attempts integer, max_attempts integer, remaining double precision, fresh boolean, crowded boolean)
    LANGUAGE plpgsql
    SET plan_cache_mode TO 'force_generic_plan'
    SET jit TO 'off'
    SET enable_hashjoin TO 'off'
    SET enable_mergejoin TO 'off'
    SET enable_seqscan TO 'off'
    SET enable_sort TO 'off'
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
CREATE FUNCTION shardflow.claim_tables(p_tables text[], p_queues text[], p_budgets integer[], p_caps integer[], p_cap_per_queue boolean[], p_names text[], p_worker text, p_limit integer, p_per_tenant integer) RETURNS TABLE(tenant_id text, shard_id integer, workflow_id text, name text, inputs jsonb, fence bigint, attempts integer, max_attempts integer, remaining double precision, queue text, slot integer)
    LANGUAGE plpgsql
    SET enable_seqscan TO 'off'
    SET enable_sort TO 'off'
    SET enable_bitmapscan TO 'off'
    AS $_$
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
$_$;
CREATE FUNCTION shardflow.drop_shard(p_shard integer) RETURNS void
    LANGUAGE plpgsql
    AS $$
DECLARE
    t record;
BEGIN
    FOR t IN SELECT table_name FROM shardflow.sharded_tables LOOP
        EXECUTE format('DROP TABLE IF EXISTS shardflow.%I', format('%s_s%s', t.table_name, p_shard));
    END LOOP;
END
$$;
CREATE FUNCTION shardflow.ensure_shard(p_shard integer, p_shard_count integer) RETURNS void
    LANGUAGE plpgsql
    AS $$
DECLARE
    t record;
    part text;
BEGIN
    FOR t IN SELECT table_name, storage, tenant_check FROM shardflow.sharded_tables
              ORDER BY table_name LOOP
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
            IF t.tenant_check THEN
                EXECUTE format('ALTER TABLE shardflow.%I ADD CONSTRAINT %I %s',
                               part, part || '_tenant_shard',
                               shardflow.tenant_check_sql(p_shard, p_shard_count));
            END IF;
        END IF;
    END LOOP;
END
$$;
CREATE FUNCTION shardflow.grant_tenant(p_role text, p_tenant text) RETURNS void
    LANGUAGE plpgsql
    AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = p_role) THEN
        EXECUTE format('CREATE ROLE %I LOGIN', p_role);
    END IF;
    EXECUTE format('GRANT CONNECT ON DATABASE %I TO %I', current_database(), p_role);
    EXECUTE format('GRANT USAGE ON SCHEMA shardflow TO %I', p_role);
    EXECUTE format('GRANT SELECT, INSERT, UPDATE, DELETE ON shardflow.workflows, '
                   'shardflow.steps, shardflow.messages, shardflow.events TO %I', p_role);
    EXECUTE format('GRANT SELECT ON shardflow.shard_map, shardflow.node_info, '
                   'shardflow.queues, shardflow.schema_migrations TO %I', p_role);
    EXECUTE format('GRANT USAGE ON SEQUENCE shardflow.message_seq TO %I', p_role);
    INSERT INTO shardflow.tenant_roles (role_name, tenant_id) VALUES (p_role, p_tenant)
    ON CONFLICT DO NOTHING;
END
$$;
CREATE FUNCTION shardflow.insert_workflows(p_tenant text[], p_shard integer[], p_id text[], p_name text[], p_queue text[], p_priority integer[], p_inputs text[], p_max_attempts integer[], p_timeout double precision[], p_delay double precision[], p_notify boolean) RETURNS TABLE(idx integer)
    LANGUAGE plpgsql
    SET plan_cache_mode TO 'force_generic_plan'
    AS $$
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
CREATE FUNCTION shardflow.my_tenants() RETURNS text[]
    LANGUAGE sql STABLE SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'shardflow'
    AS $$
    SELECT coalesce(array_agg(tenant_id), '{}') FROM shardflow.tenant_roles
     WHERE role_name = session_user
$$;
CREATE FUNCTION shardflow.purge_finished(p_shards integer[], p_limit integer) RETURNS integer
    LANGUAGE sql
    AS $$
    SELECT coalesce(sum(purged), 0)::int FROM shardflow.purge_finished_shards(p_shards, p_limit)
$$;
CREATE FUNCTION shardflow.purge_finished_shards(p_shards integer[], p_limit integer) RETURNS TABLE(shard_id integer, purged integer)
    LANGUAGE plpgsql
    AS $_$
DECLARE
    s int;
    n int;
    m int;
    v_default float8;
    v_default_idem float8;
    v_min float8;
    v_min_total float8;
BEGIN
    SELECT keep_seconds, idempotency_seconds INTO v_default, v_default_idem
      FROM shardflow.retention WHERE tenant_id = '*';
    v_default_idem := coalesce(v_default_idem, 86400);
    SELECT min(keep_seconds),
           min(keep_seconds + coalesce(idempotency_seconds, v_default_idem))
      INTO v_min, v_min_total FROM shardflow.retention;
    IF v_min IS NULL THEN
        RETURN;  -- no retention configured: keep everything
    END IF;
    FOREACH s IN ARRAY p_shards LOOP
        CONTINUE WHEN to_regclass('shardflow.workflows_s' || s) IS NULL;
        -- finished workflows past their tenant's retention become tombstones
        EXECUTE format(
            'WITH doomed AS ('
            '  SELECT w.tenant_id, w.workflow_id FROM shardflow.%1$I w'
            '    LEFT JOIN shardflow.retention r ON r.tenant_id = w.tenant_id'
            '   WHERE w.finished_at IS NOT NULL AND w.status <> ''purged'''
            '     AND w.finished_at < now() - make_interval(secs => $1)'
            '     AND w.status IN (''succeeded'', ''failed'', ''dead'', ''cancelled'')'
            '     AND w.finished_at < now() - make_interval(secs =>'
            '                          coalesce(r.keep_seconds, $2, ''Infinity''::float8))'
            '   ORDER BY w.finished_at LIMIT $3'
            '     FOR UPDATE OF w SKIP LOCKED),'
            ' del_steps AS (DELETE FROM shardflow.%2$I x USING doomed d'
            '   WHERE x.tenant_id = d.tenant_id AND x.workflow_id = d.workflow_id),'
            ' del_msgs AS (DELETE FROM shardflow.%3$I x USING doomed d'
            '   WHERE x.tenant_id = d.tenant_id AND x.workflow_id = d.workflow_id),'
            ' del_events AS (DELETE FROM shardflow.%4$I x USING doomed d'
            '   WHERE x.tenant_id = d.tenant_id AND x.workflow_id = d.workflow_id)'
            ' UPDATE shardflow.%1$I w SET status = ''purged'', inputs = ''null'','
            '        output = NULL, error = NULL, reason = ''purged by retention'','
            '        updated_at = now()'
            '   FROM doomed d'
            '  WHERE w.tenant_id = d.tenant_id AND w.workflow_id = d.workflow_id',
            'workflows_s' || s, 'steps_s' || s, 'messages_s' || s, 'events_s' || s)
        USING v_min, v_default, p_limit;
        GET DIAGNOSTICS n = ROW_COUNT;
        -- tombstones past the idempotency window go (with anything sent to them since)
        EXECUTE format(
            'WITH gone AS ('
            '  SELECT w.tenant_id, w.workflow_id FROM shardflow.%1$I w'
            '    LEFT JOIN shardflow.retention r ON r.tenant_id = w.tenant_id'
            '   WHERE w.status = ''purged'''
            '     AND w.finished_at < now() - make_interval(secs => $1)'
            '     AND w.finished_at < now() - make_interval(secs =>'
            '           coalesce(r.keep_seconds, $2, ''Infinity''::float8)'
            '           + coalesce(r.idempotency_seconds, $4))'
            '   ORDER BY w.finished_at LIMIT $3'
            '     FOR UPDATE OF w SKIP LOCKED),'
            ' del_msgs AS (DELETE FROM shardflow.%2$I x USING gone d'
            '   WHERE x.tenant_id = d.tenant_id AND x.workflow_id = d.workflow_id)'
            ' DELETE FROM shardflow.%1$I w USING gone d'
            '  WHERE w.tenant_id = d.tenant_id AND w.workflow_id = d.workflow_id',
            'workflows_s' || s, 'messages_s' || s)
        USING v_min_total, v_default, p_limit, v_default_idem;
        GET DIAGNOSTICS m = ROW_COUNT;
        IF n + m > 0 THEN
            shard_id := s;
            purged := n + m;
            RETURN NEXT;
        END IF;
    END LOOP;
END
$_$;
CREATE FUNCTION shardflow.queue_budgets(p_limit integer, p_tenant_cap integer) RETURNS TABLE(queue text, budget integer, tenant_cap integer, cap_per_queue boolean, rate_limited boolean, concurrency_limited boolean)
    LANGUAGE plpgsql
    SET enable_seqscan TO 'off'
    AS $$
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
CREATE FUNCTION shardflow.queue_spend(p_queues text[]) RETURNS void
    LANGUAGE sql
    AS $$
    UPDATE shardflow.queue_tokens b SET tokens = b.tokens - c.n
      FROM (SELECT q, count(*) AS n FROM unnest(p_queues) AS q GROUP BY q) c
     WHERE b.name = c.q
$$;
CREATE FUNCTION shardflow.shard_of(tenant text, shard_count integer) RETURNS integer
    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
    RETURN ((((('x'::text || "left"(md5(tenant), 8)))::bit(32))::bigint % (shard_count)::bigint))::integer;
COMMENT ON FUNCTION shardflow.shard_of(tenant text, shard_count integer) IS 'Logical shard of a tenant: first 32 bits of md5(tenant) modulo the shard count. The Python client computes the same (shardflow.routing.shard_of).';
CREATE FUNCTION shardflow.tenant_check_sql(p_shard integer, p_shard_count integer) RETURNS text
    LANGUAGE sql IMMUTABLE
    AS $$
    -- keep in step with shardflow.shard_of (0001) and shardflow.routing.shard_of
    SELECT format('CHECK (((((''x''::text || "left"(md5(tenant_id), 8)))::bit(32))::bigint '
                  '%% %s)::integer = %s) NOT VALID', p_shard_count, p_shard)
$$;
CREATE FUNCTION shardflow.tx_checkpoints(p_tenant text[], p_shard integer[], p_wf text[], p_seq integer[], p_name text[], p_output text[]) RETURNS void
    LANGUAGE sql
    AS $$
    INSERT INTO shardflow.steps
        (tenant_id, shard_id, workflow_id, seq, name, kind, status, output, finished_at)
    SELECT t, sh, wf, sq, nm, 'transaction', 'done', o::jsonb, now()
      FROM unnest(p_tenant, p_shard, p_wf, p_seq, p_name, p_output) AS i(t, sh, wf, sq, nm, o)
$$;
CREATE FUNCTION shardflow.tx_lock(p_tenant text[], p_shard integer[], p_wf text[], p_fence bigint[], p_seq integer[]) RETURNS TABLE(idx integer, owned boolean, recorded boolean)
    LANGUAGE plpgsql
    SET plan_cache_mode TO 'force_generic_plan'
    SET jit TO 'off'
    SET enable_hashjoin TO 'off'
    SET enable_mergejoin TO 'off'
    SET enable_seqscan TO 'off'
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
CREATE FUNCTION shardflow.update_claimed(p_tenant text[], p_shard integer[], p_wf text[], p_tid tid[], p_worker text, p_now timestamp with time zone) RETURNS TABLE(tenant_id text, shard_id integer, workflow_id text, name text, inputs jsonb, fence bigint, attempts integer, max_attempts integer, remaining double precision)
    LANGUAGE plpgsql
    SET plan_cache_mode TO 'force_generic_plan'
    SET jit TO 'off'
    SET enable_seqscan TO 'off'
    SET enable_indexscan TO 'off'
    SET enable_indexonlyscan TO 'off'
    SET enable_bitmapscan TO 'off'
    SET enable_hashjoin TO 'off'
    SET enable_mergejoin TO 'off'
    SET enable_material TO 'off'
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
CREATE FUNCTION shardflow.update_finished(p_tenant text[], p_shard integer[], p_wf text[], p_fence bigint[], p_tid tid[], p_status text[], p_output text[], p_error text[], p_idx integer[]) RETURNS TABLE(idx integer)
    LANGUAGE plpgsql
    SET plan_cache_mode TO 'force_generic_plan'
    SET jit TO 'off'
    SET enable_seqscan TO 'off'
    SET enable_indexscan TO 'off'
    SET enable_indexonlyscan TO 'off'
    SET enable_bitmapscan TO 'off'
    SET enable_hashjoin TO 'off'
    SET enable_mergejoin TO 'off'
    SET enable_material TO 'off'
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
CREATE TABLE shardflow.events (
    tenant_id text NOT NULL,
    shard_id integer NOT NULL,
    workflow_id text NOT NULL,
    key text NOT NULL,
    value jsonb,
    updated_at timestamp with time zone DEFAULT now() NOT NULL
)
PARTITION BY LIST (shard_id);
CREATE SEQUENCE shardflow.message_seq
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1;
CREATE TABLE shardflow.messages (
    tenant_id text NOT NULL,
    shard_id integer NOT NULL,
    workflow_id text NOT NULL,
    topic text NOT NULL,
    msg_id bigint DEFAULT nextval('shardflow.message_seq'::regclass) NOT NULL,
    payload jsonb,
    idempotency_key text,
    created_at timestamp with time zone DEFAULT now() NOT NULL,
    taken_at timestamp with time zone
)
PARTITION BY LIST (shard_id);
COMMENT ON COLUMN shardflow.messages.taken_at IS 'when a recv took the message (NULL: still waiting); the row stays so that its idempotency key keeps refusing a retried send';
CREATE TABLE shardflow.node_info (
    singleton boolean DEFAULT true NOT NULL,
    node_name text NOT NULL,
    shard_count integer NOT NULL,
    created_at timestamp with time zone DEFAULT now() NOT NULL,
    CONSTRAINT node_info_shard_count_check CHECK ((shard_count > 0)),
    CONSTRAINT node_info_singleton_check CHECK (singleton)
);
CREATE TABLE shardflow.queue_tokens (
    name text NOT NULL,
    tokens double precision NOT NULL,
    refilled_at timestamp with time zone DEFAULT now() NOT NULL
);
CREATE TABLE shardflow.queues (
    name text NOT NULL,
    priority integer DEFAULT 0 NOT NULL,
    concurrency integer,
    tenant_concurrency integer,
    rate_per_sec double precision,
    paused boolean DEFAULT false NOT NULL,
    updated_at timestamp with time zone DEFAULT now() NOT NULL,
    CONSTRAINT queues_concurrency_check CHECK ((concurrency > 0)),
    CONSTRAINT queues_rate_per_sec_check CHECK ((rate_per_sec > (0)::double precision)),
    CONSTRAINT queues_tenant_concurrency_check CHECK ((tenant_concurrency > 0))
);
CREATE TABLE shardflow.retention (
    tenant_id text NOT NULL,
    keep_seconds double precision NOT NULL,
    updated_at timestamp with time zone DEFAULT now() NOT NULL,
    idempotency_seconds double precision,
    CONSTRAINT retention_idempotency_seconds_check CHECK ((idempotency_seconds >= (0)::double precision)),
    CONSTRAINT retention_keep_seconds_check CHECK ((keep_seconds >= (0)::double precision))
);
CREATE TABLE shardflow.schedules (
    tenant_id text NOT NULL,
    shard_id integer NOT NULL,
    schedule_id text NOT NULL,
    cron text NOT NULL,
    workflow_name text NOT NULL,
    inputs jsonb NOT NULL,
    queue text DEFAULT 'default'::text NOT NULL,
    catch_up text DEFAULT 'skip'::text NOT NULL,
    paused boolean DEFAULT false NOT NULL,
    next_run_at timestamp with time zone NOT NULL,
    last_run_at timestamp with time zone,
    fired bigint DEFAULT 0 NOT NULL,
    created_at timestamp with time zone DEFAULT now() NOT NULL,
    CONSTRAINT schedules_catch_up_check CHECK ((catch_up = ANY (ARRAY['skip'::text, 'backfill'::text])))
);
CREATE TABLE shardflow.shard_leases (
    shard_id integer NOT NULL,
    owner text,
    epoch bigint DEFAULT 0 NOT NULL,
    acquired_at timestamp with time zone
);
CREATE TABLE shardflow.shard_map (
    shard_id integer NOT NULL,
    node text NOT NULL,
    epoch bigint DEFAULT 1 NOT NULL
);
CREATE TABLE shardflow.sharded_tables (
    table_name text NOT NULL,
    storage text DEFAULT ''::text NOT NULL,
    tenant_check boolean DEFAULT true NOT NULL
);
CREATE TABLE shardflow.steps (
    tenant_id text NOT NULL,
    shard_id integer NOT NULL,
    workflow_id text NOT NULL,
    seq integer NOT NULL,
    name text NOT NULL,
    kind text NOT NULL,
    status text NOT NULL,
    output jsonb,
    error jsonb,
    attempts integer DEFAULT 1 NOT NULL,
    retries integer DEFAULT 0 NOT NULL,
    wake_at timestamp with time zone,
    created_at timestamp with time zone DEFAULT now() NOT NULL,
    finished_at timestamp with time zone,
    CONSTRAINT steps_kind_check CHECK ((kind = ANY (ARRAY['step'::text, 'transaction'::text, 'sleep'::text, 'recv'::text, 'send'::text, 'child'::text, 'child_result'::text, 'set_event'::text, 'patch'::text]))),
    CONSTRAINT steps_status_check CHECK ((status = ANY (ARRAY['started'::text, 'done'::text, 'error'::text, 'waiting'::text])))
)
PARTITION BY LIST (shard_id);
CREATE TABLE shardflow.tenant_roles (
    role_name text NOT NULL,
    tenant_id text NOT NULL,
    granted_at timestamp with time zone DEFAULT now() NOT NULL
);
CREATE TABLE shardflow.workers (
    worker_id text NOT NULL,
    host text NOT NULL,
    pid integer NOT NULL,
    workflow_names text[] DEFAULT '{}'::text[] NOT NULL,
    started_at timestamp with time zone DEFAULT now() NOT NULL,
    heartbeat_at timestamp with time zone DEFAULT now() NOT NULL,
    lease_expires_at timestamp with time zone NOT NULL
);
CREATE TABLE shardflow.workflows (
    tenant_id text NOT NULL,
    shard_id integer NOT NULL,
    workflow_id text NOT NULL,
    name text NOT NULL,
    queue text DEFAULT 'default'::text NOT NULL,
    priority integer DEFAULT 0 NOT NULL,
    status text DEFAULT 'pending'::text NOT NULL,
    inputs jsonb NOT NULL,
    output jsonb,
    error jsonb,
    parent_id text,
    attempts integer DEFAULT 0 NOT NULL,
    max_attempts integer DEFAULT 20 NOT NULL,
    owner text,
    fence bigint DEFAULT 0 NOT NULL,
    ready_at timestamp with time zone DEFAULT now() NOT NULL,
    deadline_at timestamp with time zone,
    reason text,
    created_at timestamp with time zone DEFAULT now() NOT NULL,
    updated_at timestamp with time zone DEFAULT now() NOT NULL,
    started_at timestamp with time zone,
    finished_at timestamp with time zone,
    CONSTRAINT workflows_status_check CHECK ((status = ANY (ARRAY['pending'::text, 'running'::text, 'succeeded'::text, 'failed'::text, 'cancelled'::text, 'dead'::text, 'purged'::text])))
)
PARTITION BY LIST (shard_id);
COMMENT ON COLUMN shardflow.workflows.attempts IS 'runs of the workflow that were lost (its worker died, its run crashed) plus the current one; a run that parked itself (a durable sleep, a recv, a graceful stop) gives its attempt back. Past max_attempts the workflow is dead.';
CREATE VIEW shardflow.workflow_status AS
 SELECT w.tenant_id,
    w.shard_id,
    w.workflow_id,
    w.name,
    w.queue,
    w.status,
    w.attempts,
    w.owner,
    w.created_at,
    w.finished_at,
    (COALESCE(w.finished_at, now()) - w.created_at) AS age,
    ( SELECT count(*) AS count
           FROM shardflow.steps s
          WHERE ((s.tenant_id = w.tenant_id) AND (s.workflow_id = w.workflow_id) AND (s.shard_id = w.shard_id) AND (s.status = 'done'::text))) AS steps_done,
    w.reason
   FROM shardflow.workflows w;
ALTER TABLE ONLY shardflow.events
    ADD CONSTRAINT events_pkey PRIMARY KEY (tenant_id, workflow_id, key, shard_id);
ALTER TABLE ONLY shardflow.messages
    ADD CONSTRAINT messages_pkey PRIMARY KEY (tenant_id, workflow_id, topic, msg_id, shard_id);
ALTER TABLE ONLY shardflow.node_info
    ADD CONSTRAINT node_info_pkey PRIMARY KEY (singleton);
ALTER TABLE ONLY shardflow.queue_tokens
    ADD CONSTRAINT queue_tokens_pkey PRIMARY KEY (name);
ALTER TABLE ONLY shardflow.queues
    ADD CONSTRAINT queues_pkey PRIMARY KEY (name);
ALTER TABLE ONLY shardflow.retention
    ADD CONSTRAINT retention_pkey PRIMARY KEY (tenant_id);
ALTER TABLE ONLY shardflow.schedules
    ADD CONSTRAINT schedules_pkey PRIMARY KEY (tenant_id, schedule_id);
ALTER TABLE ONLY shardflow.shard_leases
    ADD CONSTRAINT shard_leases_pkey PRIMARY KEY (shard_id);
ALTER TABLE ONLY shardflow.shard_map
    ADD CONSTRAINT shard_map_pkey PRIMARY KEY (shard_id);
ALTER TABLE ONLY shardflow.sharded_tables
    ADD CONSTRAINT sharded_tables_pkey PRIMARY KEY (table_name);
ALTER TABLE ONLY shardflow.steps
    ADD CONSTRAINT steps_pkey PRIMARY KEY (tenant_id, workflow_id, seq, shard_id);
ALTER TABLE ONLY shardflow.tenant_roles
    ADD CONSTRAINT tenant_roles_pkey PRIMARY KEY (role_name, tenant_id);
ALTER TABLE ONLY shardflow.workers
    ADD CONSTRAINT workers_pkey PRIMARY KEY (worker_id);
ALTER TABLE ONLY shardflow.workflows
    ADD CONSTRAINT workflows_pkey PRIMARY KEY (tenant_id, workflow_id, shard_id);
CREATE UNIQUE INDEX messages_idempotency_idx ON ONLY shardflow.messages USING btree (tenant_id, workflow_id, idempotency_key, shard_id) WHERE (idempotency_key IS NOT NULL);
CREATE INDEX messages_waiting_idx ON ONLY shardflow.messages USING btree (tenant_id, workflow_id, topic, msg_id, shard_id) WHERE (taken_at IS NULL);
CREATE INDEX schedules_due_idx ON shardflow.schedules USING btree (next_run_at) WHERE (NOT paused);
CREATE INDEX workflows_created_idx ON ONLY shardflow.workflows USING btree (tenant_id, created_at);
CREATE INDEX workflows_finished_idx ON ONLY shardflow.workflows USING btree (finished_at) WHERE ((finished_at IS NOT NULL) AND (status <> 'purged'::text));
CREATE INDEX workflows_parent_idx ON ONLY shardflow.workflows USING btree (tenant_id, parent_id) WHERE (parent_id IS NOT NULL);
CREATE INDEX workflows_pending_queue_idx ON ONLY shardflow.workflows USING btree (queue, tenant_id, priority DESC, ready_at) WHERE (status = 'pending'::text);
CREATE INDEX workflows_ready_idx ON ONLY shardflow.workflows USING btree (queue, priority DESC, ready_at) WHERE (status = 'pending'::text);
CREATE INDEX workflows_running_idx ON ONLY shardflow.workflows USING btree (tenant_id, queue, owner) WHERE (status = 'running'::text);
CREATE INDEX workflows_tombstones_idx ON ONLY shardflow.workflows USING btree (finished_at) WHERE (status = 'purged'::text);
ALTER TABLE shardflow.events ENABLE ROW LEVEL SECURITY;
ALTER TABLE shardflow.messages ENABLE ROW LEVEL SECURITY;
ALTER TABLE shardflow.steps ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON shardflow.events USING ((tenant_id = ANY (shardflow.my_tenants()))) WITH CHECK ((tenant_id = ANY (shardflow.my_tenants())));
CREATE POLICY tenant_isolation ON shardflow.messages USING ((tenant_id = ANY (shardflow.my_tenants()))) WITH CHECK ((tenant_id = ANY (shardflow.my_tenants())));
CREATE POLICY tenant_isolation ON shardflow.steps USING ((tenant_id = ANY (shardflow.my_tenants()))) WITH CHECK ((tenant_id = ANY (shardflow.my_tenants())));
CREATE POLICY tenant_isolation ON shardflow.workflows USING ((tenant_id = ANY (shardflow.my_tenants()))) WITH CHECK ((tenant_id = ANY (shardflow.my_tenants())));
ALTER TABLE shardflow.workflows ENABLE ROW LEVEL SECURITY;
