"""Load-test tooling for shardflow (the benchmark workflows; see README.md here)."""
