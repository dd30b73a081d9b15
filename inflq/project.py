"""Project folders: a human-readable ``inflq.toml``, the SQLite catalog and an ``artifacts/`` folder.

A project is what users share. Paths inside are relative to the folder where possible, and the model
and corpus are identified by content fingerprints, so a copied folder notices a different model or
corpus and says so instead of showing stale results.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import threading
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import sqlite_utils

from . import catalog
from .corpus import CorpusStore, build_store, corpus_fingerprint, read_documents
from .errors import InflqError
from .modeling import (
    check_model_dir,
    fingerprint_files,
    load_model,
    load_tokenizer,
    model_files,
    pick_device,
    pick_dtype,
    sha256_file,
    tokenizer_files,
)
from .progress import Monitor
from .queries import TokenizedQuery, tokenize_query

if TYPE_CHECKING:  # the engine imports torch: opening a project to read its catalog must not
    import torch

    from .engine import GradientEngine

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

import tomli_w

CONFIG_NAME = "inflq.toml"
CATALOG_NAME = "catalog.db"
ARTIFACTS = "artifacts"
CORPUS_DIR = "corpus"


@dataclass
class ProjectConfig:
    """The contents of ``inflq.toml``."""

    name: str = "project"
    model: str = "model"
    device: str = "auto"
    dtype: str = "auto"
    modules: str = "all"
    corpus: str = "corpus.jsonl"
    corpus_format: str = "auto"
    text_field: str = "text"
    id_field: str = "id"
    max_length: int = 512
    add_bos: bool = False
    append_eos: bool = False
    seed: int = 0
    checkpoints: list[dict[str, Any]] = field(default_factory=list)

    def to_toml(self) -> dict:
        return {
            "project": {"name": self.name, "seed": self.seed},
            "model": {"path": self.model, "device": self.device, "dtype": self.dtype, "modules": self.modules},
            "corpus": {
                "path": self.corpus,
                "format": self.corpus_format,
                "text_field": self.text_field,
                "id_field": self.id_field,
            },
            "tokenization": {"max_length": self.max_length, "add_bos": self.add_bos, "append_eos": self.append_eos},
            **({"checkpoints": self.checkpoints} if self.checkpoints else {}),
        }

    @classmethod
    def from_toml(cls, data: dict, where: str) -> ProjectConfig:
        def section(name: str) -> dict:
            value = data.get(name, {})
            if not isinstance(value, dict):
                raise InflqError(f"{where}: [{name}] must be a table")
            return value

        p, m, c, t = section("project"), section("model"), section("corpus"), section("tokenization")
        cfg = cls(
            name=p.get("name", "project"),
            seed=p.get("seed", 0),
            model=m.get("path", "model"),
            device=m.get("device", "auto"),
            dtype=m.get("dtype", "auto"),
            modules=m.get("modules", "all"),
            corpus=c.get("path", "corpus.jsonl"),
            corpus_format=c.get("format", "auto"),
            text_field=c.get("text_field", "text"),
            id_field=c.get("id_field", "id"),
            max_length=t.get("max_length", 512),
            add_bos=t.get("add_bos", False),
            append_eos=t.get("append_eos", False),
            checkpoints=data.get("checkpoints", []),
        )
        for key, typ in (("name", str), ("model", str), ("corpus", str), ("max_length", int), ("add_bos", bool), ("append_eos", bool), ("seed", int), ("modules", str), ("device", str), ("dtype", str)):
            value = getattr(cfg, key)
            if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
                raise InflqError(f"{where}: {key} must be a {typ.__name__}, got {value!r}")
        if cfg.max_length < 4:
            raise InflqError(f"{where}: max_length must be at least 4")
        if "trust_remote_code" in json.dumps(data):
            raise InflqError(f"{where}: trust_remote_code is not a project setting; inflq never runs code from a model folder")
        return cfg


def _rel(path: Path, root: Path) -> str:
    try:
        return os.path.relpath(Path(path).resolve(), Path(root).resolve())
    except ValueError:  # another drive on Windows
        return str(Path(path).resolve())


def _context_length(model_dir: Path) -> int:
    try:
        cfg = json.loads((model_dir / "config.json").read_text())
    except Exception:
        return 512
    for key in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"):
        if isinstance(cfg.get(key), int):
            return min(int(cfg[key]), 2048)
    return 512


class Project:
    """An investigation project folder. Open with :meth:`open`, create with :meth:`init`."""

    def __init__(self, root: Path, config: ProjectConfig, db: sqlite_utils.Database) -> None:
        self.root = Path(root)
        self.config = config
        self._db = db
        self._db_thread = threading.get_ident()
        self._thread_dbs = threading.local()
        self._model = None
        self._tokenizer = None
        self._store: CorpusStore | None = None

    # -- creating and opening -------------------------------------------------------------------
    @classmethod
    def init(
        cls,
        root: Path,
        model: Path,
        corpus: Path,
        *,
        name: str | None = None,
        max_length: int | None = None,
        add_bos: bool | None = None,
        append_eos: bool = False,
        corpus_format: str = "auto",
        text_field: str = "text",
        id_field: str = "id",
        modules: str = "all",
        monitor: Monitor | None = None,
    ) -> Project:
        """Create a project folder. On any error nothing is left behind."""
        root, model, corpus = Path(root), Path(model), Path(corpus)
        if (root / CONFIG_NAME).exists():
            raise InflqError(f"{root} is already an inflq project; open it instead")
        check_model_dir(model)
        tokenizer = load_tokenizer(model)
        if not corpus.exists():
            raise InflqError(f"corpus {corpus} does not exist; give a JSONL file, a text file or a saved dataset folder")
        if add_bos is None:  # follow the tokenizer: Llama-style tokenizers add BOS to every text
            probe = tokenizer("a", add_special_tokens=True)["input_ids"]
            add_bos = tokenizer.bos_token_id is not None and len(probe) > 0 and probe[0] == tokenizer.bos_token_id
        config = ProjectConfig(
            name=name or root.resolve().name,
            model=_rel(model, root if root.exists() else root.parent / root.name),
            corpus=_rel(corpus, root if root.exists() else root.parent / root.name),
            corpus_format=corpus_format,
            text_field=text_field,
            id_field=id_field,
            max_length=max_length or _context_length(model),
            add_bos=bool(add_bos),
            append_eos=append_eos,
            modules=modules,
        )
        created = not root.exists()
        root.mkdir(parents=True, exist_ok=True)
        try:
            (root / CONFIG_NAME).write_text(tomli_w.dumps(config.to_toml()))
            db = catalog.connect(root / CATALOG_NAME, create=True)
            project = cls(root, config, db)
            project._tokenizer = tokenizer
            project.refresh_fingerprints(monitor)
            project.rebuild_corpus(monitor)
            project.create_investigation("default", "created with the project")
            return project
        except BaseException:
            if created:
                shutil.rmtree(root, ignore_errors=True)
            else:
                for p in (CONFIG_NAME, CATALOG_NAME, CATALOG_NAME + "-wal", CATALOG_NAME + "-shm", CORPUS_DIR, ARTIFACTS):
                    target = root / p
                    if target.is_dir():
                        shutil.rmtree(target, ignore_errors=True)
                    elif target.exists():
                        target.unlink()
            raise

    @classmethod
    def open(cls, root: Path | str) -> Project:
        root = Path(root)
        if not root.exists():
            raise InflqError(f"project folder {root} does not exist; create one with `inflq init {root} --model DIR --corpus FILE`")
        cfg_path = root / CONFIG_NAME
        if not cfg_path.is_file():
            raise InflqError(f"{root} is not an inflq project (no {CONFIG_NAME}); create one with `inflq init`")
        try:
            data = tomllib.loads(cfg_path.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise InflqError(f"{cfg_path}: not valid TOML ({exc}); fix the file") from None
        config = ProjectConfig.from_toml(data, str(cfg_path))
        readonly = not os.access(root, os.W_OK) or ((root / CATALOG_NAME).exists() and not os.access(root / CATALOG_NAME, os.W_OK))
        db = catalog.connect(root / CATALOG_NAME, readonly=readonly)
        project = cls(root, config, db)
        project.readonly = readonly
        return project

    readonly: bool = False

    @classmethod
    def create_catalog(cls, root: Path, monitor: Monitor | None = None) -> Project:
        """Build the catalog of a folder that ships only its ``inflq.toml`` (the demo does):
        fingerprints, the tokenized corpus and a default investigation. Nothing is left on error."""
        root = Path(root)
        if (root / CATALOG_NAME).exists():
            return cls.open(root)
        config = ProjectConfig.from_toml(tomllib.loads((root / CONFIG_NAME).read_text(encoding="utf-8")), str(root / CONFIG_NAME))
        db = catalog.connect(root / CATALOG_NAME, create=True)
        project = cls(root, config, db)
        try:
            project.refresh_fingerprints(monitor)
            project.rebuild_corpus(monitor)
            project.create_investigation("default", "created with the project")
        except BaseException:
            db.conn.close()
            for p in (CATALOG_NAME, CATALOG_NAME + "-wal", CATALOG_NAME + "-shm"):
                (root / p).unlink(missing_ok=True)
            shutil.rmtree(root / CORPUS_DIR, ignore_errors=True)
            raise
        return project

    def save_config(self) -> None:
        path = self.root / CONFIG_NAME
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(tomli_w.dumps(self.config.to_toml()))
        os.replace(tmp, path)

    @property
    def db(self) -> sqlite_utils.Database:
        """The catalog connection of the calling thread.

        One SQLite connection must not interleave transactions and open cursors from several
        threads (a UI thread reading while a worker writes fails with "table is locked"), so every
        other thread gets its own connection to the same file; WAL mode lets them work together."""
        if threading.get_ident() == self._db_thread:
            return self._db
        db = getattr(self._thread_dbs, "db", None)
        if db is None:
            db = catalog.connect(self.root / CATALOG_NAME, readonly=self.readonly)
            self._thread_dbs.db = db
        return db

    def close(self) -> None:
        self._db.conn.close()

    # -- paths and fingerprints -----------------------------------------------------------------
    def path(self, rel: str) -> Path:
        p = Path(rel)
        if p.is_absolute():
            return p
        joined = self.root / p
        # "proj/../data/c.jsonl" reads as "data/c.jsonl" in messages, unless a symlinked
        # project folder makes the two different files.
        tidy = Path(os.path.normpath(joined))
        try:
            if tidy != joined and tidy.exists() and os.path.samefile(tidy, joined):
                return tidy
        except OSError:
            pass
        return joined

    @property
    def model_path(self) -> Path:
        return self.path(self.config.model)

    @property
    def corpus_path(self) -> Path:
        return self.path(self.config.corpus)

    def _hash_cached(self, f: Path) -> str:
        st = f.stat()
        key = str(f.resolve())
        row = next(self.db["file_hashes"].rows_where("path = ?", [key]), None)
        if row and row["size"] == st.st_size and row["mtime_ns"] == st.st_mtime_ns:
            return row["sha256"]
        digest = sha256_file(f)
        if not self.readonly:
            with self.db.atomic():
                self.db["file_hashes"].upsert({"path": key, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}, pk="path")
        return digest

    def current_model_fingerprint(self) -> str:
        check_model_dir(self.model_path)
        return fingerprint_files(model_files(self.model_path), self._hash_cached)

    def current_tokenizer_fingerprint(self) -> str:
        return fingerprint_files(tokenizer_files(self.model_path), self._hash_cached)

    def current_corpus_fingerprint(self) -> str:
        if not self.corpus_path.exists():
            raise InflqError(f"the corpus {self.corpus_path} is missing; restore it or point inflq.toml at a copy")
        if self.corpus_path.is_file():
            st = self.corpus_path.stat()
            cached = catalog.get_meta(self.db, "corpus_stat")
            if cached == [str(self.corpus_path.resolve()), st.st_size, st.st_mtime_ns]:
                return catalog.get_meta(self.db, "corpus_fingerprint")
        return corpus_fingerprint(self.corpus_path)

    def corpus_matches(self, path: Path) -> bool:
        """Whether ``path`` holds the corpus this project was tokenized from, by content.

        The recorded fingerprint stays the project's corpus identity (factor sets and runs are
        keyed by it). A project made when a file's fingerprint also hashed its name is
        recognised by that rule, with the name its config gave it, and its content-only
        fingerprint is then recorded beside it (``corpus_content_fingerprint``), so a renamed
        or moved copy is recognised from then on."""
        recorded = self.corpus_fingerprint_recorded
        fp = corpus_fingerprint(path)
        if fp in (recorded, catalog.get_meta(self.db, "corpus_content_fingerprint", None)):
            return True
        if Path(path).is_file():
            for name in dict.fromkeys((Path(self.config.corpus).name, Path(path).name)):
                if corpus_fingerprint(path, legacy_name=name) == recorded:
                    if not self.readonly:
                        with self.db.atomic():
                            catalog.set_meta(self.db, "corpus_content_fingerprint", fp)
                    return True
        return False

    def refresh_fingerprints(self, monitor: Monitor | None = None) -> None:
        """Record the current model's fingerprint (used at init and by ``relink``)."""
        with self.db.atomic():
            catalog.set_meta(self.db, "model_fingerprint", self.current_model_fingerprint())
            catalog.set_meta(self.db, "tokenizer_fingerprint", self.current_tokenizer_fingerprint())

    @property
    def model_fingerprint(self) -> str:
        return catalog.get_meta(self.db, "model_fingerprint", "")

    @property
    def corpus_fingerprint_recorded(self) -> str:
        return catalog.get_meta(self.db, "corpus_fingerprint", "")

    def model_status(self) -> str:
        """``ok``, ``missing`` or ``different`` (from the fingerprint this project recorded)."""
        try:
            fp = self.current_model_fingerprint()
        except InflqError:
            return "missing"
        return "ok" if fp == self.model_fingerprint else "different"

    def require_model(self) -> None:
        status = self.model_status()
        if status == "missing":
            raise InflqError(f"the model {self.model_path} is missing; point the project at a copy with `inflq relink {self.root} --model DIR`")
        if status == "different":
            raise InflqError(
                f"the model in {self.model_path} differs from the one this project was made with (fingerprint); "
                f"restore it, or start a new project for the new model"
            )

    def relink(self, model: Path | None = None, corpus: Path | None = None) -> None:
        """Point the project at local copies of its model or corpus, after checking fingerprints."""
        if model is not None:
            check_model_dir(Path(model))
            fp = fingerprint_files(model_files(Path(model)), self._hash_cached)
            if fp != self.model_fingerprint:
                raise InflqError(f"{model} is not the model this project was made with (fingerprint differs)")
            self.config.model = _rel(Path(model), self.root)
        if corpus is not None:
            if not Path(corpus).exists():
                raise InflqError(f"{corpus} does not exist")
            if not self.corpus_matches(Path(corpus)):
                raise InflqError(f"{corpus} is not the corpus this project was made with (its content differs)")
            self.config.corpus = _rel(Path(corpus), self.root)
        self.save_config()

    # -- model -----------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return pick_device(self.config.device)

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            check_model_dir(self.model_path)
            self._tokenizer = load_tokenizer(self.model_path)
        return self._tokenizer

    @property
    def model(self):
        if self._model is None:
            self.require_model()
            dev = self.device
            self._model = load_model(self.model_path, dev, pick_dtype(self.config.dtype, dev))
        return self._model

    def set_runtime(self, device: str | None = None, dtype: str | None = None) -> None:
        """Change device or dtype for this session (the model reloads on next use)."""
        if device:
            self.config.device = device
        if dtype:
            self.config.dtype = dtype
        self._model = None

    def engine(self, modules: str | None = None) -> GradientEngine:
        from .engine import GradientEngine, select_modules

        return GradientEngine(self.model, select_modules(self.model, modules or self.config.modules))

    @property
    def pad_id(self) -> int:
        return int(self.tokenizer.pad_token_id)

    # -- corpus ----------------------------------------------------------------------------------
    def rebuild_corpus(self, monitor: Monitor | None = None) -> None:
        """Tokenize the corpus into the token store and the ``sequences`` table, atomically."""
        if self.readonly:
            raise InflqError("the project is read-only; copy it somewhere writable to rebuild its corpus")
        fp = corpus_fingerprint(self.corpus_path)
        docs = read_documents(self.corpus_path, self.config.corpus_format, self.config.text_field, self.config.id_field)
        rows = build_store(
            docs,
            self.tokenizer,
            self.root / CORPUS_DIR,
            max_length=self.config.max_length,
            add_bos=self.config.add_bos,
            append_eos=self.config.append_eos,
            fingerprint=fp,
        )
        cols = ("idx", "seq_id", "doc_id", "chunk", "n_tokens", "source", "meta")
        with self.db.atomic():
            self.db.execute("DELETE FROM sequences")
            self.db["sequences"].insert_all((dict(zip(cols, r, strict=False)) for r in rows), batch_size=5000)
            catalog.set_meta(self.db, "corpus_fingerprint", fp)
            catalog.set_meta(self.db, "corpus_content_fingerprint", fp)
            if self.corpus_path.is_file():
                st = self.corpus_path.stat()
                catalog.set_meta(self.db, "corpus_stat", [str(self.corpus_path.resolve()), st.st_size, st.st_mtime_ns])
        self._store = None
        note = self.unknown_tokens_note()
        if note and monitor is not None:
            monitor.warn(note)

    def unknown_tokens_note(self) -> str | None:
        """A warning with the share of the corpus's tokens the tokenizer did not know (None: none)."""
        from .corpus import unknown_tokens_note

        try:
            info = CorpusStore(self.root / CORPUS_DIR).info
        except InflqError:
            return None
        return unknown_tokens_note(info, getattr(self.tokenizer, "unk_token", None))

    @property
    def corpus(self) -> CorpusStore:
        """The token store; rebuilt (never silently reused) when the corpus file changed."""
        if self._store is None:
            store_dir = self.root / CORPUS_DIR
            recorded = self.corpus_fingerprint_recorded
            if not store_dir.exists():
                if self.corpus_path.exists():
                    self.rebuild_corpus()
                else:
                    raise InflqError(f"the corpus {self.corpus_path} and its token store are both missing; restore the corpus")
            store = CorpusStore(store_dir)
            if self.corpus_path.exists() and self.current_corpus_fingerprint() != recorded:
                if self.corpus_matches(self.corpus_path):
                    if self.corpus_path.is_file() and not self.readonly:  # recognised: skip the hash next time
                        st = self.corpus_path.stat()
                        with self.db.atomic():
                            catalog.set_meta(self.db, "corpus_stat", [str(self.corpus_path.resolve()), st.st_size, st.st_mtime_ns])
                else:
                    raise InflqError(
                        f"the corpus {self.corpus_path} changed since it was tokenized; results would be stale: "
                        f"run `inflq corpus rebuild {self.root}` (earlier result sets keep their own sequence ids)"
                    )
            if store.fingerprint != recorded:
                self.rebuild_corpus()
                store = CorpusStore(store_dir)
            self._store = store
        return self._store

    def sequence_rows(self, indices: list[int]) -> dict[int, dict]:
        if not indices:
            return {}
        out: dict[int, dict] = {}
        ids = [int(i) for i in indices]
        for start in range(0, len(ids), 900):
            part = ids[start : start + 900]
            marks = ",".join("?" * len(part))
            for row in self.db.query(f"SELECT * FROM sequences WHERE idx IN ({marks})", part):
                out[row["idx"]] = row
        return out

    def metadata_column(self, field_name: str) -> np.ndarray:
        """One metadata field for every sequence, as strings (``""`` where absent)."""
        n = self.db["sequences"].count
        out = np.full(n, "", dtype=object)
        if field_name in ("source", "doc_id", "seq_id"):
            for row in self.db.query(f"SELECT idx, [{field_name}] AS v FROM sequences"):
                out[row["idx"]] = row["v"] or ""
            return out
        for row in self.db.query("SELECT idx, json_extract(meta, ?) AS v FROM sequences", [f"$.{field_name}"]):
            out[row["idx"]] = "" if row["v"] is None else str(row["v"])
        return out

    def decode(self, tokens: np.ndarray) -> str:
        return self.tokenizer.decode([int(t) for t in tokens])

    def token_strings(self, tokens: np.ndarray) -> list[str]:
        return [self.tokenizer.decode([int(t)]) for t in tokens]

    # -- investigations, queries, probes ---------------------------------------------------------
    def create_investigation(self, name: str, description: str = "") -> int:
        name = name.strip()
        if not name:
            raise InflqError("an investigation needs a name")
        if self.db["investigations"].count_where("name = ?", [name]):
            raise InflqError(f"an investigation named {name!r} already exists; choose another name")
        with self.db.atomic():
            return self.db["investigations"].insert({"name": name, "description": description, "created_at": catalog.now()}).last_pk

    def investigations(self) -> list[dict]:
        return list(self.db.query(
            "SELECT i.*, (SELECT count(*) FROM queries q WHERE q.investigation_id = i.id) AS num_queries, "
            "(SELECT count(*) FROM result_sets r WHERE r.investigation_id = i.id) AS num_result_sets "
            "FROM investigations i ORDER BY i.id"
        ))

    def investigation(self, name: str | int) -> dict:
        col = "id" if isinstance(name, int) else "name"
        row = next(self.db["investigations"].rows_where(f"{col} = ?", [name]), None)
        if row is None:
            have = ", ".join(r["name"] for r in self.db["investigations"].rows) or "none"
            raise InflqError(f"no investigation {name!r} in this project (have: {have}); create it with `inflq investigation add`")
        return row

    def rename_investigation(self, name: str, new: str) -> None:
        inv = self.investigation(name)
        if self.db["investigations"].count_where("name = ?", [new]):
            raise InflqError(f"an investigation named {new!r} already exists")
        with self.db.atomic():
            self.db["investigations"].update(inv["id"], {"name": new})

    def delete_investigation(self, name: str) -> None:
        """Delete an investigation with its queries, probes, runs and results (artifacts too)."""
        inv = self.investigation(name)
        rs = [r["id"] for r in self.db["result_sets"].rows_where("investigation_id = ?", [inv["id"]])]
        runs = [r["id"] for r in self.db["runs"].rows_where("investigation_id = ?", [inv["id"]])]
        with self.db.atomic():
            for r in rs:
                self.db.execute("DELETE FROM results WHERE result_set_id = ?", [r])
            self.db.execute("DELETE FROM result_sets WHERE investigation_id = ?", [inv["id"]])
            for r in runs:
                self.db.execute("DELETE FROM run_shards WHERE run_id = ?", [r])
            self.db.execute("DELETE FROM runs WHERE investigation_id = ?", [inv["id"]])
            self.db.execute("DELETE FROM probes WHERE query_id IN (SELECT id FROM queries WHERE investigation_id = ?)", [inv["id"]])
            self.db.execute("DELETE FROM queries WHERE investigation_id = ?", [inv["id"]])
            self.db.execute("DELETE FROM sequence_tags WHERE investigation_id = ?", [inv["id"]])
            self.db.execute("DELETE FROM investigations WHERE id = ?", [inv["id"]])
        for r in runs:
            shutil.rmtree(self.root / ARTIFACTS / "runs" / str(r), ignore_errors=True)
        for r in rs:
            (self.root / ARTIFACTS / "results" / f"{r}.safetensors").unlink(missing_ok=True)

    def add_queries(self, investigation: str, queries: list[dict]) -> list[int]:
        """Add queries (dicts with prompt, completion, optional chat, tags, notes) in one transaction.
        Each is tokenized first, so a bad query leaves the catalog unchanged."""
        from .queries import require_known_completion

        inv = self.investigation(investigation)
        for i, q in enumerate(queries):
            # Which query, only when there are several: a lone query is not "query 1".
            which = f"query {i + 1}: " if len(queries) > 1 else ""
            if not isinstance(q.get("prompt"), str) or not isinstance(q.get("completion"), str):
                raise InflqError(f"{which}needs string 'prompt' and 'completion' fields")
            try:
                tq = self.tokenize_query(q["prompt"], q["completion"], bool(q.get("chat", False)))
                require_known_completion(self.tokenizer, tq, q["completion"])
            except InflqError as exc:
                raise InflqError(f"{which}{exc}") from None
        ids = []
        with self.db.atomic():
            pos = self.db.execute("SELECT coalesce(max(position), -1) FROM queries WHERE investigation_id = ?", [inv["id"]]).fetchone()[0]
            for q in queries:
                pos += 1
                tags = q.get("tags") or []
                ids.append(self.db["queries"].insert({
                    "investigation_id": inv["id"], "position": pos, "prompt": q["prompt"], "completion": q["completion"],
                    "chat": int(bool(q.get("chat", False))), "tags": json.dumps(tags if isinstance(tags, list) else [str(tags)]),
                    "notes": q.get("notes") or "", "created_at": catalog.now(),
                }).last_pk)
        return ids

    def add_query(self, investigation: str, prompt: str, completion: str, chat: bool = False, tags: list[str] | None = None, notes: str = "") -> int:
        return self.add_queries(investigation, [{"prompt": prompt, "completion": completion, "chat": chat, "tags": tags or [], "notes": notes}])[0]

    def queries(self, investigation: str | int) -> list[dict]:
        inv = self.investigation(investigation)
        return list(self.db["queries"].rows_where("investigation_id = ?", [inv["id"]], order_by="position"))

    def query(self, query_id: int) -> dict:
        row = next(self.db["queries"].rows_where("id = ?", [query_id]), None)
        if row is None:
            raise InflqError(f"no query with id {query_id}; see `inflq query list`")
        return row

    def delete_query(self, query_id: int) -> None:
        self.query(query_id)
        with self.db.atomic():
            self.db.execute("DELETE FROM probes WHERE query_id = ?", [query_id])
            self.db.execute("DELETE FROM results WHERE query_id = ?", [query_id])
            self.db.execute("DELETE FROM queries WHERE id = ?", [query_id])

    def tokenize_query(self, prompt: str, completion: str, chat: bool = False) -> TokenizedQuery:
        return tokenize_query(self.tokenizer, prompt, completion, chat=chat, max_length=self.config.max_length, add_bos=self.config.add_bos or None)

    def add_probe(self, query_id: int, text: str, label: str = "") -> int:
        self.query(query_id)
        if not text.strip():
            raise InflqError("a probe needs some text")
        with self.db.atomic():
            return self.db["probes"].insert({"query_id": query_id, "text": text, "label": label, "created_at": catalog.now()}).last_pk

    def probes(self, query_id: int) -> list[dict]:
        return list(self.db["probes"].rows_where("query_id = ?", [query_id], order_by="id"))

    def tokenize_sequence(self, text: str) -> np.ndarray:
        """Tokenize a hand-written training sequence the way corpus sequences are tokenized."""
        ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        if self.config.append_eos and self.tokenizer.eos_token_id is not None:
            ids.append(self.tokenizer.eos_token_id)
        if self.config.add_bos and self.tokenizer.bos_token_id is not None:
            ids = [self.tokenizer.bos_token_id] + ids
        ids = ids[: self.config.max_length]
        if len(ids) < 2:
            raise InflqError("a probe needs at least two tokens")
        return np.asarray(ids, dtype=np.int64)

    # -- tags ------------------------------------------------------------------------------------
    def tag_sequence(self, investigation: str, seq_id: str, tag: str, note: str = "") -> int:
        inv = self.investigation(investigation)
        with self.db.atomic():
            return self.db["sequence_tags"].insert({"investigation_id": inv["id"], "seq_id": seq_id, "tag": tag, "note": note, "created_at": catalog.now()}).last_pk

    def sequence_tags(self, investigation: str, seq_id: str) -> list[dict]:
        inv = self.investigation(investigation)
        return list(self.db["sequence_tags"].rows_where("investigation_id = ? AND seq_id = ?", [inv["id"], seq_id], order_by="id"))

    def as_dict(self) -> dict:
        return {"root": str(self.root), **asdict(self.config)}

    @cached_property
    def registry(self):
        from .plugins import get_registry

        return get_registry()
