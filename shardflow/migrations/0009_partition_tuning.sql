-- 0009: shard partitions tuned for the hot path: autovacuum that keeps plans stable,
-- and the tenant CHECK only where clients write.
--
-- The hot statements (checkpoint_batch, claim_oldest, migration 0008) span every shard
-- partition of a node, so their plan (made once per connection) depends on all of
-- them, and any VACUUM or ANALYZE of any partition invalidates it (both update the
-- partition's pg_class row). With 64 small, busy partitions per node and the old
-- thresholds (ANALYZE after 5% of a few hundred rows changed), a plan was remade about
-- every second call, at tens of milliseconds each: the biggest single cost in a CPU
-- profile of the bench (standard_planner, 28% of all CPU). Statistics hardly matter to
-- these statements (their access paths are forced, see 0008), so partitions are
-- analyzed rarely and vacuumed after a thousand dead rows rather than a hundred: a few
-- plan rebuilds a minute per node instead of several a second, at the price of a
-- little more dead space between vacuums. Retention still VACUUMs what it purged (0007).

UPDATE shardflow.sharded_tables SET storage = CASE table_name
    WHEN 'workflows' THEN 'fillfactor = 80, autovacuum_vacuum_threshold = 1000, '
                          'autovacuum_vacuum_scale_factor = 0.1, '
                          'autovacuum_analyze_threshold = 10000, '
                          'autovacuum_analyze_scale_factor = 0.5'
    WHEN 'steps' THEN 'autovacuum_vacuum_threshold = 1000, '
                      'autovacuum_vacuum_scale_factor = 0.1, '
                      'autovacuum_analyze_threshold = 10000, '
                      'autovacuum_analyze_scale_factor = 0.5'
    WHEN 'messages' THEN 'autovacuum_vacuum_threshold = 200, '
                         'autovacuum_vacuum_scale_factor = 0.05'
    ELSE storage END;

DO $$
DECLARE
    r record;
BEGIN
    FOR r IN SELECT c.oid::regclass AS part, t.storage
               FROM shardflow.sharded_tables t
               JOIN pg_inherits i ON i.inhparent = format('shardflow.%I', t.table_name)::regclass
               JOIN pg_class c ON c.oid = i.inhrelid
              WHERE t.storage <> '' LOOP
        EXECUTE format('ALTER TABLE %s SET (%s)', r.part, r.storage);
    END LOOP;
END
$$;

-- The tenant-to-shard CHECK of each partition (0001) stays where rows come from
-- clients (workflows, messages). Steps and events are written only by the worker that
-- holds the workflow, by statements keyed by its row in the same partition (fenced),
-- so there it guarded nothing, and it cost the most of all constraint work: each
-- statement prepares the CHECK expression of every partition it writes to, and a
-- batch of checkpoints writes to most of them.
ALTER TABLE shardflow.sharded_tables
    ADD COLUMN tenant_check boolean NOT NULL DEFAULT true;
UPDATE shardflow.sharded_tables SET tenant_check = false
 WHERE table_name IN ('steps', 'events');

DO $$
DECLARE
    r record;
BEGIN
    FOR r IN SELECT c.oid::regclass AS part, k.conname
               FROM shardflow.sharded_tables t
               JOIN pg_inherits i ON i.inhparent = format('shardflow.%I', t.table_name)::regclass
               JOIN pg_class c ON c.oid = i.inhrelid
               JOIN pg_constraint k ON k.conrelid = c.oid
                                   AND k.conname = c.relname || '_tenant_shard'
              WHERE NOT t.tenant_check LOOP
        EXECUTE format('ALTER TABLE %s DROP CONSTRAINT %I', r.part, r.conname);
    END LOOP;
END
$$;

CREATE OR REPLACE FUNCTION shardflow.ensure_shard(p_shard int, p_shard_count int)
RETURNS void LANGUAGE plpgsql AS $$
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
                EXECUTE format(
                    'ALTER TABLE shardflow.%I ADD CONSTRAINT %I '
                    'CHECK (shardflow.shard_of(tenant_id, %s) = %s)',
                    part, part || '_tenant_shard', p_shard_count, p_shard);
            END IF;
        END IF;
    END LOOP;
END
$$;
