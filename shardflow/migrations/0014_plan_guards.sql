-- 0014: the fair claim and the queue budgets cannot be planned into scans.
--
-- An audit of every statement's plan made on empty statistics (a node vacuumed while
-- quiet, then loaded) found the fair claim's probes (dynamic SQL, planned per call but
-- with no column statistics yet) reading the whole ready index of a partition and
-- sorting it, per tenant visited, and queue_budgets counting a queue's running rows
-- with a sequential scan of every partition: per claim, work that grows with the
-- tables until the next ANALYZE. Both have index plans that read only what they need;
-- these settings take the others off the table for their statements (a plan that has
-- no alternative still runs: they only add cost).
ALTER FUNCTION shardflow.claim_tables(text[], text[], int[], int[], boolean[], text[], text,
                                      int, int)
    SET enable_seqscan = off;
ALTER FUNCTION shardflow.claim_tables(text[], text[], int[], int[], boolean[], text[], text,
                                      int, int)
    SET enable_sort = off;
ALTER FUNCTION shardflow.claim_tables(text[], text[], int[], int[], boolean[], text[], text,
                                      int, int)
    SET enable_bitmapscan = off;
ALTER FUNCTION shardflow.queue_budgets(int, int) SET enable_seqscan = off;
