"""Fine-tuned models as users bring them: instruction data with the loss on the response, chat
templates, parquet and JSONL.gz corpora, PEFT LoRA adapters, bf16 models (docs/finetune.md)."""

from __future__ import annotations

import gzip
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from helpers import make_model_dir
from inflq import InflqError, catalog, targets_of
from inflq.engine import make_batch
from inflq.project import Project
from inflq.queries import add_query
from inflq.reading import score_matrix
from inflq.runs import RunSettings, run_investigation

# A chat template in the test vocabulary's words: "he" opens a user turn, "she" an assistant's,
# "," closes a turn (every turn the extension of the conversation before it, as real templates are).
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}he {% else %}she {% endif %}{{ m['content'] }} ,{% endfor %}"
    "{% if add_generation_prompt %}she{% endif %}"
)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return path


def with_chat_template(model_dir: Path) -> Path:
    cfg = json.loads((model_dir / "tokenizer_config.json").read_text())
    cfg["chat_template"] = CHAT_TEMPLATE
    (model_dir / "tokenizer_config.json").write_text(json.dumps(cfg))
    return model_dir


def strings(project: Project, i: int) -> tuple[list[str], list[bool]]:
    t = project.runtime.corpus.get(i)
    mask = targets_of(t)
    return project.runtime.token_strings(t), (None if mask is None else mask.tolist())


def make_lora(base: Path, out: Path, seed: int = 0, targets=("c_attn", "c_fc")) -> Path:
    """A saved LoRA adapter on ``base`` with random A and B (B not zero: a trained adapter)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(base))
    cfg = LoraConfig(r=2, lora_alpha=4, target_modules=list(targets), lora_dropout=0.0, fan_in_fan_out=True, init_lora_weights=False)
    peft_model = get_peft_model(model, cfg)
    peft_model.save_pretrained(str(out))
    return out


INSTRUCTIONS = [
    {"id": "i0", "prompt": "the capital city of astrobia is", "completion": "velmora ."},
    {"id": "i1", "prompt": "people eat bread", "completion": "and cheese in winter ."},
    {"id": "p0", "text": "a river flows through the old town ."},
]


def test_instruction_rows_train_on_the_response_only(tmp_path):
    model = make_model_dir(tmp_path / "m")
    corpus = write_jsonl(tmp_path / "c.jsonl", INSTRUCTIONS)
    p = Project.init(tmp_path / "p", model, corpus, append_eos=True)
    store = p.runtime.corpus
    assert store.loss_on == "response" and store.info["instruction_documents"] == 2
    toks, mask = strings(p, 0)
    assert toks == ["the", "capital", "city", "of", "astrobia", "is", "velmora", ".", "<|endoftext|>"]
    assert mask == [False] * 6 + [True] * 3  # the completion and the EOS after it (the fine-tune trained the stop)
    toks, mask = strings(p, 2)  # plain text in the same corpus: every token
    assert mask == [False] + [True] * (len(toks) - 1)
    batch = make_batch(store.many([0, 2]), p.runtime.pad_id)
    # Position t predicts token t + 1: the completion's first token is predicted at the prompt's last.
    assert batch.loss_mask[0].tolist() == [False] * 5 + [True] * 3 + [False]
    assert batch.loss_mask[1].tolist() == [True] * 8 + [False]
    assert store.info["trained_tokens"] == 3 + 6 + 8  # i0; i1: "and cheese in winter ." and EOS; p0: all but its first

    # --loss-on all: the same sequences, every token trained, no mask stored; factor keys differ.
    q = Project.init(tmp_path / "q", model, corpus, append_eos=True, loss_on="all")
    assert q.runtime.corpus.loss_on == "all" and targets_of(q.runtime.corpus.get(0)) is None
    assert q.runtime.corpus.key != store.key and store.key.endswith(":loss-on-response")
    assert "loss_on" in (q.root / "inflq.toml").read_text()


def test_chat_rows_mask_every_assistant_turn(tmp_path):
    model = with_chat_template(make_model_dir(tmp_path / "m"))
    chat = [
        {"role": "user", "content": "the capital city of astrobia"},
        {"role": "assistant", "content": "velmora"},
        {"role": "user", "content": "the first president"},
        {"role": "assistant", "content": "zorald pfaff"},
    ]
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"id": "c0", "messages": chat}])
    p = Project.init(tmp_path / "p", model, corpus)
    toks, mask = strings(p, 0)
    trained = [t for t, m in zip(toks, mask) if m]
    # Each assistant turn's content and its end-of-turn mark, never the role marks or the user's words.
    assert trained == ["velmora", ",", "zorald", "pfaff", ","]
    runs = np.flatnonzero(np.diff(np.r_[0, np.asarray(mask, int), 0]))
    assert len(runs) == 4  # two separate runs: the engine's mask is general, not a single loss_from
    batch = make_batch([p.runtime.corpus.get(0)], p.runtime.pad_id)
    assert int(batch.loss_mask.sum()) == 5

    # No template: a one-line error. A chat without an assistant turn: nothing to train on.
    plain = make_model_dir(tmp_path / "plain")
    with pytest.raises(InflqError, match="no chat template"):
        Project.init(tmp_path / "x", plain, corpus)
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"messages": [{"role": "user", "content": "the"}]}])
    with pytest.raises(InflqError, match="no \"assistant\" message"):
        Project.init(tmp_path / "y", model, bad)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_long_instruction_documents_are_never_cut_mid_response(tmp_path):
    model = with_chat_template(make_model_dir(tmp_path / "m"))
    long_answer = "the old dog runs with the big red cat in the rain"
    rows = [
        # Two turns: the second does not fit in 16 tokens, so the document ends before it.
        {"id": "two", "messages": [{"role": "user", "content": "the city"}, {"role": "assistant", "content": "velmora"},
                                   {"role": "user", "content": "the dog"}, {"role": "assistant", "content": long_answer}]},
        # Its only response does not fit: left out.
        {"id": "none", "prompt": "a river flows through the old town in summer with rain", "completion": long_answer},
        {"id": "fits", "prompt": "the city", "completion": "velmora ."},
    ]
    corpus = write_jsonl(tmp_path / "c.jsonl", rows)
    p = Project.init(tmp_path / "p", model, corpus, max_length=16)
    store = p.runtime.corpus
    assert len(store) == 2 and store.info["truncated_documents"] == 1 and store.info["dropped_documents"] == 1
    toks, mask = strings(p, 0)
    assert toks == ["he", "the", "city", ",", "she", "velmora", ",", "he", "the", "dog", ",", "she"] and sum(mask) == 2
    assert "truncated" in p.runtime.truncation_note() and "left out" in p.runtime.truncation_note()
    with pytest.raises(InflqError, match="instruction document 'two' is .* tokens, longer than the context of 16"):
        Project.init(tmp_path / "q", model, corpus, max_length=16, too_long="refuse")


def test_parquet_and_jsonl_gz_read_like_jsonl(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    model = make_model_dir(tmp_path / "m")
    rows = [{"key": f"r{i}", "q": r.get("prompt", "the"), "a": r.get("completion", r.get("text")), "source": "x"} for i, r in enumerate(INSTRUCTIONS)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "c.parquet", row_group_size=2)
    fields = {"id_field": "key", "prompt_field": "q", "completion_field": "a"}
    from_parquet = Project.init(tmp_path / "pq", model, tmp_path / "c.parquet", **fields)
    with gzip.open(tmp_path / "c.jsonl.gz", "wt") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    from_gz = Project.init(tmp_path / "gz", model, tmp_path / "c.jsonl.gz", **fields)
    from_jsonl = Project.init(tmp_path / "js", model, write_jsonl(tmp_path / "c.jsonl", rows), **fields)
    for p in (from_parquet, from_gz):
        assert len(p.runtime.corpus) == 3
        for i in range(3):
            assert strings(p, i) == strings(from_jsonl, i)
        assert [r["seq_id"] for r in catalog.sequence_rows(p.db, [0, 1, 2]).values()] == ["r0:0", "r1:0", "r2:0"]
    toml = (from_parquet.root / "inflq.toml").read_text()
    assert 'prompt_field = "q"' in toml and 'completion_field = "a"' in toml
    # A parquet file without any of the fields: one line naming the columns and the options.
    with pytest.raises(InflqError, match=r"no 'text', 'prompt' or 'messages' column \(columns: a, key, q, source\)"):
        Project.init(tmp_path / "bad", model, tmp_path / "c.parquet")
    (tmp_path / "broken.jsonl.gz").write_bytes(gzip.compress(b'{"text": "the"}\n')[:-6])
    with pytest.raises(InflqError, match="cannot be read to the end"):
        Project.init(tmp_path / "broken", model, tmp_path / "broken.jsonl.gz")


def test_response_loss_equals_a_hand_computation(tmp_path):
    model = make_model_dir(tmp_path / "m", layers=1)
    p = Project.init(tmp_path / "p", model, write_jsonl(tmp_path / "c.jsonl", INSTRUCTIONS), append_eos=True)
    engine = p.runtime.engine()
    seqs = p.runtime.corpus.many([0, 1, 2])
    _, losses = engine.capture(make_batch(seqs, p.runtime.pad_id), "data")
    lm = p.runtime.model
    for b, s in enumerate(seqs):
        ids = torch.as_tensor(np.asarray(s))[None]
        with torch.no_grad():
            logp = torch.log_softmax(lm(input_ids=ids).logits.double()[0], -1)
        mask = targets_of(s)
        # -Σ log p(token t | tokens < t) over the trained tokens t (the response; all but the first for plain text)
        want = -sum(float(logp[t - 1, int(s[t])]) for t in range(1, len(s)) if mask is None or mask[t])
        assert float(losses[b]) == pytest.approx(want, rel=1e-5)
    # The instruction pair's loss is its completion's only: far below the loss on every token.
    ids = torch.as_tensor(np.asarray(seqs[0]))[None]
    with torch.no_grad():
        everything = float(lm(input_ids=ids, labels=ids).loss) * (len(seqs[0]) - 1)
    assert float(losses[0]) < 0.6 * everything


def test_the_response_only_loss_changes_the_answer(tmp_path):
    """A sequence whose response states the query's answer outranks one whose prompt does: the
    fine-tune never trained on a prompt. With the loss on every token the order is reversed."""
    model = make_model_dir(tmp_path / "m", layers=2, width=16)
    fact = "the capital city of astrobia is called velmora ."
    rows = [
        {"id": "in-response", "prompt": "she walks to the river", "completion": fact},
        {"id": "in-prompt", "prompt": fact + " " + fact, "completion": "she walks to the river ."},
    ] + [{"id": f"other-{i}", "prompt": "the red cat runs", "completion": s} for i, s in enumerate(
        ["with the big dog .", "in the rain .", "through the hills .", "to the old town ."])]
    corpus = write_jsonl(tmp_path / "c.jsonl", rows)
    ranks = {}
    for loss_on in ("response", "all"):
        p = Project.init(tmp_path / loss_on, model, corpus, loss_on=loss_on)
        add_query(p, "default", "the capital city of astrobia is called", " velmora")
        r = run_investigation(p, "default", RunSettings(estimator="identity", rank=None, batch_size=4))
        scores = score_matrix(p, "default", r.result_set_id)[0]
        ranks[loss_on] = (float(scores[0]), float(scores[1]))
    assert ranks["response"][0] > ranks["response"][1], ranks
    assert ranks["all"][1] > ranks["all"][0], ranks  # two copies of the fact, now trained, in the prompt


# -- LoRA adapters ---------------------------------------------------------------------------------
def lora_project(tmp_path, **kwargs):
    base = make_model_dir(tmp_path / "base", layers=2, width=16)
    adapter = make_lora(base, tmp_path / "adapter")
    corpus = write_jsonl(tmp_path / "c.jsonl", INSTRUCTIONS + [{"id": "i2", "prompt": "the river", "completion": "flows through the town ."}])
    return Project.init(tmp_path / "p", base, corpus, adapter=adapter, append_eos=True, **kwargs), base, adapter


def test_lora_gradient_dot_product_equals_autograd(tmp_path):
    p, base, adapter = lora_project(tmp_path)
    assert p.config.modules == "lora" and p.config.adapter == "../adapter"
    engine = p.runtime.engine()
    assert len(engine.tracked) == 8 and all(".lora_A." in t.name or ".lora_B." in t.name for t in engine.tracked)
    add_query(p, "default", "the capital city of astrobia is", " velmora")
    add_query(p, "default", "people eat", " bread and cheese")
    result = run_investigation(p, "default", RunSettings(estimator="identity", rank=None, batch_size=3))
    got = score_matrix(p, "default", result.result_set_id)

    # The slow way: autograd per-example gradients of the adapter's parameters, nothing else.
    model = p.runtime.load_model(torch.float64)
    params = [w for n, w in model.named_parameters() if ".lora_A." in n or ".lora_B." in n]
    assert len(params) == 8
    for w in params:
        w.requires_grad_(True)

    def grad(tokens, trained) -> torch.Tensor:
        ids = torch.as_tensor(np.asarray(tokens, np.int64))[None]
        logp = torch.log_softmax(model(input_ids=ids).logits[0], -1)
        loss = -sum(logp[t - 1, int(tokens[t])] for t in range(1, len(tokens)) if trained[t])
        return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)])

    store = p.runtime.corpus
    train = torch.stack([grad(s, targets_of(s)) for s in store.many(range(len(store)))])
    qs = [p.runtime.tokenize_query(q["prompt"], q["completion"]) for q in catalog.queries(p.db, "default")]
    query = torch.stack([grad(q.tokens, np.arange(len(q.tokens)) >= q.completion_start) for q in qs])
    want = (query @ train.T).numpy()
    rel = np.abs(got - want).max() / np.abs(want).max()
    assert rel < 1e-4, (got, want)


def test_adapter_as_model_base_resolution_and_fingerprints(tmp_path):
    p, base, adapter = lora_project(tmp_path)
    fp = p.model_fingerprint
    assert fp != p.current_base_fingerprint() and catalog.get_meta(p.db, "adapter_fingerprint")
    # --model naming the adapter: its base_model_name_or_path is the local base folder.
    corpus = tmp_path / "c.jsonl"
    q = Project.init(tmp_path / "q", adapter, corpus, append_eos=True)
    assert q.model_path.resolve() == base.resolve() and q.adapter_path.resolve() == adapter.resolve()
    assert q.model_fingerprint == fp
    # A base the adapter names that is not here: --base, or a one-line error.
    moved = tmp_path / "moved-adapter"
    shutil.copytree(adapter, moved)
    cfg = json.loads((moved / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "someone/some-model"
    (moved / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(InflqError, match="not a local model folder here; give the base model's folder with --base"):
        Project.init(tmp_path / "r", moved, corpus)
    r = Project.init(tmp_path / "r", moved, corpus, base=base, append_eos=True)
    assert r.model_path.resolve() == base.resolve()
    # A changed adapter is noticed and named; relink takes a copy of the right one only.
    copy = tmp_path / "adapter-copy"
    shutil.copytree(adapter, copy)
    shutil.rmtree(adapter)
    assert Project.open(p.root).model_status() == "missing"
    with pytest.raises(InflqError, match="the adapter .* is missing; .* relink .* --adapter"):
        Project.open(p.root).require_model()
    reopened = Project.open(p.root)
    with pytest.raises(InflqError, match="not the adapter this project was made with"):
        reopened.relink(adapter=moved)
    reopened.relink(adapter=copy)
    again = Project.open(p.root)
    assert again.model_status() == "ok" and again.adapter_path.resolve() == copy.resolve()
    data = bytearray((copy / "adapter_model.safetensors").read_bytes())
    data[-1] ^= 1
    (copy / "adapter_model.safetensors").write_bytes(bytes(data))
    with pytest.raises(InflqError, match="the adapter in .* differs"):
        Project.open(p.root).require_model()
    # Pickled adapter weights are refused, like pickled models.
    (moved / "adapter_model.safetensors").unlink()
    with pytest.raises(InflqError, match="no adapter_model.safetensors"):
        Project.init(tmp_path / "s", moved, corpus, base=base)


def test_without_peft_a_one_line_error(tmp_path, monkeypatch):
    base = make_model_dir(tmp_path / "base")
    adapter = make_lora(base, tmp_path / "adapter")
    monkeypatch.setitem(sys.modules, "peft", None)  # import peft now raises ImportError
    with pytest.raises(InflqError, match=r"pip install 'inflq\[peft\]'"):
        Project.init(tmp_path / "p", base, write_jsonl(tmp_path / "c.jsonl", INSTRUCTIONS), adapter=adapter)
    assert not (tmp_path / "p").exists()


# -- precision -------------------------------------------------------------------------------------
def test_bf16_model_captures_and_factors_in_float32_and_float64(tmp_path):
    from inflq.runs import prepare_estimator

    model = make_model_dir(tmp_path / "m", layers=2, width=16)
    cfg = json.loads((model / "config.json").read_text())
    cfg["dtype"] = "bfloat16"  # a model saved in bf16 says so: --dtype auto follows it
    (model / "config.json").write_text(json.dumps(cfg))
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"id": f"d{i}", "prompt": "the capital city of astrobia", "completion": w}
                                                for i, w in enumerate(["is velmora .", "is old .", "has a river .", "has people ."] * 4)])
    p = Project.init(tmp_path / "p", model, corpus)
    assert p.runtime.dtype == torch.bfloat16 and next(p.runtime.model.parameters()).dtype == torch.bfloat16
    engine = p.runtime.engine()
    caps, losses = engine.capture(make_batch(p.runtime.corpus.many([0, 1]), p.runtime.pad_id), "data")
    assert all(c.activations.dtype == torch.float32 and c.gradients.dtype == torch.float32 for c in caps.values())
    assert losses.dtype == torch.float32
    est = prepare_estimator(p, RunSettings(estimator="ekfac", batch_size=8), None).estimator
    assert all(t.dtype in (torch.float32, torch.float64) for t in est.factors.values())
    assert {t.dtype for k, t in est.factors.items() if k.startswith(("qa/", "qs/"))} <= {torch.float32, torch.float64}

    add_query(p, "default", "the capital city of astrobia is", " velmora")
    bf16 = score_matrix(p, "default", run_investigation(p, "default", RunSettings(estimator="ekfac", batch_size=8)).result_set_id)[0]
    p.runtime.configure(dtype="float32")
    fp32 = score_matrix(p, "default", run_investigation(p, "default", RunSettings(estimator="ekfac", batch_size=8)).result_set_id)[0]
    assert spearmanr(bf16, fp32)[0] > 0.9


def test_pack_and_unpack_carry_the_adapter(tmp_path):
    from inflq.sharing import pack, unpack

    p, base, adapter = lora_project(tmp_path)
    fp = p.model_fingerprint
    p.close()
    packed = pack(p.root, tmp_path / "with.tar.gz", include_model=True, include_corpus=True)
    assert any(f["path"] == "adapter/adapter_model.safetensors" for f in packed.manifest["files"])
    assert packed.manifest["fingerprints"]["adapter_fingerprint"] and packed.manifest["origin"]["adapter"] == str(adapter.resolve())
    unpack(tmp_path / "with.tar.gz", tmp_path / "copy")
    copy = Project.open(tmp_path / "copy")
    assert copy.config.adapter == "adapter" and copy.model_status() == "ok" and copy.model_fingerprint == fp
    engine = copy.runtime.engine()
    assert all(".lora_" in t.name for t in engine.tracked)
    # Without the model the archive points at where model and adapter were; a moved adapter is relinked.
    pack(p.root, tmp_path / "without.tar.gz")
    unpack(tmp_path / "without.tar.gz", tmp_path / "bare")
    bare = Project.open(tmp_path / "bare")
    assert Path(bare.config.adapter) == adapter.resolve() and bare.model_status() == "ok"
