"""The catalog's runs, results and validations functions, the one run recipe, the registry's
defaults, and the built-in plugins' imports."""

from __future__ import annotations

import pytest

from inflq import catalog


@pytest.fixture
def db(tmp_path):
    db = catalog.connect(tmp_path / "c.db", create=True)
    for name in ("default", "other"):
        db["investigations"].insert({"name": name, "description": "", "created_at": catalog.now()})
    yield db
    db.conn.close()


def _run(db, investigation_id: int = 1, kind: str = "scores") -> int:
    return catalog.insert_run(db, {"investigation_id": investigation_id, "kind": kind, "estimator": "ekfac", "filter": "all",
                                   "executor": "local", "settings": "{}", "model_fingerprint": "m", "corpus_fingerprint": "c"})


def test_run_status_changes_in_one_place(db):
    rid = _run(db)
    row = catalog.get_run(db, rid)
    assert (row["status"], row["phase"], row["done"], row["total"]) == ("running", "starting", 0, 0) and row["started_at"]
    catalog.update_run(db, rid, phase="scoring", done=3, total=9)
    with pytest.raises(ValueError):
        catalog.update_run(db, rid, status="done")
    with pytest.raises(ValueError):
        catalog.finish_run(db, rid, "running")
    catalog.finish_run(db, rid, "failed", error="boom")
    row = catalog.get_run(db, rid)
    assert (row["status"], row["error"], row["phase"]) == ("failed", "boom", "scoring") and row["finished_at"]
    assert catalog.interrupted_run(db, 1, "scores")["id"] == rid
    catalog.restart_run(db, rid, executor="ray")
    row = catalog.get_run(db, rid)
    assert (row["status"], row["error"], row["executor"]) == ("running", None, "ray")
    catalog.finish_run(db, rid, "done", seconds=2.5, factor_set_id=None)
    row = catalog.get_run(db, rid)
    assert (row["status"], row["phase"], row["seconds"]) == ("done", "done", 2.5)
    assert catalog.interrupted_run(db, 1, "scores") is None


def test_run_reads(db):
    assert catalog.latest_run_id(db) is None and catalog.get_run(db, 1) is None
    a, b, c = _run(db, 1), _run(db, 2), _run(db, 1, "factors")
    assert catalog.latest_run_id(db) == c
    assert [r["id"] for r in catalog.runs_of(db, 1)] == [a, c]
    assert [r["id"] for r in catalog.runs_of(db, 1, newest_first=True)] == [c, a]
    assert [r["id"] for r in catalog.runs_of(db)] == [a, b, c]
    assert catalog.run_counts(db) == {1: 2, 2: 1}


def test_shards_and_what_a_run_committed(db):
    rid = _run(db)
    catalog.record_score_shard(db, rid, 0, 5, "artifacts/runs/1/shard-000000.safetensors", "x")
    catalog.record_score_shard(db, rid, 1, 4, "artifacts/runs/1/shard-000001.safetensors", "y")
    assert sorted(catalog.score_shards(db, rid)) == [0, 1] and catalog.score_shard_totals(db, rid) == (2, 9)
    catalog.delete_score_shards(db, rid, [1])
    assert sorted(catalog.score_shards(db, rid)) == [0]
    catalog.delete_score_shards(db, rid)
    assert catalog.score_shard_totals(db, rid) == (0, 0)
    catalog.record_fit_shards(db, rid, "0:covariance", "k", {0: 5}, "p0", "c0")
    catalog.record_fit_shards(db, rid, "0:covariance", "k", {1: 5}, "upto-1", "c1", running_sum=True)
    assert {r["path"] for r in catalog.fit_shards(db, rid, "0:covariance")} == {"upto-1"}
    assert catalog.fit_shard_totals(db, rid) == [("0:covariance", 2, 10)]
    fs_id, stale = catalog.store_factor_set(db, {
        "key": "k", "estimator": "ekfac", "settings": "{}", "modules": "[]", "model_fingerprint": "m", "data_fingerprint": "d",
        "num_sequences": 10, "seed": 0, "path": "f", "checksum": "c", "seconds": 1.0}, run_id=rid)
    assert stale == ["upto-1", "upto-1"] and catalog.fit_shards(db, rid) == []
    assert catalog.factor_set_by_key(db, "k")["id"] == fs_id
    catalog.update_run(db, rid, factor_set_id=fs_id)
    assert catalog.latest_run_using(db, fs_id)["id"] == rid and catalog.run_ids_using(db, fs_id) == [rid]
    assert catalog.dependents(db, ("factor_sets", fs_id)) == ([rid], [], None)


def test_result_sets_and_their_search(db):
    rid = _run(db)
    db["queries"].insert({"id": 7, "investigation_id": 1, "position": 0, "prompt": "p", "completion": "c", "chat": 0,
                          "tags": "", "notes": "", "created_at": catalog.now()})
    rows = [{"query_id": 7, "side": side, "rank": r, "seq_idx": r, "seq_id": f"doc-{r}", "score": 1.0 / r,
             "module_scores": "{}", "layer_scores": "{}", "text": "the cat" if r % 2 else "a dog"}
            for side in ("top", "bottom") for r in range(1, 6)]
    rs_id = catalog.insert_result_set(db, {"run_id": rid, "investigation_id": 1, "name": "run 1", "estimator": "ekfac", "filter": "all",
                                           "settings": "{}", "num_candidates": 5, "scores_path": "s", "scores_checksum": "x",
                                           "queries_path": "q", "queries_checksum": "y"}, rows)
    assert catalog.get_result_set(db, rs_id)["created_at"] and catalog.get_result_set(db, rs_id + 1) is None
    assert catalog.result_set_of_run(db, rid)["id"] == rs_id
    assert [r["id"] for r in catalog.result_sets_of(db, 1)] == [rs_id] and catalog.result_sets_of(db, 2) == []
    assert catalog.count_results(db, rs_id, 7, "top") == 5
    assert [r["rank"] for r in catalog.stored_results(db, rs_id, 7, "top", 2, 1)] == [2, 3]
    assert [r["rank"] for r in catalog.stored_results(db, rs_id, 7, "top", 10, search="cat")] == [1, 3, 5]
    assert [r["rank"] for r in catalog.stored_results(db, rs_id, 7, "bottom", 10, search="doc-4")] == [4]
    catalog.update_result_set(db, rs_id, scores_checksum="z")
    assert catalog.get_result_set(db, rs_id)["scores_checksum"] == "z"


def test_validations_are_numbered(db):
    row = {"investigation_id": 1, "estimator": "ekfac", "damping": None, "pearson": 0.9, "spearman": 0.8, "fit_seconds": 1.0,
           "ihvp_seconds": 0.1, "num_queries": 2, "num_sequences": 4, "settings": "{}"}
    assert catalog.insert_validation(db, [row, row]) == 1
    assert catalog.insert_validation(db, [row]) == 2
    assert [r["validation"] for r in db["validations"].rows] == [1, 1, 2]


def test_registry_defaults_and_baselines():
    from inflq.plugins import get_registry
    from inflq.search_depth import split_union, unfiltered_filters

    reg = get_registry()
    assert (reg.default("executor"), reg.default("estimator"), reg.default("filter")) == ("local", "ekfac", "all")
    assert {"random", "all"} <= unfiltered_filters(reg) and "tfidf" not in unfiltered_filters(reg)
    assert split_union("tfidf:k=3+all", {"all"}) == ("tfidf:k=3", "all")
    from inflq.settings import RunSettings

    s = RunSettings(filter="random:n=5").resolve_defaults(reg)
    assert (s.estimator, s.filter, s.executor) == ("ekfac", "random:n=5", "local")


def test_prepare_estimator_fits_once_then_reuses(project):
    from inflq.runs import RunSettings, prepare_estimator

    first = prepare_estimator(project, RunSettings(estimator="ekfac", batch_size=4))
    again = prepare_estimator(project, RunSettings(estimator="ekfac", batch_size=4))
    assert first.factor_set_id is not None and again.factor_set_id == first.factor_set_id
    assert again.engine.names == first.engine.names and again.estimator.name == "ekfac"
    assert prepare_estimator(project, RunSettings(estimator="identity", batch_size=4)).factor_set_id is None


def test_queries_preconditioned_a_few_at_a_time_equal_all_at_once(project):
    """Memory for query gradients is bounded by a few queries' dense gradients (issue 17: GPT-2
    small's peak was every query's dense gradient at once): preconditioned one query at a time, the
    queries come out as preconditioned all together, with the full-rank modules planned once for the
    whole batch (a plan made per part would hold some modules differently and fail to join)."""
    import torch

    from inflq import catalog
    from inflq.contractions import Compression, QueryGradients
    from inflq.queries import add_query
    from inflq.runs import (
        RunSettings,
        preconditioned_queries,
        preconditioned_query_gradients,
        prepare_estimator,
        query_gradients,
    )

    for prompt, completion in [("the first president of astrobia was", "zorald pfaff"), ("a river flows through the old", "town"),
                               ("the capital city of astrobia is called", "velmora"), ("people eat bread and", "cheese in winter"), ("the red cat runs with the", "big dog")]:
        add_query(project, "default", prompt, completion)
    queries = catalog.queries(project.db, "default")
    prepared = prepare_estimator(project, RunSettings(estimator="ekfac", batch_size=4))
    est, engine = prepared.estimator, prepared.engine
    # A budget for full-rank modules that holds some of them for 5 queries but not for 2: planned
    # per part, the parts would differ.
    sizes = sorted(4 * t.out_features * t.in_dim for t in engine.tracked)
    policy = Compression(rank=2, tokens=64.0, full_rank_bytes=5 * sizes[len(sizes) // 2])
    want = preconditioned_queries(est, query_gradients(project, engine, queries, 4), policy)
    assert want.full and want.left, "the case needs modules of both kinds"
    per_query = 4 * sum(t.out_features * t.in_dim for t in engine.tracked)
    for chunk in (1, 2 * per_query, 10 * per_query):
        got = preconditioned_query_gradients(project, est, engine, queries, 4, policy, chunk_bytes=chunk)
        assert set(got.full) == set(want.full) and set(got.left) == set(want.left) and got.num_queries == 5
        for name in want.names:  # what scoring uses: rank-r factors of close singular values may turn a little
            dense = want.dense(name)
            torch.testing.assert_close(got.dense(name), dense, rtol=1e-4, atol=1e-5 * float(dense.abs().max()))
    weighted = preconditioned_query_gradients(project, est, engine, queries, 4, policy, weight=2.0, chunk_bytes=1)
    doubled = 2.0 * want.dense(want.names[0])
    torch.testing.assert_close(weighted.dense(want.names[0]), doubled, rtol=1e-4, atol=1e-5 * float(doubled.abs().max()))
    parts = [preconditioned_queries(est, query_gradients(project, engine, queries[:2], 4), Compression(rank=2)),
             preconditioned_queries(est, query_gradients(project, engine, queries[2:], 4), Compression(rank=None))]
    with pytest.raises(ValueError, match="held differently"):
        QueryGradients.concat(parts)
