"""Where passes run: the in-process worker context (the project's engine and token store) and the
picklable spec from which an executor's worker in another process rebuilds it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..batching import Batching
from ..engine import GradientEngine
from ..passes import Pass, Shard, run_shard
from ..progress import Monitor
from ..project import Project


class LocalWorker:
    """The in-process worker context: the project's model, engine and token store."""

    def __init__(self, project: Project, engine: GradientEngine) -> None:
        self.engine = engine
        self.corpus = project.runtime.corpus
        self.pad_id = project.runtime.pad_id

    def run(
        self, pass_: Pass, shard: Shard, batch_size: int | Batching, monitor: Monitor | None, into: dict[str, torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor]:
        """:func:`run_shard` here; ``into``: running sums to extend (see ``Job.sums``)."""
        return run_shard(self.engine, self.corpus.many, pass_, shard, self.pad_id, batch_size, monitor, into=into)


_WORKERS: dict[str, LocalWorker] = {}


def build_worker(spec: dict[str, Any]) -> LocalWorker:
    """Rebuild (once per process) the worker context that :func:`worker_spec` describes, e.g. on
    a remote executor's worker. The project folder and model path must be readable there."""
    key = json.dumps(spec, sort_keys=True)
    if key not in _WORKERS:
        project = Project.open(spec["root"])
        project.runtime.configure(spec.get("device"), spec.get("dtype"))
        engine = checkpoint_engine(project, spec["checkpoint"], spec.get("modules")) if spec.get("checkpoint") else project.runtime.engine(spec.get("modules"))
        _WORKERS[key] = LocalWorker(project, engine)
    return _WORKERS[key]


def checkpoint_engine(project: Project, path: str | Path, modules: str | None) -> GradientEngine:
    """An engine over a training checkpoint of the project's model (TracIn), loaded like the
    project's model (local safetensors only) on the project's device and dtype. A checkpoint of an
    adapter project is an adapter folder, loaded on the project's base model."""
    from ..engine import select_modules
    from ..modeling import is_adapter_dir, load_model

    path = Path(path)
    own = project.adapter_path or project.model_path
    if path.resolve() == own.resolve():
        return project.runtime.engine(modules)
    rt = project.runtime
    model = load_model(project.model_path, rt.device, rt.dtype, path) if is_adapter_dir(path) else load_model(path, rt.device, rt.dtype)
    return GradientEngine(model, select_modules(model, modules or project.config.modules))


def worker_spec(project: Project, modules: str | None, checkpoint: str | None = None) -> dict[str, Any]:
    """A picklable description from which a remote worker can rebuild the local context
    (``checkpoint``: over that checkpoint's model instead of the project's)."""
    spec = {
        "root": str(project.root.resolve()),
        "model": str(project.model_path.resolve()),
        "adapter": str(project.adapter_path.resolve()) if project.adapter_path is not None else None,
        "device": project.config.device,
        "dtype": project.config.dtype,
        "modules": modules or project.config.modules,
    }
    return {**spec, "checkpoint": checkpoint} if checkpoint else spec
