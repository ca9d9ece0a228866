"""shardflow: durable, multi-tenant, sharded workflows whose only orchestrator is PostgreSQL.

The public API::

    engine = shardflow.Engine()          # the cluster file, or Engine(dsns=[...])

    @engine.workflow()
    async def checkout(order_id: str) -> str: ...

    async with engine:
        handle = await engine.start(checkout, "o-1", tenant="acme", workflow_id="o-1")
        print(await handle.result(timeout=30))
"""

from __future__ import annotations

from .config import EngineConfig
from .context import patch, recv, set_event, sleep, tenant, workflow_id
from .engine import Engine, Queue, Start, WorkflowHandle
from .errors import (
    ClusterError,
    ClusterFileError,
    ConfigError,
    DatabaseError,
    InvalidArgument,
    InvalidTenant,
    LeaseLost,
    MisroutedWrite,
    NonDeterminismError,
    PayloadTooLarge,
    RetryableDatabaseError,
    RoutingError,
    SerializationError,
    ShardflowError,
    StepError,
    UnknownWorkflowName,
    WorkflowCancelled,
    WorkflowFailed,
    WorkflowInterrupt,
    WorkflowNotFound,
)
from .routing import ShardMap, shard_of

__version__ = "0.1.0"

__all__ = [
    "ClusterError",
    "ClusterFileError",
    "ConfigError",
    "DatabaseError",
    "Engine",
    "EngineConfig",
    "InvalidArgument",
    "InvalidTenant",
    "LeaseLost",
    "MisroutedWrite",
    "NonDeterminismError",
    "PayloadTooLarge",
    "Queue",
    "RetryableDatabaseError",
    "RoutingError",
    "SerializationError",
    "ShardMap",
    "ShardflowError",
    "Start",
    "StepError",
    "UnknownWorkflowName",
    "WorkflowCancelled",
    "WorkflowFailed",
    "WorkflowHandle",
    "WorkflowInterrupt",
    "WorkflowNotFound",
    "__version__",
    "patch",
    "recv",
    "set_event",
    "shard_of",
    "sleep",
    "tenant",
    "workflow_id",
]
