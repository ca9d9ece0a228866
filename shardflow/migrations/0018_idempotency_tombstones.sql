-- 0018: an idempotent start holds past retention, for an idempotency window.
--
-- Retention deleted a finished workflow's row, and with it the primary key that made
-- `start` with the same (tenant, id) return the existing workflow: a start retried
-- after the purge (a client that timed out and retried much later, a message replayed
-- from a queue) ran the workflow again and re-applied its transactional effects. Now
-- the purge keeps a compact tombstone of the row (status 'purged': the key, the name
-- and the timestamps; inputs, output and error dropped; steps, messages and events
-- deleted as before) and deletes the tombstone only when the idempotency window has
-- passed as well: finished_at + keep_seconds + idempotency_seconds. The window is set
-- per tenant with the retention (NULL: the '*' default's, else one day). A start of a
-- tombstoned id inserts nothing and returns the existing (purged) workflow; its
-- result() says it was purged.
ALTER TABLE shardflow.retention
    ADD COLUMN idempotency_seconds float8 CHECK (idempotency_seconds >= 0);

ALTER TABLE shardflow.workflows DROP CONSTRAINT workflows_status_check;
ALTER TABLE shardflow.workflows ADD CONSTRAINT workflows_status_check
    CHECK (status IN ('pending', 'running', 'succeeded', 'failed', 'cancelled', 'dead',
                      'purged'));

-- The purge walks finished rows oldest first: with tombstones in the same index it
-- would step over a day of them on every call. Finished rows and tombstones get an
-- index each (a finish still writes one entry; a purge moves it to the other).
DROP INDEX shardflow.workflows_finished_idx;
CREATE INDEX workflows_finished_idx ON shardflow.workflows (finished_at)
    WHERE finished_at IS NOT NULL AND status <> 'purged';
CREATE INDEX workflows_tombstones_idx ON shardflow.workflows (finished_at)
    WHERE status = 'purged';

CREATE OR REPLACE FUNCTION shardflow.purge_finished_shards(p_shards int[], p_limit int)
RETURNS TABLE (shard_id int, purged int)
LANGUAGE plpgsql AS $$
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
$$;
