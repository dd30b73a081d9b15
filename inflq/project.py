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
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import sqlite_utils

from . import catalog, layout
from .corpus import LOSS_ON, TOO_LONG, Fields
from .corpus_identity import CorpusIdentity
from .errors import InflqError
from .modeling import (
    adapter_base,
    adapter_files,
    check_adapter_dir,
    check_model_dir,
    fingerprint_files,
    has_tokenizer,
    is_adapter_dir,
    load_tokenizer,
    model_files,
    sha256_file,
    tokenizer_files,
)
from .progress import Monitor
from .runtime import Runtime
from .settings import Declared, setting

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

import tomli_w

CORE_TABLES = ("project", "model", "corpus", "tokenization")


INIT = "init"  # the settings group `inflq init` offers


@dataclass
class ProjectConfig(Declared):
    """The contents of ``inflq.toml``. The settings ``inflq init`` offers as they are stored are
    declared here once (group ``init``: its options are generated from them); ``max_length``,
    ``modules`` and ``add_bos`` are derived by ``init`` from the model and adapter when not given."""

    name: str = "project"
    model: str = "model"
    # A PEFT LoRA adapter folder on top of ``model`` ("": none); the project explains base + adapter.
    adapter: str = ""
    device: str = "auto"
    dtype: str = setting(
        "auto", "The model's dtype here; auto: the model's own (config.json). Captures and factors are float32/float64 whatever it is.",
        choices=("auto", "float32", "bfloat16", "float16"), groups=(INIT,))
    modules: str = "all"
    corpus: str = "corpus.jsonl"
    corpus_format: str = setting(
        "auto", "Corpus format; auto: a folder is a saved dataset, .jsonl/.json/.ndjson (.gz too) is JSONL, .parquet is parquet, "
        "anything else plain text (documents separated by blank lines).", choices=("auto", "jsonl", "parquet", "text", "datasets"),
        flag="--format", groups=(INIT,))
    text_field: str = setting("text", "The field (column) holding each document's text.", groups=(INIT,))
    id_field: str = setting("id", "The field holding each document's id (missing: line-N for JSONL, row-N for parquet or a dataset).", groups=(INIT,))
    prompt_field: str = setting("prompt", "Instruction rows: the field holding the prompt.", groups=(INIT,))
    completion_field: str = setting("completion", "Instruction rows: the field holding the completion (the response trained on).", groups=(INIT,))
    messages_field: str = setting(
        "messages", "Chat rows: the field holding the messages ([{role, content}]), rendered with the tokenizer's chat template.", groups=(INIT,))
    loss_on: str = setting(
        "response", "Instruction data: the training loss on the response tokens only (as a fine-tune trains), or on every token.",
        choices=tuple(LOSS_ON), groups=(INIT,))
    too_long: str = setting(
        "truncate", "An instruction document longer than the context: truncate it before the first response that does not fit (counted), "
        "or refuse the corpus.", choices=tuple(TOO_LONG), groups=(INIT,))
    max_length: int = 512
    add_bos: bool = False
    append_eos: bool = setting(False, "End each document with EOS (as in GPT-2 style training).", type=bool, groups=(INIT,))
    seed: int = 0
    # Tables the core does not read, kept as written: a plugin's settings (TracIn's [[checkpoints]]).
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def fields(self) -> Fields:
        return Fields(self.text_field, self.id_field, self.prompt_field, self.completion_field, self.messages_field)

    def to_toml(self) -> dict:
        corpus = {"path": self.corpus, "format": self.corpus_format, "text_field": self.text_field, "id_field": self.id_field}
        # Written only where they differ from the defaults, so plain-text projects' files stay as they were.
        for key, default in (("prompt_field", "prompt"), ("completion_field", "completion"), ("messages_field", "messages"),
                             ("loss_on", "response"), ("too_long", "truncate")):
            if getattr(self, key) != default:
                corpus[key] = getattr(self, key)
        model = {"path": self.model, "device": self.device, "dtype": self.dtype, "modules": self.modules}
        if self.adapter:
            model = {"path": self.model, "adapter": self.adapter, **{k: v for k, v in model.items() if k != "path"}}
        return {
            "project": {"name": self.name, "seed": self.seed},
            "model": model,
            "corpus": corpus,
            "tokenization": {"max_length": self.max_length, "add_bos": self.add_bos, "append_eos": self.append_eos},
            **{k: v for k, v in self.extra.items() if v not in ([], {}, None)},
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
            adapter=m.get("adapter", ""),
            device=m.get("device", "auto"),
            dtype=m.get("dtype", "auto"),
            modules=m.get("modules", "all"),
            corpus=c.get("path", "corpus.jsonl"),
            corpus_format=c.get("format", "auto"),
            text_field=c.get("text_field", "text"),
            id_field=c.get("id_field", "id"),
            prompt_field=c.get("prompt_field", "prompt"),
            completion_field=c.get("completion_field", "completion"),
            messages_field=c.get("messages_field", "messages"),
            loss_on=c.get("loss_on", "response"),
            too_long=c.get("too_long", "truncate"),
            max_length=t.get("max_length", 512),
            add_bos=t.get("add_bos", False),
            append_eos=t.get("append_eos", False),
            extra={k: v for k, v in data.items() if k not in CORE_TABLES},
        )
        for key, typ in (("name", str), ("model", str), ("adapter", str), ("corpus", str), ("max_length", int), ("add_bos", bool), ("append_eos", bool), ("seed", int), ("modules", str), ("device", str), ("dtype", str),
                         ("prompt_field", str), ("completion_field", str), ("messages_field", str), ("loss_on", str), ("too_long", str)):
            value = getattr(cfg, key)
            if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
                raise InflqError(f"{where}: {key} must be a {typ.__name__}, got {value!r}")
        for key, allowed in (("loss_on", LOSS_ON), ("too_long", TOO_LONG)):
            if getattr(cfg, key) not in allowed:
                raise InflqError(f"{where}: {key} must be one of {', '.join(allowed)}, got {getattr(cfg, key)!r}")
        if cfg.max_length < 4:
            raise InflqError(f"{where}: max_length must be at least 4")
        if "trust_remote_code" in json.dumps(data):
            raise InflqError(f"{where}: trust_remote_code is not a project setting; inflq never runs code from a model folder")
        return cfg


def project_relative(path: Path | str, root: Path | str) -> str:
    """``path`` as written in a project's files: relative to the project folder ``root`` (with ``..``
    where it lies outside), or absolute where no relative path exists (another drive on Windows)."""
    try:
        return os.path.relpath(Path(path).resolve(), Path(root).resolve())
    except ValueError:  # another drive on Windows
        return str(Path(path).resolve())




def combined_fingerprint(base: str, adapter: str) -> str:
    """The model's fingerprint: the base's alone, or with an adapter, both hashed together."""
    if not adapter:
        return base
    import hashlib

    return hashlib.sha256(f"{base}+adapter:{adapter}".encode()).hexdigest()[:32]


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
        modules: str | None = None,
        monitor: Monitor | None = None,
        adapter: Path | None = None,
        base: Path | None = None,
        dtype: str = "auto",
        prompt_field: str = "prompt",
        completion_field: str = "completion",
        messages_field: str = "messages",
        loss_on: str = "response",
        too_long: str = "truncate",
    ) -> Project:
        """Create a project folder. On any error nothing is left behind.

        ``model`` is a model folder, or a PEFT LoRA adapter folder whose base is ``base`` or the
        local folder its ``adapter_config.json`` names; ``adapter`` attaches one to ``model``. With
        an adapter the tokenizer is the adapter's where it was saved with one, and ``modules``
        defaults to ``lora`` (its A and B layers: what the fine-tune trained)."""
        root, model, corpus = Path(root), Path(model), Path(corpus)
        if (root / layout.CONFIG).exists():
            raise InflqError(f"{root} is already an inflq project; open it instead")
        if adapter is None and is_adapter_dir(model):
            adapter, model = model, adapter_base(model, base)
        elif base is not None:
            raise InflqError("--base names the base model of an adapter; give the adapter with --adapter DIR (or as --model)")
        if adapter is not None:
            check_adapter_dir(Path(adapter))
            from .modeling import require_peft

            require_peft()
        check_model_dir(model)
        tokenizer = load_tokenizer(Path(adapter) if adapter is not None and has_tokenizer(Path(adapter)) else model)
        if not corpus.exists():
            raise InflqError(f"corpus {corpus} does not exist; give a JSONL file, a text file or a saved dataset folder")
        if add_bos is None:  # follow the tokenizer: Llama-style tokenizers add BOS to every text
            probe = tokenizer("a", add_special_tokens=True)["input_ids"]
            add_bos = tokenizer.bos_token_id is not None and len(probe) > 0 and probe[0] == tokenizer.bos_token_id
        config = ProjectConfig(
            name=name or root.resolve().name,
            model=project_relative(model, root if root.exists() else root.parent / root.name),
            corpus=project_relative(corpus, root if root.exists() else root.parent / root.name),
            adapter=project_relative(adapter, root if root.exists() else root.parent / root.name) if adapter is not None else "",
            dtype=dtype,
            corpus_format=corpus_format,
            text_field=text_field,
            id_field=id_field,
            prompt_field=prompt_field,
            completion_field=completion_field,
            messages_field=messages_field,
            loss_on=loss_on,
            too_long=too_long,
            max_length=max_length or _context_length(model),
            add_bos=bool(add_bos),
            append_eos=append_eos,
            modules=modules or ("lora" if adapter is not None else "all"),
        )
        config = ProjectConfig.from_toml(config.to_toml(), "the new project's settings")  # the same checks as a file's
        created = not root.exists()
        root.mkdir(parents=True, exist_ok=True)
        try:
            (root / layout.CONFIG).write_text(tomli_w.dumps(config.to_toml()))
            db = catalog.connect(root / layout.CATALOG, create=True)
            project = cls(root, config, db)
            project.runtime = Runtime(project, tokenizer)
            project.refresh_fingerprints(monitor)
            project.corpus_identity.rebuild(tokenizer, monitor)
            catalog.create_investigation(project.db, "default", "created with the project")
            return project
        except BaseException:
            if created:
                shutil.rmtree(root, ignore_errors=True)
            else:
                for p in (layout.CONFIG, layout.CATALOG, *layout.CATALOG_SIDE_FILES, layout.CORPUS, layout.ARTIFACTS):
                    target = root / p
                    if target.is_dir():
                        shutil.rmtree(target, ignore_errors=True)
                    elif target.exists():
                        target.unlink()
            raise

    @classmethod
    def open(cls, root: Path | str, *, readonly: bool = False) -> Project:
        """Open a project folder; read-only when asked, or when its folder or catalog is not writable."""
        root = Path(root)
        if not root.exists():
            raise InflqError(f"project folder {root} does not exist; create one with `inflq init {root} --model DIR --corpus FILE`")
        cfg_path = root / layout.CONFIG
        if not cfg_path.is_file():
            raise InflqError(f"{root} is not an inflq project (no {layout.CONFIG}); create one with `inflq init`")
        try:
            data = tomllib.loads(cfg_path.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise InflqError(f"{cfg_path}: not valid TOML ({exc}); fix the file") from None
        config = ProjectConfig.from_toml(data, str(cfg_path))
        readonly = readonly or not os.access(root, os.W_OK) or ((root / layout.CATALOG).exists() and not os.access(root / layout.CATALOG, os.W_OK))
        db = catalog.connect(root / layout.CATALOG, readonly=readonly)
        project = cls(root, config, db)
        project.readonly = readonly
        return project

    readonly: bool = False

    @classmethod
    def create_catalog(cls, root: Path, monitor: Monitor | None = None) -> Project:
        """Build the catalog of a folder that ships only its ``inflq.toml`` (the demo does):
        fingerprints, the tokenized corpus and a default investigation. Nothing is left on error."""
        root = Path(root)
        if (root / layout.CATALOG).exists():
            return cls.open(root)
        config = ProjectConfig.from_toml(tomllib.loads((root / layout.CONFIG).read_text(encoding="utf-8")), str(root / layout.CONFIG))
        db = catalog.connect(root / layout.CATALOG, create=True)
        project = cls(root, config, db)
        try:
            project.refresh_fingerprints(monitor)
            project.corpus_identity.rebuild(project.runtime.tokenizer, monitor)
            catalog.create_investigation(project.db, "default", "created with the project")
        except BaseException:
            db.close()
            for p in (layout.CATALOG, *layout.CATALOG_SIDE_FILES):
                (root / p).unlink(missing_ok=True)
            shutil.rmtree(root / layout.CORPUS, ignore_errors=True)
            raise
        return project

    def save_config(self) -> None:
        path = self.root / layout.CONFIG
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
            db = catalog.connect(self.root / layout.CATALOG, readonly=self.readonly)
            self._thread_dbs.db = db
        return db

    def close(self) -> None:
        self._db.close()

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
    def adapter_path(self) -> Path | None:
        """The LoRA adapter's folder, or None where the project has none."""
        return self.path(self.config.adapter) if self.config.adapter else None

    @property
    def tokenizer_path(self) -> Path:
        """Where the tokenizer is: the adapter's folder where it was saved with one, else the model's."""
        adapter = self.adapter_path
        return adapter if adapter is not None and has_tokenizer(adapter) else self.model_path

    @property
    def corpus_path(self) -> Path:
        return self.path(self.config.corpus)

    def _hash_cached(self, f: Path) -> str:
        st = f.stat()
        key = str(f.resolve())
        digest = catalog.cached_hash(self.db, key, st.st_size, st.st_mtime_ns)
        if digest is not None:
            return digest
        digest = sha256_file(f)
        if not self.readonly:
            catalog.remember_hash(self.db, key, st.st_size, st.st_mtime_ns, digest)
        return digest

    def current_base_fingerprint(self) -> str:
        """The fingerprint of the model folder alone (without the adapter)."""
        check_model_dir(self.model_path)
        return fingerprint_files(model_files(self.model_path), self._hash_cached)

    def current_adapter_fingerprint(self) -> str:
        """The fingerprint of the adapter folder ("" where the project has none)."""
        adapter = self.adapter_path
        if adapter is None:
            return ""
        check_adapter_dir(adapter)
        return fingerprint_files(adapter_files(adapter), self._hash_cached)

    def current_model_fingerprint(self) -> str:
        """The fingerprint of the model the project explains: the model folder's, or, with an
        adapter, of base and adapter together (factor sets, runs and studies are keyed by it)."""
        return combined_fingerprint(self.current_base_fingerprint(), self.current_adapter_fingerprint())

    def current_tokenizer_fingerprint(self) -> str:
        return fingerprint_files(tokenizer_files(self.tokenizer_path), self._hash_cached)

    def refresh_fingerprints(self, monitor: Monitor | None = None) -> None:
        """Record the current model's fingerprint (used at init and by ``relink``)."""
        base, adapter = self.current_base_fingerprint(), self.current_adapter_fingerprint()
        with self.db.atomic():
            catalog.set_meta(self.db, "model_fingerprint", combined_fingerprint(base, adapter))
            catalog.set_meta(self.db, "base_fingerprint", base)
            catalog.set_meta(self.db, "adapter_fingerprint", adapter)
            catalog.set_meta(self.db, "tokenizer_fingerprint", self.current_tokenizer_fingerprint())

    @property
    def model_fingerprint(self) -> str:
        return catalog.get_meta(self.db, "model_fingerprint", "")

    def model_status(self) -> str:
        """``ok``, ``missing`` or ``different`` (from the fingerprint this project recorded)."""
        try:
            fp = self.current_model_fingerprint()
        except InflqError:
            return "missing"
        return "ok" if fp == self.model_fingerprint else "different"

    def require_model(self) -> None:
        status = self.model_status()
        adapter = self.adapter_path
        if status == "missing":
            if adapter is not None and not adapter.is_dir():
                raise InflqError(f"the adapter {adapter} is missing; point the project at a copy with `inflq relink {self.root} --adapter DIR`")
            raise InflqError(f"the model {self.model_path} is missing; point the project at a copy with `inflq relink {self.root} --model DIR`")
        if status == "different":
            if adapter is not None and self.current_adapter_fingerprint() != catalog.get_meta(self.db, "adapter_fingerprint", ""):
                raise InflqError(
                    f"the adapter in {adapter} differs from the one this project was made with (fingerprint); "
                    f"restore it, or start a new project for the new adapter"
                )
            raise InflqError(
                f"the model in {self.model_path} differs from the one this project was made with (fingerprint); "
                f"restore it, or start a new project for the new model"
            )

    def relink(self, model: Path | None = None, corpus: Path | None = None, adapter: Path | None = None) -> None:
        """Point the project at local copies of its model, adapter or corpus, after checking fingerprints."""
        if adapter is not None:
            if not self.config.adapter:
                raise InflqError("this project has no adapter; start a new project for the base model with the adapter (--adapter)")
            check_adapter_dir(Path(adapter))
            if fingerprint_files(adapter_files(Path(adapter)), self._hash_cached) != catalog.get_meta(self.db, "adapter_fingerprint", ""):
                raise InflqError(f"{adapter} is not the adapter this project was made with (fingerprint differs)")
            self.config.adapter = project_relative(Path(adapter), self.root)
        if model is not None:
            check_model_dir(Path(model))
            fp = fingerprint_files(model_files(Path(model)), self._hash_cached)
            # Projects made before adapters recorded no base fingerprint: their model's is the base's.
            if fp != (catalog.get_meta(self.db, "base_fingerprint", "") or self.model_fingerprint):
                raise InflqError(f"{model} is not the model this project was made with (fingerprint differs)")
            self.config.model = project_relative(Path(model), self.root)
        if corpus is not None:
            if not Path(corpus).exists():
                raise InflqError(f"{corpus} does not exist")
            if not self.corpus_identity.matches(Path(corpus)):
                raise InflqError(f"{corpus} is not the corpus this project was made with (its content differs)")
            self.config.corpus = project_relative(Path(corpus), self.root)
        self.save_config()

    # -- the runtime and the folder's records ------------------------------------------------------
    @cached_property
    def runtime(self) -> Runtime:
        """The model, tokenizer, device, token store and engine factory, built on first use."""
        return Runtime(self)

    @cached_property
    def corpus_identity(self) -> CorpusIdentity:
        """The corpus's recorded and current fingerprints and its token store (one owner, which the
        runtime uses too)."""
        return CorpusIdentity(self)

    @property
    def store_dir(self) -> Path:
        """The folder of the corpus's token store."""
        return self.root / layout.CORPUS

    def plugin_folder(self, name: str) -> str:
        """Where a plugin keeps its own files (``artifacts/<name>``), relative to the project folder
        (``project.path(...)`` makes it absolute). No core row names them: ``inflq check`` leaves
        them to the plugin's ``check_artifacts`` hook."""
        return layout.plugin_folder(name)

    def delete_investigation(self, name: str, force: bool = False) -> None:
        """Delete an investigation with its queries, probes, runs, results and validations, rows
        first and then the files they named (:func:`inflq.removal.remove_investigation`)."""
        from .removal import remove_investigation

        remove_investigation(self, name, force=force)
