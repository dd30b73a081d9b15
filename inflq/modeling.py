"""Loading models and tokenizers from local folders, choosing devices, and fingerprints.

Nothing is ever fetched from a model hub and no code from a model folder runs:
``trust_remote_code`` is always off and weights load from safetensors only.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import InflqError

if TYPE_CHECKING:  # torch loads where a model does, not when a project opens
    import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def quiet_transformers() -> None:
    """inflq shows its own progress; transformers' bars and advice would only clutter it."""
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except Exception:  # pragma: no cover
        pass

DTYPES = ("float32", "bfloat16", "float16")


def pick_device(device: str | None = "auto") -> torch.device:
    """``auto``: cuda, then mps, then cpu. Otherwise the named device, checked to exist."""
    import torch

    if device in (None, "", "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InflqError(f"device {device} asked for, but CUDA is not available here; use --device cpu")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise InflqError(f"device {device} asked for, but MPS is not available here; use --device cpu")
    return dev


def pick_dtype(dtype: str | None, device: torch.device, model_dir: Path | None = None) -> torch.dtype:
    """The torch dtype named ``dtype``; ``auto``: the model's own (its ``config.json``'s ``dtype``
    or ``torch_dtype``, where it is one of :data:`DTYPES`), else float32. Captures and factors are
    float32/float64 whatever it is (inflq.engine)."""
    import torch

    if dtype in (None, "", "auto"):
        own = model_dtype(model_dir) if model_dir is not None else None
        return getattr(torch, own) if own else torch.float32
    if dtype not in DTYPES:
        raise InflqError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    return getattr(torch, dtype)


def model_dtype(model_dir: Path) -> str | None:
    """The dtype a model folder's ``config.json`` says its weights are in (one of :data:`DTYPES`), or None."""
    import json

    try:
        cfg = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    own = cfg.get("dtype") or cfg.get("torch_dtype") if isinstance(cfg, dict) else None
    return own if own in DTYPES else None


def check_model_dir(path: Path) -> None:
    """Refuse a folder that is not a saved model with safetensors weights."""
    path = Path(path)
    if not path.is_dir():
        raise InflqError(f"model folder {path} does not exist; give a local Hugging Face model folder")
    if not (path / "config.json").is_file():
        raise InflqError(f"{path} has no config.json; give a folder saved with save_pretrained()")
    if not any(path.glob("*.safetensors")):
        raise InflqError(
            f"{path} has no .safetensors weights (inflq never loads pickled weights); re-save with "
            "model.save_pretrained(dir, safe_serialization=True)"
        )


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    quiet_transformers()
    path = Path(path)
    if not any((path / n).is_file() for n in ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")):
        raise InflqError(f"{path} has no tokenizer files; save the model's tokenizer there with tokenizer.save_pretrained()")
    try:
        tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False, local_files_only=True)
    except Exception as exc:
        raise InflqError(f"no usable tokenizer in {path} ({type(exc).__name__}); save one there with tokenizer.save_pretrained()") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    if tok.pad_token_id is None:
        raise InflqError(f"the tokenizer in {path} has no pad, eos or unk token to pad with; add a pad token")
    return tok


ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def is_adapter_dir(path: Path) -> bool:
    """Whether ``path`` is a PEFT adapter folder (``adapter_config.json``, no ``config.json``)."""
    path = Path(path)
    return path.is_dir() and (path / "adapter_config.json").is_file() and not (path / "config.json").is_file()


def check_adapter_dir(path: Path) -> dict:
    """Refuse a folder that is not a PEFT LoRA adapter with safetensors weights; its config."""
    import json

    path = Path(path)
    if not path.is_dir():
        raise InflqError(f"adapter folder {path} does not exist; give a folder saved with PeftModel.save_pretrained()")
    try:
        cfg = json.loads((path / "adapter_config.json").read_text())
    except OSError:
        raise InflqError(f"{path} has no adapter_config.json; give a folder saved with PeftModel.save_pretrained()") from None
    except ValueError as exc:
        raise InflqError(f"{path}/adapter_config.json is not valid JSON ({exc}); fix the file") from None
    if not (path / "adapter_model.safetensors").is_file():
        raise InflqError(
            f"{path} has no adapter_model.safetensors (inflq never loads pickled weights); re-save the adapter with "
            "save_pretrained(dir, safe_serialization=True)"
        )
    if not isinstance(cfg, dict) or cfg.get("peft_type") != "LORA":
        raise InflqError(f"{path} holds a {cfg.get('peft_type') if isinstance(cfg, dict) else '?'} adapter; inflq tracks LoRA adapters only")
    return cfg


def adapter_base(adapter: Path, base: Path | None = None) -> Path:
    """The base model folder of the adapter in ``adapter``: ``base`` where given, else its
    ``base_model_name_or_path`` where that is a local folder (as written, or relative to the
    adapter's folder). A hub name is refused: inflq never downloads."""
    adapter = Path(adapter)
    if base is not None:
        return Path(base)
    named = check_adapter_dir(adapter).get("base_model_name_or_path")
    if isinstance(named, str) and named:
        for candidate in (Path(named).expanduser(), adapter / named):
            if (candidate / "config.json").is_file():
                return candidate
    raise InflqError(
        f"the adapter in {adapter} names its base model {named!r}, which is not a local model folder here; "
        "give the base model's folder with --base DIR (inflq never downloads)"
    )


def require_peft():
    """The ``peft`` module, or a one-line error naming the extra that installs it."""
    try:
        import peft
    except ImportError:
        raise InflqError("LoRA adapters need peft: pip install 'inflq[peft]'") from None
    return peft


def load_adapter(model, adapter: Path):
    """``model`` with the LoRA adapter in ``adapter`` attached (a PEFT ``PeftModel``, unmerged, so
    that its A and B layers can be tracked), in eval mode; weights from safetensors only."""
    peft = require_peft()
    check_adapter_dir(adapter)
    try:  # a local folder with adapter_model.safetensors (checked above): peft reads that file, never a pickle
        wrapped = peft.PeftModel.from_pretrained(model, str(adapter), is_trainable=False)
    except Exception as exc:
        raise InflqError(f"cannot load the adapter in {adapter} on its base model: {_short(exc)}") from None
    wrapped.eval()
    return wrapped


def load_model(path: Path, device: torch.device, dtype: torch.dtype, adapter: Path | None = None):
    """The causal LM saved in ``path`` (safetensors only, no remote code), on ``device``, in eval
    mode, with the LoRA adapter in ``adapter`` attached where given (:func:`load_adapter`)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    quiet_transformers()
    path = Path(path)
    check_model_dir(path)
    try:
        config = AutoConfig.from_pretrained(str(path), trust_remote_code=False, local_files_only=True)
    except Exception as exc:
        raise InflqError(f"cannot read {path}/config.json ({_short(exc)}); is it a Hugging Face model folder?") from None
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(path), config=config, trust_remote_code=False, local_files_only=True, use_safetensors=True, dtype=dtype
        )
    except ValueError as exc:
        if "Unrecognized configuration class" in str(exc) or "AutoModelForCausalLM" in str(exc):
            raise InflqError(
                f"{path} holds a {type(config).__name__.replace('Config', '')} model, which is not a causal language model; "
                "inflq needs AutoModelForCausalLM to load it"
            ) from None
        raise InflqError(f"cannot load the model in {path}: {_short(exc)}") from None
    except Exception as exc:
        raise InflqError(f"cannot load the model in {path}: {_short(exc)}") from None
    if adapter is not None:
        model = load_adapter(model, Path(adapter))
    model.to(device)
    model.eval()
    return model


def _short(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


MODEL_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt", "tokenizer.model")


def fingerprint_files(files: list[Path], hash_file: Callable[[Path], str] = sha256_file) -> str:
    """One fingerprint of these files' names and contents (``hash_file``: each file's SHA-256)."""
    h = hashlib.sha256()
    for f in sorted(files, key=lambda p: p.name):
        h.update(f.name.encode())
        h.update(hash_file(f).encode())
    return h.hexdigest()[:32]


def model_files(path: Path) -> list[Path]:
    """The files of a model folder that its fingerprint covers (config, tokenizer, weights)."""
    path = Path(path)
    files = [path / n for n in MODEL_FILES if (path / n).is_file()]
    files += sorted(path.glob("*.safetensors"))
    return files


def adapter_files(path: Path) -> list[Path]:
    """The files of an adapter folder that its fingerprint covers (config, weights, a tokenizer saved with it)."""
    path = Path(path)
    return [path / n for n in ADAPTER_FILES + MODEL_FILES if (path / n).is_file()]


def has_tokenizer(path: Path) -> bool:
    """Whether a folder holds tokenizer files (an adapter saved with its fine-tune's tokenizer)."""
    return any((Path(path) / n).is_file() for n in ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json"))


def tokenizer_files(path: Path) -> list[Path]:
    path = Path(path)
    return [path / n for n in MODEL_FILES if n != "config.json" and (path / n).is_file()]

