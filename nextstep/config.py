"""NextStepConfig: the fields of the official `config.json`, and nothing we do not understand.

The official config is a transformers `LlamaConfig` plus NextStep's own fields.
We read it without transformers: every field that changes the model is a
dataclass field below; a list of Hugging Face bookkeeping fields is accepted and
written back untouched; anything else is refused with its name, because a
silently ignored field is a silently different model.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import ConfigError

MODEL_TYPES = ("nextstep",)

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
}


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
    # Bookkeeping fields from config.json, written back unchanged.
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads

    # ------------------------------------------------------------------ derived
    @property
    def token_dim(self) -> int:
        """Numbers per image token: latent channels x patch x patch (64 for f8ch16, p=2)."""
        return self.latent_channels * self.latent_patch_size**2

    # ------------------------------------------------------------------ io
    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> "NextStepConfig":
        d = dict(d)
        model_type = d.get("model_type", "nextstep")
        if model_type not in MODEL_TYPES:
            raise ConfigError(
                f"{source}: unknown model_type {model_type!r}; this loader understands {list(MODEL_TYPES)}"
            )
        known = {f.name for f in fields(cls)} - {"extra"}
        extra = {k: d.pop(k) for k in list(d) if k not in known and k in HF_BOOKKEEPING}
        unknown = sorted(k for k in d if k not in known)
        if unknown:
            raise ConfigError(f"{source}: fields not understood by nextstep: {unknown}")
        config = cls(**d, extra=extra)
        config.validate(source)
        return config

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "NextStepConfig":
        """Read a model folder's config.json, or a config.json path."""
        path = Path(path)
        file = path / "config.json" if path.is_dir() else path
        if not file.is_file():
            raise ConfigError(f"no config.json at {file}")
        try:
            d = json.loads(file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{file}: not valid JSON ({e})") from None
        return cls.from_dict(d, source=str(file))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("extra")
        return {**self.extra, **dict(sorted(d.items()))}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    def validate(self, source: str = "config") -> None:
        """Reject values the implementation would silently get wrong."""
        problems = []
        if self.hidden_act != "silu":
            problems.append(f"hidden_act={self.hidden_act!r} (only 'silu')")
        if self.rope_scaling not in (None, {}):
            problems.append(f"rope_scaling={self.rope_scaling!r} (only default RoPE)")
        if self.extra.get("pretraining_tp", 1) != 1:
            problems.append("pretraining_tp != 1")
        if self.extra.get("use_sliding_window", False):
            problems.append("use_sliding_window=true")
        if self.num_attention_heads % self.num_key_value_heads:
            problems.append("num_attention_heads must be a multiple of num_key_value_heads")
        if problems:
            raise ConfigError(f"{source}: unsupported values: " + "; ".join(problems))
