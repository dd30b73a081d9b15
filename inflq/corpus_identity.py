"""The corpus's identity: the fingerprint a project recorded when it tokenized its corpus, the
fingerprint of the file there now, whether a file is that corpus, and rebuilding the token store.

One owner for what both the project folder (``Project.init``, ``relink``) and the runtime (the
token store it serves) need: each asks here, and neither asks the other. The recorded fingerprint
stays the project's corpus identity (factor sets and runs are keyed by it)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import catalog
from .corpus import (
    CorpusStore,
    build_store,
    corpus_fingerprint,
    read_documents,
    truncation_note,
    unknown_tokens_note,
)
from .errors import InflqError
from .progress import Monitor

if TYPE_CHECKING:
    from .project import Project


class CorpusIdentity:
    """A project's corpus: its recorded and current fingerprints, and its token store."""

    def __init__(self, project: Project) -> None:
        self.project = project

    @property
    def path(self) -> Path:
        """The corpus file (or dataset folder) the project's ``inflq.toml`` points at."""
        return self.project.corpus_path

    @property
    def store_dir(self) -> Path:
        """The folder of the corpus's token store."""
        return self.project.store_dir

    @property
    def recorded(self) -> str:
        """The fingerprint recorded when the corpus was tokenized ("" before it was)."""
        return catalog.get_meta(self.project.db, "corpus_fingerprint", "")

    def current(self) -> str:
        """The fingerprint of the corpus there now (a file's size and mtime skip the hash when they
        are the ones recorded)."""
        path = self.path
        if not path.exists():
            raise InflqError(f"the corpus {path} is missing; restore it or point inflq.toml at a copy")
        if path.is_file():
            st = path.stat()
            if catalog.get_meta(self.project.db, "corpus_stat") == [str(path.resolve()), st.st_size, st.st_mtime_ns]:
                return catalog.get_meta(self.project.db, "corpus_fingerprint")
        return corpus_fingerprint(path)

    def matches(self, path: Path) -> bool:
        """Whether ``path`` holds the corpus this project was tokenized from, by content.

        A project made when a file's fingerprint also hashed its name is recognised by that rule,
        with the name its config gave it, and its content-only fingerprint is then recorded beside
        it (``corpus_content_fingerprint``), so a renamed or moved copy is recognised from then on."""
        project, db = self.project, self.project.db
        recorded = self.recorded
        fp = corpus_fingerprint(path)
        if fp in (recorded, catalog.get_meta(db, "corpus_content_fingerprint", None)):
            return True
        if Path(path).is_file():
            for name in dict.fromkeys((Path(project.config.corpus).name, Path(path).name)):
                if corpus_fingerprint(path, legacy_name=name) == recorded:
                    if not project.readonly:
                        with db.atomic():
                            catalog.set_meta(db, "corpus_content_fingerprint", fp)
                    return True
        return False

    def remember_stat(self) -> None:
        """Record the corpus file's size and mtime, so that :meth:`current` skips the hash next time."""
        path = self.path
        if path.is_file() and not self.project.readonly:
            st = path.stat()
            with self.project.db.atomic():
                catalog.set_meta(self.project.db, "corpus_stat", [str(path.resolve()), st.st_size, st.st_mtime_ns])

    # -- the token store ------------------------------------------------------------------------------
    def rebuild(self, tokenizer, monitor: Monitor | None = None) -> None:
        """Tokenize the corpus into the token store and the ``sequences`` table, atomically, and
        record its fingerprint."""
        project = self.project
        if project.readonly:
            raise InflqError("the project is read-only; copy it somewhere writable to rebuild its corpus")
        cfg, path = project.config, self.path
        fp = corpus_fingerprint(path)
        docs = read_documents(path, cfg.corpus_format, fields=cfg.fields)
        rows = build_store(docs, tokenizer, self.store_dir, max_length=cfg.max_length, add_bos=cfg.add_bos, append_eos=cfg.append_eos,
                           fingerprint=fp, loss_on=cfg.loss_on, too_long=cfg.too_long)
        meta = {"corpus_fingerprint": fp, "corpus_content_fingerprint": fp}
        if path.is_file():
            st = path.stat()
            meta["corpus_stat"] = [str(path.resolve()), st.st_size, st.st_mtime_ns]
        catalog.replace_sequences(project.db, rows, meta)
        if monitor is not None:
            for note in (self.unknown_tokens_note(tokenizer), self.truncation_note()):
                if note:
                    monitor.warn(note)

    def unknown_tokens_note(self, tokenizer) -> str | None:
        """A warning with the share of the corpus's tokens the tokenizer did not know (None: none)."""
        try:
            info = CorpusStore(self.store_dir).info
        except InflqError:
            return None
        return unknown_tokens_note(info, getattr(tokenizer, "unk_token", None))

    def truncation_note(self) -> str | None:
        """A warning with the number of instruction documents truncated or left out for the context (None: none)."""
        try:
            return truncation_note(CorpusStore(self.store_dir).info)
        except InflqError:
            return None

    def store(self, tokenizer: Callable[[], Any]) -> CorpusStore:
        """The token store, checked against the corpus: rebuilt where it is missing or was built from
        another corpus than the recorded one; refused (never silently reused) when the corpus file
        changed since it was tokenized; rebuilt too where it was tokenized under other loss settings
        (``inflq.toml`` edited). ``tokenizer``: returns the tokenizer, called only for a rebuild (reading
        a project's results needs no model folder)."""
        store_dir, path, recorded = self.store_dir, self.path, self.recorded
        if not store_dir.exists():
            if not path.exists():
                raise InflqError(f"the corpus {path} and its token store are both missing; restore the corpus")
            self.rebuild(tokenizer())
        store = CorpusStore(store_dir)
        if path.exists() and self.current() != recorded:
            if not self.matches(path):
                raise InflqError(
                    f"the corpus {path} changed since it was tokenized; results would be stale: "
                    f"run `inflq corpus rebuild {self.project.root}` (earlier result sets keep their own sequence ids)"
                )
            self.remember_stat()  # recognised: skip the hash next time
        cfg = self.project.config
        # A store tokenized under other loss settings (inflq.toml edited) is rebuilt, not reused.
        if store.fingerprint != recorded or store.info.get("loss_on", cfg.loss_on) != cfg.loss_on or store.info.get("too_long", cfg.too_long) != cfg.too_long:
            self.rebuild(tokenizer())
            store = CorpusStore(store_dir)
        return store

    def store_problem(self) -> str | None:
        """What is wrong with the token store (``"missing"``, ``"unreadable"``, ``"different"``: not
        the recorded corpus or not the catalog's sequences), or None."""
        if not self.store_dir.exists():
            return "missing"
        try:
            store = CorpusStore(self.store_dir)
        except InflqError:
            return "unreadable"
        if store.fingerprint != self.recorded or len(store) != catalog.sequence_count(self.project.db):
            return "different"
        return None
