-- 0006: cron schedules per tenant. A schedule lives on its tenant's node (shard_id
-- says which shard; not moved by `shard move` yet). The worker owning the shard fires
-- due ticks: each tick starts a workflow whose id is derived from the schedule and the
-- tick time, in the same transaction that advances next_run_at (guarded by its old
-- value), so a tick runs exactly once however many workers race for it.
CREATE TABLE shardflow.schedules (
    tenant_id     text NOT NULL,
    shard_id      int NOT NULL,
    schedule_id   text NOT NULL,
    cron          text NOT NULL,
    workflow_name text NOT NULL,
    inputs        jsonb NOT NULL,
    queue         text NOT NULL DEFAULT 'default',
    -- after downtime: 'skip' fires the latest missed tick once; 'backfill' fires each
    catch_up      text NOT NULL DEFAULT 'skip' CHECK (catch_up IN ('skip', 'backfill')),
    paused        boolean NOT NULL DEFAULT false,
    next_run_at   timestamptz NOT NULL,
    last_run_at   timestamptz,
    fired         bigint NOT NULL DEFAULT 0,
    created_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, schedule_id)
);
CREATE INDEX schedules_due_idx ON shardflow.schedules (next_run_at) WHERE NOT paused;
