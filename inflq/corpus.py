"""Training corpora: reading documents, chunking them into training sequences, and the
memory-mapped token store that every pass reads from.

A document longer than the context is cut into chunks; each chunk is a training sequence with the
stable id ``<document id>:<chunk index>``. Tokens live in ``corpus/tokens.bin`` (uint32) with
``corpus/offsets.npy`` (int64, one more than the number of sequences), so a corpus of millions of
sequences is never held in memory as Python objects.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import InflqError

FORMATS = ("jsonl", "text", "datasets")


@dataclass
class Document:
    doc_id: str
    text: str
    source: str
    meta: dict[str, Any]


def detect_format(path: Path) -> str:
    path = Path(path)
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists() or (path / "state.json").exists():
            return "datasets"
        raise InflqError(f"{path} is a folder but not a dataset saved by the datasets library; give a .jsonl or .txt file")
    if path.suffix.lower() in (".jsonl", ".json", ".ndjson"):
        return "jsonl"
    return "text"


def read_documents(path: Path, fmt: str = "auto", text_field: str = "text", id_field: str = "id") -> Iterator[Document]:
    """Yield the documents of a corpus file, with clear errors naming the file and line."""
    path = Path(path)
    if not path.exists():
        raise InflqError(f"corpus {path} does not exist; give a JSONL file, a text file or a saved dataset folder")
    fmt = detect_format(path) if fmt in (None, "", "auto") else fmt
    if fmt == "jsonl":
        yield from _read_jsonl(path, text_field, id_field)
    elif fmt == "text":
        yield from _read_text(path)
    elif fmt == "datasets":
        yield from _read_datasets(path, text_field, id_field)
    else:
        raise InflqError(f"unknown corpus format {fmt!r}; use one of {', '.join(FORMATS)}")


def iter_jsonl(path: Path, expect: str) -> Iterator[tuple[int, dict]]:
    """``(line number, object)`` for each non-blank line of a JSONL file. Bad UTF-8, bad JSON or a
    line that is not an object is an :class:`InflqError` naming the file and line (``expect`` says
    what each line should hold)."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
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


def _read_jsonl(path: Path, text_field: str, id_field: str) -> Iterator[Document]:
    for lineno, obj in iter_jsonl(path, f"a {text_field!r} field"):
        text = obj.get(text_field)
        if not isinstance(text, str):
            what = "no" if text is None else f"a non-string ({type(text).__name__})"
            raise InflqError(f"{path}:{lineno}: {what} {text_field!r} field; each line needs a string {text_field!r}")
        doc_id = obj.get(id_field)
        doc_id = f"line-{lineno}" if doc_id is None else str(doc_id)
        meta = {k: v for k, v in obj.items() if k not in (text_field, id_field)}
        source = meta.get("source")
        yield Document(doc_id, text, str(source) if source is not None else "", meta)


def _read_text(path: Path) -> Iterator[Document]:
    """Plain text: documents are separated by blank lines."""
    try:
        content = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise InflqError(f"{path}: not valid UTF-8 (byte {exc.start}); re-encode the file as UTF-8") from None
    for i, para in enumerate(p for p in content.split("\n\n") if p.strip()):
        yield Document(f"doc-{i}", para.strip(), "", {})


def _read_datasets(path: Path, text_field: str, id_field: str) -> Iterator[Document]:
    try:
        import datasets  # optional extra
    except ImportError:
        raise InflqError("reading a saved dataset needs the datasets extra: pip install 'inflq[datasets]'") from None
    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        ds = ds["train"] if "train" in ds else ds[next(iter(ds))]
    if text_field not in ds.column_names:
        raise InflqError(f"{path}: no {text_field!r} column (columns: {', '.join(ds.column_names)}); use --text-field")
    for i, row in enumerate(ds):
        doc_id = str(row.get(id_field, f"row-{i}"))
        meta = {k: v for k, v in row.items() if k not in (text_field, id_field) and isinstance(v, (str, int, float, bool))}
        yield Document(doc_id, row[text_field], str(meta.get("source", "")), meta)


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


class CorpusStore:
    """Read-only access to the tokenized training sequences of a project."""

    def __init__(self, folder: Path) -> None:
        self.folder = _settled(Path(folder))
        try:
            self.info = json.loads((self.folder / "store.json").read_text())
            self.offsets = np.load(self.folder / "offsets.npy", allow_pickle=False)
            size = (self.folder / "tokens.bin").stat().st_size
        except (OSError, ValueError) as exc:
            raise InflqError(f"the token store {self.folder} is missing or damaged ({exc}); rebuild it with `inflq corpus rebuild`") from None
        if size != int(self.offsets[-1]) * 4:
            raise InflqError(f"the token store {self.folder} is truncated; rebuild it with `inflq corpus rebuild`")
        self.tokens = np.memmap(self.folder / "tokens.bin", dtype=np.uint32, mode="r") if size else np.zeros(0, np.uint32)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def fingerprint(self) -> str:
        return self.info["fingerprint"]

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def get(self, i: int) -> np.ndarray:
        return np.asarray(self.tokens[self.offsets[i] : self.offsets[i + 1]], dtype=np.int64)

    def many(self, indices: np.ndarray) -> list[np.ndarray]:
        return [self.get(int(i)) for i in indices]


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
) -> Iterator[tuple[int, str, str, int, int, str, str]]:
    """Tokenize and chunk ``documents`` into ``folder`` (written to a temporary folder first and
    moved into place at the end). Yields one row per sequence for the catalog:
    ``(idx, seq_id, doc_id, chunk, n_tokens, source, meta_json)``."""
    tmp = Path(folder).with_name(Path(folder).name + ".tmp")
    try:
        yield from _build_store(documents, tokenizer, folder, max_length=max_length, add_bos=add_bos, append_eos=append_eos, fingerprint=fingerprint, batch_docs=batch_docs)
    except BaseException:  # a bad document must not leave a half-written store behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _build_store(documents, tokenizer, folder, *, max_length, add_bos, append_eos, fingerprint, batch_docs):
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
    unknown = 0
    with open(tmp / "tokens.bin", "wb") as out:
        pending: list[Document] = []

        def flush() -> Iterator[tuple]:
            nonlocal idx, unknown
            enc = tokenizer([d.text for d in pending], add_special_tokens=False)["input_ids"]
            for doc, ids in zip(pending, enc, strict=False):
                if doc.doc_id in seen:
                    raise InflqError(f"corpus: document id {doc.doc_id!r} appears twice; ids must be unique")
                seen.add(doc.doc_id)
                if eos is not None:
                    ids = list(ids) + [eos]
                meta = json.dumps(doc.meta, ensure_ascii=False, default=str)
                for c, start in enumerate(range(0, len(ids), body)):
                    piece = ids[start : start + body]
                    if bos is not None:
                        piece = [bos] + piece
                    if len(piece) < 2:
                        continue  # no next-token prediction in it: it would carry no gradient
                    arr = np.asarray(piece, dtype=np.uint32)
                    if arr.size and int(arr.max()) >= vocab:
                        raise InflqError("the tokenizer produced ids beyond its vocabulary; check the tokenizer files")
                    if unk is not None:
                        unknown += int((arr == unk).sum())
                    out.write(arr.tobytes())
                    offsets.append(offsets[-1] + len(arr))
                    yield (idx, f"{doc.doc_id}:{c}", doc.doc_id, c, len(arr), doc.source, meta)
                    idx += 1
            pending.clear()

        for doc in documents:
            pending.append(doc)
            if len(pending) >= batch_docs:
                yield from flush()
        if pending:
            yield from flush()
    if idx == 0:
        shutil.rmtree(tmp)
        raise InflqError("the corpus has no text to train on (empty, or every document is blank); give a non-empty corpus")
    np.save(tmp / "offsets.npy", np.asarray(offsets, dtype=np.int64))
    info = {"fingerprint": fingerprint, "max_length": max_length, "add_bos": add_bos, "append_eos": append_eos, "num_sequences": idx,
            "num_tokens": offsets[-1], "unknown_tokens": unknown}
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
