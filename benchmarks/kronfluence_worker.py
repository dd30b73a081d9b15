"""The Kronfluence half of ``bench_engine.py``: the same workload through Kronfluence (EK-FAC).

Run by ``bench_engine.py`` as a subprocess, usually with the Python of a virtual environment that
has Kronfluence installed (its ``torchvision`` pin would otherwise pull a different torch into
ours). Imports torch, transformers, numpy and kronfluence only; inflq need not be installed here.

Input (a folder written by ``bench_engine.py``): ``job.json`` (model folder, tracked module names,
damping, batch size, threads, repeats), ``train_tokens.npy`` / ``train_lengths.npy`` (right-padded
training sequences) and ``query_tokens.npy`` / ``query_lengths.npy`` / ``query_starts.npy`` (queries
and where their completions start). Output, in the same folder: ``kf_scores_{1,64}.npy`` (the
queries × sequences score matrices) and ``kf_result.json`` (timings in seconds). With ``seeds`` in
``job.json`` (an agreement run, no timings): factors fitted once per seed (``torch.manual_seed``)
and ``kf_scores_seed{s}.npy`` for the first ``query_counts[0]`` queries per seed.

Conventions aligned with inflq: the measurement is the summed cross-entropy of the completion
tokens, so Kronfluence's score ``∇measurementᵀ (G + λI)⁻¹ ∇L`` has inflq's sign (positive: the
sequence makes the completion more likely); ``damping_factor`` is an absolute λ in Kronfluence,
as ``ekfac:damping=`` is in inflq (``damping: null``: Kronfluence's own heuristic, 0.1 × the mean
eigenvalue per module, as inflq's default); the true Fisher's labels sampled as Kronfluence's users
sample them (its language-modelling examples): from the shifted logits of the positions that have a
label in the training loss, so never at a sequence's last token; padding masked out of covariances.
"""

from __future__ import annotations

import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def swap_conv1d(model: nn.Module) -> None:
    """Replace transformers' GPT-2 ``Conv1D`` (``x @ W + b``, W stored in × out) by ``nn.Linear``
    with the transposed weight: Kronfluence tracks ``nn.Linear`` and ``nn.Conv2d`` only."""
    from transformers.pytorch_utils import Conv1D

    for name, mod in list(model.named_modules()):
        for child_name, child in list(mod.named_children()):
            if isinstance(child, Conv1D):
                n_in, n_out = child.weight.shape
                lin = nn.Linear(n_in, n_out, bias=child.bias is not None)
                with torch.no_grad():
                    lin.weight.copy_(child.weight.T)
                    if child.bias is not None:
                        lin.bias.copy_(child.bias)
                setattr(mod, child_name, lin)
        del name


def make_collate(pad_id: int):
    """Batches of ``(tokens, trained)``: padded to the batch's longest sequence (as inflq pads), with
    labels only for the tokens that ``trained`` marks (the training loss: every token but the first,
    or an instruction row's response; a query's measurement: its completion)."""

    def collate(items):
        T = max(len(t) for t, _ in items)
        ids = torch.full((len(items), T), pad_id, dtype=torch.long)
        att = torch.zeros((len(items), T), dtype=torch.long)
        labels = torch.full((len(items), T), -100, dtype=torch.long)
        for b, (t, trained) in enumerate(items):
            ids[b, : len(t)] = t
            att[b, : len(t)] = 1
            # labels[b, j] is the target of position j - 1; only the trained tokens count.
            labels[b, : len(t)][trained] = t[trained]
        return {"input_ids": ids, "attention_mask": att, "labels": labels}

    return collate


def language_modeling_task(tracked: list[str]):
    """Kronfluence's ``Task`` for a causal LM, as its language-modelling examples write it."""
    from kronfluence.task import Task

    class LanguageModeling(Task):
        def compute_train_loss(self, batch, model, sample=False):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
            shift = logits[:, :-1].reshape(-1, logits.size(-1))
            targets = batch["labels"][:, 1:].reshape(-1)
            if sample:
                # The true Fisher: labels drawn from the model where the loss has a label.
                with torch.no_grad():
                    targets = torch.multinomial(torch.softmax(shift.detach(), -1), 1).flatten()
                    targets[batch["labels"][:, 1:].reshape(-1) == -100] = -100
            return F.cross_entropy(shift, targets, ignore_index=-100, reduction="sum")

        def compute_measurement(self, batch, model):
            # -log p(completion | prompt): positive scores then mean "more likely", as in inflq.
            return self.compute_train_loss(batch, model, sample=False)

        def get_influence_tracked_modules(self):
            return tracked

        def get_attention_mask(self, batch):
            return batch["attention_mask"]

    return LanguageModeling


def main(folder: Path) -> None:
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.utils.dataset import DataLoaderKwargs
    from transformers import AutoModelForCausalLM

    job = json.loads((folder / "job.json").read_text())
    torch.set_num_threads(int(job["threads"]))
    torch.manual_seed(int(job["seed"]))
    tracked = list(job["modules"])
    pad_id = int(job["pad_id"])
    bs = int(job["batch_size"])
    repeats = int(job["repeats"])

    train_tok = np.load(folder / "train_tokens.npy")
    train_len = np.load(folder / "train_lengths.npy")
    q_tok = np.load(folder / "query_tokens.npy")
    q_len = np.load(folder / "query_lengths.npy")
    q_start = np.load(folder / "query_starts.npy")
    train_targets = np.load(folder / "train_targets.npy").astype(bool) if (folder / "train_targets.npy").exists() else None

    class Sequences(torch.utils.data.Dataset):
        def __init__(self, tok, lens, starts=None, targets=None):
            self.tok, self.lens, self.starts, self.targets = tok, lens, starts, targets

        def __len__(self):
            return len(self.lens)

        def __getitem__(self, i):
            n = int(self.lens[i])
            if self.targets is not None:
                trained = torch.as_tensor(self.targets[i, :n])
            else:
                trained = torch.arange(n) >= (1 if self.starts is None else int(self.starts[i]))
            trained[0] = False  # the first token is predicted from nothing
            return torch.as_tensor(self.tok[i, :n], dtype=torch.long), trained

    collate = make_collate(pad_id)
    LanguageModeling = language_modeling_task(tracked)

    model = AutoModelForCausalLM.from_pretrained(job["model"], use_safetensors=True, dtype=torch.float32)
    if job.get("adapter"):
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, job["adapter"], is_trainable=False)
    swap_conv1d(model)  # the base's Conv1D layers (inside LoRA layers too); the adapter's A and B are nn.Linear
    model.eval()
    task = LanguageModeling()

    train = Sequences(train_tok, train_len, targets=train_targets)
    loader_kwargs = DataLoaderKwargs(collate_fn=collate)

    if job.get("seeds") is not None:
        nq = int(job["query_counts"][0])
        agreement(job, folder, model, task, train, Sequences(q_tok[:nq], q_len[:nq], q_start[:nq]), loader_kwargs)
        return

    # FLOOR for this side: one plain forward + backward over the corpus (the Linear-swapped model).
    def floor() -> float:
        t = time.perf_counter()
        for s in range(0, len(train), bs):
            batch = collate([train[i] for i in range(s, min(s + bs, len(train)))])
            task.compute_train_loss(batch, model).backward()
            model.zero_grad(set_to_none=True)
        return time.perf_counter() - t

    floor()  # warm-up
    floors = [floor() for _ in range(repeats)]

    model = prepare_model(model, task)
    out_dir = Path(tempfile.mkdtemp(prefix="kf-bench-"))
    analyzer = Analyzer("bench", model=model, task=task, cpu=True, output_dir=str(out_dir), disable_tqdm=True, disable_model_save=True)
    analyzer.set_dataloader_kwargs(loader_kwargs)
    factor_args = FactorArguments(strategy="ekfac", use_empirical_fisher=job.get("fisher") == "empirical")

    def fit(name: str) -> float:
        t = time.perf_counter()
        analyzer.fit_all_factors(name, train, per_device_batch_size=bs, factor_args=factor_args, overwrite_output_dir=True)
        return time.perf_counter() - t

    # Warm up on a few sequences, then time the whole corpus.
    small = Sequences(train_tok[: 2 * bs], train_len[: 2 * bs], targets=None if train_targets is None else train_targets[: 2 * bs])
    analyzer.fit_all_factors("warm", small, per_device_batch_size=bs, factor_args=factor_args, overwrite_output_dir=True)
    fits = [fit("ekfac") for _ in range(repeats)]

    result = {"floor": statistics.median(floors), "fit": statistics.median(fits), "floors": floors, "fits": fits}
    for nq in job["query_counts"]:
        queries = Sequences(q_tok[:nq], q_len[:nq], q_start[:nq])
        score_args = ScoreArguments(
            damping_factor=None if job["damping"] is None else float(job["damping"]),
            query_gradient_low_rank=(int(job["rank"]) if nq > 1 else None),
            use_full_svd=True,
        )
        times = []
        for r in range(repeats + 1):  # the first is a warm-up
            t = time.perf_counter()
            analyzer.compute_pairwise_scores(
                f"scores_{nq}", "ekfac", queries, train, per_device_query_batch_size=nq,
                per_device_train_batch_size=bs, score_args=score_args, overwrite_output_dir=True,
            )
            if r:
                times.append(time.perf_counter() - t)
        scores = analyzer.load_pairwise_scores(f"scores_{nq}")["all_modules"].to(torch.float64).numpy()
        np.save(folder / f"kf_scores_{nq}.npy", scores, allow_pickle=False)
        result[f"score_{nq}"] = statistics.median(times)
        result[f"scores_{nq}_times"] = times
    (folder / "kf_result.json").write_text(json.dumps(result))
    shutil.rmtree(out_dir, ignore_errors=True)


def agreement(job, folder: Path, model, task, train, queries, loader_kwargs) -> None:
    """Per seed: factors fitted with that seed's sampled labels, and the queries' scores."""
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments

    bs = int(job["batch_size"])
    model = prepare_model(model, task)
    out_dir = Path(tempfile.mkdtemp(prefix="kf-agree-"))
    analyzer = Analyzer("agree", model=model, task=task, cpu=True, output_dir=str(out_dir), disable_tqdm=True, disable_model_save=True)
    analyzer.set_dataloader_kwargs(loader_kwargs)
    factor_args = FactorArguments(strategy="ekfac", use_empirical_fisher=job.get("fisher") == "empirical")
    rank = job.get("rank")
    score_args = ScoreArguments(
        damping_factor=None if job["damping"] is None else float(job["damping"]),
        query_gradient_low_rank=int(rank) if rank else None, use_full_svd=True,
    )
    seconds = {}
    for seed in job["seeds"]:
        t = time.perf_counter()
        torch.manual_seed(int(seed))
        analyzer.fit_all_factors(f"ekfac_{seed}", train, per_device_batch_size=bs, factor_args=factor_args, overwrite_output_dir=True)
        analyzer.compute_pairwise_scores(
            f"scores_{seed}", f"ekfac_{seed}", queries, train, per_device_query_batch_size=len(queries),
            per_device_train_batch_size=bs, score_args=score_args, overwrite_output_dir=True,
        )
        scores = analyzer.load_pairwise_scores(f"scores_{seed}")["all_modules"].to(torch.float64).numpy()
        np.save(folder / f"kf_scores_seed{seed}.npy", scores, allow_pickle=False)
        seconds[str(seed)] = time.perf_counter() - t
    (folder / "kf_result.json").write_text(json.dumps({"seconds": seconds}))
    shutil.rmtree(out_dir, ignore_errors=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
