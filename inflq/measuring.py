"""What a query measures: its measurement (a plugin, :class:`inflq.Measurement`) turned into token
sequences with weights on their tokens' log-probabilities (:class:`inflq.MeasurementTerm`).

A query row names its measurement (``measurement``: a spec such as ``margin``; rows from before
measurements were chosen read ``logprob``) and, for a measurement that compares two completions,
its ``alternative``. :func:`measure` tokenizes the query (the completion, and the alternative after
the same prompt) and asks the measurement for its terms; the gradient engine
(:meth:`inflq.GradientEngine.measurement_gradients`) takes the gradient of their weighted sum for
every estimator, and :func:`measured_values` evaluates it under a model (LDS, leave-one-out). No
estimator knows which measurement a query has.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .errors import InflqError

if TYPE_CHECKING:
    from .base import Measurement, MeasurementTerm
    from .queries import TokenizedQuery


def make_measurement(spec: str | None = None) -> Measurement:
    """The measurement ``spec`` names (``None`` or empty: the registry's default, ``logprob``)."""
    from .options import parse_spec
    from .plugins import get_registry

    reg = get_registry()
    s = parse_spec(spec or reg.default("measurement"))
    return reg.create("measurement", s.name, s.options)  # type: ignore[return-value]


def default_measurement() -> str:
    """The name a query gets when none is chosen."""
    from .plugins import get_registry

    return str(get_registry().default("measurement"))


def checked_choice(spec: str | None, alternative: str | None) -> tuple[str, str | None]:
    """``(measurement spec, alternative)`` as a query stores them, checked: the measurement exists,
    and an alternative is given exactly when it reads one. One-line errors name the fix."""
    m = make_measurement(spec)
    alternative = alternative if alternative else None
    if m.alternative and alternative is None:
        raise InflqError(f"measurement {m.name} compares the completion with an alternative: give one, e.g. --alternative \" B\"")
    if not m.alternative and alternative is not None:
        from .plugins import get_registry

        reg = get_registry()
        takes = [n for n, cls in sorted(reg.all("measurement").items()) if cls.alternative]
        hint = f", or choose --measurement {takes[0]}" if takes else ""
        raise InflqError(f"measurement {m.name} reads no alternative: drop --alternative{hint}")
    return m.spec(), alternative


def measurement_spec(query: dict) -> str:
    """The measurement a query row names (rows without the column: the default)."""
    return query.get("measurement") or default_measurement()


def describe(query: dict) -> str:
    """The query's measurement in a few words, for tables: ``logprob``, ``margin vs ' B'``."""
    spec = measurement_spec(query)
    alt = query.get("alternative")
    return f"{spec} vs {alt!r}" if alt else spec


def formula(query: dict) -> str:
    """What the query's measurement computes (``log p(completion) - log p(alternative)``), or its
    spec when its plugin is no longer installed."""
    spec = measurement_spec(query)
    try:
        return make_measurement(spec).formula()
    except InflqError:
        return spec


def sign_note(query: dict) -> str:
    """What a positive score means for this query, for headers: the completion made more likely,
    or (another measurement) the measurement raised."""
    if measurement_spec(query) == default_measurement():
        return "positive = makes the completion more likely"
    return f"measuring {describe(query)}; positive = raises {formula(query)}"


def measure(runtime, query: dict) -> list[MeasurementTerm]:
    """The token sequences and weights of a query row's measurement (``prompt``, ``completion``,
    ``chat``, ``measurement``, ``alternative``), tokenized as a run measures them."""
    from .base import MeasurementTerm

    m = make_measurement(measurement_spec(query))
    chat = bool(query.get("chat"))
    completion = runtime.tokenize_query(query["prompt"], query["completion"], chat)
    alt = query.get("alternative") or None
    alternative = None
    if m.alternative:
        if alt is None:
            which = f"query {query['id']}: " if query.get("id") is not None else ""
            raise InflqError(f"{which}measurement {m.name} needs an alternative; set one with `inflq query edit PROJECT ID --alternative TEXT`")
        try:
            alternative = runtime.tokenize_query(query["prompt"], alt, chat)
            require_known_completion(runtime.tokenizer, alternative, alt)
        except InflqError as exc:
            raise InflqError(f"the alternative: {exc}") from None
        if np.array_equal(alternative.tokens, completion.tokens):
            raise InflqError(f"the alternative {alt!r} tokenizes as the completion does: the {m.name} would be 0; give a different alternative")
    terms = m.terms(completion, alternative)
    if not terms:
        raise InflqError(f"measurement {m.name} gave no token sequence to measure")
    for t in terms:
        if not isinstance(t, MeasurementTerm):
            raise InflqError(f"measurement {m.name} returned {type(t).__name__}, not MeasurementTerm")
        if not 1 <= int(t.start) < len(t.tokens) or len(t.weights) != len(t.tokens) - int(t.start):
            raise InflqError(f"measurement {m.name}: a term needs 1 <= start < len(tokens) and one weight per token from start")
        if not np.all(np.isfinite(t.weights)):
            raise InflqError(f"measurement {m.name} gave non-finite weights")
    return terms


def require_known_completion(tokenizer, query: TokenizedQuery, completion: str) -> None:
    """Refuse a completion made only of the tokenizer's unknown token: its measurement would be
    the probability of ``<unk>``, which says nothing about the completion as written."""
    unk = getattr(tokenizer, "unk_token_id", None)
    measured = query.tokens[query.completion_start :]
    if unk is not None and len(measured) and bool(np.all(measured == unk)):
        raise InflqError(
            f"every token of the completion {completion!r} is unknown to the model's tokenizer ({tokenizer.unk_token}); "
            "the measurement would be the probability of that token, not of the completion: use words the tokenizer knows"
        )


def check_query(runtime, query: dict) -> dict:
    """A query dict (prompt, completion, chat, measurement, alternative) checked as a run will
    measure it: it tokenizes, its completion is not all unknown tokens, its measurement exists and
    has the alternative it needs (and none it does not read). Returns it with the measurement's
    spec filled in (the default where none was chosen)."""
    spec, alternative = checked_choice(query.get("measurement"), query.get("alternative"))
    query = {**query, "measurement": spec, "alternative": alternative}
    tq = runtime.tokenize_query(query["prompt"], query["completion"], bool(query.get("chat", False)))
    require_known_completion(runtime.tokenizer, tq, query["completion"])
    measure(runtime, query)
    return query


def measured_values(model, measured: list[list[MeasurementTerm]], device=None) -> np.ndarray:
    """Each query's measurement under ``model`` (``measured[q]``: its terms), in float64."""
    import torch

    device = device or next(model.parameters()).device
    out = []
    with torch.no_grad():
        for terms in measured:
            total = 0.0
            for t in terms:
                ids = torch.as_tensor(np.asarray(t.tokens, np.int64), device=device)[None]
                logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits.double()
                logp = torch.log_softmax(logits, -1)[0, :-1].gather(1, ids[0, 1:, None])[:, 0]
                total += float((logp[int(t.start) - 1 :] * torch.as_tensor(t.weights, dtype=torch.float64, device=device)).sum())
            out.append(total)
    return np.array(out)
