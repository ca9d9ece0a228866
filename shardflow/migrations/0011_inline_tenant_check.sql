-- 0011: the tenant-to-shard CHECK of the workflows and messages partitions written out
-- instead of calling shardflow.shard_of.
--
-- Why: every statement that writes to a partition prepares its CHECK expressions, and
-- updates re-check them too. shard_of is an SQL function, inlined into the expression
-- at that moment, which means parsing and analysing its body again, for each partition
-- each statement touches: 6% of all CPU in a profile of the bench (ExecConstraints).
-- The same arithmetic written out in the constraint costs only the expression. NOT
-- VALID: existing rows already passed the same test; new and updated rows are checked.

CREATE FUNCTION shardflow.tenant_check_sql(p_shard int, p_shard_count int) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    -- keep in step with shardflow.shard_of (0001) and shardflow.routing.shard_of
    SELECT format('CHECK (((((''x''::text || "left"(md5(tenant_id), 8)))::bit(32))::bigint '
                  '%% %s)::integer = %s) NOT VALID', p_shard_count, p_shard)
$$;

DO $$
DECLARE
    r record;
    v_count int;
BEGIN
    SELECT shard_count INTO v_count FROM shardflow.node_info;
    FOR r IN SELECT c.oid::regclass AS part, k.conname,
                    (regexp_match(c.relname, '_s(\d+)$'))[1]::int AS shard
               FROM shardflow.sharded_tables t
               JOIN pg_inherits i ON i.inhparent = format('shardflow.%I', t.table_name)::regclass
               JOIN pg_class c ON c.oid = i.inhrelid
               JOIN pg_constraint k ON k.conrelid = c.oid
                                   AND k.conname = c.relname || '_tenant_shard'
              WHERE t.tenant_check LOOP
        EXECUTE format('ALTER TABLE %s DROP CONSTRAINT %I, ADD CONSTRAINT %I %s',
                       r.part, r.conname, r.conname,
                       shardflow.tenant_check_sql(r.shard, v_count));
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
                EXECUTE format('ALTER TABLE shardflow.%I ADD CONSTRAINT %I %s',
                               part, part || '_tenant_shard',
                               shardflow.tenant_check_sql(p_shard, p_shard_count));
            END IF;
        END IF;
    END LOOP;
END
$$;
