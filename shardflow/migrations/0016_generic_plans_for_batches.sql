-- 0016: the batch functions without settings of their own keep cached generic plans.
--
-- shardflow's connections now plan their own statements for their values
-- (plan_cache_mode = force_custom_plan, shardflow/driver.py), and a function without a
-- setting of its own inherits the session's: claim_fast and insert_workflows would
-- replan their statements on every call (the insert's column defaults, its partition
-- routing and the notify; the claim's calls of claim_oldest and queue_budgets), where
-- a cached plan serves every call. Their plans cannot turn into scans: the insert
-- reaches rows only through its conflict index, and the claim's statements are calls
-- of functions that choose their own plans.
ALTER FUNCTION shardflow.claim_fast(int[], text[], text, int, int, int)
    SET plan_cache_mode = force_generic_plan;
ALTER FUNCTION shardflow.insert_workflows(text[], int[], text[], text[], text[], int[],
                                          text[], int[], float8[], float8[], boolean)
    SET plan_cache_mode = force_generic_plan;
