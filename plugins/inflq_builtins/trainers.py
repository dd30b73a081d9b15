"""The built-in trainer: the demo's training recipe (projects/demo/train_model.py calls
:func:`train_causal_lm` from here, so the two cannot drift apart).

A fresh random initialisation of the project's ``config.json`` (``torch.manual_seed(seed)`` then
``AutoModelForCausalLM.from_config``; nothing is downloaded), then AdamW (betas 0.9/0.98, weight
decay on matrices only), linear warmup to ``lr`` and a cosine decay to 5 % of it, gradient norm
clipped at 1, batches of whole sequences in an order shuffled per epoch with ``random.Random(seed)``.

With ``checkpoints=K`` (``train_model.py --checkpoints K``) it also saves K
evenly spaced checkpoints for TracIn (:func:`checkpoint_steps`): a ``save_pretrained`` folder
``step-NNNNN`` each, with ``checkpoint.json`` holding the step and the learning rate in force there
(the rate of the step that produced it), which ``inflq checkpoint add PROJECT DIR --lr X`` records.
Saving reads the weights only: the final model is bitwise the same with or without checkpoints.

``adamw-lora`` (:func:`train_lora`) fine-tunes a fresh LoRA adapter, of the project's adapter's
configuration (rank, alpha, target modules), on the project's frozen base model with the same loop:
projects/demo-lora/build.py makes the demo's adapter with it. Both trainers train on the corpus's
loss mask (instruction data: the responses only, as the fine-tune did).
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from inflq import (
    InflqError,
    Monitor,
    Option,
    Trainer,
    hookimpl,
    is_adapter_dir,
    require_peft,
    targets_of,
)


@hookimpl
def register_trainers(register):
    register(AdamWTrainer)
    register(AdamWLoRATrainer)


def collate(seqs: Sequence[Sequence[int]], pad_id: int) -> dict:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (-100 on padding, and on the
    tokens a sequence's mask of trained targets leaves out: instruction data's prompts)."""
    import numpy as np
    import torch

    n = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), n), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), n), dtype=torch.long)
    trained = torch.zeros((len(seqs), n), dtype=torch.bool)
    for i, s in enumerate(seqs):
        input_ids[i, : len(s)] = torch.as_tensor(np.asarray(s, dtype=np.int64))
        attention_mask[i, : len(s)] = 1
        targets = targets_of(s)
        trained[i, : len(s)] = True if targets is None else torch.from_numpy(np.asarray(targets, dtype=bool))
    labels = input_ids.masked_fill(~trained, -100)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def checkpoint_steps(total: int, count: int) -> list[int]:
    """``count`` evenly spaced steps of ``total`` (after step ``round(k × total / count)``, k = 1..count;
    the last is the final model), without repeats."""
    if count < 0:
        raise InflqError(f"checkpoints must be 0 or more, not {count}")
    if count > total:
        raise InflqError(f"{count} checkpoints need at least {count} training steps, there are {total}; ask for fewer")
    return sorted({max(1, round(k * total / count)) for k in range(1, count + 1)})


def save_checkpoint(model, folder: Path, step: int, learning_rate: float) -> Path:
    """``model`` saved with ``save_pretrained`` into ``folder/step-NNNNN`` with ``checkpoint.json``
    (step, learning rate); returns the checkpoint's folder."""
    out = Path(folder) / f"step-{step:05d}"
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    with open(out / "checkpoint.json", "w", encoding="utf-8") as f:
        json.dump({"step": step, "learning_rate": learning_rate}, f)
        f.write("\n")
    return out


def train_causal_lm(
    model,
    seqs: Sequence[Sequence[int]],
    pad_id: int,
    *,
    epochs: int = 12,
    batch_size: int = 32,
    lr: float = 3e-3,
    warmup: int = 200,
    weight_decay: float = 0.01,
    seed: int = 0,
    monitor: Monitor | None = None,
    log: Callable[[str], None] | None = None,
    checkpoints: int = 0,
    checkpoint_dir: Path | None = None,
) -> dict:
    """Train ``model``'s trainable parameters in place on ``seqs`` (token arrays, with their masks
    of trained targets where they carry one) with the demo's recipe; returns
    ``{"steps", "train_time_s", "final_train_loss", "checkpoints"}``. Warmup lasts
    ``min(warmup, total steps // 10)`` steps. ``monitor`` is checked before every step (Ctrl-C stops
    within one step); ``log`` gets one line per reported epoch. ``checkpoints``: save that many
    evenly spaced checkpoints under ``checkpoint_dir`` (:func:`save_checkpoint`); ``"checkpoints"``
    lists them as ``{"path", "step", "learning_rate"}``."""
    import torch

    if not len(seqs):
        raise InflqError("the trainer got no training sequences; raise --fraction")
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]  # a LoRA model: the adapter's only
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.98))
    steps_per_epoch = math.ceil(len(seqs) / batch_size)
    total = steps_per_epoch * epochs
    warm = min(warmup, total // 10)

    def lr_at(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        frac = (step - warm) / max(1, total - warm)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    if checkpoints and checkpoint_dir is None:
        raise InflqError("checkpoints need a folder to be saved in (checkpoint_dir)")
    save_at = set(checkpoint_steps(total, checkpoints)) if checkpoints else set()
    saved: list[dict] = []
    order_rng = random.Random(seed)
    model.train()
    t0 = time.perf_counter()
    step = 0
    tot_loss, tot_tok = 0.0, 0
    for epoch in range(epochs):
        order = list(range(len(seqs)))
        order_rng.shuffle(order)
        tot_loss, tot_tok = 0.0, 0
        for b in range(0, len(order), batch_size):
            if monitor is not None:
                monitor.check()
            batch = {k: v.to(device) for k, v in collate([seqs[i] for i in order[b : b + batch_size]], pad_id).items()}
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            step_lr = float(sched.get_last_lr()[0])  # the rate this step uses
            opt.step()
            sched.step()
            step += 1
            if step in save_at:
                assert checkpoint_dir is not None
                saved.append({"path": str(save_checkpoint(model, checkpoint_dir, step, step_lr)), "step": step, "learning_rate": step_lr})
            n_tok = int((batch["labels"][:, 1:] != -100).sum())
            tot_loss += out.loss.item() * n_tok
            tot_tok += n_tok
        if log is not None and (epoch == 0 or (epoch + 1) % 5 == 0 or epoch + 1 == epochs):
            log(f"epoch {epoch + 1:3d}/{epochs}  loss {tot_loss / tot_tok:.4f}  lr {sched.get_last_lr()[0]:.2e}  {time.perf_counter() - t0:6.1f}s")
    model.eval()
    return {"steps": step, "train_time_s": time.perf_counter() - t0, "final_train_loss": tot_loss / max(tot_tok, 1), "checkpoints": saved}


class AdamWTrainer(Trainer):
    name = "adamw"
    default = True
    description = "retrain from a fresh random init of config.json: AdamW, warmup + cosine (the demo's recipe)"
    options = (
        Option("epochs", int, 12, "passes over the subset"),
        Option("lr", float, 3e-3, "peak learning rate"),
        Option("batch_size", int, 32, "sequences per step"),
        Option("warmup", int, 200, "warmup steps (at most a tenth of all steps)"),
        Option("weight_decay", float, 0.01, "AdamW weight decay on matrices"),
        Option("threads", int, 2, "torch CPU threads while training (0: leave as set)"),
        Option("device", str, "cpu", "where to train: cpu or the project's device (project)", choices=("cpu", "project")),
    )

    def train(self, ctx):
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        s = self.settings
        for key in ("epochs", "batch_size"):
            if s[key] < 1:
                raise InflqError(f"trainer adamw: {key} must be at least 1")
        model_dir = Path(ctx.project.model_path)
        if not (model_dir / "config.json").exists():
            raise InflqError(f"{model_dir} has no config.json; the adamw trainer builds the model from it")
        if ctx.project.config.adapter:
            raise InflqError("this project explains a LoRA adapter, which adamw would not retrain: use --trainer adamw-lora")
        device = ctx.project.runtime.device if s["device"] == "project" else torch.device("cpu")
        threads = torch.get_num_threads()
        if s["threads"] and s["threads"] > 0:
            torch.set_num_threads(int(s["threads"]))
        try:
            config = AutoConfig.from_pretrained(str(model_dir))
            torch.manual_seed(int(ctx.seed))
            model = AutoModelForCausalLM.from_config(config).float().to(device)
            seqs = ctx.project.runtime.corpus.many(ctx.indices)
            train_causal_lm(
                model, seqs, ctx.project.runtime.pad_id, epochs=s["epochs"], batch_size=s["batch_size"], lr=s["lr"],
                warmup=s["warmup"], weight_decay=s["weight_decay"], seed=int(ctx.seed), monitor=ctx.monitor,
            )
        finally:
            torch.set_num_threads(threads)
        return model


def lora_model(base, config, seed: int):
    """``base`` (frozen) with a fresh LoRA adapter of ``config`` (a ``peft.LoraConfig``), its A
    matrices initialised from ``torch.manual_seed(seed)`` (B starts at zero, as in peft)."""
    import copy

    import torch

    peft = require_peft()
    config = copy.deepcopy(config)
    config.inference_mode = False
    torch.manual_seed(int(seed))
    return peft.get_peft_model(base, config)


def train_lora(base, config, seqs, pad_id: int, *, seed: int = 0, **recipe):
    """A fresh LoRA adapter of ``config`` on ``base`` (:func:`lora_model`), trained on ``seqs`` with
    :func:`train_causal_lm`'s loop (``recipe``: its options). Returns the model and the summary."""
    model = lora_model(base, config, seed)
    summary = train_causal_lm(model, seqs, pad_id, seed=seed, **recipe)
    return model, summary


class AdamWLoRATrainer(Trainer):
    name = "adamw-lora"
    description = "fine-tune a fresh LoRA adapter (the project's adapter's rank, alpha, modules) on the frozen base model: AdamW, warmup + cosine"
    options = (
        Option("epochs", int, 20, "passes over the subset"),
        Option("lr", float, 3e-3, "peak learning rate"),
        Option("batch_size", int, 16, "sequences per step"),
        Option("warmup", int, 20, "warmup steps (at most a tenth of all steps)"),
        Option("weight_decay", float, 0.0, "AdamW weight decay on the adapter's matrices"),
        Option("threads", int, 2, "torch CPU threads while training (0: leave as set)"),
        Option("device", str, "cpu", "where to train: cpu or the project's device (project)", choices=("cpu", "project")),
    )

    def train(self, ctx):
        import torch

        s = self.settings
        for key in ("epochs", "batch_size"):
            if s[key] < 1:
                raise InflqError(f"trainer adamw-lora: {key} must be at least 1")
        adapter = ctx.project.adapter_path
        if adapter is None or not is_adapter_dir(adapter):
            raise InflqError("trainer adamw-lora retrains a LoRA adapter: the project has none (create it with --adapter DIR)")
        peft = require_peft()
        device = ctx.project.runtime.device if s["device"] == "project" else torch.device("cpu")
        threads = torch.get_num_threads()
        if s["threads"] and s["threads"] > 0:
            torch.set_num_threads(int(s["threads"]))
        try:
            from inflq import load_model

            base = load_model(ctx.project.model_path, device, torch.float32)
            config = peft.LoraConfig.from_pretrained(str(adapter))
            model, _ = train_lora(
                base, config, ctx.project.runtime.corpus.many(ctx.indices), ctx.project.runtime.pad_id, seed=int(ctx.seed), epochs=s["epochs"],
                batch_size=s["batch_size"], lr=s["lr"], warmup=s["warmup"], weight_decay=s["weight_decay"], monitor=ctx.monitor,
            )
        finally:
            torch.set_num_threads(threads)
        return model
