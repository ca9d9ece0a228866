"""The cluster file: which nodes exist, their DSNs and roles, and the shard map.

``cluster up`` writes it; the CLI, the bench, the drills and ``Engine()`` (given no
DSNs) read it. Which file, for every one of them (:func:`resolve`, the one place that
decides): the ``--cluster-file`` flag (``cluster_file=``) if given, else
``$SHARDFLOW_CLUSTER`` if set, else ``.shardflow/cluster.json``.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import ClusterFileError
from .routing import ShardMap

DEFAULT_DIR = Path(".shardflow")
FILE_NAME = "cluster.json"
FORMAT_VERSION = 1
ENV = "SHARDFLOW_CLUSTER"
RULE = f"--cluster-file FILE, else ${ENV}, else {DEFAULT_DIR / FILE_NAME}"
"""The rule, as every command's ``--help`` states it."""


def resolve(path: Path | str | None = None) -> Path:
    """The cluster file to use: ``path`` (a ``--cluster-file`` flag) if given, else
    ``$SHARDFLOW_CLUSTER`` if set and not empty, else ``.shardflow/cluster.json``."""
    if path is not None and str(path) != "":
        return Path(path)
    env = os.environ.get(ENV)
    if env:
        return Path(env)
    return DEFAULT_DIR / FILE_NAME


def default_cluster_file() -> Path:
    """The cluster file when no flag names one: ``resolve(None)``."""
    return resolve(None)


def local_dir(directory: Path | str | None = None) -> Path:
    """The directory of a local cluster (``cluster up|status|down``, ``demo``), which
    holds its ``cluster.json``: ``directory`` (a ``--dir`` flag) if given, else the
    directory of the file :func:`resolve` names, so that every command finds the
    cluster ``up`` made. A ``$SHARDFLOW_CLUSTER`` of another file name is refused: the
    cluster manager would read and write a file beside it, not it."""
    if directory is not None and str(directory) != "":
        return Path(directory)
    file = resolve(None)
    if file.name != FILE_NAME:
        raise ClusterFileError(f"${ENV} names {file}, but a local cluster's file is "
                               f"DIR/{FILE_NAME}: give --dir DIR")
    return file.parent


def redact(dsn: str) -> str:
    """``dsn`` without its password, for messages and logs (URL or key=value form)."""
    import re

    dsn = re.sub(r"(postgres(?:ql)?://[^:/@]*):[^@]*@", r"\1:***@", dsn)
    return re.sub(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", r"\1***", dsn)


@dataclass(frozen=True, slots=True)
class NodeSpec:
    name: str
    host: str
    port: int
    dsn: str
    role: str = "primary"
    data_dir: str | None = None


@dataclass(frozen=True, slots=True)
class ClusterSpec:
    nodes: tuple[NodeSpec, ...]
    shard_map: ShardMap
    kind: str = "local"
    dir: str | None = None
    database: str = "shardflow"
    settings: dict[str, str] = field(default_factory=dict)

    def node(self, name: str) -> NodeSpec:
        for n in self.nodes:
            if n.name == name:
                return n
        raise ClusterFileError(f"cluster file has no node {name!r}")

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT_VERSION,
            "kind": self.kind,
            "dir": self.dir,
            "database": self.database,
            "nodes": [asdict(n) for n in self.nodes],
            "shard_count": self.shard_map.shard_count,
            "shard_epoch": self.shard_map.epoch,
            "placement": list(self.shard_map.placement),
            "settings": self.settings,
        }

    @classmethod
    def from_json(cls, data: Any, *, source: str = "cluster file") -> ClusterSpec:
        try:
            if data.get("format") != FORMAT_VERSION:
                raise ClusterFileError(
                    f"{source}: format {data.get('format')!r} is not {FORMAT_VERSION}"
                )
            nodes = tuple(NodeSpec(**n) for n in data["nodes"])
            shard_map = ShardMap(
                int(data["shard_count"]),
                tuple(str(p) for p in data["placement"]),
                int(data.get("shard_epoch", 1)),
            )
            names = {n.name for n in nodes}
            missing = sorted(set(shard_map.placement) - names)
            if missing:
                raise ClusterFileError(
                    f"{source}: the shard map places shards on unknown node(s) {missing}"
                )
            return cls(
                nodes=nodes,
                shard_map=shard_map,
                kind=str(data.get("kind", "local")),
                dir=data.get("dir"),
                database=str(data.get("database", "shardflow")),
                settings=dict(data.get("settings", {})),
            )
        except ClusterFileError:
            raise
        except Exception as exc:  # any shape error: one clear line naming the file
            raise ClusterFileError(f"{source} is corrupt: {type(exc).__name__}: {exc}") from exc


def load(path: Path | str | None = None) -> ClusterSpec:
    path = resolve(path)
    try:
        text = path.read_text("utf-8")
    except FileNotFoundError:
        raise ClusterFileError(
            f"no cluster file at {path}: run 'shardflow cluster up', or name one with "
            f"--cluster-file or ${ENV}"
        ) from None
    except UnicodeDecodeError as exc:
        raise ClusterFileError(f"cluster file {path} is corrupt: not UTF-8 text") from exc
    except OSError as exc:
        raise ClusterFileError(f"cannot read cluster file {path}: {exc.strerror}") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ClusterFileError(
            f"cluster file {path} is corrupt: not JSON ({exc.msg} at line {exc.lineno})"
        ) from exc
    return ClusterSpec.from_json(data, source=f"cluster file {path}")


def save(spec: ClusterSpec, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(spec.to_json(), indent=2) + "\n", "utf-8")
    # rename is atomic: a reader never sees half a cluster file
    tmp.replace(path)
