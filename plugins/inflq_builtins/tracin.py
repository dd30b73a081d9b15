"""TracIn (Pruthi et al. 2020): ``Σ_c η_c ⟨∇ℓ_q(θ_c), ∇L(z, θ_c)⟩`` over saved training checkpoints.

A project lists its checkpoints in ``inflq.toml``::

    [[checkpoints]]
    path = "checkpoints/step-1000"
    learning_rate = 3e-4

and in the catalog's ``checkpoints`` table, which this plugin's own migration set makes
(:data:`migrations`, applied by :func:`open_tables`); ``inflq checkpoint add PROJECT DIR --lr X`` checks that
the checkpoint has the project model's architecture and records it in both. The run scores every
candidate once per checkpoint with that checkpoint's model and sums the weighted scores
(``Estimator.checkpoints``); with one checkpoint of weight 1 it is the gradient dot product.
Positive scores mean the training sequence makes the completion more likely, as everywhere.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import click
import sqlite_utils
from sqlite_utils.migrations import Migrations

from inflq import Estimator, InflqError, Option, hookimpl


@hookimpl
def register_estimators(register):
    register(TracIn)


@hookimpl
def register_commands(cli):
    @cli.group()
    def checkpoint():
        """Training checkpoints of the project's model (for the tracin estimator)."""

    @checkpoint.command("add")
    @click.argument("project")
    @click.argument("directory", type=click.Path())
    @click.option("--lr", "learning_rate", type=float, required=True, help="The learning rate in force at this checkpoint (its TracIn weight).")
    def checkpoint_add(project, directory, learning_rate):
        """Record the checkpoint in DIRECTORY (a saved model folder) with its learning rate."""
        from inflq import open_project

        p = open_project(project)
        row = add_checkpoint(p, Path(directory), learning_rate)
        click.echo(f"checkpoint {row['id']}: {row['path']} (learning rate {row['learning_rate']:g}); score with --estimator tracin")

    @checkpoint.command("list")
    @click.argument("project")
    def checkpoint_list(project):
        """List the project's checkpoints."""
        from inflq import open_project

        p = open_project(project)
        for c in listed_checkpoints(p):
            click.echo(f"{c['path']}\tlearning rate {float(c['learning_rate']):g}")


# -- the plugin's own catalog table ---------------------------------------------------------------------

MIGRATION_SET = "inflq_tracin"
migrations = Migrations(MIGRATION_SET)


@migrations(name="0001_checkpoints")
def m0001_checkpoints(db: sqlite_utils.Database) -> None:
    # Training checkpoints of the project's model, as recorded by `inflq checkpoint add`. Catalogs
    # from older inflq have the table, rows and all, from the core's retired 0002_checkpoints: kept.
    if not db["checkpoints"].exists():
        db["checkpoints"].create(
            {"id": int, "path": str, "learning_rate": float, "fingerprint": str, "created_at": str}, pk="id"
        )
    db["checkpoints"].create_index(["path"], unique=True, if_not_exists=True)


def open_tables(project) -> None:
    """Apply this plugin's migrations to the project's catalog (idempotent; run before writing)."""
    if migrations.pending(project.db):
        migrations.apply(project.db)


def _architecture(path: Path, modules: str) -> tuple[str | None, list[tuple[str, tuple[int, int]]]]:
    """The model type and the tracked modules' names and shapes of a model folder (built on the
    meta device from its config.json: shapes only, no weights read)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from inflq import select_modules

    try:
        config = AutoConfig.from_pretrained(str(path), trust_remote_code=False, local_files_only=True)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    except Exception as exc:
        raise InflqError(f"cannot read the model in {path} ({type(exc).__name__}: {str(exc)[:120]}); give a saved causal LM folder") from None
    return getattr(config, "model_type", None), [(t.name, t.shape) for t in select_modules(model, modules)]


def add_checkpoint(project, path: Path, learning_rate: float) -> dict:
    """Check that ``path`` holds the project model's architecture (same ``model_type``, same tracked
    modules and shapes), or, for a project with a LoRA adapter, an adapter of the same
    configuration (rank, alpha, target modules: a checkpoint of the fine-tune), then record it in
    ``inflq.toml`` and the catalog."""
    from inflq import (
        check_model_dir,
        fingerprint_files,
        is_adapter_dir,
        model_files,
        project_relative,
    )

    path = Path(path)
    if not (learning_rate > 0):
        raise InflqError(f"--lr must be a positive learning rate, not {learning_rate}")
    if project.config.adapter:
        if not is_adapter_dir(path):
            raise InflqError(f"{path} is not a LoRA adapter folder; a checkpoint of this project's fine-tune is one (save_pretrained of the PeftModel)")
        same = ("peft_type", "r", "lora_alpha", "target_modules", "fan_in_fan_out", "bias")
        want, got = (json.loads((Path(d) / "adapter_config.json").read_text()) for d in (project.adapter_path, path))
        diff = [k for k in same if _normal(want.get(k)) != _normal(got.get(k))]
        if diff:
            raise InflqError(f"{path} is an adapter of another configuration ({', '.join(diff)} differ); give a checkpoint of the project's fine-tune")
        if not (path / "adapter_model.safetensors").is_file():
            raise InflqError(f"{path} has no adapter_model.safetensors (inflq never loads pickled weights)")
        files = [path / "adapter_config.json", path / "adapter_model.safetensors"]
    else:
        check_model_dir(path)
        want_type, want = _architecture(project.model_path, project.config.modules)
        got_type, got = _architecture(path, project.config.modules)
        if got_type != want_type:
            raise InflqError(f"{path} holds a {got_type} model but the project's model is {want_type}; give a checkpoint of the project's model")
        if got != want:
            diff = next(((a, b) for a, b in zip(want, got) if a != b), None)
            where = f" ({diff[0][0]} {diff[0][1]} vs {diff[1][0]} {diff[1][1]})" if diff else f" ({len(want)} vs {len(got)} tracked modules)"
            raise InflqError(f"{path} has a different architecture from the project's model{where}; give a checkpoint of the same model")
        files = model_files(path)
    rel = project_relative(path, project.root)
    if any(Path(project.path(c["path"])).resolve() == path.resolve() for c in listed_checkpoints(project)):
        raise InflqError(f"{path} is already a checkpoint of this project; see `inflq checkpoint list`")
    fp = fingerprint_files(files)
    listed_checkpoints(project).append({"path": rel, "learning_rate": float(learning_rate)})
    project.save_config()
    open_tables(project)
    db = project.db
    with db.atomic():  # a stale row for the same path (config edited by hand) is replaced
        existing = next(db["checkpoints"].rows_where("path = ?", [rel]), None)
        if existing is not None:
            db.execute("DELETE FROM checkpoints WHERE id = ?", [existing["id"]])
        cid = db["checkpoints"].insert(
            {"path": rel, "learning_rate": float(learning_rate), "fingerprint": fp, "created_at": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())}
        ).last_pk
    return db["checkpoints"].get(cid)


def _normal(value):
    """An adapter setting compared as a set where it is a list (target modules in any order)."""
    return sorted(value) if isinstance(value, list) else value


def listed_checkpoints(project) -> list[dict]:
    """The checkpoints ``inflq.toml`` lists (its ``[[checkpoints]]`` tables, this plugin's settings),
    in order; the list itself, so that appending to it and saving the config records one."""
    cps = project.config.extra.setdefault("checkpoints", [])
    if not isinstance(cps, list) or not all(isinstance(c, dict) and "path" in c and "learning_rate" in c for c in cps):
        raise InflqError(f"{project.root / 'inflq.toml'}: [[checkpoints]] must be tables with a path and a learning_rate; fix the file")
    return cps


def recorded_checkpoints(project) -> list[dict]:
    """The catalog's checkpoint rows (path, learning rate, fingerprint), oldest first."""
    db = project.db
    if not db["checkpoints"].exists():  # a read-only catalog this plugin never wrote to
        return []
    return list(db["checkpoints"].rows_where(order_by="id"))


class TracIn(Estimator):
    """TracIn: learning-rate-weighted gradient dot products summed over training checkpoints."""

    name = "tracin"
    description = "TracIn: gradient dot products summed over training checkpoints, weighted by learning rate"
    options = (Option("last", int, None, "use only the last N checkpoints listed (default: all)"),)

    def checkpoints(self, project):
        cps = list(listed_checkpoints(project))
        if not cps:
            raise InflqError("tracin needs training checkpoints; add them with `inflq checkpoint add PROJECT DIR --lr X`")
        if self.settings["last"] is not None:
            if self.settings["last"] < 1:
                raise InflqError("tracin: last must be at least 1")
            cps = cps[-self.settings["last"] :]
        out = []
        for c in cps:
            if not isinstance(c, dict) or "path" not in c or "learning_rate" not in c:
                raise InflqError(f"inflq.toml: each [[checkpoints]] needs path and learning_rate, got {c!r}")
            out.append((project.path(str(c["path"])), float(c["learning_rate"])))
        return out

    def precondition(self, grads):
        return grads

    def describe(self):
        return {**self.settings, "weighting": "learning rate per checkpoint"}
