"""Queries: a prompt and a completion, tokenized exactly as the model sees the joined text.

A query's measurement is a plugin (:class:`inflq.Measurement`, :mod:`inflq.measuring`); the
default, ``logprob``, is ``log p(completion | prompt)``: the summed log-likelihood of the completion
tokens only; ``margin`` also reads an alternative completion after the same prompt. Prompt and
completion are joined verbatim, except that a single space is put between them when neither side
has whitespace at the join.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .corpus import join  # instruction data joins prompt and completion as a query does
from .errors import InflqError
from .measuring import check_query  # what add and edit check: tokenizing, measuring


@dataclass
class TokenizedQuery:
    """Token ids of the joined text; tokens at positions ``>= completion_start`` are measured."""

    tokens: np.ndarray
    completion_start: int
    text: str


def tokenize_query(tokenizer, prompt: str, completion: str, *, chat: bool = False, max_length: int | None = None, add_bos: bool | None = None) -> TokenizedQuery:
    if not completion or not completion.strip():
        raise InflqError("the completion is empty; a query needs a completion to measure")
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise InflqError("this tokenizer has no chat template; add the query without --chat")
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
        text, start_char = join(prompt, completion)
        specials = False  # the template already wrote the special tokens
    else:
        text, start_char = join(prompt, completion)
        specials = True
    enc = tokenizer(text, add_special_tokens=specials, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    offsets = enc.get("offset_mapping")
    special = set(tokenizer.all_special_ids)
    if add_bos is True and tokenizer.bos_token_id is not None and (not ids or ids[0] != tokenizer.bos_token_id):
        ids = [tokenizer.bos_token_id] + ids
        offsets = [(0, 0)] + list(offsets) if offsets is not None else None
    if offsets is not None:
        start = next(
            (i for i, (tok, (s, e)) in enumerate(zip(ids, offsets, strict=False)) if e > start_char and not (tok in special and s == e)),
            len(ids),
        )
    else:  # slow tokenizers: count the prompt's tokens instead
        start = len(tokenizer(text[:start_char], add_special_tokens=specials)["input_ids"])
    if start >= len(ids):
        raise InflqError(f"the completion {completion!r} tokenizes to nothing measurable; check the prompt and completion")
    if start == 0:
        raise InflqError("the prompt is empty and the tokenizer adds no BOS token; give a prompt so the first completion token has context")
    if max_length is not None and len(ids) > max_length:
        raise InflqError(f"the query is {len(ids)} tokens, longer than the model's context of {max_length}; shorten it")
    return TokenizedQuery(np.asarray(ids, dtype=np.int64), int(start), text)


def add_queries(project, investigation: str, queries: list[dict]) -> list[int]:
    """Add queries (dicts with prompt, completion, optional measurement, alternative, chat, tags,
    notes) to a project's investigation in one transaction. Each is tokenized and measured first
    (:func:`check_query`), so a bad query leaves the catalog unchanged."""
    from . import catalog

    catalog.investigation(project.db, investigation)
    runtime = project.runtime
    checked = []
    for i, q in enumerate(queries):
        # Which query, only when there are several: a lone query is not "query 1".
        which = f"query {i + 1}: " if len(queries) > 1 else ""
        if not isinstance(q.get("prompt"), str) or not isinstance(q.get("completion"), str):
            raise InflqError(f"{which}needs string 'prompt' and 'completion' fields")
        for key in ("measurement", "alternative"):
            if q.get(key) is not None and not isinstance(q[key], str):
                raise InflqError(f"{which}'{key}' must be a string")
        try:
            checked.append(check_query(runtime, q))
        except InflqError as exc:
            raise InflqError(f"{which}{exc}") from None
    return catalog.add_queries(project.db, investigation, checked)


def add_query(
    project, investigation: str, prompt: str, completion: str, chat: bool = False, tags: list[str] | None = None, notes: str = "",
    measurement: str | None = None, alternative: str | None = None,
) -> int:
    """Add one query (see :func:`add_queries`); returns its id. ``measurement``: a measurement's
    name (default: the registry's, ``logprob``); ``alternative``: the completion it is compared
    with, for one that compares (``margin``)."""
    return add_queries(project, investigation, [{
        "prompt": prompt, "completion": completion, "chat": chat, "tags": tags or [], "notes": notes,
        "measurement": measurement, "alternative": alternative,
    }])[0]


def edit_query(
    project, query_id: int, *, prompt: str | None = None, completion: str | None = None, chat: bool | None = None,
    tags: list[str] | None = None, notes: str | None = None, measurement: str | None = None, alternative: str | None = None,
) -> list[int]:
    """Change a query's prompt, completion, chat formatting, measurement, alternative, tags or notes
    (``None``: keep; ``alternative=""`` removes it). A change to what is measured (prompt,
    completion, chat formatting, measurement, alternative) is checked as :func:`add_queries` checks
    a query, and makes the query's rows in earlier result sets stale (shown as such; refused while
    its investigation has an unfinished run, which a resume would mix). Choosing a measurement that
    reads no alternative drops the query's alternative. Returns the ids of the result sets made stale."""
    import json

    from . import catalog
    from .measuring import make_measurement

    row = catalog.query(project.db, query_id)
    if measurement is not None and alternative is None and row.get("alternative") and not make_measurement(measurement).alternative:
        alternative = ""  # the old alternative belongs to the old measurement
    new = {"prompt": prompt, "completion": completion, "chat": None if chat is None else int(bool(chat)),
           "tags": None if tags is None else json.dumps(list(tags)), "notes": notes, "measurement": measurement,
           "alternative": alternative}
    changes = {k: v for k, v in new.items() if v is not None and v != (row.get(k) if k != "alternative" else row.get(k) or "")}
    if not changes:
        raise InflqError(f"query {query_id} already reads so; give a new --prompt, --completion, --measurement, --alternative, --tag or --notes")
    measured = bool({"prompt", "completion", "chat", "measurement", "alternative"} & set(changes))
    if measured:
        merged = {**row, **changes}
        checked = check_query(project.runtime, {**merged, "chat": bool(merged["chat"])})
        if "measurement" in changes:
            changes["measurement"] = checked["measurement"]
        if "alternative" in changes:
            changes["alternative"] = checked["alternative"]  # "" is stored as NULL
    return catalog.edit_query(project.db, query_id, changes, measured)


def remove_query(project, query_id: int) -> dict:
    """Delete a query with its probes and its rows in every result set (refused while its
    investigation has an unfinished run). Returns the deleted row. Query rows own no files."""
    from . import catalog

    return catalog.delete_query(project.db, query_id)
