"""Creating a project and keeping it pointed at its model and corpus: ``init``, ``relink``, ``corpus rebuild``."""

from __future__ import annotations

from pathlib import Path

import click

from .common import project_at


@click.command()
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--model", required=True, type=click.Path(), help="Local Hugging Face model folder (safetensors).")
@click.option("--corpus", required=True, type=click.Path(), help="Training corpus: JSONL with a text field, plain text, or a saved dataset folder.")
@click.option("--name", help="Project name (default: the folder name).")
@click.option("--max-length", type=int, help="Context length for training sequences (default: the model's, at most 2048).")
@click.option("--format", "corpus_format", default="auto", type=click.Choice(["auto", "jsonl", "text", "datasets"]),
              help="Corpus format; auto: a folder is a saved dataset, .jsonl/.json/.ndjson is JSONL, anything else plain text (documents separated by blank lines).")
@click.option("--text-field", default="text", show_default=True, help="The JSONL field or dataset column holding each document's text.")
@click.option("--id-field", default="id", show_default=True, help="The field holding each document's id (missing: line-N for JSONL, row-N for a dataset).")
@click.option("--modules", default="all", show_default=True, help="Tracked modules: all, mlp, attention, or name globs.")
@click.option("--add-bos/--no-add-bos", default=None, help="Start each sequence with BOS (default: as the tokenizer does).")
@click.option("--append-eos", is_flag=True, help="End each document with EOS (as in GPT-2 style training).")
def init(directory, model, corpus, name, max_length, corpus_format, text_field, id_field, modules, add_bos, append_eos):
    """Create a project folder for MODEL and CORPUS."""
    from ..project import Project

    p = Project.init(Path(directory), Path(model), Path(corpus), name=name, max_length=max_length, corpus_format=corpus_format, text_field=text_field, id_field=id_field, modules=modules, add_bos=add_bos, append_eos=append_eos)
    n = len(p.runtime.corpus)
    click.echo(f"created {directory}: {n} training sequences, max length {p.config.max_length}, investigation 'default'")
    note = p.runtime.unknown_tokens_note()
    if note:
        click.echo(f"warning: {note}", err=True)


@click.command()
@click.argument("project")
@click.option("--model", type=click.Path(), help="A local copy of the project's model.")
@click.option("--corpus", "corpus_path", type=click.Path(), help="A local copy of the project's corpus.")
def relink(project, model, corpus_path):
    """Point a project at local copies of its model or corpus (fingerprints are checked)."""
    p = project_at(project)
    p.relink(Path(model) if model else None, Path(corpus_path) if corpus_path else None)
    click.echo("relinked")


@click.group()
def corpus():
    """The tokenized corpus."""


@corpus.command("rebuild")
@click.argument("project")
def corpus_rebuild(project):
    """Re-tokenize the corpus after it changed."""
    p = project_at(project)
    p.runtime.rebuild_corpus()
    click.echo(f"tokenized {len(p.runtime.corpus)} training sequences")
    note = p.runtime.unknown_tokens_note()
    if note:
        click.echo(f"warning: {note}", err=True)


COMMANDS = (init, relink, corpus)
