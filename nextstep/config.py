"""NextStepConfig: the fields of the official `config.json`, and nothing we do not understand.

The official config is a transformers `LlamaConfig` (NextStep-1) or
`Qwen2Config` (NextStep-1.1) plus NextStep's own fields. We read it without
transformers: every field that changes the model is a dataclass field below; a
list of Hugging Face bookkeeping fields is accepted and written back untouched.
Real checkpoints carry fields we have never seen (only excerpts of the official
config.json files are known), so any other field is kept and written back too,
with a one-line warning naming it; `strict=True` refuses it instead. Known
fields keep their checks: an unsupported value is an error either way.

Three layouts are understood, and `family` records which checkpoint family
(and so which inference behaviour) a config belongs to:
- NextStep-1: `model_type "nextstep"` with `latent_*` / `fm_head_*` fields;
- NextStep-1.1 (code release): `model_type "stepx_llama"`, same field names;
- NextStep-1.1 (Hub config.json): `model_type "nextstep"` with `image_size`,
  `patch_size`, `num_channels`, `genloss_*` instead, mapped by `HUB_11_FIELDS`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import ConfigError

logger = logging.getLogger(__name__)

MODEL_TYPES = ("nextstep", "stepx_llama")


@dataclass(frozen=True)
class Family:
    """How the official pipeline of a checkpoint family samples (see the fixture READMEs)."""

    default_sampler: str
    shared_noise: bool  # 1.0: the k-th image of every caption gets the same noise
    reseed_after_encoding: bool  # 1.1: token noise starts from a fresh seed after encoding images


# The checkpoint families, keyed by name (a config's `family`, derived from its layout).
FAMILIES = {
    "nextstep-1": Family("euler_maruyama", shared_noise=True, reseed_after_encoding=False),
    "nextstep-1.1": Family("sde", shared_noise=False, reseed_after_encoding=True),
}
# The published NextStep-1.1 config.json names some fields differently.
HUB_11_FIELDS = {"image_size": "latent_size", "patch_size": "latent_patch_size", "num_channels": "latent_channels",
                 "genloss_width": "fm_head_dim", "genloss_depth": "fm_head_layers",
                 "genloss_batch_mul": "fm_head_batch_mul"}

# Fields transformers writes into every config.json that do not change the
# computation (or whose only supported value we check in `validate`). Kept in
# `extra` so save_pretrained writes them back.
HF_BOOKKEEPING = {
    "_attn_implementation_autoset", "_name_or_path", "architectures", "auto_map",
    "transformers_version", "torch_dtype", "use_cache", "max_window_layers",
    "use_sliding_window", "sliding_window", "attention_dropout", "initializer_range",
    "pretraining_tp", "return_dict", "output_hidden_states", "output_attentions",
    "torchscript", "tie_encoder_decoder", "is_decoder", "is_encoder_decoder",
    "add_cross_attention", "chunk_size_feed_forward", "pruned_heads", "problem_type",
    "tokenizer_class", "prefix", "sep_token_id", "decoder_start_token_id",
    "task_specific_params", "id2label", "label2id", "finetuning_task", "cross_attention_hidden_size",
    "tf_legacy_loss", "use_bfloat16", "generation_config",
    # Newer transformers: "dtype" replaces "torch_dtype", "layer_types" lists the attention
    # kind per layer (checked in `validate`: only full attention).
    "dtype", "layer_types", "_commit_hash", "_attn_implementation",
}

# Accepted JSON types of each dataclass field, from its annotation ("int | None" -> int or null).
_JSON_TYPES = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,), "dict": (dict,)}


@dataclass
class NextStepConfig:
    # --- decoder (Qwen2.5 / Llama fields) ---
    vocab_size: int = 152064
    hidden_size: int = 5120
    intermediate_size: int = 13824
    num_hidden_layers: int = 48
    num_attention_heads: int = 40
    num_key_value_heads: int = 8
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    hidden_act: str = "silu"
    max_position_embeddings: int = 131072
    rms_norm_eps: float = 1e-5
    rope_theta: float = 1_000_000.0
    rope_scaling: dict | None = None
    attention_bias: bool = True  # q/k/v bias
    o_attention_bias: bool = False  # o_proj bias
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 151643
    eos_token_id: int | None = 151643
    pad_token_id: int | None = None
    # --- NextStep: image tokens and flow-matching head ---
    latent_channels: int = 16
    latent_patch_size: int = 2
    latent_size: int = 64  # unused at inference (kept for round-trips)
    base_image_grid_size: int = 32  # side of the gen_pos_embed table
    fm_head_dim: int = 1536
    fm_head_layers: int = 12
    fm_head_batch_mul: int = 4
    lm_loss_weight: float = 0.01
    im_loss_weight: float = 1.0
    use_gen_pos_embed: bool = False
    boi: int = 151667
    eoi: int = 151668
    image_placeholder_id: int = 151669
    pad_token_id_added: int = 151665
    vae_name_or_path: str | None = None
    model_type: str = "nextstep"
    family: str = "nextstep-1"  # not a config.json key: derived from the layout (see module doc)
    # Bookkeeping fields from config.json, written back unchanged.
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.head_dim is None and _is_int(self.hidden_size) and _is_int(self.num_attention_heads) \
                and self.num_attention_heads > 0:
            self.head_dim = self.hidden_size // self.num_attention_heads

    # ------------------------------------------------------------------ derived
    @property
    def token_dim(self) -> int:
        """Numbers per image token: latent channels x patch x patch (64 for f8ch16, p=2)."""
        return self.latent_channels * self.latent_patch_size**2

    # ------------------------------------------------------------------ io
    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config", strict: bool = False) -> "NextStepConfig":
        """A config from a config.json dict. A field we do not know is kept (and written back)
        with a one-line warning naming it; `strict=True` refuses it instead."""
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: a config must be a JSON object, got {type(d).__name__}")
        d = dict(d)
        model_type = d.get("model_type", "nextstep")
        if model_type not in MODEL_TYPES:
            raise ConfigError(
                f"{source}: unknown model_type {model_type!r}; this loader understands {list(MODEL_TYPES)}"
            )
        if "family" in d:
            raise ConfigError(f"{source}: 'family' is derived from the layout, not a config field")
        d["family"] = "nextstep-1.1" if model_type == "stepx_llama" else "nextstep-1"
        hub_fields = [k for k in HUB_11_FIELDS if k in d]
        if hub_fields:
            for hub_name in hub_fields:
                ours = HUB_11_FIELDS[hub_name]
                if ours in d and d[ours] != d[hub_name]:
                    raise ConfigError(f"{source}: {hub_name}={d[hub_name]!r} contradicts {ours}={d[ours]!r}")
                d[ours] = d.pop(hub_name)
            d["family"], d["model_type"] = "nextstep-1.1", "stepx_llama"
        if d["family"] == "nextstep-1.1":
            # Qwen2 always has q/k/v biases and never an o_proj bias, whatever attention_bias says.
            d["attention_bias"], d["o_attention_bias"] = True, False
            if d.get("use_gen_pos_embed"):
                raise ConfigError(f"{source}: NextStep-1.1 has no gen_pos_embed (use_gen_pos_embed=true)")
        known = {f.name for f in fields(cls)} - {"extra"}
        extra = {k: d.pop(k) for k in list(d) if k not in known and k in HF_BOOKKEEPING}
        unknown = sorted(k for k in d if k not in known)
        if unknown and strict:
            raise ConfigError(f"{source}: fields not understood by nextstep: {unknown} (strict config)")
        if unknown:
            logger.warning("%s: config fields nextstep does not know, ignored (and kept when saved): %s; "
                           "strict_config=True / --strict-config refuses them", source, unknown)
            extra.update((k, d.pop(k)) for k in unknown)
        types = {f.name: f.type for f in fields(cls)}
        wrong = [f"{k}={v!r} (expected {types[k]})" for k, v in d.items() if not _type_ok(v, types[k])]
        if wrong:
            raise ConfigError(f"{source}: fields of the wrong type: " + "; ".join(wrong))
        config = cls(**d, extra=extra)
        config.validate(source)
        return config

    @classmethod
    def from_pretrained(cls, path: str | Path, strict: bool = False) -> "NextStepConfig":
        """Read a model folder's config.json, or a config.json path (`strict`: see `from_dict`)."""
        path = Path(path)
        file = path / "config.json" if path.is_dir() else path
        if not file.is_file():
            raise ConfigError(f"no config.json at {file}")
        try:
            d = json.loads(file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{file}: not valid JSON ({e})") from None
        return cls.from_dict(d, source=str(file), strict=strict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("extra")
        d.pop("family")  # written as model_type
        return {**self.extra, **dict(sorted(d.items()))}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    def validate(self, source: str = "config") -> None:
        """Reject values the implementation would silently get wrong."""
        problems = []
        if self.family not in FAMILIES:
            problems.append(f"family={self.family!r} (one of {list(FAMILIES)})")
        if (self.family == "nextstep-1.1") != (self.model_type == "stepx_llama"):
            problems.append(f"model_type={self.model_type!r} does not fit family {self.family!r}")
        if self.hidden_act != "silu":
            problems.append(f"hidden_act={self.hidden_act!r} (only 'silu')")
        if self.rope_scaling not in (None, {}):
            problems.append(f"rope_scaling={self.rope_scaling!r} (only default RoPE)")
        if self.extra.get("pretraining_tp", 1) != 1:
            problems.append("pretraining_tp != 1")
        if self.extra.get("use_sliding_window", False):
            problems.append("use_sliding_window=true")
        if self.extra.get("attention_dropout", 0.0) not in (0, 0.0, None):
            problems.append(f"attention_dropout={self.extra['attention_dropout']!r} (no dropout is implemented)")
        layer_types = self.extra.get("layer_types")
        if layer_types is not None and (not isinstance(layer_types, list)
                                        or any(t != "full_attention" for t in layer_types)):
            problems.append(f"layer_types={layer_types!r} (only 'full_attention')")
        positive = ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
                    "head_dim", "max_position_embeddings", "latent_channels", "latent_patch_size",
                    "base_image_grid_size", "fm_head_dim", "fm_head_batch_mul")
        for name in positive:
            if getattr(self, name) is None or not getattr(self, name) > 0:
                problems.append(f"{name}={getattr(self, name)!r} (must be > 0)")
        for name in ("num_hidden_layers", "fm_head_layers"):
            if getattr(self, name) < 0:
                problems.append(f"{name}={getattr(self, name)!r} (must be >= 0)")
        if self.head_dim is not None and self.head_dim > 0 and self.head_dim % 2:
            problems.append(f"head_dim={self.head_dim} (RoPE needs an even head_dim)")
        if not (self.rms_norm_eps > 0 and self.rope_theta > 0):
            problems.append("rms_norm_eps and rope_theta must be > 0")
        if self.num_key_value_heads > 0 and self.num_attention_heads % self.num_key_value_heads:
            problems.append("num_attention_heads must be a multiple of num_key_value_heads")
        if self.vocab_size > 0:
            for name in ("boi", "eoi", "image_placeholder_id"):
                if not 0 <= getattr(self, name) < self.vocab_size:
                    problems.append(f"{name}={getattr(self, name)} is outside the vocabulary "
                                    f"(vocab_size={self.vocab_size})")
        if problems:
            raise ConfigError(f"{source}: unsupported values: " + "; ".join(problems))


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _type_ok(value: Any, annotation: str) -> bool:
    """Whether a JSON value fits a field annotation such as "int", "float" or "str | None"."""
    for name in str(annotation).replace(" ", "").split("|"):
        if name == "None" and value is None:
            return True
        allowed = _JSON_TYPES.get(name)
        if allowed is None:
            return True  # an annotation we do not check
        if isinstance(value, allowed) and not (name in ("int", "float") and isinstance(value, bool)):
            return True
    return False
