"""Creating a project and keeping it pointed at its model and corpus: ``init``, ``relink``, ``corpus rebuild``."""

from __future__ import annotations

from pathlib import Path

import click

from .common import project_at


@click.command()
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--model", required=True, type=click.Path(), help="Local Hugging Face model folder (safetensors), or a PEFT LoRA adapter folder (its base: --base or the local folder it names).")
@click.option("--adapter", type=click.Path(), help="A PEFT LoRA adapter folder to explain on top of --model (pip install 'inflq[peft]').")
@click.option("--base", type=click.Path(), help="The base model folder of an adapter given as --model (default: the folder its adapter_config.json names).")
@click.option("--corpus", required=True, type=click.Path(), help="Training corpus: JSONL (.gz too) or parquet rows (text, prompt/completion or chat messages), plain text, or a saved dataset folder.")
@click.option("--name", help="Project name (default: the folder name).")
@click.option("--max-length", type=int, help="Context length for training sequences (default: the model's, at most 2048).")
@click.option("--format", "corpus_format", default="auto", type=click.Choice(["auto", "jsonl", "parquet", "text", "datasets"]),
              help="Corpus format; auto: a folder is a saved dataset, .jsonl/.json/.ndjson (.gz too) is JSONL, .parquet is parquet, anything else plain text (documents separated by blank lines).")
@click.option("--text-field", default="text", show_default=True, help="The field (column) holding each document's text.")
@click.option("--id-field", default="id", show_default=True, help="The field holding each document's id (missing: line-N for JSONL, row-N for parquet or a dataset).")
@click.option("--prompt-field", default="prompt", show_default=True, help="Instruction rows: the field holding the prompt.")
@click.option("--completion-field", default="completion", show_default=True, help="Instruction rows: the field holding the completion (the response trained on).")
@click.option("--messages-field", default="messages", show_default=True, help="Chat rows: the field holding the messages ([{role, content}]), rendered with the tokenizer's chat template.")
@click.option("--loss-on", default="response", show_default=True, type=click.Choice(["response", "all"]),
              help="Instruction data: the training loss on the response tokens only (as a fine-tune trains), or on every token.")
@click.option("--too-long", default="truncate", show_default=True, type=click.Choice(["truncate", "refuse"]),
              help="An instruction document longer than the context: truncate it before the first response that does not fit (counted), or refuse the corpus.")
@click.option("--modules", default=None, help="Tracked modules: all, mlp, attention, lora (an adapter's A and B layers), or name globs [default: lora with an adapter, else all].")
@click.option("--dtype", default="auto", show_default=True, type=click.Choice(["auto", "float32", "bfloat16", "float16"]),
              help="The model's dtype here; auto: the model's own (config.json). Captures and factors are float32/float64 whatever it is.")
@click.option("--add-bos/--no-add-bos", default=None, help="Start each sequence with BOS (default: as the tokenizer does).")
@click.option("--append-eos", is_flag=True, help="End each document with EOS (as in GPT-2 style training).")
def init(directory, model, adapter, base, corpus, name, max_length, corpus_format, text_field, id_field, prompt_field, completion_field,
         messages_field, loss_on, too_long, modules, dtype, add_bos, append_eos):
    """Create a project folder for MODEL (with an adapter) and CORPUS."""
    from ..project import Project

    p = Project.init(Path(directory), Path(model), Path(corpus), name=name, max_length=max_length, corpus_format=corpus_format, text_field=text_field,
                     id_field=id_field, modules=modules, add_bos=add_bos, append_eos=append_eos, adapter=Path(adapter) if adapter else None,
                     base=Path(base) if base else None, dtype=dtype, prompt_field=prompt_field, completion_field=completion_field,
                     messages_field=messages_field, loss_on=loss_on, too_long=too_long)
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
