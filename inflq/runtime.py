"""What running the project's model needs: its tokenizer, the model on a device, the corpus's token
store and gradient engines. Built on first use (``project.runtime``), so that opening a project to
read its catalog loads no model, tokenizer or torch."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from . import catalog
from .corpus import CorpusStore, build_store, corpus_fingerprint, read_documents
from .errors import InflqError
from .modeling import check_model_dir, load_model, load_tokenizer, pick_device, pick_dtype
from .progress import Monitor
from .queries import TokenizedQuery, tokenize_query

if TYPE_CHECKING:
    import torch

    from .engine import GradientEngine
    from .project import Project


class Runtime:
    """A project's model, tokenizer, device, token store and engine factory, each loaded on first use."""

    def __init__(self, project: Project, tokenizer=None) -> None:
        self.project = project
        self._model = None
        self._tokenizer = tokenizer
        self._store: CorpusStore | None = None

    # -- model and tokenizer ----------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return pick_device(self.project.config.device)

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            check_model_dir(self.project.model_path)
            self._tokenizer = load_tokenizer(self.project.tokenizer_path)
        return self._tokenizer

    @property
    def dtype(self) -> torch.dtype:
        """The model's dtype here: the project's ``dtype``, ``auto`` being the model's own."""
        return pick_dtype(self.project.config.dtype, self.device, self.project.model_path)

    @property
    def model(self):
        if self._model is None:
            self.project.require_model()
            self._model = self.load_model()
        return self._model

    def load_model(self, dtype: torch.dtype | None = None, device: torch.device | None = None):
        """A fresh copy of the project's model (with its adapter), in ``dtype`` and on ``device``
        (default: the project's), that the caller owns (PBRF, TracIn's checkpoints, trainers)."""
        return load_model(self.project.model_path, device or self.device, dtype or self.dtype, self.project.adapter_path)

    def configure(self, device: str | None = None, dtype: str | None = None) -> None:
        """Change device or dtype for this session (the model reloads on next use)."""
        if device:
            self.project.config.device = device
        if dtype:
            self.project.config.dtype = dtype
        self._model = None

    def engine(self, modules: str | None = None) -> GradientEngine:
        """A gradient engine over the model's tracked modules (``modules``, else the project's)."""
        from .engine import GradientEngine, select_modules

        return GradientEngine(self.model, select_modules(self.model, modules or self.project.config.modules))

    @property
    def pad_id(self) -> int:
        return int(self.tokenizer.pad_token_id)

    # -- tokens ------------------------------------------------------------------------------------
    def decode(self, tokens: np.ndarray) -> str:
        return self.tokenizer.decode([int(t) for t in tokens])

    def token_strings(self, tokens: np.ndarray) -> list[str]:
        return [self.tokenizer.decode([int(t)]) for t in tokens]

    def tokenize_query(self, prompt: str, completion: str, chat: bool = False) -> TokenizedQuery:
        cfg = self.project.config
        return tokenize_query(self.tokenizer, prompt, completion, chat=chat, max_length=cfg.max_length, add_bos=cfg.add_bos or None)

    def tokenize_sequence(self, text: str) -> np.ndarray:
        """Tokenize a hand-written training sequence the way corpus sequences are tokenized."""
        cfg = self.project.config
        ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        if cfg.append_eos and self.tokenizer.eos_token_id is not None:
            ids.append(self.tokenizer.eos_token_id)
        if cfg.add_bos and self.tokenizer.bos_token_id is not None:
            ids = [self.tokenizer.bos_token_id] + ids
        ids = ids[: cfg.max_length]
        if len(ids) < 2:
            raise InflqError("a probe needs at least two tokens")
        return np.asarray(ids, dtype=np.int64)

    # -- the corpus's token store ----------------------------------------------------------------
    def rebuild_corpus(self, monitor: Monitor | None = None) -> None:
        """Tokenize the corpus into the token store and the ``sequences`` table, atomically."""
        project = self.project
        if project.readonly:
            raise InflqError("the project is read-only; copy it somewhere writable to rebuild its corpus")
        cfg, corpus_path = project.config, project.corpus_path
        fp = corpus_fingerprint(corpus_path)
        docs = read_documents(corpus_path, cfg.corpus_format, fields=cfg.fields)
        rows = build_store(
            docs,
            self.tokenizer,
            project.store_dir,
            max_length=cfg.max_length,
            add_bos=cfg.add_bos,
            append_eos=cfg.append_eos,
            fingerprint=fp,
            loss_on=cfg.loss_on,
            too_long=cfg.too_long,
        )
        meta = {"corpus_fingerprint": fp, "corpus_content_fingerprint": fp}
        if corpus_path.is_file():
            st = corpus_path.stat()
            meta["corpus_stat"] = [str(corpus_path.resolve()), st.st_size, st.st_mtime_ns]
        catalog.replace_sequences(project.db, rows, meta)
        self._store = None
        if monitor is not None:
            for note in (self.unknown_tokens_note(), self.truncation_note()):
                if note:
                    monitor.warn(note)

    def unknown_tokens_note(self) -> str | None:
        """A warning with the share of the corpus's tokens the tokenizer did not know (None: none)."""
        from .corpus import unknown_tokens_note

        try:
            info = CorpusStore(self.project.store_dir).info
        except InflqError:
            return None
        return unknown_tokens_note(info, getattr(self.tokenizer, "unk_token", None))

    def truncation_note(self) -> str | None:
        """A warning with the number of instruction documents truncated or left out for the context (None: none)."""
        from .corpus import truncation_note

        try:
            return truncation_note(CorpusStore(self.project.store_dir).info)
        except InflqError:
            return None

    @property
    def corpus(self) -> CorpusStore:
        """The token store; rebuilt (never silently reused) when the corpus file changed."""
        if self._store is None:
            project = self.project
            store_dir, corpus_path = project.store_dir, project.corpus_path
            recorded = project.corpus_fingerprint_recorded
            if not store_dir.exists():
                if corpus_path.exists():
                    self.rebuild_corpus()
                else:
                    raise InflqError(f"the corpus {corpus_path} and its token store are both missing; restore the corpus")
            store = CorpusStore(store_dir)
            if corpus_path.exists() and project.current_corpus_fingerprint() != recorded:
                if project.corpus_matches(corpus_path):
                    if corpus_path.is_file() and not project.readonly:  # recognised: skip the hash next time
                        st = corpus_path.stat()
                        with project.db.atomic():
                            catalog.set_meta(project.db, "corpus_stat", [str(corpus_path.resolve()), st.st_size, st.st_mtime_ns])
                else:
                    raise InflqError(
                        f"the corpus {corpus_path} changed since it was tokenized; results would be stale: "
                        f"run `inflq corpus rebuild {project.root}` (earlier result sets keep their own sequence ids)"
                    )
            cfg = project.config
            # A store tokenized under other loss settings (inflq.toml edited) is rebuilt, not reused.
            if store.fingerprint != recorded or store.info.get("loss_on", cfg.loss_on) != cfg.loss_on or store.info.get("too_long", cfg.too_long) != cfg.too_long:
                self.rebuild_corpus()
                store = CorpusStore(store_dir)
            self._store = store
        return self._store
