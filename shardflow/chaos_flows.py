"""The workflows of ``shardflow drill chaos``, shared by its driver and its worker processes.

One workflow, ``chaos.script(ops)``, interprets a list of operations it is given as its
input, so every workflow of a chaos run is a different, seeded mix of the engine's
durable primitives while the code stays one small, deterministic interpreter. Its result
is the list of each op's result, which the audit recomputes from the script alone
(:func:`expected_output`): a replay that returned a wrong checkpoint shows up there.

Ops (JSON lists, so they travel as workflow inputs):

* ``["tx", label, fail_first]``: transactional step inserting ``(tenant, workflow, label)``
  into ``public.chaos_effects``; it raises after its insert on its first ``fail_first``
  runs in a process (the insert rolls back; ``retries=2``). Must apply exactly once.
* ``["txc", label, fail_first]``: like ``tx``, but its first ``fail_first`` runs in a
  process also insert a row that breaks a deferred foreign key: the step fails at
  COMMIT, where it shares a group commit with other workflows' steps.
* ``["ext", label, fail_first, ms]``: external step (``retries=3``), failing its first
  ``fail_first`` calls in a process; ``fail_first >= 4`` makes it fail for good.
* ``["sleep", seconds]``: durable sleep (longer than ``suspend_after`` releases it).
* ``["event", key, value]``: ``set_event``.
* ``["child", index, ops]``: a child ``<id>.k<index>`` running ``ops``; waits for it.
* ``["send", tenant, workflow_id, topic, message]``: a message from inside a workflow.
* ``["ext_gate", label, path]``: an external step (``retries=1``) that fails while the
  file ``path`` is missing: the workflow fails on a *recorded step error*; the driver
  creates the file and resumes it, and the resume must run the step again.
* ``["fail", message]``: the workflow's own code raises; ``["fail", message, "nul"]``
  adds a NUL to the message, which jsonb cannot store as it is.
* ``["gate", path]``: the code raises unless the file ``path`` exists (not checkpointed:
  the chaos driver creates it, then resumes the failed workflow).
* ``["park", key]``: ``set_event(key, True)`` then ``recv("go", 600)``: a workflow the
  driver cancels while it waits (and maybe resumes and sends ``go``).
* ``["recv_loop", topic]``: receive messages ``{"id": ...}`` until ``{"done": true}``,
  recording each (a transactional effect and the ``received`` event), then one more
  ``recv(topic, 0)`` that must find nothing (a duplicate delivery would be there).

``chaos.extra`` is the same interpreter registered only by the worker processes started
with ``$SHARDFLOW_CHAOS_EXTRA`` set (every other one): workers that register different
workflow sets must not strand its workflows.

Worker processes run ``python -m shardflow.worker shardflow.chaos_flows:engine``; the
module-level ``engine`` reads its DSNs from ``$SHARDFLOW_CHAOS_DSNS`` and its settings
from ``$SHARDFLOW_CHAOS_CONFIG``.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections import Counter
from typing import Any

import shardflow
from shardflow import Engine, EngineConfig

DSNS_ENV = "SHARDFLOW_CHAOS_DSNS"
CONFIG_ENV = "SHARDFLOW_CHAOS_CONFIG"
EXTRA_ENV = "SHARDFLOW_CHAOS_EXTRA"
WORKFLOW = "chaos.script"
EXTRA_WORKFLOW = "chaos.extra"
LIMITED_QUEUE = "chaos-limited"
LIMITED_CONCURRENCY = 3
EXT_RETRIES = 3
TX_RETRIES = 2
RECV_TIMEOUT = 600.0  # long: a recv that times out in a chaos run is itself a finding

# Engine settings of the drivers and the workers: a 1 s lease, and a short suspend_after
# so that many sleeps and waits release the workflow and get claimed again.
CHAOS_ENGINE: dict[str, Any] = {
    "lease_timeout": 1.0, "heartbeat_interval": 0.25, "recovery_interval": 0.25,
    "poll_interval": 0.05, "sweep_interval": 0.25, "suspend_after": 1.0,
    "step_backoff_base": 0.02, "step_backoff_max": 0.5, "max_attempts": 10,
    "reconnect_timeout": 30.0, "connect_timeout": 30.0,
}

EFFECTS_DDL = """
CREATE TABLE IF NOT EXISTS public.chaos_effects (
    tenant_id   text NOT NULL,
    workflow_id text NOT NULL,
    label       text NOT NULL,
    at          timestamptz NOT NULL DEFAULT clock_timestamp()
)
"""
# No unique constraint on purpose: a duplicate effect must be counted by the audit, not
# turned into an error that the engine would retry away.
DEFERRED_DDL = """
CREATE TABLE IF NOT EXISTS public.chaos_parents (id int PRIMARY KEY);
CREATE TABLE IF NOT EXISTS public.chaos_deferred (
    parent int REFERENCES public.chaos_parents (id) DEFERRABLE INITIALLY DEFERRED
);
"""
# chaos_parents stays empty: any row in chaos_deferred fails its transaction at COMMIT.


class TransientFailure(RuntimeError):
    """Raised by a step on its first runs in a process: retried by the engine."""


class ScriptedFailure(RuntimeError):
    """The workflow's own code failing, as its script says."""


# Calls per (workflow, label) in this process: the "first N runs fail" of a step. Per
# process on purpose: a worker killed mid-retry starts counting again elsewhere, which
# only adds failures the step's retries absorb.
_calls: Counter[tuple[str, str]] = Counter()


def _fail_now(label: str, fail_first: int) -> bool:
    key = (shardflow.workflow_id(), label)
    _calls[key] += 1
    return _calls[key] <= fail_first


def config_from_env() -> EngineConfig:
    raw = os.environ.get(CONFIG_ENV)
    return EngineConfig(**(json.loads(raw) if raw else CHAOS_ENGINE))


def make_engine(dsns: list[str], *, config: EngineConfig | None = None,
                run_workers: bool = True, extra: bool = True) -> Engine:
    """An engine with the chaos workflow, its steps and its limited queue registered
    (and ``chaos.extra`` with ``extra``)."""
    eng = Engine(dsns=dsns, config=config or config_from_env(), run_workers=run_workers)
    eng.queue(LIMITED_QUEUE, concurrency=LIMITED_CONCURRENCY)

    @eng.transaction(name="chaos.effect", retries=TX_RETRIES)
    async def effect(conn: Any, label: str, fail_first: int = 0) -> str:
        await conn.execute(
            "INSERT INTO public.chaos_effects (tenant_id, workflow_id, label) "
            "VALUES ($1, $2, $3)", shardflow.tenant(), shardflow.workflow_id(), label)
        if fail_first and _fail_now(label, fail_first):
            raise TransientFailure(f"transaction {label} fails on this run")
        return label

    @eng.transaction(name="chaos.commit_effect", retries=TX_RETRIES)
    async def commit_effect(conn: Any, label: str, fail_first: int = 0) -> str:
        await conn.execute(
            "INSERT INTO public.chaos_effects (tenant_id, workflow_id, label) "
            "VALUES ($1, $2, $3)", shardflow.tenant(), shardflow.workflow_id(), label)
        if fail_first and _fail_now(label, fail_first):
            await conn.execute("INSERT INTO public.chaos_deferred (parent) VALUES (-1)")
        return label

    @eng.step(name="chaos.external", retries=EXT_RETRIES)
    async def external(label: str, fail_first: int = 0, ms: float = 0.0) -> str:
        if ms > 0:
            await asyncio.sleep(ms / 1000)  # a call to another service: a crash lands inside
        if fail_first and _fail_now(label, fail_first):
            raise TransientFailure(f"external step {label} fails on this call")
        return label

    @eng.step(name="chaos.gate", retries=1)
    async def gate(label: str, path: str) -> str:
        if not os.path.exists(path):  # noqa: ASYNC240 (a stat of a local file)
            raise ScriptedFailure(f"gate {path} is closed")
        return label

    async def script(ops: list[Any]) -> list[Any]:
        out: list[Any] = []
        for op in ops:
            if op[0] == "ext_gate":
                out.append(await gate(op[1], op[2]))
            elif op[0] == "txc":
                out.append(await commit_effect(op[1], op[2]))
            else:
                out.append(await _run_op(eng, op, effect, external))
        return out

    eng.workflow(name=WORKFLOW)(script)
    if extra:
        async def extra_script(ops: list[Any]) -> list[Any]:
            return await script(ops)

        eng.workflow(name=EXTRA_WORKFLOW)(extra_script)
    return eng


async def _run_op(eng: Engine, op: list[Any], effect: Any,  # noqa: PLR0911 (a dispatch)
                  external: Any) -> Any:
    kind = op[0]
    if kind == "tx":
        return await effect(op[1], op[2])
    if kind == "ext":
        return await external(op[1], op[2], op[3])
    if kind == "sleep":
        await shardflow.sleep(op[1])
        return None
    if kind == "event":
        await shardflow.set_event(op[1], op[2])
        return None
    if kind == "child":
        child = await eng.start(WORKFLOW, op[2],
                                workflow_id=f"{shardflow.workflow_id()}.k{op[1]}")
        return await child.result()
    if kind == "send":
        await eng.send(op[1], op[2], op[3], op[4])
        return None
    if kind == "fail":
        # made here, not passed in: a NUL in the inputs would be refused at start
        raise ScriptedFailure(op[1] + ("\x00" if op[2:] == ["nul"] else ""))
    if kind == "gate":
        # a stat of a local file, not checkpointed on purpose: see the module docstring
        if not os.path.exists(op[1]):  # noqa: ASYNC240
            raise ScriptedFailure(f"gate {op[1]} is closed")
        return None
    if kind == "park":
        await shardflow.set_event(op[1], True)
        return await shardflow.recv("go", RECV_TIMEOUT)
    if kind == "recv_loop":
        got: list[Any] = []
        while True:
            msg = await shardflow.recv(op[1], RECV_TIMEOUT)
            if msg is None:  # timed out: the audit reports it
                got.append(None)
                break
            if msg.get("done"):
                break
            got.append(msg["id"])
            await effect(f"recv{len(got)}:{msg['id']}")
            await shardflow.set_event("received", len(got))
        extra = await shardflow.recv(op[1], 0)
        return {"got": got, "extra": extra}
    raise ScriptedFailure(f"unknown op {kind!r}")


def child_ids(workflow_id: str, ops: list[Any]) -> list[tuple[str, list[Any]]]:
    """Every descendant ``(id, ops)`` that a script starts, depth first."""
    out: list[tuple[str, list[Any]]] = []
    for op in ops:
        if op[0] == "child":
            cid = f"{workflow_id}.k{op[1]}"
            out.append((cid, op[2]))
            out.extend(child_ids(cid, op[2]))
    return out


def expected_output(ops: list[Any]) -> tuple[bool, Any]:
    """``(known, output)``: what ``chaos.script(ops)`` returns when it succeeds, if the
    script alone says (it does unless it receives messages)."""
    out: list[Any] = []
    for op in ops:
        kind = op[0]
        if kind in ("tx", "txc", "ext", "ext_gate"):
            out.append(op[1])
        elif kind == "child":
            known, value = expected_output(op[2])
            if not known:
                return False, None
            out.append(value)
        elif kind == "park":
            out.append({"go": True})
        elif kind == "recv_loop":
            return False, None
        else:
            out.append(None)
    return True, out


# Built at import when the chaos driver has set the environment (worker processes).
engine = (make_engine(os.environ[DSNS_ENV].split(","), extra=bool(os.environ.get(EXTRA_ENV)))
          if DSNS_ENV in os.environ else None)
