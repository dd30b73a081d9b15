"""The gradient index as users get it (issue 16): ``inflq index build/list/rm``, the estimator
``--estimator index`` and the candidate filter ``--filter index:k=N``, on the numeric core
:mod:`inflq.index` (docs/gradient-index.md).

* ``inflq index build PROJECT``: fits the projections and the projected EK-FAC (or K-FAC) through
  the one run recipe (``inflq.runs.prepare_estimator``: the fit runs on the chosen executor and is cached
  as a factor set named ``index-fit``), then writes every corpus sequence's row, shard by shard,
  under ``artifacts/index/index-<key>/`` (the key a content hash: building again resumes). Its
  catalog row lives in this plugin's own table (``gradient_indexes``, migration set
  ``inflq_index``).
* ``--estimator index``: scores come from the stored rows (``Estimator.score_candidates``); the
  queries are also preconditioned with the *projected* model and lifted back to the full space,
  ``P_Sᵀ (G' + λI)⁻¹ q' P_A`` per module, so that the top rows' layer scores and the token and
  layer attribution of any chosen sequence are the same estimator's (they sum to the index's
  score up to its float16 storage).
* ``--filter index:k=N``: each query's top-N rows of the index, for an exact estimator to re-score.
"""

from __future__ import annotations

import json
import shutil
import time
from typing import TYPE_CHECKING

import click
import sqlite_utils
from sqlite_utils.migrations import Migrations

from inflq import Estimator, Filter, InflqError, Option, hookimpl

if TYPE_CHECKING:
    import numpy as np

INDEX_FOLDER = "index"  # under the project's artifacts: project.plugin_folder(INDEX_FOLDER)
METRICS = ("inner", "cosine")


@hookimpl
def register_estimators(register):
    register(IndexEstimator)


@hookimpl
def register_filters(register):
    register(IndexFilter)


@hookimpl
def check_artifacts(project):
    """`inflq check`: every recorded index's files present and its shards' checksums right."""
    out = []
    for r in recorded_indexes(project):
        store = _store(project, r)
        fix = f"remove it (`inflq index rm {project.root} {r['key']}`) and build it again (`inflq index build`)"
        if not (store.path / "manifest.json").exists():
            out.append(f"gradient index {r['key']} ({r['path']}) is missing; {fix}")
            continue
        bad = store.verify()
        if bad:
            out.append(f"gradient index {r['key']}: shard(s) {', '.join(map(str, bad))} fail their checksums; {fix}")
    return out


# -- the plugin's own catalog table -----------------------------------------------------------------

MIGRATION_SET = "inflq_index"
migrations = Migrations(MIGRATION_SET)


@migrations(name="0001_gradient_indexes")
def m0001_gradient_indexes(db: sqlite_utils.Database) -> None:
    db["gradient_indexes"].create(
        {
            "key": str, "path": str, "kind": str, "estimator": str, "settings": str, "modules": str, "width": int,
            "num_rows": int, "factor_set_id": int, "model_fingerprint": str, "corpus_fingerprint": str,
            "status": str, "created_at": str, "seconds": float,
        },
        pk="key", if_not_exists=True,
    )


def open_tables(project) -> None:
    """Apply this plugin's migrations to the project's catalog (idempotent; run before writing)."""
    if migrations.pending(project.db):
        migrations.apply(project.db)


def recorded_indexes(project) -> list[dict]:
    """The catalog's index rows, newest first (none in a catalog this plugin never wrote to)."""
    db = project.db
    if not db["gradient_indexes"].exists():
        return []
    return list(db["gradient_indexes"].rows_where(order_by="created_at desc, rowid desc"))


def _record(project, row: dict) -> None:
    open_tables(project)
    with project.db.atomic():
        project.db["gradient_indexes"].upsert(row, pk="key")


def _store(project, row: dict):
    from inflq._builtins_api import index

    return index.IndexStore(project.path(row["path"]))


def find_index(project, key: str | None = None):
    """``(row, store)`` of the index ``key`` (a key or its first characters), else of the newest
    complete one, checked against the project's model and corpus."""
    rows = recorded_indexes(project)
    if key:
        rows = [r for r in rows if r["key"].startswith(str(key))]
        if not rows:
            raise InflqError(f"no gradient index {key!r} in this project; see `inflq index list {project.root}`")
        if len(rows) > 1:
            raise InflqError(f"{key!r} names {len(rows)} indexes; give more of the key (see `inflq index list`)")
    else:
        rows = [r for r in rows if r["status"] == "complete"]
        if not rows:
            raise InflqError(f"this project has no complete gradient index; build one with `inflq index build {project.root}`")
    row = rows[0]
    store = _store(project, row)
    if not (store.path / "manifest.json").exists():
        raise InflqError(f"the files of index {row['key']} are missing ({row['path']}); rebuild it with `inflq index build`")
    if not store.complete:
        raise InflqError(f"index {row['key']} is incomplete; resume it with `inflq index build {project.root}` and the same options")
    if row["model_fingerprint"] != project.model_fingerprint:
        raise InflqError(f"index {row['key']} was built with another model; build one for this model with `inflq index build`")
    if row["corpus_fingerprint"] != project.runtime.corpus.key:
        raise InflqError(f"index {row['key']} was built over another corpus; rebuild it with `inflq index build`")
    return row, store


def _query_rows(project, model, engine, queries: list[dict]):
    from inflq._builtins_api import index

    toks = [project.runtime.tokenize_query(q["prompt"], q["completion"], bool(q.get("chat"))) for q in queries]
    return index.query_rows(model, engine, [t.tokens for t in toks], [t.completion_start for t in toks], project.runtime.pad_id)


# -- building ---------------------------------------------------------------------------------------


class IndexFit(Estimator):
    """The index's projections and projected preconditioner as a factor set: fitted through the
    run recipe (executor, committed fitting shards, factor cache) like any estimator's factors.
    Not registered: ``inflq index build`` uses it."""

    name = "index-fit"
    description = "the gradient index's projections and projected EK-FAC (inflq index build)"
    fits_factors = True

    def __init__(self, index_settings) -> None:
        super().__init__()
        self.index_settings = index_settings
        self.model = None
        self.fit_indices = None
        self._tensors = None

    def factor_settings(self):
        return self.index_settings.factor_settings()

    def fit(self, ctx):
        from inflq._builtins_api import index

        self.model = index.fit_index(ctx, self.index_settings)
        return self.model.tensors()

    def load_factors(self, tensors):
        self._tensors = tensors

    def prepare(self, ctx):
        from inflq._builtins_api import index

        self.fit_indices = ctx.indices
        if self.model is None:
            self.model = index.IndexModel(self._tensors, self.index_settings, ctx.engine.names)


def build(project, index_settings, run, monitor, shard_size: int = 4096):
    """Fit (or reuse) the index's preconditioner and write every corpus sequence's row, resuming an
    interrupted build of the same key. ``run``: an ``inflq.runs.RunSettings`` (modules, executor, fitting
    sequences, seed, batching). Returns ``(catalog row, store)``."""
    import numpy as np

    from inflq import Job, LocalWorker, get_registry
    from inflq._builtins_api import index, make_executor, prepare_estimator, worker_spec

    project.require_model()
    run.resolve_defaults(get_registry())
    engine = project.runtime.engine(run.modules)
    executor = make_executor(run.executor)
    started = time.perf_counter()
    try:
        fit = IndexFit(index_settings)
        prepared = prepare_estimator(project, run, monitor, estimator=fit, engine=engine, executor=executor)
        corpus = project.runtime.corpus
        indices = np.arange(len(corpus), dtype=np.int64)
        dtype = str(next(engine.model.parameters()).dtype)
        source = index.key_source(index_settings, engine.names, project.model_fingerprint, corpus.key, fit.fit_indices, indices, run.seed, dtype)
        key = index.index_key(source)
        row = {
            "key": key, "path": f"{project.plugin_folder(INDEX_FOLDER)}/index-{key}", "kind": index_settings.kind, "estimator": index_settings.estimator,
            "settings": index_settings.to_json(), "modules": json.dumps(engine.names), "width": fit.model.width, "num_rows": len(indices),
            "factor_set_id": prepared.factor_set_id, "model_fingerprint": project.model_fingerprint, "corpus_fingerprint": corpus.key,
            "status": "building", "created_at": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()), "seconds": None,
        }
        old = next((r for r in recorded_indexes(project) if r["key"] == key), None)
        if old is not None:
            row["created_at"] = old["created_at"]
        _record(project, row)
        local = LocalWorker(project, engine)

        def map_shards(pass_, shards, on_result, mon):
            executor.map(Job(pass_, worker_spec(project, run.modules), run.batching(), local=local), shards, on_result, mon)

        store = index.build_index(project.path(project.plugin_folder(INDEX_FOLDER)), key, fit.model, indices, map_shards, monitor, shard_size=shard_size, source=source)
    finally:
        executor.close()
    row.update(status="complete", seconds=time.perf_counter() - started)
    _record(project, row)
    return row, store


def remove(project, key: str) -> dict:
    """Delete an index's catalog row, then its files."""
    rows = [r for r in recorded_indexes(project) if r["key"].startswith(str(key))]
    if len(rows) != 1:
        raise InflqError(f"{key!r} names {len(rows)} indexes; give a key from `inflq index list {project.root}`")
    row = rows[0]
    # The row first, then its files: a crash in between leaves files no row names, never a row
    # naming missing files (inflq's own removals keep the same order).
    with project.db.atomic():
        project.db["gradient_indexes"].delete(row["key"])
    folder = project.path(row["path"])
    if folder.exists():
        shutil.rmtree(folder)
    return row




@hookimpl
def register_commands(cli):
    # the run settings (and their options) a build shares with runs
    from inflq._builtins_api import RunSettings, size_text

    @cli.group("index")
    def index_group():
        """The gradient index: per-sequence gradients stored once, queries answered from them
        (--estimator index, --filter index:k=N)."""

    @index_group.command("build")
    @click.argument("project")
    @click.option("--k-s", type=int, default=None, help="Projection size of each module's output side (default: from --budget).")
    @click.option("--k-a", type=int, default=None, help="Projection size of each module's input side (default: from --budget).")
    @click.option("--budget", "budget", type=int, default=None, help="Bytes per sequence shared by the modules (default 65536).")
    @click.option("--kind", type=click.Choice(["orthogonal", "gaussian", "eigen"]), default="orthogonal", show_default=True,
                  help="Projection: random orthonormal rows, Gaussian (Johnson-Lindenstrauss), or the covariances' top eigenvectors.")
    @click.option("--estimator", "fit_estimator", type=click.Choice(["ekfac", "kfac"]), default="ekfac", show_default=True,
                  help="The preconditioner fitted in the projected space.")
    @RunSettings.click_options("index build", notes={"fit_sequences": "Here: the preconditioner's fit."})
    # The index's own seed and shards (recorded in its key; rows, not a run's sequences).
    @click.option("--seed", type=int, default=0, show_default=True, help="Seeds the random projections and the fit's sampled labels.")
    @click.option("--shard-size", type=int, default=4096, show_default=True, help="Rows committed at a time (Ctrl-C keeps committed shards).")
    def index_build(project, k_s, k_a, budget, kind, fit_estimator, seed, shard_size, **given):
        """Build (or resume) a gradient index over the whole corpus."""
        from inflq import Cancelled, open_project
        from inflq._builtins_api import index, progress_monitor

        p = open_project(project)
        extra = {} if budget is None else {"budget_bytes": budget}
        settings = index.IndexSettings(kind=kind, k_s=k_s, k_a=k_a, estimator=fit_estimator, seed=seed, **extra)
        run = RunSettings.from_values({**given, "seed": seed})
        with progress_monitor() as monitor:
            try:
                row, store = build(p, settings, run, monitor, shard_size)
            except Cancelled:
                raise Cancelled("committed shards are kept: run the same command again to resume") from None
        s = store.summary()
        click.echo(f"index {row['key']}: {s['num_rows']} row{'' if s['num_rows'] == 1 else 's'} of width {s['width']} ({kind}, {fit_estimator}), {size_text(s['size_bytes'])}; "
                   f"use --estimator index or --filter index:k=N")

    @index_group.command("list")
    @click.argument("project")
    @click.option("--verify", is_flag=True, help="Also check every shard's SHA-256 (reads every byte).")
    def index_list(project, verify):
        """List the project's gradient indexes: key, kind, width, rows, size, complete?"""
        from inflq import open_project

        p = open_project(project)
        rows = recorded_indexes(p)
        if not rows:
            click.echo(f"no gradient index; build one with `inflq index build {project}`")
            return
        click.echo(f"{'key':<24}  {'kind':<10}  {'est':<5}  {'width':>6}  {'rows':>15}  {'size':>9}  {'B/seq':>6}  status")
        for r in rows:
            store = _store(p, r)
            if not (store.path / "manifest.json").exists():
                click.echo(f"{r['key']:<24}  {r['kind']:<10}  {r['estimator']:<5}  {r['width']:>6}  {'':>15}  {'':>9}  {'':>6}  files missing")
                continue
            s = store.summary()
            status = "complete" if s["complete"] else "incomplete (build again to resume)"
            if verify:
                bad = store.verify()
                status += f"; {len(bad)} shard(s) fail their checksums: rebuild" if bad else "; checksums ok"
            done = f"{s['rows_done']}/{s['num_rows']}"
            click.echo(f"{r['key']:<24}  {r['kind']:<10}  {r['estimator']:<5}  {s['width']:>6}  {done:>15}  {size_text(s['size_bytes']):>9}  "
                       f"{s['bytes_per_sequence']:>6}  {status}")

    @index_group.command("rm")
    @click.argument("project")
    @click.argument("key")
    def index_rm(project, key):
        """Remove a gradient index (its files and its catalog row)."""
        from inflq import open_project

        p = open_project(project)
        row = remove(p, key)
        click.echo(f"removed index {row['key']} ({row['path']})")


# -- scoring from the index ---------------------------------------------------------------------------


class IndexEstimator(Estimator):
    """Scores from a stored gradient index: the projected EK-FAC (or K-FAC) of ``inflq index build``."""

    name = "index"
    description = "scores from a stored gradient index (inflq index build): one matrix product for all queries"
    interactive = True
    options = (
        Option("key", str, None, "which index (a key or its first characters; default: the newest complete one)"),
        Option("metric", str, "inner", "inner product, or cosine in the preconditioner's metric", choices=METRICS),
    )

    def __init__(self, **options) -> None:
        super().__init__(**options)
        self.row = None
        self.store = None
        self.model = None
        self.engine = None
        self._last_queries = None
        self._sequence_rows = {}  # sha256 of a sequence's tokens -> (projected row, self-influence)

    def prepare(self, ctx):
        if ctx.project is None:
            raise InflqError("the index estimator needs a project (its index lives there)")
        self.row, self.store = find_index(ctx.project, self.settings["key"])
        self.model = self.store.model()
        self._last_queries, self._sequence_rows = None, {}
        if list(self.model.names) != list(ctx.engine.names):
            raise InflqError(
                f"index {self.row['key']} covers {len(self.model.names)} modules, the run tracks {len(ctx.engine.names)}: "
                f"run with --modules {','.join(self.model.names)} or build an index over these modules"
            )
        self.engine = ctx.engine

    def _lifted_blocks(self, grads):
        """Per module ``X = (G' + λI)⁻¹ P_S DW P_Aᵀ`` ``[n, k_s, k_a]`` of the queries' gradients."""
        pre = self.model.precondition(self.model.rows_from_dense(grads))
        out = {}
        for n in self.model.names:
            ks, ka = self.model.sizes[n]
            o = self.model.offsets[n]
            out[n] = pre[:, o : o + ks * ka].reshape(pre.shape[0], ks, ka)
        return out

    def precondition(self, grads):
        out = {}
        for n, x in self._lifted_blocks(grads).items():
            ps, pa = self.model.factors[f"ps/{n}"].to(x.device), self.model.factors[f"pa/{n}"].to(x.device)
            out[n] = ps.T @ x @ pa
        return out

    def precondition_queries(self, grads, rank):
        """``P_Sᵀ X P_A`` held exactly: at full rank where that is no larger, else as its rank-
        ``min(k_s, k_a)`` factors (no truncation: the attribution sums to the index's score)."""
        import torch

        from inflq import QueryGradients

        qg = QueryGradients(rank=None)
        r_max = 0
        for n, x in self._lifted_blocks(grads).items():
            ps, pa = self.model.factors[f"ps/{n}"].to(x.device), self.model.factors[f"pa/{n}"].to(x.device)
            nq, ks, ka = x.shape
            out, inn = ps.shape[1], pa.shape[1]
            r = min(ks, ka)
            if out * inn <= r * (out + inn):
                qg.full[n] = (ps.T @ x @ pa).to(torch.float32).contiguous()
                continue
            if ks <= ka:  # left = P_Sᵀ, right = (X P_A)ᵀ
                left, right = ps.T.expand(nq, out, ks), (x @ pa).transpose(1, 2)
            else:  # left = P_Sᵀ X, right = P_Aᵀ
                left, right = ps.T @ x, pa.T.expand(nq, inn, ka)
            qg.left[n] = left.to(torch.float32).contiguous()
            qg.right[n] = right.to(torch.float32).contiguous()
            r_max = max(r_max, r)
        qg.rank = r_max or None
        return qg

    def _prepared(self, project, queries):
        """The queries' preconditioned projected rows; the last queries' are kept (the live query
        scores the index's rows and then the probes with the same ones)."""
        from inflq._builtins_api import index

        key = [(q["prompt"], q["completion"], bool(q.get("chat"))) for q in queries]
        if self._last_queries is None or self._last_queries[0] != key:
            self._last_queries = (key, index.prepare(self.model, _query_rows(project, self.model, self.engine, queries)))
        return self._last_queries[1]

    def score_candidates(self, ctx):
        from inflq._builtins_api import index

        ctx.monitor.start("index scores", len(ctx.queries))
        out = index.scores(self.store, self._prepared(ctx.project, ctx.queries), self.settings["metric"], indices=ctx.candidates)
        ctx.monitor.advance(len(ctx.queries))
        return out

    def score_sequences(self, project, queries, sequences, monitor):
        """Queries against sequences outside the corpus (probes): each sequence's projected row and
        self-influence are computed once with the index's model (its training loss, as a stored
        row's) and cached by its tokens; scored in float32 as ``scores(precise=True)`` would."""
        import hashlib

        import numpy as np
        import torch

        from inflq import make_batch

        keys = [hashlib.sha256(np.ascontiguousarray(s, dtype=np.int64).tobytes()).hexdigest() for s in sequences]
        todo = [keys.index(k) for k in dict.fromkeys(keys) if k not in self._sequence_rows]
        monitor.start("index probes", len(todo))
        for s in range(0, len(todo), 8):
            part = todo[s : s + 8]
            captures, _ = self.engine.capture(make_batch([np.asarray(sequences[i]) for i in part], project.runtime.pad_id, self.engine.device), "data")
            rows = self.model.rows_from_captures(captures).to("cpu", torch.float32)
            selfs = self.model.self_influence(rows)
            for j, i in enumerate(part):
                self._sequence_rows[keys[i]] = (rows[j], selfs[j])
            monitor.advance(len(part))
        q = self._prepared(project, queries)
        if not sequences:
            return np.zeros((q.num_queries, 0), dtype=np.float32)
        rows = torch.stack([self._sequence_rows[k][0] for k in keys])
        out = q.vectors @ rows.T
        if self.settings["metric"] == "cosine":
            selfs = torch.stack([self._sequence_rows[k][1] for k in keys])
            out = out / (torch.sqrt(q.self_influence.clamp_min(0))[:, None] * torch.sqrt(selfs.clamp_min(0))[None, :]).clamp_min(torch.finfo(torch.float32).tiny)
        return out.numpy().astype(np.float32)

    def describe(self):
        m = self.store.manifest if self.store is not None else {}
        return {
            **self.settings, "key": self.row["key"] if self.row else self.settings["key"], "index_settings": m.get("settings"),
            "width": m.get("width"), "damping": m.get("dampings"),
            "attribution": "the projected preconditioner, lifted back to the full space (inner product)",
        }


class IndexFilter(Filter):
    """Each query's top-k sequences by a stored gradient index (``side=bottom``: its lowest k), for
    an exact estimator to re-score."""

    name = "index"
    description = "each query's top-k sequences by a stored gradient index (inflq index build)"
    options = (
        Option("k", int, 1000, "how many candidates per query"),
        Option("key", str, None, "which index (default: the newest complete one)"),
        Option("metric", str, "inner", "inner product, or cosine in the preconditioner's metric", choices=METRICS),
        Option("search", str, "exact", "exact blocked scan, or approximate through FAISS (pip install 'inflq[faiss]')", choices=("exact", "faiss")),
        Option("nprobe", int, 32, "with search=faiss: how many of FAISS's lists each query probes (more: slower, higher recall)"),
        Option("side", str, "top", "the index's highest scores (top), or its lowest (bottom: candidates for the most negative)", choices=("top", "bottom")),
    )

    def candidates(self, ctx) -> list[np.ndarray]:
        import torch

        from inflq._builtins_api import index

        if ctx.project is None:
            raise InflqError("the index filter needs a project (FilterContext.project): its index lives there")
        if self.settings["k"] is None or self.settings["k"] < 1:
            raise InflqError("index filter: k must be at least 1, e.g. --filter index:k=1000")
        if self.settings["search"] == "faiss":
            index.require_faiss()  # before any pass: the missing extra is a one-line error
        project = ctx.project
        _, store = find_index(project, self.settings["key"])
        model = store.model()
        engine = project.runtime.engine(",".join(model.names))
        ctx.monitor.start("index filter", len(ctx.query_tokens))
        rows = index.query_rows(model, engine, ctx.query_tokens, ctx.query_completion_starts, project.runtime.pad_id)
        q = index.prepare(model, rows.to(torch.float32))
        out = index.candidates(store, q, self.settings["k"], self.settings["metric"], search=self.settings["search"], nprobe=self.settings["nprobe"],
                               largest=self.settings["side"] != "bottom")
        ctx.monitor.advance(len(ctx.query_tokens))
        return out
