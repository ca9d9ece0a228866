-- 0017: promises kept where an adversarial review broke them (issue 14).
--
-- Messages are marked taken instead of deleted. The idempotency key's unique index
-- lived on the message row, so the row's deletion by recv also deleted the key: a
-- sender retrying after its message was consumed (or a sending workflow re-run after a
-- crash between the message's commit and its own checkpoint) inserted the message a
-- second time and it was delivered twice. A taken message keeps its row, and so its
-- key, until retention purges the workflow. Takes and the "any message waiting?" test
-- read the partial index of messages not yet taken, so a workflow that has received
-- 10,000 messages does not scan them on every recv.
ALTER TABLE shardflow.messages ADD COLUMN taken_at timestamptz;

CREATE INDEX messages_waiting_idx ON shardflow.messages
    (tenant_id, workflow_id, topic, msg_id, shard_id) WHERE taken_at IS NULL;

COMMENT ON COLUMN shardflow.messages.taken_at IS
    'when a recv took the message (NULL: still waiting); the row stays so that its '
    'idempotency key keeps refusing a retried send';

COMMENT ON COLUMN shardflow.workflows.attempts IS
    'runs of the workflow that were lost (its worker died, its run crashed) plus the '
    'current one; a run that parked itself (a durable sleep, a recv, a graceful stop) '
    'gives its attempt back. Past max_attempts the workflow is dead.';
