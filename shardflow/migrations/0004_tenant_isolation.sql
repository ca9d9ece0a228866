-- 0004: tenant isolation enforced by Postgres. A tenant-bound client connects as a role
-- of its own (not the tables' owner, not a superuser); row-level security on the
-- workflow tables lets that role see and change only the rows of the tenant(s) it was
-- granted. shardflow's own workers connect as the owner, which RLS does not apply to.
-- Partitions get no grants: a tenant role can reach rows only through the parents,
-- where the policies are.

-- Which tenant(s) each role may act for. Not readable by tenant roles (that would list
-- the other tenants): the policies read it through a SECURITY DEFINER function.
CREATE TABLE shardflow.tenant_roles (
    role_name  text NOT NULL,
    tenant_id  text NOT NULL,
    granted_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (role_name, tenant_id)
);

-- An array, not a set: policies then hold no subquery (Citus refuses subqueries in
-- policies on distributed tables).
CREATE FUNCTION shardflow.my_tenants() RETURNS text[]
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, shardflow AS $$
    SELECT coalesce(array_agg(tenant_id), '{}') FROM shardflow.tenant_roles
     WHERE role_name = session_user
$$;

ALTER TABLE shardflow.workflows ENABLE ROW LEVEL SECURITY;
ALTER TABLE shardflow.steps ENABLE ROW LEVEL SECURITY;
ALTER TABLE shardflow.messages ENABLE ROW LEVEL SECURITY;
ALTER TABLE shardflow.events ENABLE ROW LEVEL SECURITY;

CREATE POLICY tenant_isolation ON shardflow.workflows
    USING (tenant_id = ANY (shardflow.my_tenants()))
    WITH CHECK (tenant_id = ANY (shardflow.my_tenants()));
CREATE POLICY tenant_isolation ON shardflow.steps
    USING (tenant_id = ANY (shardflow.my_tenants()))
    WITH CHECK (tenant_id = ANY (shardflow.my_tenants()));
CREATE POLICY tenant_isolation ON shardflow.messages
    USING (tenant_id = ANY (shardflow.my_tenants()))
    WITH CHECK (tenant_id = ANY (shardflow.my_tenants()));
CREATE POLICY tenant_isolation ON shardflow.events
    USING (tenant_id = ANY (shardflow.my_tenants()))
    WITH CHECK (tenant_id = ANY (shardflow.my_tenants()));

-- Create (if needed) login role p_role and let it act for tenant p_tenant: what a
-- tenant-bound Engine needs (read the shard map and queues; start, read, cancel,
-- resume, fork, message its workflows), nothing more. Run on every node
-- (`shardflow tenants grant`); roles are per server, grants per database.
CREATE FUNCTION shardflow.grant_tenant(p_role text, p_tenant text) RETURNS void
LANGUAGE plpgsql AS $$
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
