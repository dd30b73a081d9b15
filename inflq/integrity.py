"""Checking a project's artifacts against the checksums in its catalog, saying which results
depend on a missing or altered one, and recomputing what can be recomputed (``inflq check``).

A damaged artifact is never used silently: :func:`inflq.artifacts.load_tensors` refuses it, and
this module finds all of them at once and says what they affect.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import catalog, layout
from .display import plural
from .errors import InflqError
from .modeling import sha256_file
from .plugins import get_registry
from .progress import Monitor


@dataclass
class Artifact:
    """A file the catalog references. ``owner`` says which row: (table, id[, detail])."""

    kind: str
    path: str
    checksum: str | None
    owner: tuple


@dataclass
class Problem:
    artifact: Artifact
    problem: str  # "missing", "checksum" or "unreadable"
    affected: list[str] = field(default_factory=list)

    def line(self) -> str:
        what = {"missing": "is missing", "checksum": "fails its checksum", "unreadable": "cannot be read"}[self.problem]
        aff = "; affects " + ", ".join(self.affected) if self.affected else ""
        return f"{self.artifact.kind} {self.artifact.path} {what}{aff}"


@dataclass
class PluginProblem:
    """A problem a plugin found in its own files (the ``check_artifacts`` hook); inflq cannot
    repair it, and the plugin's line says how to."""

    text: str
    plugin: str
    artifact: Artifact = field(init=False)
    problem: str = "plugin"
    affected: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.artifact = Artifact("plugin artifact", self.text, None, ("plugin", self.plugin))

    def line(self) -> str:
        return self.text


def plugin_problems(project) -> list[PluginProblem]:
    """What the plugins' ``check_artifacts`` hooks report, each line with its plugin's name."""
    pm = get_registry().pm
    out = []
    for impl in pm.hook.check_artifacts.get_hookimpls():
        for line in impl.function(project=project) or []:
            out.append(PluginProblem(str(line), pm.get_name(impl.plugin) or "?"))
    return out


def referenced_artifacts(db) -> list[Artifact]:
    """Every artifact file the catalog (a sqlite-utils Database or a sqlite3 connection) references."""
    out = [Artifact(*f) for f in catalog.referenced_files(db)]
    # Candidates carry no checksum in the catalog; they must at least exist and read once scoring began.
    out += [Artifact("candidate list", layout.candidates(r), None, ("runs", r, "candidates")) for r in catalog.scored_run_ids(db)]
    return out


def _affected(db, art: Artifact) -> list[str]:
    table, key = art.owner[0], art.owner[1]
    if table == "self_influence":
        return ["cached self-influence scores (recomputed by the next `inflq self-influence`)"]
    runs, sets, status = catalog.dependents(db, art.owner)
    if table == "factor_sets":
        out = [f"run {r}" for r in runs] + [f"result set {s} (attribution and probes)" for s in sets]
        return out or ["no run (refit on the next run that needs it)"]
    if table == "result_sets":
        use = "export and score distributions" if art.owner[2] == "scores" else "attribution and probes"
        return [f"result set {key} ({use}; its top sequences stay browsable)"] + [f"run {r}" for r in runs]
    return [f"run {key} ({status}{'; resuming it' if status != 'done' else ''})"]


def _verify(root: Path, art: Artifact) -> str | None:
    path = Path(root) / art.path
    if not path.is_file():
        return "missing"
    if art.checksum is not None:
        return None if sha256_file(path) == art.checksum else "checksum"
    try:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            list(f.keys())
    except Exception:
        return "unreadable"
    return None


def check(project, monitor: Monitor | None = None) -> list[Problem]:
    """Verify every referenced artifact and the token store; returns the problems found."""
    monitor = monitor or Monitor()
    arts = referenced_artifacts(project.db)
    problems = []
    monitor.start("checking", len(arts))
    for art in arts:
        monitor.check()
        bad = _verify(project.root, art)
        if bad:
            problems.append(Problem(art, bad, _affected(project.db, art)))
        monitor.advance(1)
    store = _store_problem(project)
    if store:
        problems.append(store)
    return problems + plugin_problems(project)


def _store_problem(project) -> Problem | None:
    art = Artifact("token store", layout.CORPUS, None, ("sequences", None))
    found = project.corpus_identity.store_problem()
    if found == "missing":
        return Problem(art, "missing", ["every run, attribution and export (rebuilt from the corpus file)"])
    if found is not None:
        return Problem(art, "unreadable" if found == "unreadable" else "checksum", ["every run, attribution and export"])
    return None


# -- repair ---------------------------------------------------------------------------------------
def repair(project, problems: list[Problem], monitor: Monitor | None = None) -> list[str]:
    """Recompute what ``problems`` name, where possible. Returns one line per action or refusal."""
    from .runs import RunSettings

    monitor = monitor or Monitor()
    notes: list[str] = []
    if any(p.artifact.kind == "token store" for p in problems):
        if not project.corpus_path.exists():
            notes.append(f"cannot rebuild the token store: the corpus {project.corpus_path} is missing; `inflq relink {project.root} --corpus FILE` first")
        else:
            project.runtime.rebuild_corpus(monitor)
            notes.append("rebuilt the token store from the corpus")
    notes += [f"cannot repair {p.line()}" for p in problems if isinstance(p, PluginProblem)]
    project.require_model()
    for p in problems:
        if p.artifact.owner[0] == "factor_sets":
            notes.append(_refit(project, p.artifact.owner[1], monitor))
        elif p.artifact.owner[0] == "self_influence":  # a cache: forgotten, recomputed when next asked for
            catalog.delete_self_influence(project.db, p.artifact.owner[1])
            (project.root / p.artifact.path).unlink(missing_ok=True)
            notes.append(f"dropped the damaged cache {p.artifact.path} (recomputed by the next `inflq self-influence`)")
    runs: dict[int, list[Problem]] = {}
    for p in problems:
        table = p.artifact.owner[0]
        if table in ("run_shards", "runs"):
            runs.setdefault(p.artifact.owner[1], []).append(p)
        elif table == "result_sets":
            rs = catalog.get_result_set(project.db, p.artifact.owner[1])
            runs.setdefault(rs["run_id"], []).append(p)
    for run_id, probs in sorted(runs.items()):
        row = catalog.get_run(project.db, run_id)
        if row is None:
            notes.append(f"run {run_id} no longer exists; nothing to recompute")
            continue
        settings = RunSettings.from_json(row["settings"])
        if row["status"] != "done":
            notes.append(_resume(project, row, probs, monitor))
        else:
            notes.append(_recompute_done_run(project, row, settings, probs, monitor))
    return notes


def _refit(project, fs_id: int, monitor: Monitor) -> str:
    from .runs import RunSettings, prepare_estimator

    old = catalog.factor_set(project.db, fs_id)
    run = catalog.latest_run_using(project.db, fs_id)
    if run is None:
        catalog.delete_factor_set(project.db, fs_id)
        (project.root / old["path"]).unlink(missing_ok=True)
        return f"factor set {fs_id} was used by no run: removed (it is refit when next needed)"
    settings = RunSettings.from_json(run["settings"], refit=True, executor=get_registry().default("executor"))
    new_id = prepare_estimator(project, settings, monitor).factor_set_id
    new = catalog.factor_set(project.db, new_id)
    if new["key"] != old["key"]:
        return f"factor set {fs_id} could not be reproduced (the model or corpus changed since); refit as factor set {new_id} for new runs"
    catalog.move_runs_to_factor_set(project.db, fs_id, new_id)
    moved = f" (now factor set {new_id})" if new_id != fs_id else ""
    return f"refit factor set {fs_id}{moved} with its run's settings"


def _resume(project, run: dict, probs: list[Problem], monitor: Monitor) -> str:
    from .runs import run_investigation

    rid = run["id"]
    drop_all = any(p.artifact.kind == "candidate list" for p in probs)
    bad = None if drop_all else [p.artifact.owner[2] for p in probs if p.artifact.owner[0] == "run_shards"]
    catalog.delete_score_shards(project.db, rid, bad)
    if drop_all:
        (project.root / layout.candidates(rid)).unlink(missing_ok=True)
    res = run_investigation(project, "", resume=rid, monitor=monitor)
    return f"resumed run {rid}: recomputed its missing shards (result set {res.result_set_id})"


def _recompute_done_run(project, run: dict, settings, probs: list[Problem], monitor: Monitor) -> str:
    """A finished run: recompute its query gradients, candidates, shards and score matrix as needed,
    keeping its result set (and so every stored top sequence) in place."""
    from .artifacts import load_tensors, save_tensors
    from .contractions import QueryGradients
    from .passes import ScorePass, make_shards
    from .runs import (
        LocalWorker,
        default_executor,
        preconditioned_queries,
        prepare_estimator,
        query_gradients,
    )

    rid = run["id"]
    rs = catalog.result_set_of_run(project.db, rid)
    if rs is None:
        return f"run {rid} has no result set; nothing to recompute"
    kinds = {p.artifact.kind for p in probs}
    rs_settings = json.loads(rs["settings"])
    engine = project.runtime.engine(settings.modules)
    done: list[str] = []
    if "query gradients" in kinds:
        try:
            queries = [catalog.query(project.db, q) for q in rs_settings["query_ids"]]
        except InflqError:
            return f"run {rid}: a query it scored was deleted, so its query gradients cannot be recomputed; rerun the investigation"
        est = prepare_estimator(project, settings, monitor, engine=engine, executor=default_executor()).estimator
        qg = preconditioned_queries(est, query_gradients(project, engine, queries, settings.batch_size), settings.rank)
        checksum = save_tensors(project.root, rs["queries_path"], qg.tensors(), {"rank": json.dumps(settings.rank)})
        catalog.update_result_set(project.db, rs["id"], queries_checksum=checksum)
        rs["queries_checksum"] = checksum
        done.append("query gradients")
    cand_rel = layout.candidates(rid)
    if "candidate list" in kinds:
        if "score matrix" in kinds:
            return f"run {rid}: both its candidate list and its score matrix are damaged; rerun the investigation"
        t = load_tensors(project.root, rs["scores_path"], rs["scores_checksum"], "score matrix")
        idx, mask = t["indices"].numpy(), np.isfinite(t["scores"].numpy())
        save_tensors(project.root, cand_rel, {"indices": torch.from_numpy(idx), "mask": torch.from_numpy(mask.astype(np.uint8))})
        done.append("candidate list")
    c = load_tensors(project.root, cand_rel, None, "candidate list")
    cand, mask = c["indices"].numpy(), c["mask"].numpy().astype(bool)
    shards = make_shards(cand, settings.shard_size)
    bad_shards = {p.artifact.owner[2] for p in probs if p.artifact.kind == "score shard"}
    if bad_shards or "score matrix" in kinds:
        qg = QueryGradients.from_tensors(load_tensors(project.root, rs["queries_path"], rs["queries_checksum"], "query gradients"), settings.rank)
        worker = LocalWorker(project, engine)
        have = catalog.score_shards(project.db, rid)
        for s in shards:
            row = have.get(s.index)
            intact = row is not None and s.index not in bad_shards and _verify(project.root, Artifact("score shard", row["path"], row["checksum"], ())) is None
            if intact:
                continue
            out = worker.run(ScorePass(qg), s, settings.batch_size, monitor)
            rel = layout.score_shard(rid, s.index)
            checksum = save_tensors(project.root, rel, {"scores": out["scores"].to(torch.float32)})
            catalog.record_score_shard(project.db, rid, s.index, len(s), rel, checksum)
        if bad_shards:
            done.append(plural(len(bad_shards), "score shard"))
    if "score matrix" in kinds:
        rows = catalog.score_shards(project.db, rid)
        scores = torch.cat([load_tensors(project.root, rows[s.index]["path"], rows[s.index]["checksum"], "shard")["scores"] for s in shards]).T.numpy()
        scores = np.where(mask, scores, np.nan).astype(np.float32)
        checksum = save_tensors(project.root, rs["scores_path"], {"indices": torch.from_numpy(cand), "scores": torch.from_numpy(scores)})
        catalog.update_result_set(project.db, rs["id"], scores_checksum=checksum)
        done.append("score matrix")
    return f"run {rid}: recomputed {', '.join(done)}"
