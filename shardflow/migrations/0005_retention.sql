-- 0005: retention of finished workflows. Finished workflows (succeeded, failed, dead,
-- cancelled) older than their tenant's retention are deleted with their steps,
-- messages and events by the workers that own their shards, in small batches per shard
-- partition (short transactions, no long locks), so the hot tables stay small and
-- autovacuum keeps up.

-- Retention per tenant; the row with tenant_id '*' is the default for every tenant
-- without one. No row at all: keep forever.
CREATE TABLE shardflow.retention (
    tenant_id    text PRIMARY KEY,
    keep_seconds float8 NOT NULL CHECK (keep_seconds >= 0),
    updated_at   timestamptz NOT NULL DEFAULT now()
);

-- Finished rows by finish time: the purge's only scan, and small (it holds what the
-- retention keeps).
CREATE INDEX workflows_finished_idx ON shardflow.workflows (finished_at)
    WHERE finished_at IS NOT NULL;

-- Delete up to p_limit expired finished workflows from each of shards p_shards (and
-- their steps, messages, events). Returns how many workflows were deleted.
CREATE FUNCTION shardflow.purge_finished(p_shards int[], p_limit int) RETURNS int
LANGUAGE plpgsql AS $$
DECLARE
    s int;
    n int;
    total int := 0;
    v_default float8;
    v_min float8;
BEGIN
    SELECT keep_seconds INTO v_default FROM shardflow.retention WHERE tenant_id = '*';
    SELECT min(keep_seconds) INTO v_min FROM shardflow.retention;
    IF v_min IS NULL THEN
        RETURN 0;  -- no retention configured: keep everything
    END IF;
    FOREACH s IN ARRAY p_shards LOOP
        CONTINUE WHEN to_regclass('shardflow.workflows_s' || s) IS NULL;
        -- candidates by the index (older than the shortest retention), then each
        -- tenant's own retention (or the default; none: kept)
        EXECUTE format(
            'WITH doomed AS ('
            '  SELECT w.tenant_id, w.workflow_id FROM shardflow.%1$I w'
            '    LEFT JOIN shardflow.retention r ON r.tenant_id = w.tenant_id'
            '   WHERE w.finished_at IS NOT NULL'
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
            ' DELETE FROM shardflow.%1$I w USING doomed d'
            '  WHERE w.tenant_id = d.tenant_id AND w.workflow_id = d.workflow_id',
            'workflows_s' || s, 'steps_s' || s, 'messages_s' || s, 'events_s' || s)
        USING v_min, v_default, p_limit;
        GET DIAGNOSTICS n = ROW_COUNT;
        total := total + n;
    END LOOP;
    RETURN total;
END
$$;
