"""The built-in local executor: shards run one after another in this process, on the project's
device (cpu, cuda or mps). A batch that does not fit is halved and retried."""

from __future__ import annotations

from inflq import Executor, hookimpl


@hookimpl
def register_executors(register):
    register(LocalExecutor)


class LocalExecutor(Executor):
    name = "local"
    default = True
    description = "run in this process on the project's device (cpu, cuda, mps)"

    def map(self, job, shards, on_result, monitor):
        if job.local is None:
            raise RuntimeError("the local executor needs the driver's worker context")
        for shard in shards:
            # One shard after another, in order: a sum pass adds straight into the driver's sums.
            out = job.local.run(job.pass_, shard, job.batch_size, monitor, into=job.sums)
            on_result(shard, out)
