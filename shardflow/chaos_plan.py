"""The seeded script of ``shardflow drill chaos`` and the driver's actors that play it.

:func:`make_plan` turns ``(seed, duration, rate, tenants)`` into the run's workflows: when
each starts, its tenant, its ops (see ``chaos_flows``) and what the driver will do to it
(messages to send, cancel, resume, fork). Same seed, same script. An :class:`Actor` per
workflow then plays its part against a client engine and writes everything it did, and
whether each call was acknowledged, into the workflow's :class:`WfRecord` (the history
the audit judges). Client calls that fail under the faults are retried where the API
makes that safe (starts and cancels by id, keyed sends, resumes, forks by new id); a send
without a key is tried once, and if it errors its message may or may not be delivered.
"""

from __future__ import annotations

import asyncio
import functools
import random
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from .chaos_audit import SendRecord, WfRecord
from .chaos_flows import EXTRA_WORKFLOW, LIMITED_QUEUE, WORKFLOW
from .engine import TERMINAL, Engine

KIND_WEIGHTS = {
    "basic": 14, "sleeper": 10, "retry": 10, "fails": 6, "recv": 8, "parent": 6,
    "timeout": 4, "cancel": 6, "gated": 5, "fork": 5, "limited": 6, "extra": 5,
}
CLIENT_RETRY_S = 60.0  # how long the driver retries a call the faults make fail
WAIT_S = 180.0  # how long the driver waits for a workflow to reach a point of its script


def _basic_ops(rng: random.Random, n: int, prefix: str = "") -> list[Any]:
    ops: list[Any] = []
    for j in range(n):
        kind = rng.choice(("tx", "tx", "ext", "ext", "sleep", "event"))
        if kind == "tx":
            ops.append(["tx", f"{prefix}t{j}", 0])
        elif kind == "ext":
            ops.append(["ext", f"{prefix}e{j}", 0, rng.choice((0, 50, 200))])
        elif kind == "sleep":
            ops.append(["sleep", round(rng.uniform(0.05, 0.5), 2)])
        else:
            ops.append(["event", f"{prefix}k{j}", rng.randrange(1000)])
    return ops


def make_plan(seed: int, *, duration: float, rate: float, tenants: int, run: str,
              gates: Path) -> list[WfRecord]:
    """The run's workflows, in start order: a pure function of its arguments."""
    rng = random.Random(seed)
    kinds, weights = list(KIND_WEIGHTS), list(KIND_WEIGHTS.values())
    plan: list[WfRecord] = []
    t, k = 0.0, 0
    while True:
        t += rng.expovariate(rate)
        if t >= duration:
            break
        kind = rng.choices(kinds, weights)[0]
        tenant = f"tenant-{rng.randrange(tenants)}"
        wid = f"{run}-{k:05d}"
        k += 1
        rec = WfRecord(tenant, wid, kind, [], round(t, 3))
        if kind in ("basic", "limited", "extra"):
            rec.ops = _basic_ops(rng, rng.randint(1, 5))
            if kind == "limited":
                rec.queue = LIMITED_QUEUE
        elif kind == "sleeper":
            # some sleep more often than max_attempts: waiting is no failed attempt
            rec.ops = [["tx", "t0", 0]]
            for j in range(rng.choice((2, 3, 4, 12))):
                rec.ops += [["sleep", round(rng.uniform(1.1, 1.6), 2)], ["tx", f"t{j + 1}", 0]]
        elif kind == "retry":
            rec.ops = [["ext", "e0", rng.randint(1, 3), 0], ["tx", "t1", rng.randint(1, 2)],
                       ["txc", "t2", rng.randint(0, 1)], *_basic_ops(rng, rng.randint(0, 2), "b")]
        elif kind == "fails":
            stop = rng.choice((["fail", "scripted failure"],
                               ["fail", "an error jsonb cannot hold", "nul"],
                               ["ext", "boom", 99, 0]))  # the last fails on every retry
            rec.ops = [["tx", "t0", 0], ["ext", "e1", 0, 0], stop, ["tx", "after", 0]]
        elif kind == "recv":
            rec.ops = [["tx", "t0", 0], ["recv_loop", "inbox"]]
            for j in range(rng.randint(1, 4)):
                keyed = rng.random() < 0.6
                rec.sends.append(SendRecord(f"m{j}", keyed, retried_after_consumed=keyed
                                            and rng.random() < 0.6))
            if rng.random() < 0.5:
                sender = WfRecord(tenant, f"{wid}-s", "sender", [], rec.at)
                sender.ops = [["ext", "e0", 0, 100],
                              ["send", tenant, wid, "inbox", {"id": f"{wid}-s/0"}],
                              ["ext", "e1", 0, 100],
                              ["send", tenant, wid, "inbox", {"id": f"{wid}-s/1"}],
                              ["tx", "t2", 0]]
                rec.senders.append(sender.workflow_id)
                plan.append(sender)
        elif kind == "parent":
            rec.ops = [["tx", "t0", 0]]
            for j in range(rng.randint(1, 3)):
                child = _basic_ops(rng, rng.randint(1, 3), f"c{j}")
                if rng.random() < 0.3:
                    child.append(["sleep", 1.5])  # a child released and re-claimed
                rec.ops.append(["child", j, child])
            rec.ops.append(["tx", "t9", 0])
            if rng.random() < 0.4:
                # a fork of a child: a new root, whatever the child's parent was
                rec.fork_of, rec.fork_from = f"{wid}.k0", 1
        elif kind == "timeout":
            rec.ops = [["tx", "t0", 0], ["sleep", 30.0], ["tx", "after", 0]]
            rec.timeout = 3.0
        elif kind == "cancel":
            park: list[Any] = ["park", "parked"]
            if rng.random() < 0.4:  # the child waits: cancel and resume reach the tree
                park = ["child", 0, [["tx", "c0", 0], park, ["tx", "c1", 0]]]
            rec.ops = [["tx", "t0", 0], ["ext", "e1", 0, 0], park, ["tx", "after", 0]]
            rec.plan_cancel = True
            rec.plan_resume = rng.random() < 0.5
        elif kind == "gated":
            # the code fails (nothing recorded), or a step fails (its error recorded):
            # a resume after the gate opens must get past either
            gate = (["gate", str(gates / wid)] if rng.random() < 0.5
                    else ["ext_gate", "g1", str(gates / wid)])
            rec.ops = [["tx", "t0", 0], gate, ["tx", "after", 0]]
            rec.plan_resume = rng.random() < 0.8
        else:  # fork
            rec.ops = [["tx", "a", 0], ["ext", "b", 0, 0], ["tx", "c", 0]]
            rec.fork_from = rng.choice((1, 2))
        plan.append(rec)
    return plan


class Actor:
    """Plays one workflow's part of the script against the client engine."""

    def __init__(self, eng: Engine, rec: WfRecord, plan: dict[str, WfRecord],
                 t0: float, started: Callable[[], None]) -> None:
        self.eng, self.rec, self.plan, self.t0 = eng, rec, plan, t0
        self.started = started

    async def _retry(self, what: str, call: Callable[[], Awaitable[Any]]) -> tuple[bool, Any]:
        deadline = time.monotonic() + CLIENT_RETRY_S
        while True:
            try:
                return True, await call()
            except Exception as exc:
                self.rec.notes.append(f"{what}: {type(exc).__name__}: {str(exc)[:160]}")
                if time.monotonic() > deadline:
                    return False, None
                await asyncio.sleep(0.5)

    async def start(self, rec: WfRecord) -> bool:
        async def call() -> Any:
            try:
                name = EXTRA_WORKFLOW if rec.kind == "extra" else WORKFLOW
                return await self.eng.start(name, rec.ops, tenant=rec.tenant,
                                            workflow_id=rec.workflow_id, queue=rec.queue,
                                            timeout=rec.timeout)
            except Exception:
                rec.start_errors += 1
                raise
        ok, _ = await self._retry(f"start {rec.workflow_id}", call)
        if ok:
            rec.acked, rec.t_ack = True, time.time()
            self.started()
        return ok

    async def status(self, w: str) -> str | None:
        try:
            return str((await self.eng.get_info(self.rec.tenant, w))["status"])
        except Exception:
            return None

    async def wait_status(self, w: str, want: tuple[str, ...]) -> str | None:
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            s = await self.status(w)
            if s in want:
                return s
            await asyncio.sleep(1.0)
        self.rec.notes.append(f"waited {WAIT_S:.0f}s for {w} to be {'/'.join(want)}")
        return None

    async def wait_event(self, key: str, at_least: Any = True, wf: str | None = None
                         ) -> bool:
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            try:
                v = await self.eng.get_event(self.rec.tenant, wf or self.rec.workflow_id,
                                             key, timeout=2.0)
                if v is not None and (v is True or (isinstance(v, int) and v >= at_least)):
                    return True
            except Exception:
                await asyncio.sleep(0.5)
        self.rec.notes.append(f"waited {WAIT_S:.0f}s for event {key!r} >= {at_least}")
        return False

    async def run(self) -> None:
        rec = self.rec
        if rec.kind == "sender":
            return  # its receiver starts it
        await asyncio.sleep(max(0.0, self.t0 + rec.at - time.time()))
        if not await self.start(rec):
            return
        t, w = rec.tenant, rec.workflow_id
        if rec.kind == "cancel":
            # the workflow that waits for "go": this one, or its child
            parked = w if rec.ops[2][0] == "park" else f"{w}.k0"
            if not await self.wait_event("parked", wf=parked):
                return
            rec.cancel_acked, _ = await self._retry("cancel", lambda: self.eng.cancel(t, w))
            if rec.plan_resume and rec.cancel_acked:
                await asyncio.sleep(1.0)
                rec.resume_acked, _ = await self._retry("resume", lambda: self.eng.resume(t, w))
                if rec.resume_acked:
                    rec.go_sent, _ = await self._retry("send go", lambda: self.eng.send(
                        t, parked, "go", {"go": True}, idempotency_key=f"{parked}/go"))
        elif rec.kind == "gated":
            if rec.plan_resume and await self.wait_status(w, ("failed",)) == "failed":
                await asyncio.to_thread(Path(rec.ops[1][-1]).touch)
                rec.gate_opened = True
                rec.resume_acked, _ = await self._retry("resume", lambda: self.eng.resume(t, w))
        elif rec.fork_from is not None:
            if await self.wait_status(w, TERMINAL) == "succeeded":
                src = rec.fork_of or w
                fid = rec.fork_id = f"{src}.fork"
                rec.fork_acked, _ = await self._retry("fork", functools.partial(
                    self.eng.fork, t, src, from_step=rec.fork_from, new_workflow_id=fid))
        elif rec.kind == "recv":
            await self._play_messages()
        elif (any(op[0] == "event" for op in rec.ops)
              and await self.wait_status(w, TERMINAL) == "succeeded"):
            for op in rec.ops:
                if op[0] == "event":
                    ok, v = await self._retry("get_event", functools.partial(
                        self.eng.get_event, t, w, op[1]))
                    if ok:
                        rec.events_read[op[1]] = v

    async def _play_messages(self) -> None:
        rec = self.rec
        t, w = rec.tenant, rec.workflow_id
        for sid in rec.senders:
            await self.start(self.plan[f"{t}/{sid}"])
        async def keyed(msg: dict[str, Any], key: str) -> bool:
            ok, _ = await self._retry(f"send {key}", functools.partial(
                self.eng.send, t, w, "inbox", msg, idempotency_key=f"{w}/{key}"))
            return ok

        for s in rec.sends:
            await asyncio.sleep(0.2)
            if s.keyed:
                s.acked = await keyed({"id": s.msg_id}, s.msg_id)
            else:
                try:  # no key: a retry could deliver it twice, so one try only
                    await self.eng.send(t, w, "inbox", {"id": s.msg_id})
                    s.acked = True
                except Exception as exc:
                    s.errors += 1
                    rec.notes.append(f"send {s.msg_id} without key: {exc!s:.160}")
        exact = sum(1 for s in rec.sends if s.acked)
        for sid in rec.senders:
            if await self.wait_status(sid, TERMINAL) == "succeeded":
                exact += 2
        # the retry after consumption, once the receiver has taken everything sent so
        # far: the message is gone from the queue, the key must still hold
        resend = [s for s in rec.sends if s.retried_after_consumed and s.acked]
        consumed = bool(resend) and await self.wait_event("received", exact)
        for s in rec.sends:
            # from here on the flag says what was done, not what was planned
            s.retried_after_consumed = (s in resend and consumed
                                        and await keyed({"id": s.msg_id}, s.msg_id))
        await keyed({"done": True}, "done")
