"""Tenants to shards to nodes.

The hash, used by the client, by SQL (``shardflow.shard_of``) and by the tools, is::

    shard = int(md5(tenant_id as UTF-8)[first 8 hex digits], 16) % shard_count

In SQL on any node: ``SELECT shardflow.shard_of('acme', 256)`` and then
``SELECT node FROM shardflow.shard_map WHERE shard_id = …``. md5 is not used for
security here, only because both Python and Postgres ship it and it spreads well.

The shard count is fixed when a cluster is initialised; each shard lives on exactly one
node. A node creates table partitions only for the shards it owns, so a row routed to
the wrong node has no partition to land in and Postgres itself refuses it.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .errors import InvalidTenant, RoutingError

MAX_TENANT_LEN = 128
# Printable, no whitespace, no quotes: tenants end up in logs, CLI tables and SQL by hand.
_TENANT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:@/-]*$")


def validate_tenant(tenant: object, *, argument: str = "tenant") -> str:
    """Return ``tenant`` if it is a valid tenant id, else raise :class:`InvalidTenant`."""
    if not isinstance(tenant, str):
        raise InvalidTenant(
            f"{argument} must be a str, got {type(tenant).__name__} ({tenant!r})"
        )
    if not tenant:
        raise InvalidTenant(f"{argument} must not be empty")
    if len(tenant) > MAX_TENANT_LEN:
        raise InvalidTenant(
            f"{argument} {tenant[:20]!r}... is {len(tenant)} characters; "
            f"the maximum is {MAX_TENANT_LEN}"
        )
    if not _TENANT_RE.match(tenant):
        raise InvalidTenant(
            f"{argument} {tenant!r} has forbidden characters: use letters, digits and _.:@/- "
            "and start with a letter or digit"
        )
    return tenant


def shard_of(tenant: str, shard_count: int) -> int:
    """The logical shard of ``tenant``: the same function as SQL ``shardflow.shard_of``."""
    digest = hashlib.md5(tenant.encode("utf-8"), usedforsecurity=False).hexdigest()
    return int(digest[:8], 16) % shard_count


def balanced_assignment(shard_count: int, nodes: Sequence[str]) -> list[str]:
    """Place shards on nodes round-robin: node counts differ by at most one."""
    if not nodes:
        raise RoutingError("cannot place shards on zero nodes")
    return [nodes[s % len(nodes)] for s in range(shard_count)]


@dataclass(frozen=True, slots=True)
class ShardMap:
    """Which node holds each shard. ``placement[s]`` is the node name of shard ``s``."""

    shard_count: int
    placement: tuple[str, ...]
    epoch: int = 1

    def __post_init__(self) -> None:
        if self.shard_count < 1:
            raise RoutingError(f"shard_count must be >= 1, got {self.shard_count}")
        if len(self.placement) != self.shard_count:
            raise RoutingError(
                f"shard map has {len(self.placement)} placements for {self.shard_count} shards"
            )

    @classmethod
    def balanced(cls, shard_count: int, nodes: Sequence[str]) -> ShardMap:
        return cls(shard_count, tuple(balanced_assignment(shard_count, nodes)))

    @property
    def nodes(self) -> list[str]:
        """Node names in first-appearance order."""
        return list(dict.fromkeys(self.placement))

    def shard(self, tenant: str) -> int:
        return shard_of(validate_tenant(tenant), self.shard_count)

    def node_of_shard(self, shard: int) -> str:
        if not 0 <= shard < self.shard_count:
            raise RoutingError(f"shard {shard} is out of range 0..{self.shard_count - 1}")
        return self.placement[shard]

    def route(self, tenant: str) -> tuple[int, str]:
        """(shard, node) of a tenant."""
        s = self.shard(tenant)
        return s, self.placement[s]

    def shards_of(self, node: str) -> list[int]:
        return [s for s, n in enumerate(self.placement) if n == node]

    def as_rows(self) -> Iterable[tuple[int, str]]:
        return enumerate(self.placement)
