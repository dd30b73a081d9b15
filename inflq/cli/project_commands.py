"""Creating a project and keeping it pointed at its model and corpus: ``init``, ``relink``, ``corpus rebuild``."""

from __future__ import annotations

from pathlib import Path

import click

from ..project import INIT, ProjectConfig
from .common import project_at


@click.command()
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--model", required=True, type=click.Path(), help="Local Hugging Face model folder (safetensors), or a PEFT LoRA adapter folder (its base: --base or the local folder it names).")
@click.option("--adapter", type=click.Path(), help="A PEFT LoRA adapter folder to explain on top of --model (pip install 'inflq[peft]').")
@click.option("--base", type=click.Path(), help="The base model folder of an adapter given as --model (default: the folder its adapter_config.json names).")
@click.option("--corpus", required=True, type=click.Path(), help="Training corpus: JSONL (.gz too) or parquet rows (text, prompt/completion or chat messages), plain text, or a saved dataset folder.")
@click.option("--name", help="Project name (default: the folder name).")
@click.option("--max-length", type=int, help="Context length for training sequences (default: the model's, at most 2048).")
@click.option("--modules", default=None, help="Tracked modules: all, mlp, attention, lora (an adapter's A and B layers), or name globs [default: lora with an adapter, else all].")
@click.option("--add-bos/--no-add-bos", default=None, help="Start each sequence with BOS (default: as the tokenizer does).")
@ProjectConfig.click_options(INIT)
def init(directory, model, adapter, base, corpus, name, max_length, modules, add_bos, **stored):
    """Create a project folder for MODEL (with an adapter) and CORPUS."""
    from ..project import Project

    p = Project.init(Path(directory), Path(model), Path(corpus), name=name, max_length=max_length, modules=modules, add_bos=add_bos,
                     adapter=Path(adapter) if adapter else None, base=Path(base) if base else None, **stored)
    store = p.runtime.corpus
    what = f", adapter {p.config.adapter} (modules: {p.config.modules})" if p.config.adapter else ""
    loss = f", loss on the responses ({store.info.get('instruction_documents', 0)} instruction documents)" if store.loss_on == "response" else ""
    click.echo(f"created {directory}: {len(store)} training sequences, max length {p.config.max_length}{what}{loss}, investigation 'default'")
    _warn_store(p)


def _warn_store(p) -> None:
    for note in (p.runtime.unknown_tokens_note(), p.runtime.truncation_note()):
        if note:
            click.echo(f"warning: {note}", err=True)


@click.command()
@click.argument("project")
@click.option("--model", type=click.Path(), help="A local copy of the project's model (an adapter project's base model).")
@click.option("--adapter", type=click.Path(), help="A local copy of the project's LoRA adapter.")
@click.option("--corpus", "corpus_path", type=click.Path(), help="A local copy of the project's corpus.")
def relink(project, model, adapter, corpus_path):
    """Point a project at local copies of its model, adapter or corpus (fingerprints are checked)."""
    p = project_at(project)
    p.relink(Path(model) if model else None, Path(corpus_path) if corpus_path else None, Path(adapter) if adapter else None)
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
    _warn_store(p)


COMMANDS = (init, relink, corpus)
