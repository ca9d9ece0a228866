-- Citus mode, run on the coordinator after the migrations (idempotent: the engine runs
-- it only for tables not yet in pg_dist_partition).
--
-- The workflow tables become distributed tables on tenant_id, all colocated, so a
-- tenant's workflows, steps, messages, events (and any business table a user
-- distributes by tenant_id with colocate_with => 'shardflow.workflows') live in one
-- shard group on one worker: a transactional step's writes and its checkpoint commit in
-- one single-node transaction. The small catalog tables (node_info, shard_map, workers,
-- shard_leases) stay local to the coordinator, where every worker process reads them.
SELECT create_distributed_table('shardflow.workflows', 'tenant_id');
SELECT create_distributed_table('shardflow.steps', 'tenant_id', colocate_with => 'shardflow.workflows');
SELECT create_distributed_table('shardflow.messages', 'tenant_id', colocate_with => 'shardflow.workflows');
SELECT create_distributed_table('shardflow.events', 'tenant_id', colocate_with => 'shardflow.workflows');
