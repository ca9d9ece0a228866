-- 0007: the retention purge reports what it deleted per shard, so the worker that owns
-- a shard can VACUUM the partitions it just emptied.
--
-- Why: a shard partition is small and each one sees few deletes (100 workflows/s over
-- 256 shards is 0.4 deletes/s per partition), so autovacuum's per-table thresholds are
-- reached only after minutes, and its launcher visits a database once per
-- autovacuum_naptime (1 min). Until a VACUUM records the freed space in the free space
-- map, inserts extend the table instead of reusing it: the tables kept growing under
-- retention (results/2026-11-24-retention-3n-150s). A VACUUM of a partition of a few
-- hundred rows costs a millisecond; the worker runs it (SKIP_LOCKED) after enough
-- deletes, and its index pages are recycled by the next one.

CREATE FUNCTION shardflow.purge_finished_shards(p_shards int[], p_limit int)
RETURNS TABLE (shard_id int, purged int)
LANGUAGE plpgsql AS $$
DECLARE
    s int;
    n int;
    v_default float8;
    v_min float8;
BEGIN
    SELECT keep_seconds INTO v_default FROM shardflow.retention WHERE tenant_id = '*';
    SELECT min(keep_seconds) INTO v_min FROM shardflow.retention;
    IF v_min IS NULL THEN
        RETURN;  -- no retention configured: keep everything
    END IF;
    FOREACH s IN ARRAY p_shards LOOP
        CONTINUE WHEN to_regclass('shardflow.workflows_s' || s) IS NULL;
        -- candidates by the finished index (older than the shortest retention), then
        -- each tenant's own retention (or the default; none: kept)
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
        IF n > 0 THEN
            shard_id := s;
            purged := n;
            RETURN NEXT;
        END IF;
    END LOOP;
END
$$;

-- The old entry point, for workers of the previous version during a rolling upgrade.
CREATE OR REPLACE FUNCTION shardflow.purge_finished(p_shards int[], p_limit int)
RETURNS int LANGUAGE sql AS $$
    SELECT coalesce(sum(purged), 0)::int FROM shardflow.purge_finished_shards(p_shards, p_limit)
$$;
