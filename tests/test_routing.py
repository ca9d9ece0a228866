"""The tenant hash, the shard map and tenant validation."""

from __future__ import annotations

import pytest

from shardflow import InvalidTenant, RoutingError, ShardMap, shard_of
from shardflow.routing import validate_tenant

from .conftest import PerTestDB


def test_python_hash_matches_sql_hash(db: PerTestDB) -> None:
    """The client's shard_of and SQL shardflow.shard_of agree on every tenant."""
    tenants = [f"tenant-{i}" for i in range(500)] + ["acme", "a", "Z9", "x" * 128, "é-ü"[:0] + "u@x.io"]
    with db.connect("node0") as conn:
        rows = conn.execute(
            "SELECT t, shardflow.shard_of(t, 256), shardflow.shard_of(t, 7) FROM unnest(%s::text[]) t",
            (tenants,),
        ).fetchall()
    for t, s256, s7 in rows:
        assert shard_of(t, 256) == s256, t
        assert shard_of(t, 7) == s7, t


def test_hash_spreads_tenants_over_shards() -> None:
    counts = [0] * 16
    for i in range(16000):
        counts[shard_of(f"t{i}", 16)] += 1
    assert min(counts) > 800 and max(counts) < 1200


def test_balanced_map_differs_by_at_most_one() -> None:
    m = ShardMap.balanced(256, ["a", "b", "c"])
    sizes = [len(m.shards_of(n)) for n in ("a", "b", "c")]
    assert sum(sizes) == 256 and max(sizes) - min(sizes) <= 1
    shard, node = m.route("acme")
    assert m.node_of_shard(shard) == node


@pytest.mark.parametrize(
    ("tenant", "fragment"),
    [
        (42, "must be a str, got int"),
        ("", "must not be empty"),
        ("x" * 129, "129 characters"),
        ("has space", "forbidden characters"),
        ("-lead", "forbidden characters"),
        (None, "must be a str, got NoneType"),
    ],
)
def test_invalid_tenants_are_refused_with_the_reason(tenant: object, fragment: str) -> None:
    with pytest.raises(InvalidTenant, match=fragment):
        validate_tenant(tenant)


def test_shard_map_rejects_bad_shapes() -> None:
    with pytest.raises(RoutingError, match="3 placements for 4 shards"):
        ShardMap(4, ("a", "b", "c"))
    with pytest.raises(RoutingError, match="out of range"):
        ShardMap.balanced(4, ["a"]).node_of_shard(4)
