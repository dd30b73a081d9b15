"""The paper's TF-IDF candidate filter, and the ``inflq search-depth`` command.

The index is a sparse ``[sequences, vocabulary]`` TF-IDF matrix over the model's token ids (so it
follows the tokenizer, for any language). It is built once per project, in streamed chunks of the
memory-mapped token store, and saved under ``artifacts/tfidf/`` with a manifest naming the corpus
and tokenizer it was built for; an index built for another corpus or tokenizer is rebuilt, never
used. The weighting is scikit-learn's ``TfidfTransformer`` (raw counts, smoothed idf
``ln((1 + n) / (1 + df)) + 1``, rows L2-normalised); a query is weighted the same way and the
score is the cosine similarity. Tokens that occur in every sequence (a BOS token, say) tell no
sequence apart, so they are left out of the query.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import click
import numpy as np

from inflq import Filter, FilterContext, InflqError, Option, hookimpl, targets_of

if TYPE_CHECKING:  # SciPy and scikit-learn load when an index is built or read, not on import
    import scipy.sparse as sp

FORMAT_VERSION = 1
CHUNK_SEQUENCES = 50_000


@hookimpl
def register_filters(register):
    register(TfidfFilter)


@hookimpl
def register_commands(cli):
    cli.add_command(search_depth_command)


class TfidfIndex:
    """A built TF-IDF index: ``matrix`` (CSC, float32, rows L2-normalised), ``idf`` and ``df``."""

    def __init__(self, matrix: sp.csc_matrix, idf: np.ndarray, df: np.ndarray, manifest: dict) -> None:
        self.matrix = matrix
        self.idf = idf
        self.df = df
        self.manifest = manifest

    @property
    def num_sequences(self) -> int:
        return self.matrix.shape[0]

    def query_vector(self, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(token ids, weights)`` of a query: counts × idf, L2-normalised, informative tokens only."""
        toks, counts = np.unique(np.asarray(tokens, dtype=np.int64), return_counts=True)
        keep = (toks >= 0) & (toks < len(self.df))
        toks, counts = toks[keep], counts[keep]
        informative = (self.df[toks] > 0) & (self.df[toks] < self.num_sequences)
        toks, counts = toks[informative], counts[informative]
        weights = counts * self.idf[toks].astype(np.float64)
        norm = np.linalg.norm(weights)
        return toks, (weights / norm if norm > 0 else weights)

    def scores(self, tokens: np.ndarray) -> np.ndarray:
        """Cosine similarity of every sequence with the query tokens (float64, zeros if no overlap)."""
        toks, weights = self.query_vector(tokens)
        if len(toks) == 0:
            return np.zeros(self.num_sequences)
        # Only the query's columns are touched: CSC column slicing is the inverted index.
        return np.asarray(self.matrix[:, toks] @ weights, dtype=np.float64).ravel()

    def top(self, tokens: np.ndarray, k: int) -> np.ndarray:
        """Sorted indices of the ``k`` most similar sequences with a positive score (ties: lower index)."""
        s = self.scores(tokens)
        positive = int(np.count_nonzero(s > 0))
        k = min(k, positive)
        if k == 0:
            return np.zeros(0, dtype=np.int64)
        threshold = s[np.argpartition(-s, k - 1)[k - 1]]
        above = np.flatnonzero(s > threshold)
        tied = np.flatnonzero(s == threshold)[: k - len(above)]
        return np.sort(np.concatenate([above, tied])).astype(np.int64)


def index_dir(ctx: FilterContext) -> Path:
    return Path(ctx.artifacts_dir) / "tfidf"


def _manifest_for(ctx: FilterContext) -> dict:
    return {
        "format": FORMAT_VERSION,
        "corpus_fingerprint": ctx.corpus_fingerprint,
        "tokenizer_fingerprint": ctx.tokenizer_fingerprint,
        "num_sequences": int(ctx.num_sequences),
        "weighting": "sklearn TfidfTransformer(norm='l2', use_idf=True, smooth_idf=True, sublinear_tf=False)",
    }


def _stale_reason(found: dict, wanted: dict) -> str | None:
    for key, what in (("format", "an older index format"), ("corpus_fingerprint", "another corpus"),
                      ("tokenizer_fingerprint", "another tokenizer"), ("num_sequences", "another number of sequences")):
        if found.get(key) != wanted[key]:
            return what
    return None


_cache: dict[str, TfidfIndex] = {}


def load_or_build(ctx: FilterContext, chunk: int = CHUNK_SEQUENCES) -> TfidfIndex:
    """The project's TF-IDF index: loaded if it was built for this corpus and tokenizer, else built."""
    import scipy.sparse as sp

    folder = index_dir(ctx)
    wanted = _manifest_for(ctx)
    key = str(folder.resolve())
    cached = _cache.get(key)
    if cached is not None and _stale_reason(cached.manifest, wanted) is None and (folder / "manifest.json").exists():
        return cached
    if (folder / "manifest.json").exists():
        try:
            found = json.loads((folder / "manifest.json").read_text())
            stale = _stale_reason(found, wanted)
            if stale is None:
                idf, df = _load_vectors(folder / "vectors.npz")
                index = TfidfIndex(sp.load_npz(folder / "matrix.npz").tocsc(), idf, df, found)
                _cache[key] = index
                return index
            ctx.monitor.warn(f"tfidf: the index in {folder} was built for {stale}; rebuilding it")
        except (OSError, ValueError, KeyError) as exc:
            ctx.monitor.warn(f"tfidf: the index in {folder} is damaged ({exc}); rebuilding it")
    index = build_index(ctx, chunk)
    save_index(index, folder)
    _cache.clear()
    _cache[key] = index
    return index


def _load_vectors(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        return z["idf"], z["df"]


def build_index(ctx: FilterContext, chunk: int = CHUNK_SEQUENCES) -> TfidfIndex:
    """Count tokens per sequence in chunks of ``chunk`` sequences, then weight with scikit-learn."""
    import scipy.sparse as sp
    from sklearn.feature_extraction.text import TfidfTransformer

    n = int(ctx.num_sequences)
    if n <= 0:
        raise InflqError("tfidf: the corpus has no sequences to index; rebuild the corpus")
    ctx.monitor.start("tfidf index", n)
    indptr_parts, index_parts, data_parts = [np.zeros(1, dtype=np.int64)], [], []
    nnz = 0
    vocab = 0
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        # A fine-tune's instruction data counts its responses' tokens only: the text it trained on.
        seqs = [s if targets_of(s) is None else np.asarray(s)[targets_of(s)] for s in ctx.sequences(np.arange(start, stop, dtype=np.int64))]
        lengths = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
        toks = np.concatenate(seqs).astype(np.int64) if len(seqs) else np.zeros(0, np.int64)
        width = int(toks.max()) + 1 if toks.size else 1
        vocab = max(vocab, width)
        rows = np.repeat(np.arange(stop - start, dtype=np.int64), lengths)
        counts = sp.csr_matrix((np.ones(len(toks), dtype=np.float32), (rows, toks)), shape=(stop - start, width))
        counts.sum_duplicates()
        indptr_parts.append(counts.indptr[1:].astype(np.int64) + nnz)
        index_parts.append(counts.indices.astype(np.int32))
        data_parts.append(counts.data.astype(np.float32))
        nnz += counts.nnz
        del seqs, toks, rows, counts
        ctx.monitor.advance(stop - start)
    indptr = np.concatenate(indptr_parts)
    indices = np.concatenate(index_parts)
    del index_parts
    data = np.concatenate(data_parts)
    del data_parts
    counts = sp.csr_matrix((data, indices, indptr), shape=(n, vocab))
    df = np.bincount(counts.indices, minlength=vocab).astype(np.int64)
    transformer = TfidfTransformer(norm="l2", use_idf=True, smooth_idf=True, sublinear_tf=False)
    weighted = transformer.fit(counts).transform(counts, copy=False)
    del counts
    return TfidfIndex(weighted.tocsc(), transformer.idf_.astype(np.float32), df, _manifest_for(ctx))


def save_index(index: TfidfIndex, folder: Path) -> None:
    """Write the index beside its manifest; the folder is replaced at once, never half-written."""
    import scipy.sparse as sp

    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    sp.save_npz(tmp / "matrix.npz", index.matrix, compressed=False)
    np.savez(tmp / "vectors.npz", idf=index.idf, df=index.df)
    (tmp / "manifest.json").write_text(json.dumps(index.manifest, indent=2))
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)


class TfidfFilter(Filter):
    name = "tfidf"
    description = "the top K sequences by TF-IDF similarity of token ids with the query (the paper's filter)"
    options = (
        Option("k", int, 10000, "how many candidates per query (10,000 in the paper)"),
        Option("fields", str, "both", "which query tokens count", choices=("both", "prompt", "completion")),
        Option("fallback", str, "error", "when a query shares no token with the corpus: error, or a random sample of k", choices=("error", "random")),
    )

    def query_tokens(self, ctx: FilterContext, i: int) -> np.ndarray:
        tokens, start = np.asarray(ctx.query_tokens[i]), int(ctx.query_completion_starts[i])
        fields = self.settings["fields"]
        return tokens[:start] if fields == "prompt" else tokens[start:] if fields == "completion" else tokens

    def candidates(self, ctx: FilterContext) -> list[np.ndarray]:
        k = self.settings["k"]
        if k is None or k <= 0:
            raise InflqError("tfidf filter: k must be positive, e.g. --filter tfidf:k=10000")
        if k > ctx.num_sequences:
            ctx.monitor.warn(f"tfidf: k={k} is more than the corpus's {ctx.num_sequences} sequences; using every sequence that shares a token with the query")
            k = ctx.num_sequences
        index = load_or_build(ctx)
        out = []
        for i in range(len(ctx.query_tokens)):
            pick = index.top(self.query_tokens(ctx, i), k)
            if len(pick) == 0:
                what = f"query {i + 1}'s {self.settings['fields']} tokens share no token with the corpus (beyond tokens in every sequence)"
                if self.settings["fallback"] != "random":
                    raise InflqError(f"tfidf: {what}; reword it, use fields=both, or add fallback=random to score a random sample instead")
                ctx.monitor.warn(f"tfidf: {what}; falling back to a random sample of {k}")
                rng = np.random.default_rng(ctx.seed)
                pick = np.sort(rng.choice(ctx.num_sequences, size=k, replace=False)).astype(np.int64)
            elif len(pick) < k:
                ctx.monitor.warn(f"tfidf: only {len(pick)} sequences share a token with query {i + 1}; it has {len(pick)} candidates, not {k}")
            out.append(pick)
        return out


# -- the search-depth command ------------------------------------------------------------------------


@click.command("search-depth")
@click.argument("project", type=click.Path(exists=True, file_okay=False))
@click.option("--investigation", "-i", default="default", show_default=True, help="investigation name")
@click.option("--result-set", type=int, default=None, help="result set id (default: the latest); its filter must be tfidf:k=K+random:n=N")
@click.option("--query", "query_ids", type=int, multiple=True, help="query id (repeatable; default: every query in the result set)")
@click.option("--top-m", "m", type=int, default=10, show_default=True, help="compare the mean of the top m influences")
@click.option("--repeats", type=int, default=20, show_default=True, help="random subsamples averaged per sample size")
@click.option("--plot/--no-plot", default=True, show_default=True, help="draw the curve in the terminal")
@click.option("--json", "as_json", is_flag=True, help="print the curves and estimates as JSON")
def search_depth_command(project, investigation, result_set, query_ids, m, repeats, plot, as_json):
    """How many unfiltered sequences must be searched to find influences as large as the TF-IDF
    candidates' (the paper's search depth). Scores are positive when a sequence makes the
    completion more likely."""
    from inflq import open_project, search_depth_for_result_set

    try:
        proj = open_project(project)
        reports = search_depth_for_result_set(proj, investigation, result_set, list(query_ids) or None, m=m, repeats=repeats)
    except InflqError as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        click.echo(json.dumps([r.to_dict() for r in reports], indent=2))
        return
    for r in reports:
        click.echo(r.summary())
        click.echo(f"  {'sequences searched':>20}  {'mean top-' + str(r.m) + ' influence':>24}")
        for size, stat in zip(r.sizes, r.statistic, strict=True):
            click.echo(f"  {int(size):>20,}  {stat:>24.6g}")
        if plot:
            click.echo(_plot(r))


def _plot(r) -> str:
    """The curve in the terminal (x: log10 of the sequences searched; the horizontal line is the
    TF-IDF candidates' top-m mean, the vertical one the estimate)."""
    import plotext

    try:
        fig = plotext.figure
        fig.clear()
        fig.plot_size(72, 18)
        x = [float(v) for v in np.log10(r.sizes)]
        fig.draw(fig.signal(x, [float(v) for v in r.statistic], marker="dot"))
        fig.line(float(r.target))
        if r.estimate is not None and r.estimate > 0:
            fig.line(float(np.log10(r.estimate)), orientation="vertical")
        fig.title(f"query {r.query_id}: unfiltered top-{r.m} mean vs. TF-IDF candidates (horizontal line)")
        fig.label("log10(sequences searched)", "x")
        return fig.build().string(colorless=True)
    except Exception as exc:  # plotext's API changes between majors; the table above has the data
        return f"(no plot: plotext {getattr(plotext, '__version__', '')} failed: {exc})"
