"""What the model itself says about a query: the log-probability of its completion and the
greedy continuation of its prompt. Feeds the model ``input_ids`` and ``attention_mask`` only
(GPT-2 adds ``token_type_ids`` to its embeddings, which changes the answer)."""

from __future__ import annotations

import torch

from .errors import InflqError
from .project import Project


def _device(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def completion_token_logprobs(project: Project, prompt: str, completion: str, chat: bool = False) -> list[tuple[str, float]]:
    """``(token, log p(token | everything before it))`` for each measured (completion) token."""
    tq = project.runtime.tokenize_query(prompt, completion, chat)
    model = project.runtime.model
    ids = torch.as_tensor(tq.tokens, dtype=torch.long, device=_device(model)).unsqueeze(0)
    logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, :-1].float()
    logp = logits.log_softmax(-1).gather(-1, ids[0, 1:, None])[:, 0]
    measured = logp[tq.completion_start - 1 :].cpu().tolist()
    names = project.runtime.token_strings(tq.tokens[tq.completion_start :])
    return list(zip(names, measured))


def completion_logprob(project: Project, prompt: str, completion: str, chat: bool = False) -> float:
    """The measurement ``log p(completion | prompt)`` in nats, summed over the completion tokens."""
    return float(sum(lp for _, lp in completion_token_logprobs(project, prompt, completion, chat)))


@torch.no_grad()
def greedy_continuation(project: Project, prompt: str, max_new_tokens: int = 20) -> str:
    """What the model says after ``prompt`` when it always picks its most likely next token."""
    tok = project.runtime.tokenizer
    ids = list(tok(prompt, add_special_tokens=True)["input_ids"])
    if project.config.add_bos and tok.bos_token_id is not None and (not ids or ids[0] != tok.bos_token_id):
        ids = [tok.bos_token_id] + ids
    if not ids:
        raise InflqError("the prompt is empty and the tokenizer adds no BOS token; give a prompt")
    model = project.runtime.model
    dev = _device(model)
    limit = project.config.max_length
    new: list[int] = []
    for _ in range(max(0, max_new_tokens)):
        if len(ids) >= limit:
            break
        x = torch.as_tensor(ids, dtype=torch.long, device=dev).unsqueeze(0)
        nxt = int(model(input_ids=x, attention_mask=torch.ones_like(x)).logits[0, -1].argmax())
        if nxt == tok.eos_token_id:
            break
        ids.append(nxt)
        new.append(nxt)
    return tok.decode(new)
