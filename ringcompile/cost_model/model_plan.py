"""``ringcompile plan --model ...``: whole-model memory per rank, and the smallest world that fits.

``--model`` is ``llama`` or ``gpt2`` (transformers' default config of that family: Llama-2-7B
and GPT-2 124M sizes) or the path of a Hugging Face ``config.json``. The model is built on the
meta device, so a 405B config costs no memory. The model is captured once (``MemoryModel``)
and estimated for each world size.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import OptionError
from .whole_model import MemoryModel

FAMILIES = {"llama": "llama", "gpt2": "gpt2"}  # --model name -> transformers model_type
UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
         "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str) -> int:
    """'80GiB' -> 85899345920; '40 GB' -> 40e9; a plain number is bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in UNITS:
        raise OptionError(f"cannot read {text!r} as a size: use e.g. 80GiB, 40GB or 1073741824")
    return int(float(m.group(1)) * UNITS[m.group(2).lower()])


@dataclass
class ModelShape:
    """What the attention planner needs from a model, and the captured memory model."""

    name: str
    heads: int
    kv_heads: int
    head_dim: int
    memory: MemoryModel


def load_model(spec: str) -> ModelShape:
    """A family name (llama, gpt2) or an HF config.json path, captured for memory estimates."""
    model, heads, kv, head_dim = _hf_model(spec)
    ids = torch.zeros(1, 16, dtype=torch.long, device="meta")
    memory = MemoryModel.capture(model, ids, labels=ids, use_cache=False)
    return ModelShape(spec, heads, kv, head_dim, memory)


def _hf_model(spec: str) -> tuple[Any, int, int, int]:
    try:
        from transformers import AutoConfig, AutoModelForCausalLM
    except ImportError as exc:
        raise OptionError("--model needs transformers: pip install transformers") from exc
    if spec in FAMILIES:
        config = AutoConfig.for_model(FAMILIES[spec])
    elif Path(spec).is_file():
        config = AutoConfig.from_pretrained(str(spec))
    else:
        raise OptionError(f"--model {spec!r} is neither a family ({', '.join(FAMILIES)}) nor a config file")
    config._attn_implementation = "sdpa"
    if getattr(config, "num_attention_heads", None) is None:
        raise OptionError(f"--model {spec!r}: the config has no num_attention_heads; not a transformer LM?")
    heads = int(config.num_attention_heads)
    kv = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return model, heads, kv, head_dim


def format_fit(shape: ModelShape, seq_len: int, budget: int, **kwargs: Any) -> tuple[str, int | None]:
    """The text answering 'how many ranks does this need?', and that world size (None: none fits)."""
    est = shape.memory.smallest_world(seq_len, budget, **kwargs)
    if est is None:
        biggest = shape.memory.estimate(min(seq_len, 2 ** 14), seq_len, **kwargs)
        return (f"{shape.name} at S={seq_len:,} does not fit {budget / 2**30:.1f} GiB per rank on up to "
                f"{biggest.world_size:,} ranks:\n{biggest}"), None
    return (f"smallest world size that fits {budget / 2**30:.1f} GiB per rank: {est.world_size}\n{est}",
            est.world_size)
