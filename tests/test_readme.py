"""The README's quick start runs as written, against a real cluster."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from shardflow import clusterfile
from shardflow.clusterfile import ClusterSpec, NodeSpec

from .conftest import PerTestDB, make_tempdir

README = Path(__file__).resolve().parent.parent / "README.md"


def test_quick_start_example_runs(db: PerTestDB) -> None:
    text = README.read_text()
    block = re.search(r"## Quick start\s+```python\n(.*?)```", text, re.S)
    assert block is not None, "README has no quick start python block"
    d = make_tempdir("shardflow-readme-")
    spec = ClusterSpec(
        nodes=tuple(NodeSpec(n.name, n.host, n.port, db.dsn_of(n.name)) for n in db.spec.nodes),
        shard_map=db.spec.shard_map,
    )
    clusterfile.save(spec, d / "cluster.json")
    (d / "quickstart.py").write_text(block.group(1))
    env = db.env()
    env["SHARDFLOW_CLUSTER"] = str(d / "cluster.json")
    out = subprocess.run([sys.executable, str(d / "quickstart.py")], env=env, cwd=d,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "receipt-o-1"
