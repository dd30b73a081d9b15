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
* Independent tasks (``Executor.run_tasks``: one LDS or leave-one-out retraining each) run as Ray
  tasks with ``num_cpus``/``num_gpus`` each, at most as many at once as there would be actors; each
  result comes back to the driver, which commits it as it arrives. The tasks open the project
  folder at the driver's path (a shared filesystem; ``ship_model`` does not apply to them).
  During a fit (``FitContext.run_tasks``: EK-FAC's eigendecompositions, one covariance each) the
  fit's actors hold the cluster's resources, so the tasks run on them instead, one at a time per
  actor, on the actor's own device (its GPU where it has one).

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
        if shipped is None:
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
        pad_id = job.local.pad_id if job.local is not None else 0
        handle = cls.remote(spec, int(max(1, self.settings["num_cpus"])), self._shipped, pad_id)
        self._actors[handle._actor_id.hex()] = {"handle": handle, "ready": False, "ping": handle.pid.remote(), "load": 0, "since": time.monotonic()}

    def _ensure_pool(self, job) -> None:
        ray = self._ray
        spec = dict(job.worker)
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

    # -- the map ------------------------------------------------------------------------------
    def map(self, job, shards, on_result, monitor):
        if not shards:
            return
        ray = self._connect(monitor)
        from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

        self._ensure_pool(job)
        pass_ref = ray.put(job.pass_)
        queue = deque(shards)
        attempts: Counter = Counter()
        reported: Counter = Counter()
        inflight: dict[Any, tuple[str, Any]] = {}
        start_failures: list[str] = []
        waiting_since = time.monotonic()

        def submit(actor_id: str, shard) -> None:
            a = self._actors[actor_id]
            tokens = job.local.corpus.many(shard.indices) if self._shipped is not None else None
            ref = a["handle"].run.remote([pass_ref], shard.index, shard.indices, tokens, job.batch_size, self._sink)
            inflight[ref] = (actor_id, shard)
            a["load"] += 1

        def lose(actor_id: str) -> None:
            a = self._actors.pop(actor_id, None)
            if a is not None:
                with contextlib.suppress(Exception):
                    ray.kill(a["handle"], no_restart=True)
                self._start_actor(self._spec, job)  # a replacement, wherever Ray finds room

        try:
            while queue or inflight:
                ready_ids = [i for i, a in self._actors.items() if a["ready"]]
                for actor_id in sorted(ready_ids, key=lambda i: self._actors[i]["load"]):
                    while queue and self._actors[actor_id]["load"] < IN_FLIGHT:
                        submit(actor_id, queue.popleft())
                pings = {a["ping"]: i for i, a in self._actors.items() if not a["ready"]}
                if not ready_ids and not inflight:
                    if len(start_failures) > self.settings["max_retries"]:
                        raise InflqError(f"Ray workers fail to start: {start_failures[-1]}; check the project folder is readable on the workers (docs/executors.md)")
                    if time.monotonic() - waiting_since > self.settings["start_timeout"]:
                        raise InflqError(
                            f"no Ray worker started in {self.settings['start_timeout']:.0f}s: the cluster lacks "
                            f"num_gpus={self.settings['num_gpus']}, num_cpus={self.settings['num_cpus']} per worker; see `ray status`"
                        )
                done, _ = ray.wait([*inflight, *pings], num_returns=1, timeout=0.1)
                for shard_index, n in ray.get(self._sink.take.remote()).items():
                    if any(s.index == shard_index for _, s in inflight.values()):
                        reported[shard_index] += n
                        monitor.advance(n)
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
                                self._start_actor(self._spec, job)
                        continue
                    actor_id, shard = inflight.pop(ref)
                    try:
                        out = ray.get(ref)
                    except RayActorError:
                        attempts[shard.index] += 1
                        if attempts[shard.index] > self.settings["max_retries"]:
                            raise InflqError(f"shard {shard.index} lost its Ray worker {attempts[shard.index]} times; check the cluster (`ray status`) and resume") from None
                        monitor.advance(-reported.pop(shard.index, 0))
                        if actor_id in self._actors:
                            monitor.warn(f"a Ray worker was lost; its shards are retried on other workers (shard {shard.index}, attempt {attempts[shard.index] + 1})")
                        self.lost_workers += actor_id in self._actors
                        lose(actor_id)
                        queue.appendleft(shard)
                        continue
                    except RayTaskError as exc:
                        _raise_cause(exc)
                    except GetTimeoutError:  # pragma: no cover - ready refs do not time out
                        continue
                    if actor_id in self._actors:
                        self._actors[actor_id]["load"] -= 1
                    # Own the memory: a tensor read from the object store may alias a buffer that
                    # Ray reuses once the reference is gone.
                    out = {k: v.clone() for k, v in out.items()}
                    del ref
                    on_result(shard, out)
                    monitor.advance(len(shard) - reported.pop(shard.index, 0))
                    waiting_since = time.monotonic()
        except BaseException:
            # Cancelled, an error or Ctrl-C twice: stop the work in flight now (it is not committed).
            self._kill_all()
            raise

    # -- independent tasks --------------------------------------------------------------------
    def run_tasks(self, fn, tasks, on_result, monitor):
        tasks = iter(tasks)
        first = [next(tasks, _NONE)]
        if first[0] is _NONE:  # nothing to run: no cluster to connect to
            return
        tasks = _taken_once(first, tasks)
        ray = self._connect(monitor)
        if self._actors:  # a fit's actors hold the cluster's resources: the tasks run on them
            self._tasks_on_actors(ray, fn, tasks, on_result, monitor)
            return
        from ray.exceptions import RayTaskError, WorkerCrashedError

        remote = ray.remote(num_cpus=self.settings["num_cpus"], num_gpus=self.settings["num_gpus"], max_retries=self.settings["max_retries"])(_run_task)
        width = self._worker_count()
        fn_ref = ray.put(fn)
        queue = iter(enumerate(tasks))  # taken one at a time, as each is sent
        inflight: dict[Any, int] = {}
        try:
            while True:
                while len(inflight) < width and (item := next(queue, None)) is not None:
                    i, task = item
                    inflight[remote.remote(fn_ref, task, int(max(1, self.settings["num_cpus"])), self.settings["num_gpus"] > 0)] = i
                    del item, task
                if not inflight:
                    break
                done, _ = ray.wait(list(inflight), num_returns=1, timeout=0.1)
                monitor.check()
                for ref in done:
                    i = inflight.pop(ref)
                    try:
                        out = _owned(ray.get(ref))
                    except RayTaskError as exc:
                        _raise_cause(exc)
                    except WorkerCrashedError:
                        raise InflqError(f"task {i} lost its Ray worker {self.settings['max_retries'] + 1} times; check the cluster (`ray status`) and resume") from None
                    del ref
                    on_result(i, out)
        except BaseException:
            # Cancelled, an error or Ctrl-C: stop the tasks in flight now (their results are lost).
            for ref in inflight:
                with contextlib.suppress(Exception):
                    ray.cancel(ref, force=True)
            raise

    def _tasks_on_actors(self, ray, fn, tasks, on_result, monitor) -> None:
        """``run_tasks`` on the actors a fit started (each task asks for no resources of its own):
        one task in flight per actor, each task's data in the object store only while it is in
        flight; a task whose actor is lost runs again on another (a replacement is started), up to
        ``max_retries`` times; cancelling kills the actors, as for a pass."""
        from ray.exceptions import RayActorError, RayTaskError

        fn_ref = ray.put(fn)
        queue = iter(enumerate(tasks))
        retry: deque = deque()
        attempts: Counter = Counter()
        inflight: dict[Any, tuple[str, int, Any]] = {}  # result ref: (actor, task number, task ref)
        exhausted = False
        try:
            while True:
                for actor_id, a in list(self._actors.items()):
                    if not a["ready"] or a["load"]:
                        continue
                    if retry:
                        i, task_ref = retry.popleft()
                    elif not exhausted and (item := next(queue, None)) is not None:
                        i, task_ref = item[0], ray.put(item[1])  # the task's data leaves the driver here
                        del item
                    else:
                        exhausted = True
                        break
                    inflight[a["handle"].call.remote(fn_ref, task_ref)] = (actor_id, i, task_ref)
                    a["load"] += 1
                if not inflight and exhausted and not retry:
                    break
                pings = {a["ping"]: i for i, a in self._actors.items() if not a["ready"]}
                if not inflight and not pings:
                    raise InflqError("no Ray worker is left to run the tasks; check the cluster (`ray status`) and resume")
                done, _ = ray.wait([*inflight, *pings], num_returns=1, timeout=0.1)
                monitor.check()
                for ref in done:
                    if ref in pings:
                        try:
                            ray.get(ref)
                            self._actors[pings[ref]]["ready"] = True
                        except (RayActorError, RayTaskError) as exc:
                            self._actors.pop(pings[ref], None)
                            raise InflqError(f"a Ray worker failed to start: {_first_line(exc)}") from None
                        continue
                    actor_id, i, task_ref = inflight.pop(ref)
                    try:
                        out = _owned(ray.get(ref))
                    except RayActorError:
                        attempts[i] += 1
                        if attempts[i] > self.settings["max_retries"]:
                            raise InflqError(f"task {i} lost its Ray worker {attempts[i]} times; check the cluster (`ray status`) and resume") from None
                        monitor.warn(f"a Ray worker was lost; its task runs again on another worker (task {i}, attempt {attempts[i] + 1})")
                        lost = self._actors.pop(actor_id, None)
                        if lost is not None:
                            self.lost_workers += 1
                            with contextlib.suppress(Exception):
                                ray.kill(lost["handle"], no_restart=True)
                            self._start_actor(self._spec, self._job)  # a replacement, wherever Ray finds room
                        retry.append((i, task_ref))
                        continue
                    except RayTaskError as exc:
                        _raise_cause(exc)
                    if actor_id in self._actors:
                        self._actors[actor_id]["load"] -= 1
                    del ref, task_ref
                    on_result(i, out)
        except BaseException:
            # Cancelled, an error or Ctrl-C twice: stop the tasks in flight now (their results are lost).
            self._kill_all()
            raise

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


def _run_task(fn, task, threads: int, gpus: bool = False):
    """A Ray task: ``fn(task, monitor)`` with torch on ``threads`` threads and a monitor of its own
    (the driver cancels by cancelling the task); without ``gpus``, none visible."""
    if not gpus:
        _hide_gpus()
    import torch

    from inflq import Monitor, quiet_transformers

    quiet_transformers()
    torch.set_num_threads(max(1, threads))
    return fn(task, Monitor())


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
