"""The Ray executor: shards of a pass run on a Ray cluster's actors; the driver (this process) keeps
the catalog and the artifacts.

* Each actor holds one worker context (model, gradient engine, token store), built once per actor
  by :func:`inflq.runs.build_worker` from the project folder, which the workers must be able to read
  at the same path (a shared filesystem). With ``ship_model=true`` the model folder travels through
  the object store instead and each shard's tokens travel with its task: no shared filesystem.
* Shards are dispatched to actors (two in flight per actor); results come back to the driver,
  which commits scoring shards and reduces fitting sums in shard order, exactly as the local
  executor does, so both give the same numbers.
* ``memory=GB`` reserves that much of Ray's ``memory`` resource per actor and bounds what a
  fitting pass sums there: where the factors' sums exceed half of it (the rest holds the model and
  a batch), estimators fit by module (:meth:`inflq.FitContext.groups`): one pass per group of
  modules, so neither a worker nor the driver ever holds every module's sums.
* Progress streams back per batch through a small progress actor.
* Cancelling (Ctrl-C) kills the actors, so work in flight stops at once; committed shards stay.
* A lost actor (process or node death) is replaced and its shards are retried on live actors, up
  to ``max_retries`` times per shard.
* Independent tasks (``Executor.run_tasks``: one LDS or leave-one-out retraining each) run on
  actors too, one at a time per actor: during a fit (``FitContext.run_tasks``: EK-FAC's
  eigendecompositions, one covariance each) on the fit's actors, which hold the cluster's
  resources, each on its own device (its GPU where it has one); otherwise on actors started for
  the tasks, with ``num_cpus``/``num_gpus`` each. Each result comes back to the driver, which
  commits it as it arrives. Retraining tasks open the project folder at the driver's path (a
  shared filesystem; ``ship_model`` does not apply to them).
* Shards and tasks go through one loop (:meth:`RayExecutor._schedule`): readiness pings, lost
  actors replaced and their work retried, cancellation.

Security: a Ray cluster runs whatever code a connected client sends. Keep Ray's token
authentication on (the default for clusters that ``ray.init`` starts, Ray >= 2.59) and give inflq
the cluster's token through ``RAY_AUTH_TOKEN`` or ``RAY_AUTH_TOKEN_PATH`` (with ``RAY_AUTH_MODE=token``).
See docs/executors.md.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections import Counter, deque
from pathlib import Path
from typing import Any

from inflq import Executor, InflqError, Option, hookimpl

INSTALL = 'the ray executor needs Ray: pip install "inflq[ray]" (on this machine and on every cluster node)'
IN_FLIGHT = 2  # shards queued per actor, so that an actor never waits for the driver
_NONE = object()


@hookimpl
def register_executors(register):
    register(RayExecutor)


def _import_ray():
    try:
        import ray
    except ImportError:
        raise InflqError(INSTALL) from None
    return ray


class _ProgressSink:
    """Collects per-batch counts from actors; the driver takes them every tenth of a second."""

    def __init__(self) -> None:
        self.counts: Counter = Counter()

    def add(self, shard: int, n: int) -> None:
        self.counts[shard] += n

    def take(self) -> dict[int, int]:
        out, self.counts = dict(self.counts), Counter()
        return out


class _RemoteMonitor:
    """What ``run_shard`` needs of a Monitor, on an actor: ``advance`` reports to the driver."""

    def __init__(self, sink, shard: int) -> None:
        self.sink, self.shard = sink, shard

    def advance(self, n: int = 1, message: str = "") -> None:
        if self.sink is not None:
            self.sink.add.remote(self.shard, int(n))


class ShardWorker:
    """A Ray actor: one worker context, loaded once, running passes over shards."""

    def __init__(self, spec: dict[str, Any], threads: int, shipped: dict[str, bytes] | None = None, pad_id: int = 0) -> None:
        if spec.get("device") == "cpu":
            _hide_gpus()
        import torch

        from inflq import quiet_transformers

        quiet_transformers()
        torch.set_num_threads(max(1, threads))
        self._pass_key: str | None = None
        self._pass = None
        if spec.get("model") is None:  # an actor for independent tasks only (run_tasks outside a pass)
            self.engine, self.pad_id, self.sequences = None, pad_id, None
        elif shipped is None:
            from inflq import build_worker

            worker = build_worker(spec)
            self.engine, self.pad_id, self.sequences = worker.engine, worker.pad_id, worker.corpus.many
        else:
            from inflq import GradientEngine, load_model, pick_device, pick_dtype, select_modules

            folder = Path(tempfile.mkdtemp(prefix="inflq-model-"))
            (folder / "adapter").mkdir()
            for name, data in shipped.items():  # "adapter/NAME": the LoRA adapter's files
                (folder / name).write_bytes(data)
            device = pick_device(spec.get("device"))
            adapter = folder / "adapter" if spec.get("adapter") else None
            model = load_model(folder, device, pick_dtype(spec.get("dtype"), device, folder), adapter)
            self.engine = GradientEngine(model, select_modules(model, spec.get("modules")))
            self.pad_id, self.sequences = pad_id, None

    def pid(self) -> int:
        return os.getpid()

    def call(self, fn, task):
        """One of :meth:`RayExecutor.run_tasks`' tasks on this actor (its device, threads and
        memory reservation): ``fn(task, monitor)`` with a monitor of its own."""
        from inflq import Monitor

        return fn(task, Monitor())

    def run(self, pass_holder: list, shard_index: int, indices, tokens, batch_size: int, sink) -> dict:
        import ray

        from inflq import Shard, run_shard

        ref = pass_holder[0]  # a reference inside a list: fetched only when the pass changes
        if ref.hex() != self._pass_key:
            self._pass, self._pass_key = ray.get(ref), ref.hex()
        if tokens is not None:
            by_index = dict(zip(map(int, indices), tokens))

            def sequences(idx):
                return [by_index[int(i)] for i in idx]
        else:
            sequences = self.sequences
        return run_shard(self.engine, sequences, self._pass, Shard(shard_index, indices), self.pad_id, batch_size, _RemoteMonitor(sink, shard_index))


class RayExecutor(Executor):
    name = "ray"
    description = "run shards on a Ray cluster's actors (GPUs or CPUs); pip install 'inflq[ray]'"
    remote_tasks = True
    options = (
        Option("address", str, None, "unset: $RAY_ADDRESS or a private local cluster; local: a private local cluster; auto: the cluster `ray start` began on this machine; HOST:PORT: a remote cluster's GCS"),
        Option("num_workers", int, None, "actors to start (default: as many as the cluster's resources allow)"),
        Option("num_gpus", float, 0.0, "GPUs per actor (1 for one model per GPU)"),
        Option("num_cpus", float, 1.0, "CPUs per actor"),
        Option("memory", float, None, "GB of memory per actor (Ray's memory resource); factors whose sums exceed half of it are fitted by module, a group of modules per pass"),
        Option("ship_model", bool, False, "send the model folder through the object store and tokens with each shard (no shared filesystem)"),
        Option("max_retries", int, 3, "times a shard is retried after its worker is lost"),
        Option("start_timeout", float, 600.0, "seconds to wait for a first worker (e.g. while the cluster scales up)"),
    )

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self._ray = None
        self._owns_ray = False
        self._actors: dict[str, dict] = {}
        self._spec_key: str | None = None
        self._sink = None
        self._shipped = None
        self.lost_workers = 0

    # -- cluster ------------------------------------------------------------------------------
    def _connect(self, monitor):
        ray = _import_ray()
        self._ray = ray
        if not ray.is_initialized():
            address = self.settings["address"]
            if address is None:
                address = os.environ.get("RAY_ADDRESS") or "local"
            kwargs: dict[str, Any] = {"logging_level": "WARNING", "log_to_driver": False}
            if address == "local":
                # A private cluster for this run. Ray (>= 2.59) turns token authentication on here
                # by default; inflq never turns it off.
                kwargs.update(include_dashboard=False, _node_ip_address="127.0.0.1")
                total = self.settings["num_workers"]
                if total:
                    kwargs["num_cpus"] = int(max(1, total * self.settings["num_cpus"]))
            try:
                ray.init(address=address, **kwargs)
            except Exception as exc:
                raise InflqError(
                    f"cannot connect to the Ray cluster at {address} ({_first_line(exc)}); if it uses token "
                    "authentication give inflq its token: export RAY_AUTH_MODE=token RAY_AUTH_TOKEN=... "
                    "(or RAY_AUTH_TOKEN_PATH=FILE); see docs/executors.md"
                ) from None
            self._owns_ray = True
        try:
            from ray._private.authentication.authentication_utils import is_token_auth_enabled

            if not is_token_auth_enabled():
                monitor.warn(
                    "this Ray cluster has token authentication off: anyone who can reach its ports can run code on it; "
                    "start it with RAY_AUTH_MODE=token (docs/executors.md)"
                )
        except ImportError:  # a Ray without token authentication (< 2.52)
            monitor.warn("this Ray has no token authentication; upgrade Ray (>= 2.52) or keep the cluster on a private network")
        return ray

    def _worker_count(self) -> int:
        if self.settings["num_workers"]:
            return max(1, int(self.settings["num_workers"]))
        res = self._ray.cluster_resources()
        if self.settings["num_gpus"] > 0:
            count = int(res.get("GPU", 0) // self.settings["num_gpus"])
        else:
            count = int(res.get("CPU", 1) // max(self.settings["num_cpus"], 1e-9))
        if self.settings["memory"]:
            count = min(count, int(res.get("memory", 0) // int(self.settings["memory"] * 2**30)))
        return max(1, count)

    def _start_actor(self, spec: dict, job) -> None:
        ray = self._ray
        resources: dict[str, Any] = {"num_cpus": self.settings["num_cpus"], "num_gpus": self.settings["num_gpus"]}
        if self.settings["memory"] is not None:
            resources["memory"] = int(self.settings["memory"] * 2**30)
        cls = ray.remote(**resources)(ShardWorker)
        pad_id = job.local.pad_id if job is not None and job.local is not None else 0
        handle = cls.remote(spec, int(max(1, self.settings["num_cpus"])), self._shipped, pad_id)
        self._actors[handle._actor_id.hex()] = {"handle": handle, "ready": False, "ping": handle.pid.remote(), "load": 0, "since": time.monotonic()}

    def _ensure_pool(self, job) -> None:
        """Actors for ``job`` (its worker context loaded once each), or, with no job, bare actors
        for independent tasks; the pool is kept while the job's worker spec stays the same."""
        ray = self._ray
        spec = dict(job.worker) if job is not None else {"model": None}
        # Ray gives an actor its own GPUs as cuda:0..; an actor without GPUs stays on the CPU.
        spec["device"] = "cuda" if self.settings["num_gpus"] > 0 else "cpu"
        key = repr(sorted(spec.items()))
        if key != self._spec_key:
            self._kill_all()
            self._spec_key = key
            if self.settings["ship_model"] and self._shipped is None:
                folder = Path(spec["model"])
                files = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
                if spec.get("adapter"):
                    files.update({f"adapter/{p.name}": p.read_bytes() for p in Path(spec["adapter"]).iterdir() if p.is_file()})
                self._shipped = ray.put(files)
        self._spec, self._job = spec, job
        if self._sink is None:
            self._sink = ray.remote(num_cpus=0)(_ProgressSink).remote()
        for _ in range(self._worker_count() - len(self._actors)):
            self._start_actor(spec, job)

    def _kill_all(self) -> None:
        for a in self._actors.values():
            with contextlib.suppress(Exception):
                self._ray.kill(a["handle"], no_restart=True)
        self._actors.clear()

    def fit_memory(self) -> int | None:
        gb = self.settings["memory"]
        if gb is None:
            return None
        if gb <= 0:
            raise InflqError("ray:memory must be a positive number of GB per worker")
        return int(gb * 2**30) // 2  # the other half: the model and a batch

    # -- the one loop over the actors --------------------------------------------------------------
    def _replace(self, actor_id: str) -> None:
        """Kill a lost actor (if it still answers) and start another, wherever Ray finds room."""
        a = self._actors.pop(actor_id, None)
        if a is not None:
            with contextlib.suppress(Exception):
                self._ray.kill(a["handle"], no_restart=True)
            self._start_actor(self._spec, self._job)

    def _schedule(self, work: _Work, monitor) -> None:
        """Run ``work`` on the pool's actors: each ready actor (least loaded first) gets items up to
        ``work.depth`` in flight; actors are ready once they answer a ping, and one that fails to
        start is replaced up to ``max_retries`` times; an item whose actor is lost runs again on
        another (a replacement is started), up to ``max_retries`` times; results reach the driver
        as they finish. Cancelling (or any error) kills the actors: work in flight stops at once."""
        ray = self._ray
        from ray.exceptions import RayActorError, RayTaskError

        inflight: dict[Any, tuple[str, Any]] = {}  # result ref: (actor, item)
        start_failures: list[str] = []
        waiting_since = time.monotonic()
        try:
            while True:
                ready = sorted((i for i, a in self._actors.items() if a["ready"]), key=lambda i: self._actors[i]["load"])
                for actor_id in ready:
                    a = self._actors[actor_id]
                    while a["load"] < work.depth and (item := work.take()) is not None:
                        inflight[work.send(a["handle"], item)] = (actor_id, item)
                        a["load"] += 1
                        del item
                if not inflight and work.finished():
                    return
                pings = {a["ping"]: i for i, a in self._actors.items() if not a["ready"]}
                if not ready and not inflight:
                    if not self._actors or len(start_failures) > self.settings["max_retries"]:
                        why = start_failures[-1] if start_failures else "every worker was lost"
                        raise InflqError(f"Ray workers fail to start: {why}; check the project folder is readable on the workers (docs/executors.md)")
                    if time.monotonic() - waiting_since > self.settings["start_timeout"]:
                        raise InflqError(
                            f"no Ray worker started in {self.settings['start_timeout']:.0f}s: the cluster lacks "
                            f"num_gpus={self.settings['num_gpus']}, num_cpus={self.settings['num_cpus']} per worker; see `ray status`"
                        )
                done, _ = ray.wait([*inflight, *pings], num_returns=1, timeout=0.1)
                work.poll([item for _, item in inflight.values()])
                monitor.check()
                for ref in done:
                    if ref in pings:
                        actor_id = pings[ref]
                        try:
                            ray.get(ref)
                            self._actors[actor_id]["ready"] = True
                        except (RayActorError, RayTaskError) as exc:
                            start_failures.append(_first_line(exc))
                            self._actors.pop(actor_id, None)
                            if len(start_failures) <= self.settings["max_retries"]:
                                self._start_actor(self._spec, self._job)
                        continue
                    actor_id, item = inflight.pop(ref)
                    try:
                        out = _owned(ray.get(ref))
                    except RayActorError:
                        attempt = work.retry(item, self.settings["max_retries"])
                        if actor_id in self._actors:  # the first of its items to report the loss
                            monitor.warn(f"a Ray worker was lost; {work.describe(item)} runs again on another worker (attempt {attempt + 1})")
                            self.lost_workers += 1
                            self._replace(actor_id)
                        continue
                    except RayTaskError as exc:
                        _raise_cause(exc)
                    if actor_id in self._actors:
                        self._actors[actor_id]["load"] -= 1
                    del ref
                    work.finish(item, out)
                    del item, out
                    waiting_since = time.monotonic()
        except BaseException:
            # Cancelled, an error or Ctrl-C twice: stop the work in flight now (it is not committed).
            self._kill_all()
            raise

    # -- the map ------------------------------------------------------------------------------
    def map(self, job, shards, on_result, monitor):
        if not shards:
            return
        ray = self._connect(monitor)
        self._ensure_pool(job)
        self._schedule(_Shards(shards, job, ray.put(job.pass_), self, on_result, monitor), monitor)

    # -- independent tasks --------------------------------------------------------------------
    def run_tasks(self, fn, tasks, on_result, monitor):
        """On the pool's actors: a fit's (which hold the cluster's resources; EK-FAC's
        eigendecompositions run there, on each actor's device), or else actors started for the
        tasks alone, with ``num_cpus``/``num_gpus`` each (LDS retrainings). One task in flight per
        actor, each task's data in the object store only while it is in flight."""
        tasks = iter(tasks)
        first = [next(tasks, _NONE)]
        if first[0] is _NONE:  # nothing to run: no cluster to connect to
            return
        ray = self._connect(monitor)
        if not self._actors:
            self._ensure_pool(None)
        self._schedule(_Tasks(_taken_once(first, tasks), ray.put(fn), ray, on_result), monitor)

    def close(self) -> None:
        if self._ray is None:
            return
        self._kill_all()
        if self._sink is not None:
            with contextlib.suppress(Exception):
                self._ray.kill(self._sink)
            self._sink = None
        if self._owns_ray:
            self._ray.shutdown()
            self._owns_ray = False
        self._spec_key = None
        self._shipped = None


class _Work:
    """What :meth:`RayExecutor._schedule` runs: items taken one at a time (a lost item first, again),
    each sent to an actor, its result handed back in the driver."""

    depth = 1  # items in flight per actor

    def __init__(self, items) -> None:
        self._items = items
        self._again: deque = deque()
        self._exhausted = False
        self.attempts: Counter = Counter()

    def take(self):
        if self._again:
            return self._again.popleft()
        if not self._exhausted:
            item = next(self._items, None)
            if item is not None:
                return self.prepare(item)
            self._exhausted = True
        return None

    def finished(self) -> bool:
        return self._exhausted and not self._again

    def retry(self, item, max_retries: int) -> int:
        """Put an item whose actor was lost back, first in line; returns how often it was lost."""
        self.attempts[self.key(item)] += 1
        n = self.attempts[self.key(item)]
        if n > max_retries:
            raise InflqError(f"{self.describe(item)} lost its Ray worker {n} times; check the cluster (`ray status`) and resume")
        self._again.appendleft(item)
        return n

    def prepare(self, item):
        return item

    def poll(self, inflight: list) -> None:
        pass

    def key(self, item):
        raise NotImplementedError

    def describe(self, item) -> str:
        raise NotImplementedError

    def send(self, handle, item):
        raise NotImplementedError

    def finish(self, item, out) -> None:
        raise NotImplementedError


class _Shards(_Work):
    """A pass's shards, two in flight per actor (so that an actor never waits for the driver), with
    the actors' per-batch progress reported as it comes."""

    depth = IN_FLIGHT

    def __init__(self, shards, job, pass_ref, executor: RayExecutor, on_result, monitor) -> None:
        super().__init__(iter(shards))
        self.job, self.pass_ref, self.executor, self.on_result, self.monitor = job, pass_ref, executor, on_result, monitor
        self.reported: Counter = Counter()  # batches' sequences already shown, per shard in flight

    def key(self, shard):
        return shard.index

    def describe(self, shard) -> str:
        return f"shard {shard.index}"

    def send(self, handle, shard):
        ex = self.executor
        tokens = self.job.local.corpus.many(shard.indices) if ex._shipped is not None else None
        return handle.run.remote([self.pass_ref], shard.index, shard.indices, tokens, self.job.batch_size, ex._sink)

    def poll(self, inflight: list) -> None:
        running = {s.index for s in inflight}
        for shard_index, n in self.executor._ray.get(self.executor._sink.take.remote()).items():
            if shard_index in running:
                self.reported[shard_index] += n
                self.monitor.advance(n)

    def retry(self, shard, max_retries: int) -> int:
        n = super().retry(shard, max_retries)
        self.monitor.advance(-self.reported.pop(shard.index, 0))  # its batches run again
        return n

    def finish(self, shard, out) -> None:
        self.on_result(shard, out)
        self.monitor.advance(len(shard) - self.reported.pop(shard.index, 0))


class _Tasks(_Work):
    """Independent tasks ``(number, task)``, one in flight per actor; a task's data goes into the
    object store when it is sent, and leaves it with its result."""

    def __init__(self, tasks, fn_ref, ray, on_result) -> None:
        super().__init__(enumerate(tasks))
        self.fn_ref, self.ray, self.on_result = fn_ref, ray, on_result

    def prepare(self, item):
        i, task = item
        return i, self.ray.put(task)  # the task's data leaves the driver here

    def key(self, item):
        return item[0]

    def describe(self, item) -> str:
        return f"task {item[0]}"

    def send(self, handle, item):
        return handle.call.remote(self.fn_ref, item[1])

    def finish(self, item, out) -> None:
        self.on_result(item[0], out)


def _hide_gpus() -> None:
    """Make this worker see no GPU: it was given none (``num_gpus=0``), and Ray (2.60 at least)
    leaves every GPU of the node visible then, so that code picking CUDA where it is available (a
    fit's eigendecompositions) would use a GPU reserved for someone else. Before CUDA starts in this
    process, where it has not already."""
    import sys

    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_initialized():
        os.environ["CUDA_VISIBLE_DEVICES"] = ""


def _taken_once(first: list, rest):
    """``first``'s one item, then ``rest``'s: the item leaves ``first`` as it is taken, so that
    nothing here keeps a task's data once it is sent."""
    yield first.pop()
    yield from rest


def _owned(out):
    """A task's result with its tensors copied out of the object store: a tensor read from it may
    alias a buffer that Ray reuses once the reference is gone."""
    import torch

    if isinstance(out, torch.Tensor):
        return out.clone()
    if type(out) in (tuple, list):
        return type(out)(_owned(v) for v in out)
    if type(out) is dict:
        return {k: _owned(v) for k, v in out.items()}
    return out


def _raise_cause(exc: BaseException):
    """Re-raise the exception a Ray task raised (an ``InflqError`` as a one-line one)."""
    cause = exc.cause if isinstance(getattr(exc, "cause", None), Exception) else exc
    if isinstance(cause, InflqError):
        raise InflqError(str(cause)) from None
    raise cause from None


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    # Ray wraps a worker's exception in its traceback; its last line names the cause.
    errors = [line for line in lines if "Error:" in line or "Exception:" in line]
    return (errors[-1] if errors else lines[-1] if lines else type(exc).__name__)[:300]
