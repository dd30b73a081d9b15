"""The gradient index: compressed per-sequence gradients stored once, any query answered with one
matrix product (LoGra-style Kronecker projections, EK-FAC fitted in the projected space).

Per tracked module a sequence's row block is ``P_S DW P_Aᵀ = Σ_t (P_S g_t)(P_A ā_t)ᵀ``, computed
token by token from the shared engine's captures (no ``DW`` formed); the preconditioner is EK-FAC
(or K-FAC) of the projected model; rows are float16 in memory-mapped shards under a content-hashed
folder. With orthogonal full-width projections the scores are EK-FAC's own.

Typical use (a front end adds the catalog, executors and options around it)::

    model = fit_index(fit_ctx, IndexSettings())                       # projections + preconditioner
    store = build_index(root, key, model, indices, local_map(engine, sequences, pad_id, 8))
    q = prepare(model, query_rows(model, engine, tokens, starts, pad_id))
    values, which = top_k(store, q, k=10)                             # or scores(store, q, indices=...)
"""

from .approx import SEARCHES, faiss_index, faiss_top_k, require_faiss
from .build import RowPass, build_index, local_fit_context, local_map
from .fit import (
    IndexModel,
    IndexSettings,
    ProjectedCorrectionPass,
    ProjectedCovariancePass,
    fit_index,
)
from .projection import BUDGET_BYTES, KINDS, default_sizes
from .search import (
    METRICS,
    PreparedQueries,
    block_scores,
    candidates,
    measured_rows,
    prepare,
    query_rows,
    scores,
    self_influences,
    top_k,
)
from .store import Block, IndexStore, index_key, indices_fingerprint, key_source

__all__ = [
    "BUDGET_BYTES", "Block", "IndexModel", "IndexSettings", "IndexStore", "KINDS", "METRICS", "PreparedQueries",
    "ProjectedCorrectionPass", "ProjectedCovariancePass", "RowPass", "SEARCHES", "block_scores", "build_index", "candidates", "default_sizes",
    "faiss_index", "faiss_top_k", "fit_index", "index_key", "indices_fingerprint", "key_source", "local_fit_context", "local_map", "measured_rows", "prepare", "query_rows", "require_faiss", "scores", "self_influences", "top_k",
]
