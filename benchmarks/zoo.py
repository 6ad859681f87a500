"""The transformers zoo: every installed text family on 2 gloo ranks under backend="ring" vs one process.

Families come from the auto mappings (causal LM, masked LM, seq2seq LM); each tiny config is built
generically from the config class's defaults by shrinking size-like fields (``shrink_config``), so a
new family needs no code here. Each (family, attention implementation) run is classified:

  ok               right, and every attention the eager model runs was rewritten in a sharded graph
  wrong            outputs or gradients differ from one process (and aot_eager is right)
  crash            ring raised (and aot_eager runs)
  unsharded-reason not (fully) sharded, and explain/HISTORY says why
  unsharded-silent attention ran in eager, but no site and no reason: a defect
  skipped          not a text model, the tiny config does not build or run eagerly, or aot_eager fails too

Usage: python benchmarks/zoo.py [--families llama,gpt2] [--impls eager,sdpa] [--jobs 1]
       [--group-size 8] [--timeout 120] [--out benchmarks/results/zoo.json]
       python benchmarks/zoo.py --build-only [--families ...]   # one process, no ranks: does each
                                                               # tiny config build and run one forward?
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import sys
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "models"))

V, S, B = 97, 16, 2
OUT_TOL, GRAD_TOL = 1e-5, 1e-4  # relative to the reference's max |value|: float32-accurate

# generic field-name rules: (predicate on the field name, value for an int field)
_EXACT = {
    "vocab_size": V, "num_hidden_layers": 2, "num_layers": 2, "n_layer": 2, "num_decoder_layers": 2,
    "encoder_layers": 2, "decoder_layers": 2, "n_layers": 2, "num_attention_heads": 4, "n_head": 4,
    "n_heads": 4, "encoder_attention_heads": 4, "decoder_attention_heads": 4, "num_heads": 4,
    "num_key_value_heads": 2, "n_kv_heads": 2, "num_kv_heads": 2, "head_dim": 8, "d_kv": 8,
    "num_experts": 4, "num_local_experts": 4, "n_routed_experts": 4, "num_experts_per_tok": 2,
    "moe_topk": 2, "top_k": 2, "n_shared_experts": 1, "num_shared_experts": 1,
    "type_vocab_size": 2, "sliding_window": 8, "attention_window": 8,
    # expert groups and top-k must fit the 4 shrunk experts
    "num_experts_per_token": 2, "n_group": 1, "num_expert_group": 1, "topk_group": 1,
    # state-space mixers: head counts and the groups that must divide them
    "mamba_n_heads": 4, "n_mamba_heads": 4, "n_groups": 1, "mamba_n_groups": 1,
}


def _int_rule(name: str, default: int, broad: bool = False) -> int | None:
    """The tiny value for an int config field, or None to keep the default. ``broad``: also the
    spellings only a retry shrinks (``_BROAD_WIDTH`` / ``_BROAD_COUNT``), so configs that already build
    without them keep their sizes."""
    if name in _EXACT:
        return _EXACT[name]
    if broad and name.startswith(_BROAD_WIDTH):
        return 32
    if broad and name.endswith(_BROAD_COUNT):
        return 2
    if "vocab" in name:  # secondary vocabularies (BLT's hash-byte groups) too
        return V if default > V else None
    if "position" in name or name in ("n_positions", "n_ctx", "max_seq_len", "seq_length"):
        return max(4 * S, 64) if default > 4 * S else None
    if "rotary" in name and name.endswith("dim"):  # a rotary width must fit inside the shrunk head
        return 4
    if "hidden_size" in name or name.endswith(("bottleneck_size", "d_model", "n_embd", "hidden_dim",
                                               "embed_dim", "dim", "embedding_size")):
        return 32
    if "intermediate" in name or name.endswith(("ffn_dim", "d_ff", "n_inner", "ffn_hidden_size")):
        return 64
    if "shared" in name and name.endswith("_layers"):  # layers reusing another's K/V (Gemma 3n): none, so
        return 0  # the shrunk pattern need not hold a producer of every kind before the sharers
    if name.endswith(("_layers", "layers_count")):
        return 2
    if "lora_rank" in name or name.endswith("_rank"):
        return 8
    if "head_dim" in name:
        return 8
    if name.startswith("index_") and "heads" not in name:
        # a sparse-attention indexer's counts (DSA's index_topk keys per query, pools, blocks, local and
        # sink tokens): at their defaults (2048 keys) every query of an S-long input keeps every key, so
        # the selection never runs; a quarter of S makes it choose (equal values keep divisibility checks)
        return S // 4 if default > S // 4 else None
    return None


# retry-only spellings: widths named ``d_X`` (Perceiver's ``d_latents``) and per-block layer counts
# (Perceiver's ``num_self_attends_per_block``)
_BROAD_WIDTH = ("d_",)
_BROAD_COUNT = ("_per_block",)

# fields a config leaves None (derived by the model, or required): set when shrinking, since the
# derivation would use the unshrunk sizes or fail on None
_FILL_NONE = ("head_dim", "num_key_value_heads", "num_experts_per_tok", "n_group", "topk_group")
# (heads field, per-head width field) of state-space mixers: heads * width must equal expand * hidden
_SSM_HEADS = (("mamba_n_heads", "mamba_d_head"), ("n_mamba_heads", "mamba_headdim"),
              ("num_heads", "head_dim"))

_DROPOUTS = ("hidden_dropout_prob", "attention_probs_dropout_prob", "dropout", "attention_dropout",
             "resid_pdrop", "embd_pdrop", "attn_pdrop", "hidden_dropout", "activation_dropout")
_SWITCHES = ("use_cache", "tie_word_embeddings")  # set False
_LAYER_COUNTS = ("num_hidden_layers", "num_layers", "n_layer", "n_layers")
_MAX_LAYERS = 12  # a longer pattern period is cut here (its later layer kinds are then not exercised)


def _layer_count(cfg) -> int | None:
    for name in _LAYER_COUNTS:
        v = vars(cfg).get(name)
        if isinstance(v, int) and not isinstance(v, bool):
            return v
    return None


def _is_index_list(name: str, v) -> bool:
    return (isinstance(v, (list, tuple)) and bool(v) and all(type(x) is int for x in v)
            and name.endswith(("_idxs", "_ids", "_indices")) and ("layer" in name or "attn" in name))


def _first_borrower(name: str, v, n_layers: int | None) -> int | None:
    """The first layer of a per-layer map to earlier layers (Kolibri 1.1's ``kv_source_layers``: the layer
    whose K/V each layer reads) that reads another layer's, or None when ``v`` is no such map."""
    if not (isinstance(v, (list, tuple)) and n_layers and len(v) == n_layers and "layer" in name
            and all(type(x) is int and 0 <= x <= i for i, x in enumerate(v))):
        return None
    return next((i for i, x in enumerate(v) if x != i), None)


def pattern_layers(cfg, n_layers: int | None) -> int:
    """The fewest layers (at least 2) that hold every kind of layer the config's layer pattern names, so a
    hybrid's attention layers exist: per-layer kind lists (``layer_types``, ``block_types``,
    ``layers_block_type``, ``mlp_layer_types``, ... or any list of strings as long as the layer count)
    up to the first occurrence of their last new kind; layer-index lists (``full_attn_idxs``,
    ``hybrid_layer_ids``) up to their first index; ``X_period`` / ``X_offset`` pairs (Jamba's
    ``attn_layer_period`` / ``attn_layer_offset``) up to the offset; per-layer maps to earlier layers
    (``kv_source_layers``) up to the first layer that reads another's, so cross-layer K/V sharing runs."""
    need = 2
    for name in dir(cfg):
        if name.startswith("_") or name.startswith("mtp_"):
            continue
        try:
            v = getattr(cfg, name)
        except Exception:  # noqa: BLE001 - a property that needs other fields
            continue
        if isinstance(v, (list, tuple)) and v and all(isinstance(x, str) for x in v) and (
                name.endswith(("layer_types", "block_types", "layers_block_type")) or len(v) == n_layers):
            first: dict[str, int] = {}
            for i, kind in enumerate(v):
                first.setdefault(kind, i)
            need = max(need, max(first.values()) + 1)
        elif _is_index_list(name, v):
            need = max(need, min(v) + 1)
        elif _first_borrower(name, v, n_layers) is not None:
            need = max(need, _first_borrower(name, v, n_layers) + 1)
        elif name.endswith("_period") and type(v) is int:
            offset = getattr(cfg, name[: -len("period")] + "offset", None)
            if type(offset) is int:
                need = max(need, offset + 1)
    return min(need, _MAX_LAYERS)


def _follow_layer_count(cfg, n_old: int | None, n_new: int) -> None:
    """Per-layer lists follow the new layer count: lists as long as the old count are cut (or cycled),
    layer-index lists keep the indices that still exist."""
    for name, v in list(vars(cfg).items()):
        if name.startswith("_"):
            continue
        if isinstance(v, list) and v and n_old is not None and len(v) == n_old and n_old != n_new:
            _set(cfg, name, (v * (n_new // len(v) + 1))[:n_new])
        elif _is_index_list(name, v):
            _set(cfg, name, [i for i in v if i < n_new])


def shrink_config(config_cls, impl: str, fill_none: bool = False, wide_heads: bool = False,
                  derive_exact: bool = False, broad: bool = False):
    """A tiny config of ``config_cls``: its defaults with every size-like int field shrunk, keeping
    enough layers for one period of a hybrid's layer pattern (``pattern_layers``).

    The shrunk fields are then passed to the constructor again (``_reconstruct``), so fields the
    config derives from others (Zamba's ``attention_hidden_size = 2 * hidden_size``, LongCat's
    ``qk_head_dim``) follow the shrunk values instead of the defaults. ``fill_none``: also give every
    size field of ``_EXACT`` that the defaults leave None its tiny value (a config whose defaults do
    not build, e.g. dots1's ``n_routed_experts=None``); windows stay None (None means no window).
    ``wide_heads``: heads of 16, not 8 (NeoMME's 2-D RoPE on a quarter of the head needs 4 rotary dims).
    ``broad``: the retry-only field spellings too (``_int_rule``)."""
    from transformers import PreTrainedConfig

    default = config_cls()
    n_new = pattern_layers(default, _layer_count(default))
    cfg = _shrink_fields(config_cls(), impl, fill_none, broad)
    overrides = _shrink_layer_overrides(default, cfg, n_new) if broad else None
    if overrides is not None:
        _set(cfg, "per_layer_config", overrides)
    if wide_heads and type(vars(cfg).get("head_dim")) is int:
        _set(cfg, "head_dim", 2 * _EXACT["head_dim"])
    for name, sub in list(vars(cfg).items()):  # a composite's parts (T5Gemma's encoder and decoder,
        if isinstance(sub, PreTrainedConfig):    # BLT's patcher and global transformer) likewise
            _set(cfg, name, shrink_config(type(sub), impl, fill_none, wide_heads, derive_exact, broad))
    return _reconstruct(config_cls, cfg, impl, derive_exact, overrides)


def _shrink_layer_overrides(default, shrunk, n_new: int) -> dict | None:
    """A heterogeneous config's per-layer overrides (transformers' ``per_layer_config``: Dots3's
    sliding layers with 64 heads of their own) shrunk like the global fields, for the layers that
    remain: a size field takes the shrunk global value, and a width that is the sum of two others in
    the defaults (``head_dim = qk_nope_head_dim + qk_rope_head_dim``, named as their common suffix)
    stays their sum. None when the defaults have no overrides."""
    spec = vars(default).get("_heterogeneity_spec")
    if spec is None:
        return None
    out = {}
    for layer, override in spec.per_layer_overrides.items():
        if layer >= n_new:
            continue
        old = {**{k: v for k, v in vars(default).items() if type(v) is int}, **override}
        new = {k: v for k, v in vars(shrunk).items() if type(v) is int}
        mine = {}
        for name, value in override.items():
            sized = type(value) is int and _int_rule(name, value) is not None
            mine[name] = new[name] if sized and name in new else value
        new.update(mine)
        for total in [k for k in old if k in new]:
            parts = [k for k in old if k != total and k.endswith("_" + total) and k in new]
            for i, a in enumerate(parts):
                for b in parts[i + 1:]:
                    if old[total] == old[a] + old[b] and new[total] != new[a] + new[b]:
                        mine[total] = new[a] + new[b]
        out[layer] = mine
    return out


def _declared_defaults(config_cls) -> dict:
    """{field: default} as the config class declares them (transformers configs are dataclasses)."""
    import dataclasses

    if not dataclasses.is_dataclass(config_cls):
        return {}
    out = {}
    for f in dataclasses.fields(config_cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = None  # a fresh container: treated as given, not derived
    return out


def _same(a, b) -> bool:
    """a == b; False where comparing raises (configs with per-layer attributes refuse global reads)."""
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001
        return False


def _reconstruct(config_cls, shrunk, impl: str, derive_exact: bool = False, overrides: dict | None = None):
    """``config_cls(**changed)``: the fields ``shrunk`` changed from the defaults, except those the
    constructor derived (declared None, set by ``__post_init__``), which it derives again from the
    shrunk ones. The fixed tiny values (``_EXACT``: GQA's 2 K/V heads, 4 experts, the window of 8) and
    the switches (dropout 0, no cache, untied) are passed even where derived, unless ``derive_exact``
    (ESMC refuses grouped K/V heads); ``overrides``: the shrunk per-layer overrides, passed as
    ``per_layer_config``. ``shrunk`` itself where the constructor refuses the changed fields."""
    declared = _declared_defaults(config_cls)
    default_cfg = config_cls()
    defaults, n_old = vars(default_cfg), _layer_count(default_cfg)
    forced = set(_DROPOUTS) | set(_SWITCHES) | (set() if derive_exact else set(_EXACT))
    changed = {}
    for name, value in vars(shrunk).items():
        if name.startswith("_") or name not in declared or _same(defaults.get(name), value):
            continue
        old = defaults.get(name)
        per_layer = isinstance(old, list) and len(old) == n_old  # a fixed pattern (Zamba2's block
        derived = declared[name] is None and old is not None and not per_layer  # types): keep it cut
        if derived and not hasattr(value, "to_dict") and name not in forced:  # (composite parts too)
            continue  # derived by the constructor from other fields: let it derive again
        changed[name] = value
    if overrides is not None:
        changed["per_layer_config"] = overrides
    try:
        cfg = config_cls(**changed)
    except Exception:  # noqa: BLE001 - a validation the mutated config does not trigger
        return shrunk
    for name in forced:  # a constructor that overrides them from its own defaults (Qwen3-MoE's experts,
        if name in vars(shrunk) and name in vars(cfg) and not _same(vars(cfg)[name], vars(shrunk)[name]):
            _set(cfg, name, vars(shrunk)[name])  # T5's tied embeddings): set them again afterwards
    cfg._attn_implementation = impl
    return cfg


def _shrink_fields(cfg, impl: str, fill_none: bool = False, broad: bool = False):
    """``cfg`` with its size-like fields shrunk in place (the per-field rules)."""
    n_old = _layer_count(cfg)
    n_new = pattern_layers(cfg, n_old)
    hidden_old = vars(cfg).get("hidden_size")
    for name, value in list(vars(cfg).items()):
        if isinstance(value, bool) or not isinstance(value, int):
            continue
        new = _int_rule(name, value, broad)
        if name.endswith("_token_id") and value >= V:  # special ids must fit the shrunk vocabulary
            new = 1
        if new is not None and new < value or name in _EXACT and new is not None:
            _set(cfg, name, new)
    for name in _DROPOUTS:
        if hasattr(cfg, name):
            setattr(cfg, name, type(getattr(cfg, name))(0) if isinstance(getattr(cfg, name), int) else 0.0)
    for name in _SWITCHES:
        if hasattr(cfg, name):
            setattr(cfg, name, False)
    for name in _FILL_NONE + (tuple(k for k in _EXACT if "window" not in k) if fill_none else ()):
        if name in vars(cfg) and vars(cfg)[name] is None:
            _set(cfg, name, _EXACT[name])
    for name, value in list(vars(cfg).items()):
        choices = vars(cfg).get(name.removeprefix("default_") + "s")
        if name.startswith("default_") and value is None and isinstance(choices, (list, tuple)) and choices:
            _set(cfg, name, choices[0])  # X-MOD's default_language: the first of its languages
    if fill_none:  # special ids the defaults leave None (ESM's mask id): below the ids inputs use (>= 3)
        free = iter(range(3))
        for name, value in list(vars(cfg).items()):
            if name.endswith("_token_id") and value is None:
                _set(cfg, name, next(free, 2))
    _fit_ssm_heads(cfg)
    _fit_hidden_splits(cfg, hidden_old)
    rope = vars(cfg).get("qk_rope_head_dim")
    if type(rope) is int and type(vars(cfg).get("head_dim")) is int:  # MLA: the rotary table's width
        _set(cfg, "head_dim", rope)
    if type(vars(cfg).get("kv_lora_rank")) is int and type(vars(cfg).get("num_key_value_heads")) is int:
        # MLA: one latent K/V per query head
        _set(cfg, "num_key_value_heads", vars(cfg).get("num_attention_heads"))
    for name in _LAYER_COUNTS:
        if type(vars(cfg).get(name)) is int:
            _set(cfg, name, n_new)
    _follow_layer_count(cfg, n_old, n_new)
    cfg._attn_implementation = impl
    return cfg


def _fit_hidden_splits(cfg, hidden_old) -> None:
    """Int lists of widths that split the hidden size (Reformer's ``axial_pos_embds_dim`` (64, 192) of
    256) split the shrunk hidden size instead, in equal parts."""
    hidden = vars(cfg).get("hidden_size")
    if type(hidden_old) is not int or type(hidden) is not int or hidden == hidden_old:
        return
    for name, v in list(vars(cfg).items()):
        if (name.startswith("_") or "dim" not in name or not isinstance(v, (list, tuple)) or len(v) < 2
                or not all(type(x) is int for x in v) or sum(v) != hidden_old or hidden % len(v)):
            continue
        _set(cfg, name, type(v)([hidden // len(v)] * len(v)))


def _fit_ssm_heads(cfg) -> None:
    """Mamba-style mixers split ``expand * hidden_size`` into heads: after shrinking, the per-head width
    follows the (shrunk) head count."""
    expand = vars(cfg).get("mamba_expand", vars(cfg).get("expand"))
    hidden = vars(cfg).get("hidden_size")
    if type(expand) is not int or type(hidden) is not int:
        return
    if type(vars(cfg).get("mamba_d_ssm")) is int:  # an explicit mixer width (Falcon-H1) follows too
        _set(cfg, "mamba_d_ssm", expand * hidden)
    for heads, width in _SSM_HEADS:
        n = vars(cfg).get(heads)
        if type(n) is int and type(vars(cfg).get(width)) is int and expand * hidden % n == 0:
            _set(cfg, width, expand * hidden // n)
            return


def _set(cfg, name: str, value) -> None:
    """Set a config field; a read-only property (derived from other fields, e.g. Jamba's layer_types from
    the layer count) is left to follow them."""
    try:
        setattr(cfg, name, value)
    except (AttributeError, NotImplementedError):  # a property without a setter (also through the
        pass  # config's attribute_map); Funnel / ProphetNet refuse num_hidden_layers, set their own


def families() -> dict[str, str]:
    """{family: model class name}: causal LM first, then masked LM, then seq2seq LM."""
    from transformers.models.auto import modeling_auto as ma

    out: dict[str, str] = {}
    for mapping in (ma.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, ma.MODEL_FOR_MASKED_LM_MAPPING_NAMES,
                    ma.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES):
        for fam, cls in mapping.items():
            out.setdefault(fam, cls if isinstance(cls, str) else cls[0])
    return out


# forward parameters that carry another modality: a model taking one is multimodal
_OTHER_MODALITY = ("pixel_", "image", "video", "audio", "speech", "input_features", "input_values")


def config_class(family: str):
    """The config class ``family``'s model is built from: for a composite config, the model class's own
    (Llama 4's ``Llama4ForCausalLM`` takes the text config, not the ``Llama4Config`` the family maps to)."""
    import transformers as tf
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    mapped = CONFIG_MAPPING[family]
    own = getattr(getattr(tf, families()[family]), "config_class", None)
    if getattr(mapped, "sub_configs", None) and isinstance(own, type) \
            and issubclass(own, tf.PreTrainedConfig):
        return own  # only for composites: an alias family (exaone -> LlamaForCausalLM) keeps its config
    return mapped


def duplicate_of(family: str) -> str | None:
    """The family that builds the same model class from the same config class as ``family`` (an alias
    such as gpt-sw3 for gpt2, a composite family whose causal-LM class is its text family's), when
    that one is the canonical one: the family named by the config's ``model_type``, else the first
    by name. None when ``family`` is canonical or has no twin."""
    fams = families()
    twins = sorted(f for f in fams if fams[f] == fams[family] and config_class(f) is config_class(family))
    canonical = next((f for f in twins if f == getattr(config_class(f), "model_type", None)), twins[0])
    return None if canonical == family else canonical


def _forward_params(cls) -> list[str]:
    import inspect

    try:
        return list(inspect.signature(cls.forward).parameters)
    except (TypeError, ValueError):
        return []


def _one_line(exc: BaseException, n: int = 200) -> str:
    """The last line of an exception's message (validators wrap the cause in a multi-line message)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return (lines[-1] if lines else "")[:n]


def _multimodal(cls, config_cls) -> str | None:
    """Why ``cls`` is skipped as a multimodal model whose text part runs as its own family, or None."""
    other = [p for p in _forward_params(cls) if p.startswith(_OTHER_MODALITY)]
    if not other or not getattr(config_cls, "sub_configs", None):
        return None
    try:
        cfg = config_cls()
    except Exception:  # noqa: BLE001 - build() says why the defaults do not build
        return None
    texts = [getattr(getattr(cfg, k, None), "model_type", None) for k in config_cls.sub_configs]
    text = next((t for t in texts if t in families()), None)
    if text is None:
        return None
    return f"multimodal (inputs {', '.join(other[:3])}): its text model runs as family {text}"


def build(family: str, impl: str):
    """(model, inputs) or raises _Skip with the reason."""
    import transformers as tf

    cls = getattr(tf, families()[family])
    config_cls = config_class(family)
    dup = duplicate_of(family)
    if dup is not None:
        raise _Skip(f"same model class and config class as family {dup}")
    why = _multimodal(cls, config_cls)
    if why is not None:
        raise _Skip(why)
    main = getattr(cls, "main_input_name", "input_ids")
    if main != "input_ids" and "input_ids" not in _forward_params(cls):  # (Perceiver's main input
        raise _Skip(f"main input is {main}")  # ``inputs`` also comes as input_ids)
    try:
        default_cfg = config_cls()
    except Exception as exc:  # noqa: BLE001 - a validator that refuses the class's own defaults
        raise _Skip(f"the default config does not build (nothing to shrink): {type(exc).__name__}: "
                    f"{_one_line(exc)}") from None
    impls = [i for i, flag in (("eager", True), ("sdpa", getattr(cls, "_supports_sdpa", False)),
                               ("flex_attention", getattr(cls, "_supports_flex_attn", False))) if flag]
    if impl not in impls:
        raise _Skip(f"{impl} not offered")
    g = torch.Generator().manual_seed(3)
    inputs = {"input_ids": torch.randint(3, V, (B, S), generator=g)}
    if getattr(default_cfg, "is_encoder_decoder", False):
        inputs["decoder_input_ids"] = torch.randint(3, V, (B, S), generator=g)
    model, inputs, error = _build_model(cls, config_cls, impl, inputs)
    params = _forward_params(cls)
    other = [p for p in params if p.startswith(_OTHER_MODALITY)]
    if error is not None and other:
        raise _Skip(f"multimodal (inputs {', '.join(other[:3])}) and no text family to run instead: "
                    f"input_ids alone fail: {type(error).__name__}: {_one_line(error)}")
    needed = [p for p in params if p not in _MADE_INPUTS and re.search(rf"\b{p}\b", str(error or ""))]
    if error is not None and needed:  # Gemma 4's assistant drafts from its target's shared K/V states
        raise _Skip(f"needs {', '.join(needed)}, which token ids do not give: "
                    f"{type(error).__name__}: {_one_line(error)}")
    return model.double().eval(), inputs


# forward inputs the zoo makes (or that token ids stand in for): an eager error naming another one
# says what the model needs from outside
_MADE_INPUTS = ("self", "input_ids", "decoder_input_ids", "inputs_embeds", "decoder_inputs_embeds",
                "attention_mask", "position_ids", "labels", "kwargs", "inputs")


def _input_variants(cfg, inputs: dict):
    """The inputs to try on ``cfg``'s model: the plain ones, then, for a model reading several codebook
    streams per sample (MusicGen's decoder: ``num_codebooks`` rows of ids per sequence), each batch row
    repeated as that many streams of fresh ids."""
    yield inputs
    k = vars(cfg).get("num_codebooks")
    if type(k) is int and k > 1:
        g = torch.Generator().manual_seed(4)
        yield {name: torch.randint(3, V, (t.shape[0] * k, *t.shape[1:]), generator=g)
               for name, t in inputs.items()}


_MAX_PARAMS = 20_000_000  # a tiny config has well under 1M; more means a size field was not shrunk


def _build_model(cls, config_cls, impl: str, inputs: dict):
    """``cls`` on the tiny config; retried with None size fields and special ids filled, then as a
    decoder (Reformer's LM head exists only with ``is_decoder=True``), then with wider heads, then with
    the derived fixed sizes left to the constructor, until one runs ``inputs`` or a variant of them
    (``_input_variants``); else the first that builds. (model, inputs it ran, None) or (the first
    model, ``inputs``, the first eager error). Sized on the meta device first, so a field the rules
    missed is a skip with its reason, not an out-of-memory kill."""
    first, built, run_error, too_big = None, None, None, None
    # (fill_none, decoder, wide_heads, derive_exact, broad); the broad ones last, so a config that
    # builds without the retry-only spellings keeps the sizes it had before they existed
    attempts = ((False, False, False, False, False), (True, False, False, False, False),
                (False, True, False, False, False), (True, True, False, False, False),
                (False, False, True, False, False), (False, False, False, True, False),
                (True, False, False, True, False), (False, False, False, False, True),
                (True, False, False, False, True))
    for fill_none, decoder, wide_heads, derive_exact, broad in attempts:
        try:
            cfg = shrink_config(config_cls, impl, fill_none, wide_heads, derive_exact, broad)
            if decoder:
                if getattr(cfg, "is_decoder", None) is not False:
                    continue
                cfg.is_decoder = True
            with torch.device("meta"):
                params = dict(cls(cfg).named_parameters())
            n = sum(p.numel() for p in params.values())
            if n > _MAX_PARAMS:
                big = max(params, key=lambda k: params[k].numel())
                too_big = too_big or _Skip(
                    f"tiny config still has {n / 1e6:.0f}M parameters (largest: {big} "
                    f"{tuple(params[big].shape)}): a size field the rules do not shrink")
                continue  # a retry may shrink it
            torch.manual_seed(0)
            model = cls(cfg)
        except Exception as exc:  # noqa: BLE001
            first = first or exc
            continue
        built = built or model
        for variant in _input_variants(cfg, inputs):
            try:
                with torch.no_grad():
                    model.eval()(**variant)
            except Exception as exc:  # noqa: BLE001 - run_one reports the first model's eager failure
                run_error = run_error or exc
                continue
            return model, variant, None
    if built is not None:
        return built, inputs, run_error
    if too_big is not None:
        raise too_big
    why = f"tiny config does not build: {type(first).__name__}: {str(first)[:200]}"
    try:
        with torch.device("meta"):
            cls(config_cls())
    except Exception:  # noqa: BLE001
        why += " (the default config does not build either)"
    raise _Skip(why)


class _Skip(Exception):
    pass


def _first_tensor(out):
    for key in ("logits", "last_hidden_state", "prediction_logits"):
        v = getattr(out, key, None)
        if isinstance(v, torch.Tensor):
            return v
    return out[0] if isinstance(out, (tuple, list)) else out


def count_attention(model, inputs) -> int:
    """How many attention computations an eager forward runs: softmaxes over an S-long last dim of a
    value with another S-long dim, plus fused SDPA kernels (seen at dispatch, once each)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    softmax = {torch.ops.aten._softmax.default, torch.ops.aten._safe_softmax.default}

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = str(func)
            if func in softmax:
                shape = args[0].shape
                # S keys, or S + 1 with an attention-sink column (gpt-oss)
                if len(shape) >= 3 and shape[-1] in (S, S + 1) and S in shape[:-1]:
                    Count.n += 1
            elif "scaled_dot_product" in name and "backward" not in name:
                Count.n += 1
            return func(*args, **(kwargs or {}))

    with torch.no_grad(), Count():
        model(**inputs)
    return Count.n


def _errors(model, ref, out, r_out) -> dict:
    g = torch.randn(r_out.shape, generator=torch.Generator().manual_seed(9), dtype=r_out.dtype)
    (out * g).sum().backward()
    (r_out * g).sum().backward()
    errs = {"out_abs": (out - r_out).abs().max().item()}
    errs["out_rel"] = errs["out_abs"] / max(r_out.abs().max().item(), 1e-30)
    grads = [(p.grad, q.grad) for p, q in zip(model.parameters(), ref.parameters(), strict=True)]
    scale = max((q.abs().max().item() for _, q in grads if q is not None), default=1.0) or 1.0
    gabs = 0.0
    for p, q in grads:
        if (p is None) != (q is None):
            gabs = float("inf")
        elif p is not None:
            gabs = max(gabs, (p - q).abs().max().item())
    errs["grad_abs"], errs["grad_rel"] = gabs, gabs / scale
    return errs


def _compiled_run(model, inputs, backend: str):
    """(errors, HISTORY entries, ring attention forward calls executed). The calls, not the sites:
    a layer frame cut by a graph break (LongCat's MoE ``nonzero``) is compiled once and run per layer."""
    from ringcompile import backend as rb
    from ringcompile.runtime import timing

    torch._dynamo.reset()
    m = copy.deepcopy(model)
    ref = copy.deepcopy(model)
    first = len(rb.HISTORY)
    opts = {"options": {"inner": "eager"}} if backend == "ring" else {}
    compiled = torch.compile(m, backend=backend, dynamic=False, **opts)
    with timing.record() as calls:
        out = _first_tensor(compiled(**inputs))
    r_out = _first_tensor(ref(**inputs))
    ring_calls = sum(1 for c in calls if c.phase == "forward")
    return _errors(m, ref, out, r_out), rb.HISTORY[first:], ring_calls


def _wrong(errs) -> bool:
    return not (errs["out_rel"] <= OUT_TOL and errs["grad_rel"] <= GRAD_TOL)


def _has_nan(model, inputs) -> bool:
    """Whether the eager model's output holds NaN (BLT eager's tiny config: fully masked rows)."""
    with torch.no_grad():
        return bool(torch.isnan(_first_tensor(model(**inputs))).any())


def run_one(family: str, impl: str) -> dict:
    """One classified run (inside a rank)."""
    rec: dict = {"family": family, "impl": impl}
    try:
        model, inputs = build(family, impl)
        try:
            rec["expected_sites"] = count_attention(model, inputs)
            rec["dtype"] = "float64"
        except Exception:  # noqa: BLE001 - some kernels (grouped MoE mm) or constants want float32
            model = model.float()
            rec["expected_sites"] = count_attention(model, inputs)
            rec["dtype"] = "float32"
    except _Skip as exc:
        return {**rec, "status": "skipped", "reason": str(exc)}
    except Exception as exc:  # noqa: BLE001
        why = f"eager run fails: {type(exc).__name__}: {str(exc)[:200]}"
        return {**rec, "status": "skipped", "reason": why}
    if _has_nan(model, inputs):
        return {**rec, "status": "skipped", "reason": "the one-process eager output holds NaN: no reference"}
    try:
        errs, entries, rec["ring_calls"] = _compiled_run(model, inputs, "ring")
    except Exception as exc:  # noqa: BLE001
        rec["error"] = traceback.format_exc()[-1500:]
        return {**rec, **_control(model, inputs, "crash", f"{type(exc).__name__}: {str(exc)[:300]}")}
    rec["errs"] = errs
    sites = [s for e in entries for s in e.sites]
    rec["rewritten"] = sum(s.rewritten for s in sites)
    reasons = [f"{s.location or s.name}: {s.reason}" for s in sites if not s.rewritten]
    # a softmax found not to be attention (a MoE router) explains no missing site
    reasons += [f"{r.location}: {r.reason}" for e in entries for r in e.rejected
                if not r.reason.startswith("not attention")]
    reasons += [e.fallback_reason for e in entries if e.fallback_reason]
    rec["sharded_graphs"] = sum(1 for e in entries if e.graph is not None
                                and e.graph.meta.get("ringcompile_shard") is not None)
    rec["reasons"] = reasons[:10]
    if _wrong(errs):
        return {**rec, **_control(model, inputs, "wrong", "differs from one process")}
    if rec["expected_sites"] == 0:
        why = "no attention in the eager forward"
        if rec["rewritten"]:  # Perceiver: latents attend over the sequence, the sequence not over itself
            why = (f"no attention of the {S} inputs over themselves in the eager forward (what this table "
                   f"counts); {rec['rewritten']} sites attending over them from other queries were rewritten")
        return {**rec, "status": "skipped", "reason": why}
    if max(rec["rewritten"], rec["ring_calls"]) >= rec["expected_sites"] and rec["sharded_graphs"]:
        return {**rec, "status": "ok"}
    return {**rec, "status": "unsharded-reason" if reasons else "unsharded-silent"}


def _control(model, inputs, status: str, why: str) -> dict:
    """aot_eager as a control: a failure it shares is not ours."""
    try:
        errs, _, _ = _compiled_run(model, inputs, "aot_eager")
    except Exception as exc:  # noqa: BLE001
        return {"status": "skipped", "reason": f"{status} under ring, aot_eager raises too: "
                                               f"{type(exc).__name__}: {str(exc)[:200]}"}
    if _wrong(errs):
        return {"status": "skipped", "reason": f"{status} under ring, aot_eager is wrong too: {errs}"}
    return {"status": status, "reason": why}


# ---------------------------------------------------------------------------- ranks


def _rank_main(rank: int, world: int, init_file: str, runs: list, out) -> None:
    import datetime

    import torch.distributed as dist

    from ringcompile.runtime.spawned_ranks import exit_rank

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    import logging

    logging.getLogger("ringcompile").setLevel(logging.ERROR)
    for fam, impl in runs:
        out.put((rank, fam, impl, run_one(fam, impl)))
    out.put((rank, None, None, None))
    exit_rank(0, [out])


def run_group(runs: list, timeout: float) -> list[dict]:
    """Run ``runs`` [(family, impl)] on 2 spawned ranks; rank 0's record (rank 1's error if it differs).
    A run that does not finish within ``timeout`` seconds ends the group: it is a crash (hang), and
    the remaining runs go to a fresh group."""
    import os
    import queue
    import tempfile

    import torch.multiprocessing as mp

    results: dict[tuple, dict] = {}
    todo = list(runs)
    while todo:
        ctx = mp.get_context("spawn")
        out = ctx.Queue()
        fd, init_file = tempfile.mkstemp(prefix="zoo_init_")
        os.close(fd)
        os.unlink(init_file)
        procs = [ctx.Process(target=_rank_main, args=(r, 2, init_file, todo, out), daemon=True)
                 for r in range(2)]
        for p in procs:
            p.start()
        got: dict[tuple, dict] = {}
        done = 0
        while done < 2:
            try:
                rank, fam, impl, rec = out.get(timeout=timeout + 60)  # +60: the first run pays start-up
            except queue.Empty:
                break
            if fam is None:
                done += 1
                continue
            if rank == 0 or (fam, impl) not in got:
                got.setdefault((fam, impl), rec)
                if rank == 0:
                    got[(fam, impl)] = rec
        for p in procs:
            p.kill() if p.is_alive() and done < 2 else p.join(timeout=10)
        results.update(got)
        finished = [r for r in todo if tuple(r) in got]
        rest = [r for r in todo if tuple(r) not in got]
        if rest and done < 2:
            hung = rest[0]
            results[tuple(hung)] = {"family": hung[0], "impl": hung[1], "status": "crash",
                                    "reason": f"no result within {timeout:g} s (hang or rank died)"}
            rest = rest[1:]
        todo = rest if finished or done < 2 else []
    return [results[tuple(r)] for r in runs if tuple(r) in results]


def markdown(records: list[dict], command: str) -> str:
    import collections
    import datetime
    import platform

    counts = collections.Counter(r["status"] for r in records)
    lines = ["## Transformers zoo (benchmarks/zoo.py)", "",
             f"Command: `{command}`; machine: {platform.machine()} CPU, {torch.get_num_threads()} threads, "
             f"torch {torch.__version__}; date {datetime.date.today()}; 2 gloo ranks, float64 models "
             "(float32 where the eager model needs it: dtype column), "
             f"outputs rel tol {OUT_TOL:g}, grads rel tol {GRAD_TOL:g}.", "",
             "Counts: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())), "",
             "| family | impl | status | dtype | sites (rewritten/expected) | ring calls | out rel "
             "| grad rel | reason |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        e = r.get("errs", {})
        reason = (r.get("reason") or "; ".join(r.get("reasons", [])))[:160]
        reason = reason.replace("|", "/").replace("\n", " ")
        lines.append(f"| {r['family']} | {r['impl']} | {r['status']} | {r.get('dtype', '-')} | "
                     f"{r.get('rewritten', '-')}/"
                     f"{r.get('expected_sites', '-')} | {r.get('ring_calls', '-')} | "
                     f"{e.get('out_rel', float('nan')):.1e} | "
                     f"{e.get('grad_rel', float('nan')):.1e} | {reason} |")
    return "\n".join(lines) + "\n"


def build_check(family: str) -> dict:
    """Does ``family``'s tiny config build, and does one eager forward run (one process, no ranks)?
    status: runs / build-fails / run-fails / skipped (not a text model)."""
    rec: dict = {"family": family}
    try:
        model, inputs = build(family, "eager")
    except _Skip as exc:
        status = "build-fails" if str(exc).startswith("tiny config does not build") else "skipped"
        return {**rec, "status": status, "reason": str(exc)}
    except Exception as exc:  # noqa: BLE001 - the model class itself is missing or broken
        return {**rec, "status": "build-fails", "reason": f"{type(exc).__name__}: {str(exc)[:200]}"}
    errors = []
    for dtype in (torch.float64, torch.float32):
        try:
            nan = _has_nan(model.to(dtype), inputs)
            return {**rec, "status": "runs", "dtype": str(dtype).removeprefix("torch."), "nan": nan}
        except Exception as exc:  # noqa: BLE001
            errors.append(f"{type(exc).__name__}: {str(exc)[:200]}")
    return {**rec, "status": "run-fails", "reason": errors[-1], "where": traceback.format_exc()[-600:]}


def _build_only(fams: list[str], out: str) -> int:
    import collections

    records = []
    for fam in fams:
        records.append(build_check(fam))
        r = records[-1]
        sys.stderr.write(f"{fam}: {r['status']} {r.get('reason', '')[:150]}\n")
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(records, indent=1))
    counts = collections.Counter(r["status"] for r in records)
    sys.stdout.write("Counts: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", default="", help="comma-separated; default: every installed family")
    ap.add_argument("--impls", default="eager,sdpa")
    ap.add_argument("--jobs", type=int, default=1, help="rank pairs run at once")
    ap.add_argument("--group-size", type=int, default=12, help="runs per spawned rank pair")
    ap.add_argument("--timeout", type=float, default=600.0,
                    help="seconds per run (a shared 2-core machine needs minutes per compile)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "zoo.json"))
    ap.add_argument("--markdown", default="", help="write the table here too (e.g. a file to paste)")
    ap.add_argument("--build-only", action="store_true",
                    help="only build each tiny config and run one eager forward, in this process")
    a = ap.parse_args(argv)
    fams = [f for f in a.families.split(",") if f] or sorted(families())
    if a.build_only:
        return _build_only(fams, a.out if a.out != ap.get_default("out") else
                           str(ROOT / "benchmarks" / "results" / "zoo_build.json"))
    runs = [(f, i) for f in fams for i in a.impls.split(",") if i]
    groups = [runs[k:k + a.group_size] for k in range(0, len(runs), a.group_size)]
    from concurrent.futures import ThreadPoolExecutor, as_completed

    command = "python benchmarks/zoo.py " + " ".join(argv if argv is not None else sys.argv[1:])
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    done: dict[int, list[dict]] = {}

    def write(final: bool) -> str:
        """The records so far, in run order (a long run leaves a usable partial table behind)."""
        records = [r for k in sorted(done) for r in done[k]]
        Path(a.out).write_text(json.dumps(records, indent=1, default=str))
        md = markdown(records, command)
        if not final:
            md += f"\n(partial: {len(records)} of {len(runs)} runs so far)\n"
        if a.markdown:
            Path(a.markdown).write_text(md)
        return md

    with ThreadPoolExecutor(max(1, a.jobs)) as pool:
        futures = {pool.submit(run_group, g, a.timeout): k for k, g in enumerate(groups)}
        for fut in as_completed(futures):
            done[futures[fut]] = fut.result()
            write(final=False)
            sys.stderr.write(f"zoo: {sum(map(len, done.values()))} of {len(runs)} runs done\n")
    sys.stdout.write(write(final=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
