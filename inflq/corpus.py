"""Training corpora: reading documents, chunking them into training sequences, and the
memory-mapped token store that every pass reads from.

A document longer than the context is cut into chunks; each chunk is a training sequence with the
stable id ``<document id>:<chunk index>``. Tokens live in ``corpus/tokens.bin`` (uint32) with
``corpus/offsets.npy`` (int64, one more than the number of sequences), so a corpus of millions of
sequences is never held in memory as Python objects.

Instruction data (``{"prompt", "completion"}`` or chat ``{"messages": [...]}`` rows) is one training
sequence per document, and the loss of a fine-tune covers its response only: with ``loss_on =
"response"`` the store keeps ``corpus/targets.bin`` (uint8, one per token: 1 where the token is a
trained target), and :meth:`CorpusStore.get` returns :class:`TrainingTokens` that carry it to every
pass (:func:`inflq.engine.make_batch`), the trainers and TF-IDF. Such a document is never cut
mid-response: one longer than the context is refused, or truncated before the first response that
does not fit (dropped where none fits), and counted (``store.json``).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import InflqError

FORMATS = ("jsonl", "parquet", "text", "datasets")
LOSS_ON = ("response", "all")  # instruction data: the loss on the response (completion, assistant turns) only, or on every token
TOO_LONG = ("truncate", "refuse")  # an instruction document longer than the context
PARQUET_ROWS = 1024  # rows per batch read from a parquet file


@dataclass(frozen=True)
class Fields:
    """Which fields of a corpus row hold what: ``text`` (plain text), ``prompt`` and ``completion``
    (instruction pairs), ``messages`` (a chat: a list of ``{"role", "content"}``), ``id``."""

    text: str = "text"
    id: str = "id"
    prompt: str = "prompt"
    completion: str = "completion"
    messages: str = "messages"


@dataclass
class Document:
    """A corpus document. ``responses``: for instruction data, the character spans of ``text`` that
    the fine-tune trained on (a completion, the assistant's turns); ``None`` for plain text.
    ``messages``: a chat not yet rendered (:func:`render_chat` needs the tokenizer)."""

    doc_id: str
    text: str
    source: str
    meta: dict[str, Any]
    responses: list[tuple[int, int]] | None = None
    messages: list[dict] | None = field(default=None, repr=False)


class TrainingTokens(np.ndarray):
    """A training sequence's token ids (int64) with ``targets``: a bool array of the same length,
    True where the token is a target of the training loss (the fine-tune's response), i.e. where
    the prediction of it from the tokens before counts. A plain token array trains on every token
    (:func:`targets_of` gives ``None``). An array derived from one (a slice, a copy of another
    length) does not keep the mask: use :func:`targets_of` on the original."""

    targets: np.ndarray | None

    def __new__(cls, tokens: np.ndarray, targets: np.ndarray) -> TrainingTokens:
        obj = np.asarray(tokens, dtype=np.int64).view(cls)
        obj.targets = np.asarray(targets, dtype=bool)
        if obj.targets.shape != obj.shape:
            raise ValueError("targets must have one entry per token")
        return obj

    def __array_finalize__(self, obj) -> None:
        same = obj is not None and getattr(obj, "shape", None) == self.shape
        self.targets = getattr(obj, "targets", None) if same else None


def targets_of(tokens: Any) -> np.ndarray | None:
    """The mask of trained target tokens of a training sequence (:class:`TrainingTokens`), or
    ``None`` where every token is trained (plain text)."""
    return getattr(tokens, "targets", None)


def detect_format(path: Path) -> str:
    path = Path(path)
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists() or (path / "state.json").exists():
            return "datasets"
        raise InflqError(f"{path} is a folder but not a dataset saved by the datasets library; give a .jsonl, .parquet or .txt file")
    suffixes = [x.lower() for x in path.suffixes[-2:]]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    if suffixes and suffixes[-1] in (".jsonl", ".json", ".ndjson"):
        return "jsonl"
    if suffixes and suffixes[-1] in (".parquet", ".pq"):
        return "parquet"
    return "text"


def read_documents(path: Path, fmt: str = "auto", text_field: str = "text", id_field: str = "id", fields: Fields | None = None) -> Iterator[Document]:
    """Yield the documents of a corpus file, with clear errors naming the file and line (row).
    JSONL (``.gz`` too) is read line by line and parquet in batches of rows, so memory holds one
    batch, not the corpus. A row is plain text (``fields.text``), an instruction pair
    (``fields.prompt`` and ``fields.completion``) or a chat (``fields.messages``)."""
    path = Path(path)
    fields = fields or Fields(text=text_field, id=id_field)
    if not path.exists():
        raise InflqError(f"corpus {path} does not exist; give a JSONL or parquet file, a text file or a saved dataset folder")
    fmt = detect_format(path) if fmt in (None, "", "auto") else fmt
    if fmt == "jsonl":
        for lineno, obj in iter_jsonl(path, f"a {fields.text!r}, {fields.prompt!r}/{fields.completion!r} or {fields.messages!r} field"):
            yield row_document(obj, fields, f"{path}:{lineno}", f"line-{lineno}")
    elif fmt == "parquet":
        yield from _read_parquet(path, fields)
    elif fmt == "text":
        yield from _read_text(path)
    elif fmt == "datasets":
        yield from _read_datasets(path, fields)
    else:
        raise InflqError(f"unknown corpus format {fmt!r}; use one of {', '.join(FORMATS)}")


def join(prompt: str, completion: str) -> tuple[str, int]:
    """The joined text and the character offset where the completion starts."""
    if prompt and completion and not prompt[-1].isspace() and not completion[0].isspace():
        prompt = prompt + " "
    return prompt + completion, len(prompt)


def row_document(row: dict, fields: Fields, where: str, default_id: str) -> Document:
    """The document a corpus row holds: a chat (``fields.messages``), an instruction pair
    (``fields.prompt`` and ``fields.completion``, joined as a query's are) or plain text."""
    doc_id = row.get(fields.id)
    doc_id = default_id if doc_id is None else str(doc_id)
    used = {fields.id}
    responses = messages = None
    if row.get(fields.messages) is not None:
        messages = check_messages(row[fields.messages], f"{where}: {fields.messages!r}")
        text, used = "", used | {fields.messages}
    elif row.get(fields.prompt) is not None or row.get(fields.completion) is not None:
        prompt, completion = row.get(fields.prompt), row.get(fields.completion)
        if not isinstance(prompt, str) or not isinstance(completion, str):
            raise InflqError(f"{where}: an instruction row needs string {fields.prompt!r} and {fields.completion!r} fields")
        if not completion.strip():
            raise InflqError(f"{where}: the {fields.completion!r} is empty; an instruction row needs a response to train on")
        text, start = join(prompt, completion)
        responses, used = [(start, len(text))], used | {fields.prompt, fields.completion}
    else:
        text = row.get(fields.text)
        if not isinstance(text, str):
            what = "no" if text is None else f"a non-string ({type(text).__name__})"
            raise InflqError(
                f"{where}: {what} {fields.text!r} field; each row needs a string {fields.text!r} (--text-field), "
                f"{fields.prompt!r} and {fields.completion!r}, or {fields.messages!r}"
            )
        used = used | {fields.text}
    meta = {k: v for k, v in row.items() if k not in used and (v is None or isinstance(v, (str, int, float, bool)))}
    source = meta.get("source")
    return Document(doc_id, text, str(source) if source is not None else "", meta, responses, messages)


def check_messages(messages: Any, where: str) -> list[dict]:
    """A chat as a list of ``{"role": str, "content": str}`` with at least one assistant turn."""
    if not isinstance(messages, list) or not messages:
        raise InflqError(f"{where} must be a non-empty list of {{\"role\", \"content\"}} objects")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise InflqError(f"{where}: message {i + 1} needs string \"role\" and \"content\" fields")
        out.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == "assistant" for m in out):
        raise InflqError(f"{where}: no \"assistant\" message, so nothing to train on")
    return out


def render_chat(tokenizer, messages: list[dict], where: str) -> tuple[str, list[tuple[int, int]]]:
    """A chat rendered with the tokenizer's chat template, and the character spans of the assistant's
    turns: for each assistant message, the text that rendering it added after the conversation so
    far with the generation prompt (its content and the template's end-of-turn marks, which the
    fine-tune also trained). Refused where the template does not render a conversation as the
    extension of its beginning (such templates rewrite earlier turns; train on them with
    ``--loss-on all`` only after checking what they render)."""
    if not getattr(tokenizer, "chat_template", None):
        raise InflqError(f"{where}: a chat row, but the tokenizer has no chat template; give prompt/completion rows, or a tokenizer with one")

    def render(msgs: list[dict], prompt: bool) -> str:
        try:
            return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=prompt)
        except Exception as exc:
            raise InflqError(f"{where}: the chat template cannot render this chat ({str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__})") from None

    text = render(messages, False)
    spans = []
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before, upto = render(messages[:k], True), render(messages[: k + 1], False)
        if not (upto.startswith(before) and text.startswith(upto)):
            raise InflqError(
                f"{where}: the chat template renders the conversation differently from its beginning (assistant turn {k + 1}), "
                "so its assistant tokens cannot be told apart; use prompt/completion rows"
            )
        if len(upto) > len(before):
            spans.append((len(before), len(upto)))
    return text, spans


def iter_jsonl(path: Path, expect: str) -> Iterator[tuple[int, dict]]:
    """``(line number, object)`` for each non-blank line of a JSONL file (gzip-compressed where its
    name ends in ``.gz``). Bad UTF-8, bad JSON or a line that is not an object is an
    :class:`InflqError` naming the file and line (``expect`` says what each line should hold)."""
    opener = gzip.open if Path(path).suffix.lower() == ".gz" else open
    with opener(path, "rb") as f:
        for lineno, raw in _lines(f, path):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise InflqError(f"{path}:{lineno}: not valid UTF-8 (byte {exc.start}); re-encode the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InflqError(f"{path}:{lineno}: not valid JSON ({exc.msg.removesuffix(' at')} at column {exc.colno}); fix or remove that line") from None
            if not isinstance(obj, dict):
                raise InflqError(f"{path}:{lineno}: expected a JSON object with {expect}, got {type(obj).__name__}")
            yield lineno, obj


def _lines(f, path: Path) -> Iterator[tuple[int, bytes]]:
    try:
        yield from enumerate(f, 1)
    except (OSError, EOFError) as exc:  # a damaged or truncated gzip stream
        raise InflqError(f"{path}: cannot be read to the end ({exc}); check the file") from None


def _read_parquet(path: Path, fields: Fields) -> Iterator[Document]:
    """A parquet file, ``PARQUET_ROWS`` rows at a time (pyarrow: the columns of one batch in memory)."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise InflqError("reading parquet needs pyarrow: pip install 'inflq[parquet]'") from None
    try:
        pf = pq.ParquetFile(str(path))
    except Exception as exc:
        raise InflqError(f"{path}: not a readable parquet file ({str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__})") from None
    names = set(pf.schema_arrow.names)
    if not names & {fields.text, fields.prompt, fields.messages}:
        raise InflqError(
            f"{path}: no {fields.text!r}, {fields.prompt!r} or {fields.messages!r} column (columns: {', '.join(sorted(names))}); "
            "use --text-field, --prompt-field or --messages-field"
        )
    row = 0
    for batch in pf.iter_batches(batch_size=PARQUET_ROWS):
        for obj in batch.to_pylist():
            row += 1
            yield row_document(obj, fields, f"{path}: row {row}", f"row-{row - 1}")


def _read_text(path: Path) -> Iterator[Document]:
    """Plain text: documents are separated by blank lines."""
    try:
        content = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise InflqError(f"{path}: not valid UTF-8 (byte {exc.start}); re-encode the file as UTF-8") from None
    for i, para in enumerate(p for p in content.split("\n\n") if p.strip()):
        yield Document(f"doc-{i}", para.strip(), "", {})


def _read_datasets(path: Path, fields: Fields) -> Iterator[Document]:
    try:
        import datasets  # optional extra
    except ImportError:
        raise InflqError("reading a saved dataset needs the datasets extra: pip install 'inflq[datasets]'") from None
    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        ds = ds["train"] if "train" in ds else ds[next(iter(ds))]
    if not set(ds.column_names) & {fields.text, fields.prompt, fields.messages}:
        raise InflqError(
            f"{path}: no {fields.text!r}, {fields.prompt!r} or {fields.messages!r} column (columns: {', '.join(ds.column_names)}); "
            "use --text-field, --prompt-field or --messages-field"
        )
    for i, row in enumerate(ds):
        yield row_document(row, fields, f"{path}: row {i}", f"row-{i}")


def corpus_fingerprint(path: Path, legacy_name: str | None = None) -> str:
    """Content hash of a corpus file or folder: a file's bytes alone (so a renamed copy has the
    same fingerprint), a folder's files' relative paths and bytes.

    ``legacy_name``: the rule of projects made before fingerprints were content-only, which
    hashed a single file's name too (``legacy_name``, the name it had then) before its bytes."""
    path = Path(path)
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        if path.is_dir():
            h.update(str(f.relative_to(path)).encode())
        elif legacy_name is not None:
            h.update(legacy_name.encode())
        with open(f, "rb") as fh:
            while block := fh.read(1 << 22):
                h.update(block)
    return h.hexdigest()[:32]


def unknown_tokens_note(info: dict, unk_token: str | None) -> str | None:
    """A warning when the tokenizer did not know part of the corpus (its share of ``<unk>``
    tokens), from a token store's ``store.json``; None when it knew every token."""
    unknown, total = info.get("unknown_tokens") or 0, info.get("num_tokens") or 0
    if not unknown or not total:
        return None
    return (f"{unknown / total:.1%} of the corpus's tokens ({unknown} of {total}) are unknown to the model's tokenizer "
            f"({unk_token or 'unk'}), so the model sees each of them as that one token; check that the corpus and the model belong together")


def _aside(folder: Path) -> Path:
    """Where :func:`build_store` moves the previous store while it swaps in the new one."""
    return folder.with_name(folder.name + ".old")


def _settled(folder: Path) -> Path:
    """The store folder to read: ``folder``, or, where a rebuild was killed between moving the old
    store aside and moving the new one in, the old store, moved back (or read where it is, if the
    project is not writable)."""
    aside = _aside(folder)
    if not folder.exists() and aside.exists():
        try:
            os.replace(aside, folder)
        except OSError:
            return aside
    return folder


def truncation_note(info: dict) -> str | None:
    """A warning when instruction documents were truncated or dropped for the context (from a
    token store's ``store.json``); None when none was."""
    cut, dropped = info.get("truncated_documents") or 0, info.get("dropped_documents") or 0
    if not cut and not dropped:
        return None
    return (f"{cut} instruction documents longer than the context ({info.get('max_length')} tokens) were truncated before their "
            f"first response that did not fit, and {dropped} in which no response fitted were left out; raise --max-length "
            "to keep them whole, or --too-long refuse to list them")


class CorpusStore:
    """Read-only access to the tokenized training sequences of a project."""

    def __init__(self, folder: Path) -> None:
        self.folder = _settled(Path(folder))
        try:
            self.info = json.loads((self.folder / "store.json").read_text())
            self.offsets = np.load(self.folder / "offsets.npy", allow_pickle=False)
            size = (self.folder / "tokens.bin").stat().st_size
            masked = bool(self.info.get("targets"))
            mask_size = (self.folder / "targets.bin").stat().st_size if masked else 0
        except (OSError, ValueError) as exc:
            raise InflqError(f"the token store {self.folder} is missing or damaged ({exc}); rebuild it with `inflq corpus rebuild`") from None
        if size != int(self.offsets[-1]) * 4 or (masked and mask_size != int(self.offsets[-1])):
            raise InflqError(f"the token store {self.folder} is truncated; rebuild it with `inflq corpus rebuild`")
        self.tokens = np.memmap(self.folder / "tokens.bin", dtype=np.uint32, mode="r") if size else np.zeros(0, np.uint32)
        self.targets = np.memmap(self.folder / "targets.bin", dtype=np.uint8, mode="r") if mask_size else None

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def fingerprint(self) -> str:
        """The corpus file's content fingerprint (what the project recorded)."""
        return self.info["fingerprint"]

    @property
    def loss_on(self) -> str:
        """``response``: instruction documents train on their responses only (the store keeps the
        mask); ``all``: every token (plain text only, or ``--loss-on all``)."""
        return "response" if self.targets is not None else "all"

    @property
    def key(self) -> str:
        """What the training sequences' gradients depend on besides the model: the corpus's
        fingerprint, and the loss mask where there is one (factor sets, TF-IDF and gradient
        indexes are keyed by it, so that masked and unmasked data never share them)."""
        return self.fingerprint if self.targets is None else f"{self.fingerprint}:loss-on-response"

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def get(self, i: int) -> np.ndarray:
        """Sequence ``i``'s tokens (int64); :class:`TrainingTokens` with its mask of trained targets
        where the store has one."""
        s, e = self.offsets[i], self.offsets[i + 1]
        tokens = np.asarray(self.tokens[s:e], dtype=np.int64)
        if self.targets is None:
            return tokens
        return TrainingTokens(tokens, np.asarray(self.targets[s:e], dtype=bool))

    def many(self, indices: np.ndarray) -> list[np.ndarray]:
        return [self.get(int(i)) for i in indices]


def response_mask(offsets: list[tuple[int, int]], responses: list[tuple[int, int]]) -> list[bool]:
    """Per token (``offsets``: its character span), whether it overlaps a response span."""
    out = []
    for s, e in offsets:
        out.append(any(e > rs and s < re_ for rs, re_ in responses) if e > s else False)
    return out


def fit_context(ids: list[int], mask: list[bool], body: int) -> int:
    """How many leading tokens of an instruction document to keep within ``body`` tokens: all of
    them where they fit, else up to the start of the first response (a run of trained tokens) that
    does not fit whole, so that no response is cut."""
    if len(ids) <= body:
        return len(ids)
    cut = body
    while cut > 0 and mask[cut - 1] and mask[cut]:
        cut -= 1
    return cut


def build_store(
    documents: Iterator[Document],
    tokenizer,
    folder: Path,
    *,
    max_length: int,
    add_bos: bool,
    append_eos: bool,
    fingerprint: str,
    batch_docs: int = 1000,
    loss_on: str = "response",
    too_long: str = "truncate",
) -> Iterator[tuple[int, str, str, int, int, str, str]]:
    """Tokenize and chunk ``documents`` into ``folder`` (written to a temporary folder first and
    moved into place at the end). Yields one row per sequence for the catalog:
    ``(idx, seq_id, doc_id, chunk, n_tokens, source, meta_json)``.

    Instruction documents (:attr:`Document.responses`, chats rendered here) are one sequence each;
    with ``loss_on="response"`` only their responses' tokens are trained targets (an appended EOS
    too, after a response: the fine-tune trained the model to stop), written to ``targets.bin``.
    One longer than the context is refused (``too_long="refuse"``) or truncated (:func:`fit_context`)."""
    if loss_on not in LOSS_ON:
        raise InflqError(f"unknown loss_on {loss_on!r}; use one of {', '.join(LOSS_ON)}")
    if too_long not in TOO_LONG:
        raise InflqError(f"unknown too_long {too_long!r}; use one of {', '.join(TOO_LONG)}")
    tmp = Path(folder).with_name(Path(folder).name + ".tmp")
    try:
        yield from _build_store(documents, tokenizer, folder, max_length=max_length, add_bos=add_bos, append_eos=append_eos, fingerprint=fingerprint,
                                batch_docs=batch_docs, loss_on=loss_on, too_long=too_long)
    except BaseException:  # a bad document must not leave a half-written store behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _build_store(documents, tokenizer, folder, *, max_length, add_bos, append_eos, fingerprint, batch_docs, loss_on, too_long):
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    bos = tokenizer.bos_token_id if add_bos else None
    eos = tokenizer.eos_token_id if append_eos else None
    if add_bos and bos is None:
        raise InflqError("add_bos is on but the tokenizer has no BOS token; set add_bos = false in inflq.toml")
    if append_eos and eos is None:
        raise InflqError("append_eos is on but the tokenizer has no EOS token; set append_eos = false in inflq.toml")
    body = max_length - (1 if bos is not None else 0)
    if body < 2:
        raise InflqError(f"max_length {max_length} is too short; use at least 4")
    offsets = [0]
    seen: set[str] = set()
    idx = 0
    vocab = len(tokenizer)
    unk = getattr(tokenizer, "unk_token_id", None)
    counts = {"unknown": 0, "instruction": 0, "truncated": 0, "dropped": 0, "trained": 0}
    # targets.bin is written alongside tokens.bin from the first instruction document on (the
    # plain sequences before it: all trained), and kept only if the loss is on responses.
    targets_out = None
    with open(tmp / "tokens.bin", "wb") as out:
        pending: list[Document] = []

        def write(doc: Document, c: int, piece: list[int], mask: list[bool] | None) -> tuple:
            nonlocal idx, targets_out
            if bos is not None:
                piece = [bos] + piece
                mask = None if mask is None else [False] + mask
            arr = np.asarray(piece, dtype=np.uint32)
            if arr.size and int(arr.max()) >= vocab:
                raise InflqError("the tokenizer produced ids beyond its vocabulary; check the tokenizer files")
            if unk is not None:
                counts["unknown"] += int((arr == unk).sum())
            out.write(arr.tobytes())
            if mask is not None and loss_on == "response" and targets_out is None:
                targets_out = open(tmp / "targets.bin", "wb")  # noqa: SIM115 (closed in the finally below)
                targets_out.write(np.ones(offsets[-1], np.uint8).tobytes())
            if targets_out is not None:
                m = np.ones(len(arr), np.uint8) if mask is None else np.asarray(mask, np.uint8)
                m[0] = 0  # the first token is predicted from nothing
                counts["trained"] += int(m.sum())
                targets_out.write(m.tobytes())
            offsets.append(offsets[-1] + len(arr))
            row = (idx, f"{doc.doc_id}:{c}", doc.doc_id, c, len(arr), doc.source, json.dumps(doc.meta, ensure_ascii=False, default=str))
            idx += 1
            return row

        def flush() -> Iterator[tuple]:
            for doc in pending:
                if doc.messages is not None:
                    doc.text, doc.responses = render_chat(tokenizer, doc.messages, f"corpus document {doc.doc_id!r}")
            texts = [d.text for d in pending]
            if any(d.responses is not None for d in pending):
                if not getattr(tokenizer, "is_fast", False):
                    raise InflqError("instruction data needs a fast tokenizer (tokenizer.json), to find each response's tokens")
                enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
                spans = enc["offset_mapping"]
            else:
                enc = tokenizer(texts, add_special_tokens=False)
                spans = [None] * len(pending)
            for doc, ids, offs in zip(pending, enc["input_ids"], spans, strict=True):
                if doc.doc_id in seen:
                    raise InflqError(f"corpus: document id {doc.doc_id!r} appears twice; ids must be unique")
                seen.add(doc.doc_id)
                ids = list(ids)
                if doc.responses is None:
                    if eos is not None:
                        ids.append(eos)
                    for c, start in enumerate(range(0, len(ids), body)):
                        piece = ids[start : start + body]
                        if len(piece) + (bos is not None) < 2:
                            continue  # no next-token prediction in it: it would carry no gradient
                        yield write(doc, c, piece, None)
                    continue
                counts["instruction"] += 1
                mask = response_mask(offs, doc.responses)
                if eos is not None:
                    ids.append(eos)
                    mask.append(bool(mask) and mask[-1])
                full = len(ids)
                keep = fit_context(ids, mask, body)
                if keep < full:
                    if too_long == "refuse":
                        raise InflqError(
                            f"corpus: instruction document {doc.doc_id!r} is {len(ids) + (bos is not None)} tokens, longer than the context "
                            f"of {max_length}; raise --max-length, shorten it, or use --too-long truncate (cuts before a response, never inside one)"
                        )
                    ids, mask = ids[:keep], mask[:keep]
                if not any(mask[1:] if bos is None else mask):
                    counts["dropped"] += 1  # no response fits (or is there): nothing the fine-tune trained
                    continue
                counts["truncated"] += keep < full
                yield write(doc, 0, ids, mask)
            pending.clear()

        try:
            for doc in documents:
                pending.append(doc)
                if len(pending) >= batch_docs:
                    yield from flush()
            if pending:
                yield from flush()
        finally:
            if targets_out is not None:
                targets_out.close()
    if idx == 0:
        shutil.rmtree(tmp)
        raise InflqError("the corpus has no text to train on (empty, every document blank, or no response fits the context); give a non-empty corpus")
    np.save(tmp / "offsets.npy", np.asarray(offsets, dtype=np.int64))
    info = {"fingerprint": fingerprint, "max_length": max_length, "add_bos": add_bos, "append_eos": append_eos, "num_sequences": idx,
            "num_tokens": offsets[-1], "unknown_tokens": counts["unknown"], "loss_on": loss_on, "too_long": too_long, "targets": targets_out is not None,
            "instruction_documents": counts["instruction"], "truncated_documents": counts["truncated"], "dropped_documents": counts["dropped"]}
    if targets_out is not None:
        info["trained_tokens"] = counts["trained"]
    (tmp / "store.json").write_text(json.dumps(info, indent=2))
    # Swap by renames only, so a kill at any moment leaves a whole store: the new one, or the old
    # one in place or aside (``.old``, which CorpusStore puts back). Deleting the old store before
    # the rename left a window where the folder was half deleted.
    aside = _aside(folder)
    if aside.exists():
        shutil.rmtree(aside)
    if folder.exists():
        os.replace(folder, aside)
    os.replace(tmp, folder)
    shutil.rmtree(aside, ignore_errors=True)
