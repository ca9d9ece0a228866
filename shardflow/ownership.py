"""Shard-aware workers: each worker owns a balanced subset of the shards and polls only those.

Membership is the set of live heartbeat rows (``shardflow.workers``, read on the first
reachable node: every worker heartbeats on every node). Ranked by id, worker ``r`` of
``W`` targets ``S // W`` shards plus one if ``r < S % W``, so shares differ by at most
one. Each tick a worker releases shards above its target and takes free ones below it.
A shard lease is valid while its owner's heartbeat is live, so owning shards costs no
writes beyond the heartbeat, and a dead worker's shards become free when its heartbeat
lapses (``lease_timeout``). Ownership only spreads the polling: correctness never
depends on it (claims lock rows with SKIP LOCKED; checkpoints are fenced), so a brief
overlap while views of the membership differ is harmless.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from .driver import BACKGROUND, Driver, Node
from .errors import ShardflowError

log = logging.getLogger("shardflow.ownership")


def target_share(shard_count: int, members: list[str], me: str) -> int | None:
    """How many shards ``me`` should own, or None when it is not (yet) a member."""
    if me not in members:
        return None
    rank = members.index(me)
    base, extra = divmod(shard_count, len(members))
    return base + (1 if rank < extra else 0)


class ShardOwnership:
    """``units()`` says which shards each node leases out: on plain nodes a node's
    logical shards; on Citus the coordinator leases the Citus shards (placements) of
    the workflow table, which workers claim from on the Citus worker holding each."""

    def __init__(self, driver: Driver, units: Callable[[], dict[str, list[int]]],
                 worker_id: str) -> None:
        self.driver = driver
        self.units = units
        self.worker_id = worker_id
        self.owned: dict[str, set[int]] = {name: set() for name in driver.nodes}
        self.members: list[str] = []

    def shards(self, node: Node) -> list[int]:
        return sorted(self.owned.get(node.name, ()))

    def all_owned(self) -> int:
        return sum(len(s) for s in self.owned.values())

    async def _members(self) -> list[str]:
        for node in self.driver.nodes.values():
            try:
                rows = await self.driver.fetch(node, "live_workers", patience=BACKGROUND)
                return [r["worker_id"] for r in rows]
            except ShardflowError as exc:
                log.warning("membership from node %s failed: %s", node.name, exc)
        return []

    async def rebalance(self) -> bool:
        """One step towards this worker's fair share; True when ownership changed."""
        units = self.units()
        nodes = [n for n in self.driver.nodes.values() if n.name in units]
        before = {k: set(v) for k, v in self.owned.items()}
        for node in nodes:
            try:
                rows = await self.driver.fetch(node, "owned_shards", self.worker_id,
                                               patience=BACKGROUND)
                held = {r["shard_id"] for r in rows}
                here = set(units[node.name])
                if held - here:
                    # leases for shards that moved away (taken with a stale map): let go
                    await self.driver.execute(node, "release_shards", sorted(held - here),
                                              self.worker_id, patience=BACKGROUND)
                self.owned[node.name] = held & here
            except ShardflowError as exc:
                log.warning("reading shard leases on node %s failed: %s", node.name, exc)
        self.members = await self._members()
        count = sum(len(u) for u in units.values())
        target = target_share(count, self.members, self.worker_id)
        if target is None:
            return self.owned != before
        total = self.all_owned()
        if total > target:
            await self._release(total - target)
        elif total < target:
            await self._acquire(target - total, nodes, units)
        changed = self.owned != before
        if changed:
            log.info("worker %s owns %d shards (target %d of %d, %d workers)", self.worker_id,
                     self.all_owned(), target, count, len(self.members))
        return changed

    async def _release(self, extra: int) -> None:
        while extra > 0:
            node_name = max(self.owned, key=lambda n: len(self.owned[n]))
            give = sorted(self.owned[node_name])[-extra:]
            node = self.driver.nodes[node_name]
            await self.driver.execute(node, "release_shards", give, self.worker_id,
                                      patience=BACKGROUND)
            self.owned[node_name] -= set(give)
            extra -= len(give)

    async def _acquire(self, need: int, nodes: list[Node],
                       units: dict[str, list[int]]) -> None:
        # take from the node where we own least first, to spread each worker over nodes
        for node in sorted(nodes, key=lambda n: len(self.owned[n.name])):
            if need <= 0:
                return
            try:
                free = await self.driver.fetch(node, "free_shards", units[node.name], need,
                                               patience=BACKGROUND)
                if not free:
                    continue
                got = await self.driver.fetch(node, "acquire_shards",
                                              [r["shard_id"] for r in free], self.worker_id,
                                              patience=BACKGROUND)
            except ShardflowError as exc:
                log.warning("acquiring shards on node %s failed: %s", node.name, exc)
                continue
            self.owned[node.name] |= {r["shard_id"] for r in got}
            need -= len(got)

    async def release_all(self) -> None:
        """Hand every shard back (graceful stop); a node that fails keeps ours until
        our lease there expires, the others get theirs back at once."""
        for node in self.driver.nodes.values():
            try:
                if self.owned.get(node.name):
                    await self.driver.execute(node, "release_shards",
                                              sorted(self.owned[node.name]), self.worker_id,
                                              patience=BACKGROUND)
            except ShardflowError as exc:
                log.warning("releasing shards on node %s failed: %s", node.name, exc)
            self.owned[node.name] = set()
