"""OpenTelemetry spans (EngineConfig.tracing): off by default; on, a span per workflow
run and per step, with the tenant and workflow id."""

from __future__ import annotations

import dataclasses
import sys

import pytest

from shardflow import ConfigError, EngineConfig

from .conftest import PerTestDB
from .flows import FAST

sdk = pytest.importorskip("opentelemetry.sdk.trace", reason="opentelemetry-sdk not installed")


async def test_spans_for_workflows_and_steps(db: PerTestDB) -> None:
    from opentelemetry import trace
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = sdk.TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)  # once per process: only this test sets it
    eng = db.engine(config=dataclasses.replace(FAST, tracing=True))

    @eng.step(name="t.fetch")
    async def fetch(x: int) -> int:
        return x + 1

    @eng.transaction(name="t.save")
    async def save(conn: object, x: int) -> int:
        return x

    @eng.workflow(name="t.flow")
    async def flow(x: int) -> int:
        return await save(await fetch(x))

    async with eng:
        h = await eng.start(flow, 1, tenant="trace-acme", workflow_id="tr-1")
        assert await h.result(timeout=30) == 2
    spans = {s.name: s for s in exporter.get_finished_spans()}
    assert {"workflow t.flow", "step t.fetch", "transaction t.save"} <= set(spans)
    wf, step = spans["workflow t.flow"], spans["step t.fetch"]
    assert wf.attributes is not None and wf.attributes["shardflow.tenant"] == "trace-acme"
    assert wf.attributes["shardflow.workflow_id"] == "tr-1"
    assert step.parent is not None and step.parent.span_id == wf.context.span_id


def test_tracing_without_opentelemetry_is_a_clear_error(
        db: PerTestDB, monkeypatch: pytest.MonkeyPatch) -> None:
    assert EngineConfig().tracing is False  # off by default
    monkeypatch.setitem(sys.modules, "opentelemetry", None)  # as if not installed
    with pytest.raises(ConfigError, match=r"shardflow\[otel\]"):
        db.engine(config=dataclasses.replace(FAST, tracing=True))
