"""Kronfluence as its users run it: one script, from a model folder and a corpus file to scores.

Run by ``bench_user.py`` (``--kf-python``) as a whole process and timed from start to exit, as
``inflq run`` is: imports, loading the model, tokenizing the corpus, fitting EK-FAC factors and
scoring every query against every training sequence. Everything is left at Kronfluence's defaults
(its automatic batch size search, torch's default threads, no query low-rank, its damping
heuristic), with the true Fisher's labels sampled where the training loss has a term (as its
language-modelling examples do) and the tracked modules inflq tracks by default (every linear layer
of the transformer blocks; GPT-2's ``Conv1D`` swapped for ``nn.Linear``, as its GPT-2 example does).

    python kronfluence_user.py MODEL_DIR CORPUS.jsonl QUERIES.jsonl MAX_LENGTH APPEND_EOS OUT.npy [BATCH]

``BATCH`` (optional) fixes ``per_device_batch_size`` for both phases instead of the automatic search.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kronfluence_worker import language_modeling_task, make_collate, swap_conv1d  # noqa: E402


def main(model_dir: str, corpus: str, queries: str, max_length: int, append_eos: bool, out: str, batch: int | None) -> None:
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments
    from kronfluence.utils.dataset import DataLoaderKwargs
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, use_safetensors=True, dtype=torch.float32)
    swap_conv1d(model)
    model.eval()
    tracked = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head")]
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0

    def encode(text: str) -> list[int]:
        ids = tok(text, add_special_tokens=True)["input_ids"]
        if append_eos and tok.eos_token_id is not None:
            ids = ids + [tok.eos_token_id]
        return ids[:max_length]

    train = []
    for line in Path(corpus).read_text().splitlines():
        if line.strip():
            ids = encode(json.loads(line)["text"])
            if len(ids) >= 2:
                train.append((torch.tensor(ids), 1))
    qs = []
    for line in Path(queries).read_text().splitlines():
        if line.strip():
            q = json.loads(line)
            prompt = tok(q["prompt"], add_special_tokens=True)["input_ids"]
            full = tok(q["prompt"] + q["completion"], add_special_tokens=True)["input_ids"]
            qs.append((torch.tensor(full), len(prompt)))

    class Listed(torch.utils.data.Dataset):
        def __init__(self, items):
            self.items = items

        def __len__(self):
            return len(self.items)

        def __getitem__(self, i):
            return self.items[i]

    collate = make_collate(pad)
    LanguageModeling = language_modeling_task(tracked)

    task = LanguageModeling()
    model = prepare_model(model, task)
    folder = Path(tempfile.mkdtemp(prefix="kf-user-"))
    try:
        analyzer = Analyzer("user", model=model, task=task, cpu=not torch.cuda.is_available(), output_dir=str(folder), disable_tqdm=True)
        analyzer.set_dataloader_kwargs(DataLoaderKwargs(collate_fn=collate))
        analyzer.fit_all_factors("ekfac", Listed(train), per_device_batch_size=batch, factor_args=FactorArguments(strategy="ekfac"), overwrite_output_dir=True)
        analyzer.compute_pairwise_scores("scores", "ekfac", Listed(qs), Listed(train), per_device_query_batch_size=len(qs),
                                         per_device_train_batch_size=batch, overwrite_output_dir=True)
        scores = analyzer.load_pairwise_scores("scores")["all_modules"].to(torch.float64).numpy()
        np.save(out, scores, allow_pickle=False)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    a = sys.argv[1:]
    main(a[0], a[1], a[2], int(a[3]), a[4] == "1", a[5], int(a[6]) if len(a) > 6 else None)
