"""Every core setting, declared once: its type, default, help, range and where it is offered.

A setting is a field of one of the dataclasses below, declared with :func:`setting`: the field
gives the name and the default, the declaration the rest (a :class:`Setting`, an :class:`Option`
as plugins declare theirs). The command line's options (:meth:`Declared.click_options`) and the
TUI's forms (``inflq/tui/forms.py``) are generated from these declarations, so that a setting added
here appears in ``--help`` and in the form with the same default (tests/test_settings.py):

- :class:`RunSettings`: everything that determines a run's result, stored with the run as JSON and
  read back on resume; offered by ``run``, ``factors fit``, ``plan``, ``index build`` and the
  TUI's run form (and ``--estimator`` by the commands that score with one estimator);
- :class:`DeviceSettings`: where and in what precision a command loads the model;
- :class:`ValidationSettings`: ``inflq validate``'s, and the TUI's validate form's; its groups
  ``pbrf``, ``lds`` and ``loo`` name the settings :func:`inflq.validate.validate`,
  :func:`inflq.lds.validate_lds` and :func:`inflq.lds.validate_loo` take.

A setting's ``groups`` name the commands (``"run"``, ``"factors fit"``, ...) and forms (``"run
form"``, ``"validate form"``) that offer it. Kept apart from :mod:`inflq.runs` (which imports torch)
so that front ends can build and show settings without loading the engine; click is imported only
when options are generated.
"""

from __future__ import annotations

import json
from dataclasses import MISSING, dataclass, field, fields
from functools import cache
from typing import TYPE_CHECKING, Any

from .batching import Batching, auto_batching
from .errors import InflqError
from .options import Option, parse_bool

if TYPE_CHECKING:
    from .engine import GradientEngine
    from .project import Project

_KEY = "inflq.setting"
_WHAT = {int: "a whole number", float: "a number", bool: "true or false", str: "text"}


@dataclass(frozen=True)
class Setting(Option):
    """One core setting: an :class:`Option` with what the front ends need to offer it.

    ``groups``: the commands and forms that offer it. ``flag``: its command-line flag (default
    ``--name-with-dashes``). ``minimum``: the smallest value allowed. ``none_word``: a word that
    means ``None`` (``--rank full``). ``many``: a comma-separated list of ``type``. ``plugin``: a
    plugin kind whose spec the setting holds (the run form offers the registry's plugins of that
    kind with their declared options). ``hint``: the form's short placeholder (``{default}`` is
    filled in; default: the help). ``advanced``: the form leaves it blank (blank: the default).
    ``project_default``: on the command line, unset means this field of the project's
    ``inflq.toml`` (``seed``), not the field's own default.
    """

    groups: frozenset[str] = frozenset()
    flag: str | None = None
    minimum: float | None = None
    none_word: str | None = None
    many: bool = False
    plugin: str | None = None
    hint: str = ""
    advanced: bool = False
    project_default: str | None = None

    @property
    def flags(self) -> tuple[str, ...]:
        return (self.flag or "--" + self.name.replace("_", "-"),)

    @property
    def cli_default(self) -> Any:
        """The command line's default: ``None`` where the project's setting stands in."""
        return None if self.project_default else self.default

    def shown(self, value: Any = MISSING) -> str:
        """``value`` (default: the default) as a form shows it: blank for ``None``."""
        value = self.default if value is MISSING else value
        if value is None:
            return ""
        if self.many:
            return ",".join(self._show_one(v) for v in value)
        return self._show_one(value)

    def _show_one(self, v: Any) -> str:
        if isinstance(v, bool):
            return str(v).lower()
        return f"{v:g}" if isinstance(v, float) else str(v)

    def form_hint(self) -> str:
        return (self.hint or self.help).format(default=self.shown() or "none")

    def parse(self, raw: Any, owner: str | None = None) -> Any:
        """``raw`` (text from a command line or a form, or a value) as this setting's type: blank
        is the default; a bad value raises an :class:`InflqError` naming ``owner`` (the flag or
        the form's label) and what it must be."""
        owner = owner or self.name
        if raw is None or (isinstance(raw, str) and not raw.strip()):
            return self.default
        if self.none_word and isinstance(raw, str) and raw.strip().lower() == self.none_word:
            return None
        if self.many:
            items = raw if isinstance(raw, (list, tuple)) else [p for p in (s.strip() for s in str(raw).split(",")) if p]
            return [self._one(v, owner, raw) for v in items] or self.default
        return self._one(raw, owner, raw)

    def _one(self, raw: Any, owner: str, whole: Any) -> Any:
        value = self._convert(raw, owner, whole)
        if self.choices and value not in self.choices:
            raise InflqError(f"{owner} must be one of {', '.join(self.choices)}, not {raw!r}")
        if self.minimum is not None and value < self.minimum:
            raise InflqError(f"{owner} must be at least {self.minimum:g}, not {value!r}")
        return value

    def _convert(self, raw: Any, owner: str, whole: Any) -> Any:
        try:
            if self.type is bool:
                return parse_bool(raw)
            if self.type is int and isinstance(raw, float) and not raw.is_integer():
                raise ValueError(raw)
            return self.type(raw.strip() if isinstance(raw, str) else raw)
        except (TypeError, ValueError):
            what = _WHAT.get(self.type, self.type.__name__) + (f" or {self.none_word!r}" if self.none_word else "")
            where = f" in {whole!r}" if self.many else ""
            raise InflqError(f"{owner} must be {what}, not {raw!r}{where}") from None

    def metavar(self) -> str:
        if self.choices:
            return "[" + "|".join(self.choices) + "]"
        word = {int: "INTEGER", float: "FLOAT"}.get(self.type, "TEXT")
        if self.plugin:
            word = "SPEC"
        if self.none_word:
            word += "|" + self.none_word
        return f"{word},..." if self.many else word

    def click_option(self, note: str = ""):
        """The click option that offers this setting (``note``: a sentence the command adds)."""
        import click

        setting = self
        text = " ".join(filter(None, (self.help, note)))
        if self.type is bool:
            return click.option(*self.flags, self.name, is_flag=True, default=bool(self.default), help=text)

        class SettingType(click.ParamType):
            name = setting.type.__name__

            def convert(self, value, param, ctx):
                # An InflqError, not click's usage error: one line naming the flag (cli.common.main).
                return setting.parse(value, setting.flags[0])

            def get_metavar(self, param, ctx=None):
                return setting.metavar()

        default = self.cli_default
        return click.option(*self.flags, self.name, type=SettingType(), default=default,
                            show_default=default is not None, help=text)


def setting(default: Any, help: str, *, type: type = str, groups: tuple[str, ...] = (), **declared: Any) -> Any:
    """A dataclass field declared as a :class:`Setting` (see the module's docstring)."""
    return field(default=default, metadata={_KEY: {"type": type, "help": help, "groups": frozenset(groups), **declared}})


class Declared:
    """What the settings dataclasses share: their declarations, the click options and the values."""

    @classmethod
    def declared(cls, group: str | None = None) -> tuple[Setting, ...]:
        """The declared settings, in declaration order; only ``group``'s if given."""
        return tuple(s for s in _declared(cls) if group is None or group in s.groups)

    @classmethod
    def declaration(cls, name: str) -> Setting:
        """The declared setting ``name``."""
        found = [s for s in _declared(cls) if s.name == name]
        if not found:
            raise ValueError(f"{cls.__name__} declares no setting {name!r} (its settings: {', '.join(s.name for s in _declared(cls))})")
        return found[0]

    @classmethod
    def click_options(cls, group: str | None = None, *, names: tuple[str, ...] = (), notes: dict[str, str] | None = None):
        """A decorator adding ``group``'s settings (or those ``names``d, e.g. for a plugin's
        command) to a click command as options, in declaration order; the command receives them
        under their field names. ``notes``: a sentence to add to a setting's help for this command."""
        declared = cls.declared(group) if group else tuple(cls.declaration(n) for n in names)
        unknown = set(notes or ()) - {s.name for s in declared}
        if unknown:
            raise ValueError(f"notes for settings {group or names!r} does not offer: {sorted(unknown)}")

        def decorate(command):
            for s in reversed(declared):
                command = s.click_option((notes or {}).get(s.name, ""))(command)
            return command

        return decorate

    @classmethod
    def from_values(cls, values: dict[str, Any], project: Project | None = None):
        """Settings from the front ends' values (keys that are not settings are ignored); a setting
        with a ``project_default`` that is unset or not offered takes the project's."""
        given = {}
        for s in _declared(cls):
            value = values.get(s.name)
            if value is None and s.project_default:
                if project is not None:
                    given[s.name] = getattr(project.config, s.project_default)
            elif s.name in values:
                given[s.name] = value
        return cls(**given)

    def values(self, group: str) -> dict[str, Any]:
        """``group``'s settings and their values (e.g. a validation's keyword arguments)."""
        return {s.name: getattr(self, s.name) for s in self.declared(group)}


@cache
def _declared(cls: type) -> tuple[Setting, ...]:
    out = []
    for f in fields(cls):
        meta = f.metadata.get(_KEY)
        if meta is not None:
            out.append(Setting(f.name, default=None if f.default is MISSING else f.default, **meta))
    return tuple(out)


# The groups: commands, and the TUI's forms.
RUN, FIT, PLAN, INDEX, FORM, ASK = "run", "factors fit", "plan", "index build", "run form", "ask"
SCORES_WITH_ONE = ("self-influence", "probe score", "demo")  # commands that score with one estimator


@dataclass
class RunSettings(Declared):
    """Everything that determines a run's result (stored with the run, reused on resume)."""

    # Plugin specs; None: the registry's default of the kind (see resolve_defaults).
    estimator: str | None = setting(
        None, "Estimator spec, e.g. ekfac or ekfac:damping=1e-3 (default: the registry's default estimator; ekfac among the built-ins).",
        plugin="estimator", groups=(RUN, FIT, PLAN, FORM, ASK, *SCORES_WITH_ONE))
    filter: str | None = setting(
        None, "Candidate filter spec; join with + for a union (tfidf:k=1000+random:n=500). Default: the registry's default filter (all: every sequence).",
        plugin="filter", groups=(RUN, FORM))
    executor: str | None = setting(
        None, "Executor spec: local (default), or ray / ray:num_gpus=1,num_workers=4 (docs/executors.md).",
        plugin="executor", groups=(RUN, FIT, INDEX, FORM))
    modules: str | None = setting(
        None, "Tracked modules: all, mlp, attention, lora (an adapter's A and B layers) or name globs (default: the project's).", groups=(RUN, FIT, PLAN, INDEX, ASK))
    rank: int | None = setting(
        32, "Rank of the preconditioned query gradients, or 'full'.", type=int, minimum=1, none_word="full",
        hint="low-rank query gradients, or full", groups=(RUN, PLAN, FORM))
    # Keep a module's query gradients at full rank where scoring is cheaper that way (see
    # inflq.contractions.Compression), up to this many MiB in all; 0 = always rank ``rank``.
    full_rank_mb: int = setting(
        1024, "MiB of query gradients kept at full rank where scoring is cheaper (and exact) that way; 0: always --rank.",
        type=int, minimum=0, flag="--full-rank-memory", groups=(RUN,))
    top_k: int = setting(20, "Top and bottom sequences stored per query.", type=int, minimum=1, hint="sequences kept per side", groups=(RUN, FORM))
    fit_sequences: int | None = setting(
        None, "Fit factors on a seeded sample of this many sequences (default: all).", type=int, minimum=1,
        hint="sequences to fit factors on (blank: all)", groups=(RUN, FIT, PLAN, INDEX, FORM, ASK))
    seed: int = setting(0, "Seed for sampled labels and samples (default: the project's).", type=int, project_default="seed", groups=(RUN, FIT))
    # Sequences per batch and padded tokens per batch; both None (the default): chosen from the
    # model's size and the device's memory when the run starts (inflq.batching), then recorded.
    # A batch_size alone fixes the number of sequences, as before token budgets existed.
    batch_size: int | None = setting(None, "Sequences per batch (default: as many as the token budget holds).", type=int, minimum=1, groups=(RUN, FIT, PLAN))
    batch_tokens: int | None = setting(
        None, "Padded tokens per batch (default: chosen from the model's size and the free memory; recorded with the run).",
        type=int, minimum=1, groups=(RUN, FIT, PLAN))
    shard_size: int = setting(
        512, "Sequences per committed shard (the unit a resume continues from).", type=int, minimum=1, advanced=True,
        hint="advanced: sequences per shard, a resume's unit (blank: {default})", groups=(RUN, FIT, FORM))
    # GB of sums one fitting pass may hold (per worker and on the driver): above it, factors are
    # fitted by module, one group of modules per pass (FitContext.groups). None: no limit.
    fit_memory: float | None = setting(
        None, "GB of sums one fitting pass may hold (per worker and on the driver): larger factors are fitted by module, "
        "a group of modules per pass (default: no limit, or ray:memory's half).", type=float, groups=(RUN, FIT, PLAN))
    refit: bool = setting(False, "Recompute the estimator's factors even if cached.", type=bool, groups=(RUN, FIT))

    def resolve_defaults(self, registry) -> RunSettings:
        """Fill the plugins left to the registry (``Registry.default``) in place; returns self."""
        for kind in ("estimator", "filter", "executor"):
            if getattr(self, kind) is None:
                setattr(self, kind, registry.default(kind))
        return self

    def to_json(self) -> str:
        return json.dumps(self.__dict__, sort_keys=True)

    def batching(self) -> Batching:
        """How run_shard batches this run's sequences (after :meth:`resolve_batching`)."""
        if self.batch_size is None and self.batch_tokens is None:
            raise RuntimeError("the run's batching is chosen when it starts: call resolve_batching(engine, project) first")
        return Batching(tokens=self.batch_tokens, sequences=self.batch_size)

    def resolve_batching(self, engine: GradientEngine, project: Project) -> bool:
        """Fill in the batching left to inflq (see :mod:`inflq.batching`); True if it changed."""
        if self.batch_size is not None or self.batch_tokens is not None:
            return False
        auto = auto_batching(engine, project.config.max_length)
        self.batch_tokens, self.batch_size = auto.tokens, auto.sequences
        return True

    @classmethod
    def from_json(cls, text: str, **overrides: Any) -> RunSettings:
        """Settings recorded with a run. Runs recorded before ``full_rank_mb`` existed compressed
        every module, so they are read back that way and recompute the same scores."""
        return cls(**{"full_rank_mb": 0, **json.loads(text), **overrides})


@dataclass
class DeviceSettings(Declared):
    """Where and in what precision a command loads the model (``Runtime.configure``); not part of
    what a run records as its settings."""

    device: str | None = setting(None, "cpu, cuda, cuda:1, mps (default: the project's, auto).", groups=(RUN, FIT, PLAN, ASK))
    dtype: str | None = setting(
        None, "Model dtype (default: the project's).", choices=("auto", "float32", "bfloat16", "float16"), groups=(RUN, FIT))


# How many of the investigation's queries a PBRF validation uses unless told (retraining: all).
PBRF_QUERIES = 3
VALIDATE, VALIDATE_FORM, PBRF, LDS, LOO = "validate", "validate form", "pbrf", "lds", "loo"
RETRAINING = (LDS, LOO)


@dataclass
class ValidationSettings(Declared):
    """``inflq validate``'s settings and the TUI's validate form's. The groups ``pbrf``, ``lds``
    and ``loo`` are the keyword arguments of ``validate``, ``validate_lds`` and ``validate_loo``,
    whose defaults are these (tests/test_settings.py checks)."""

    method: str = setting(
        "pbrf", "The ground truth: pbrf (the PBRF) or lds (retraining on random subsets; resumable).",
        choices=("pbrf", "lds"), hint="pbrf (the PBRF ground truth) or lds (retraining on random subsets; resumable)", groups=(VALIDATE_FORM,))
    # None: the registry's comparison set (Registry.comparison: identity, ekfac, lissa among the built-ins).
    estimators: list[str] | None = setting(
        None, "Comma-separated estimator specs to compare (default: the registry's comparison set; identity, ekfac and lissa among the built-ins).",
        many=True, hint="estimator specs to compare, comma-separated (blank: the registry's comparison set)",
        groups=(VALIDATE, VALIDATE_FORM, PBRF, *RETRAINING))
    sample: int = setting(
        8, "Fitting sequences to solve the PBRF for (two solves each; at least 4, 8 or more to tell estimators apart).", type=int, minimum=1,
        hint="fitting sequences to solve the PBRF for (two solves each; at least 4)", groups=(VALIDATE, VALIDATE_FORM, PBRF))
    queries: int | None = setting(
        None, f"How many of the investigation's queries (default: {PBRF_QUERIES}; with --lds or --loo all).", type=int, minimum=1,
        hint=f"how many of the investigation's queries (blank: {PBRF_QUERIES}; lds: all)", groups=(VALIDATE, VALIDATE_FORM, PBRF, *RETRAINING))
    fit_sequences: int = setting(
        64, "Fitting sequences (N) for the estimators and the PBRF.", type=int, minimum=2,
        hint="fitting sequences N for the estimators and the PBRF", groups=(VALIDATE, VALIDATE_FORM, PBRF))
    dampings: list[float] | None = setting(
        None, "Dampings of the default estimator (ekfac among the built-ins) to sweep, e.g. 1e-8,1e-4,1e-2.", type=float, many=True,
        hint="dampings of the default estimator to sweep, e.g. 1e-4,1e-2 (blank: none)", groups=(VALIDATE, VALIDATE_FORM, PBRF, *RETRAINING))
    epsilon: float | None = setting(None, "Up-weighting ε of the PBRF (default 1/N).", type=float, groups=(VALIDATE, PBRF))
    pbrf_steps: int = setting(
        100, "Optimizer steps for each PBRF solve.", type=int, minimum=1,
        hint="optimiser steps per PBRF solve (fewer: faster, less exact)", groups=(VALIDATE, VALIDATE_FORM, PBRF))
    pbrf_damping: float | None = setting(
        None, "The PBRF's damping λ (default: 0.1 × mean Gauss-Newton eigenvalue per module).", type=float, groups=(VALIDATE, PBRF))
    max_minutes: float = setting(
        10.0, "Refuse a sample whose PBRF solves would take longer (timed on one step first).", type=float, minimum=0,
        hint="refuse a sample whose PBRF solves would take longer", groups=(VALIDATE, VALIDATE_FORM, PBRF))
    seed: int = setting(0, "Seed for the sample and the sampled labels.", type=int, groups=(VALIDATE, PBRF, *RETRAINING))
    batch_size: int = setting(8, "Sequences per batch.", type=int, minimum=1, groups=(VALIDATE, PBRF, *RETRAINING))
    lds: bool = setting(False, "Linear datamodeling score: retrain on random subsets instead of the PBRF.", type=bool, groups=(VALIDATE,))
    subsets: int = setting(
        32, "--lds: how many subsets to retrain on.", type=int, minimum=3,
        hint="lds: subsets to retrain on (each committed as it finishes)", groups=(VALIDATE, VALIDATE_FORM, LDS))
    fraction: float = setting(
        0.5, "--lds: the share of the corpus in each subset.", type=float,
        hint="lds: the share of the corpus in each subset", groups=(VALIDATE, VALIDATE_FORM, LDS))
    count: int | None = setting(
        None, "Leave-one-out: retrain without each of this many seeded sequences (and once on all) instead of the PBRF.",
        type=int, flag="--loo", groups=(VALIDATE, LOO))
    sequences: list[str] | None = setting(
        None, "Leave-one-out over these sequences instead of seeded ones: comma-separated ids (document id:chunk).",
        many=True, flag="--leave-out", groups=(VALIDATE, LOO))
    trainer: str | None = setting(
        None, "--lds/--loo: the trainer spec, e.g. adamw:epochs=6 (default: the default trainer).",
        hint="lds: trainer spec, e.g. adamw:epochs=6 (blank: the default)", groups=(VALIDATE, VALIDATE_FORM, *RETRAINING))
    executor: str | None = setting(
        None, "--lds/--loo: where the retrainings run, e.g. ray:num_workers=4 (default: this process, one after another).",
        groups=(VALIDATE, *RETRAINING))

    def method_of(self) -> str:
        """The validation these settings ask for: ``lds`` (``--lds``), ``loo`` (``--loo N`` or
        ``--leave-out``) or ``method`` (the form's choice; ``pbrf`` by default)."""
        if self.lds and (self.count is not None or self.sequences):
            raise InflqError("--lds and --loo are two validations; give one")
        if self.lds:
            return LDS
        if self.count is not None or self.sequences:
            return LOO
        return self.method
