"""StableLMConfig: every setting that changes the forward pass, read from / written to Hugging Face config dicts.

`from_hf` accepts the old spelling (top-level `rope_theta`, `partial_rotary_factor`, `rope_scaling`), the new one
(`rope_parameters`) and the pre-transformers `stablelm_epoch` names (`rope_pct`, `norm_eps`). Anything it does not
know, or a value the model does not implement, is an error naming the field: a config that would run with a
silently different forward pass is worse than one that does not load.

The head fields (`architectures`, `num_labels`, `id2label` / `label2id`, `problem_type`, `pad_token_id`,
`classifier_dropout`) follow transformers' PretrainedConfig: `architectures[0]` says which class a checkpoint is
(causal LM, bare backbone or a classification head) and the rest configure the heads.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

ROPE_TYPES = ("default", "linear", "dynamic")
# transformers' class names for the four StableLM classes; config.architectures[0] is one of them.
ARCHITECTURES = ("StableLmForCausalLM", "StableLmModel", "StableLmForSequenceClassification",
                 "StableLmForTokenClassification")
PROBLEM_TYPES = ("regression", "single_label_classification", "multi_label_classification")

# Keys of a Hugging Face config.json that do not change inference (bookkeeping, generation defaults, labels).
IGNORED_HF_KEYS = {
    "auto_map", "model_type", "torch_dtype", "dtype", "transformers_version", "_name_or_path",
    "initializer_range", "use_cache", "output_hidden_states", "output_attentions", "return_dict",
    "chunk_size_feed_forward", "is_encoder_decoder", "tokenizer_class", "_attn_implementation", "attn_implementation", "use_return_dict", "torchscript",
    "tf_legacy_loss", "pruned_heads", "add_cross_attention", "finetuning_task", "prefix", "sep_token_id",
    "decoder_start_token_id", "task_specific_params", "cross_attention_hidden_size", "tie_encoder_decoder",
    "is_decoder", "use_bfloat16", "max_length", "min_length", "do_sample", "early_stopping", "num_beams",
    "num_beam_groups", "diversity_penalty", "temperature", "top_k", "top_p", "typical_p", "repetition_penalty",
    "length_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size", "bad_words_ids",
    "num_return_sequences", "output_scores", "return_dict_in_generate", "forced_bos_token_id",
    "forced_eos_token_id", "remove_invalid_values", "exponential_decay_length_penalty", "suppress_tokens",
    "begin_suppress_tokens", "_commit_hash",
}


@dataclass
class StableLMConfig:
    vocab_size: int = 50304
    hidden_size: int = 2560
    intermediate_size: int = 6912
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    partial_rotary_factor: float = 0.25
    rope_theta: float = 10000.0
    rope_type: str = "default"
    rope_factor: float = 1.0
    use_qkv_bias: bool = False
    qk_layernorm: bool = False
    use_parallel_residual: bool = False
    layer_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 4096
    bos_token_id: int | None = 0
    eos_token_id: list[int] = field(default_factory=lambda: [0])
    # ---- which class, and the heads' settings (transformers' names and meaning)
    architectures: list[str] = field(default_factory=lambda: ["StableLmForCausalLM"])
    pad_token_id: int | None = None           # sequence classification pools at the last token != pad_token_id
    num_labels: int = 2
    id2label: dict[int, str] | None = None    # None: transformers' default names LABEL_0 .. LABEL_{n-1}
    label2id: dict[str, int] | None = None    # None: the inverse of id2label
    problem_type: str | None = None           # None: inferred from num_labels / the labels' dtype on first loss
    classifier_dropout: float | None = None   # token classification; None: hidden_dropout, which is 0 here

    def __post_init__(self):
        if isinstance(self.eos_token_id, int):
            self.eos_token_id = [self.eos_token_id]
        if isinstance(self.architectures, str):
            self.architectures = [self.architectures]
        # JSON keys are strings; ids are ints (as transformers converts them).
        if self.id2label is not None:
            self.id2label = {int(k): v for k, v in self.id2label.items()}
        if self.label2id is not None:
            self.label2id = {k: int(v) for k, v in self.label2id.items()}
        self.validate()

    @property
    def architecture(self) -> str:
        return self.architectures[0]

    def labels(self) -> tuple[dict[int, str], dict[str, int]]:
        """(id2label, label2id) with transformers' defaults filled in."""
        id2label = self.id2label if self.id2label is not None else {i: f"LABEL_{i}" for i in range(self.num_labels)}
        label2id = self.label2id if self.label2id is not None else {v: k for k, v in id2label.items()}
        return id2label, label2id

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def rotary_dim(self) -> int:
        # Same truncation as transformers: int(head_dim * factor).
        return int(self.head_dim * self.partial_rotary_factor)

    def validate(self) -> None:
        def bad(name, why):
            raise ValueError(f"StableLMConfig.{name}={getattr(self, name)!r}: {why}")

        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "max_position_embeddings"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                bad(name, "must be a positive integer")
        if self.hidden_size % self.num_attention_heads:
            bad("hidden_size", f"must be divisible by num_attention_heads={self.num_attention_heads}")
        if self.num_attention_heads % self.num_key_value_heads:
            bad("num_key_value_heads", f"must divide num_attention_heads={self.num_attention_heads}")
        if not 0.0 < self.partial_rotary_factor <= 1.0:
            bad("partial_rotary_factor", "must be in (0, 1]")
        if self.rotary_dim % 2 or self.rotary_dim == 0:
            bad("partial_rotary_factor", f"gives rotary_dim={self.rotary_dim}; it must be even and > 0")
        if self.rope_type not in ROPE_TYPES:
            bad("rope_type", f"unsupported; supported: {ROPE_TYPES}")
        if self.rope_type != "default" and not self.rope_factor >= 1.0:
            bad("rope_factor", "rope scaling factor must be >= 1")
        if self.rope_theta <= 0:
            bad("rope_theta", "must be > 0")
        if (not isinstance(self.architectures, list) or len(self.architectures) != 1
                or self.architectures[0] not in ARCHITECTURES):
            bad("architectures", f"must be one of {[[a] for a in ARCHITECTURES]}")
        if isinstance(self.num_labels, bool) or not isinstance(self.num_labels, int) or self.num_labels < 1:
            bad("num_labels", "must be a positive integer")
        if self.id2label is not None and sorted(self.id2label) != list(range(self.num_labels)):
            bad("id2label", f"must have the ids 0..{self.num_labels - 1} (num_labels={self.num_labels}); "
                            f"change both together")
        if self.problem_type is not None and self.problem_type not in PROBLEM_TYPES:
            bad("problem_type", f"must be None or one of {PROBLEM_TYPES}")
        if self.problem_type == "single_label_classification" and self.num_labels == 1:
            bad("problem_type", "single_label_classification needs num_labels > 1 (use regression for one output)")
        if self.classifier_dropout is not None and not 0.0 <= self.classifier_dropout < 1.0:
            bad("classifier_dropout", "must be None or in [0, 1)")
        if self.pad_token_id is not None and not 0 <= self.pad_token_id:
            bad("pad_token_id", "must be None or a token id >= 0")

    # ---- Hugging Face config.json <-> StableLMConfig ----
    @classmethod
    def from_hf(cls, hf: dict) -> "StableLMConfig":
        """Build from a transformers StableLmConfig dict (config.json). Errors name the offending field."""
        hf = dict(hf)
        model_type = hf.get("model_type", "stablelm")
        if model_type not in ("stablelm", "stablelm_epoch"):
            raise ValueError(f"config.model_type={model_type!r}: not a StableLM checkpoint")
        act = hf.pop("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"config.hidden_act={act!r}: only 'silu' (SwiGLU) is supported")
        for name in ("hidden_dropout", "attention_dropout"):
            if hf.pop(name, 0.0):
                raise ValueError(f"config.{name}={hf.get(name)!r}: dropout is not supported (must be 0)")
        head_dim = hf.pop("head_dim", None)
        aliases = {"rope_pct": "partial_rotary_factor", "norm_eps": "layer_norm_eps", "num_heads": "num_attention_heads"}
        for old, new in aliases.items():
            if old in hf:
                hf.setdefault(new, hf.pop(old))

        kw: dict = {}
        rope = hf.pop("rope_parameters", None) or {}
        scaling = hf.pop("rope_scaling", None) or {}
        if not isinstance(rope, dict) or not isinstance(scaling, dict):
            raise ValueError("config.rope_parameters / rope_scaling must be objects")
        # The new spelling wins where both are present, as in transformers.
        theta = rope.get("rope_theta", hf.pop("rope_theta", None))
        prf = rope.get("partial_rotary_factor", hf.pop("partial_rotary_factor", None))
        rope_type = rope.get("rope_type", rope.get("type")) or scaling.get("rope_type", scaling.get("type")) or "default"
        factor = rope.get("factor", scaling.get("factor", 1.0))
        known_rope = {"rope_theta", "partial_rotary_factor", "rope_type", "type", "factor"}
        extra = (set(rope) | set(scaling)) - known_rope
        if rope_type != "default" and "original_max_position_embeddings" in extra:
            extra.discard("original_max_position_embeddings")
        if extra:
            raise ValueError(f"config.rope_parameters: unsupported keys {sorted(extra)}")
        if rope_type not in ROPE_TYPES:
            raise ValueError(f"config.rope_parameters.rope_type={rope_type!r}: supported types are {ROPE_TYPES}")
        if theta is not None:
            kw["rope_theta"] = float(theta)
        if prf is not None:
            kw["partial_rotary_factor"] = float(prf)
        kw["rope_type"] = rope_type
        kw["rope_factor"] = float(factor) if factor is not None else 1.0

        # Labels as transformers reads them: id2label decides num_labels; a missing id2label means num_labels
        # (default 2) with the default names, which this config keeps as None so it compares equal.
        id2label = hf.pop("id2label", None)
        label2id = hf.pop("label2id", None)
        if id2label is not None:
            id2label = {int(k): v for k, v in id2label.items()}
            kw["num_labels"] = len(id2label)
            hf.pop("num_labels", None)
        default_names = {i: f"LABEL_{i}" for i in range(kw.get("num_labels", hf.get("num_labels", 2)))}
        if id2label == default_names:
            id2label = None
        if label2id is not None:
            label2id = {k: int(v) for k, v in label2id.items()}
            if label2id == {v: k for k, v in (id2label or default_names).items()}:
                label2id = None
        kw["id2label"], kw["label2id"] = id2label, label2id
        if hf.get("architectures") is None:
            hf.pop("architectures", None)  # transformers writes null for a config never saved with a model

        names = {f.name for f in dataclasses.fields(cls)} - {"rope_type", "rope_factor"}
        for key in list(hf):
            if key in names:
                kw[key] = hf.pop(key)
            elif key in IGNORED_HF_KEYS:
                hf.pop(key)
        if hf:
            raise ValueError(f"config: unknown fields {sorted(hf)} (not part of the StableLM forward pass)")
        if kw.get("eos_token_id") is None:
            kw["eos_token_id"] = []
        cfg = cls(**kw)
        if head_dim is not None and head_dim != cfg.head_dim:
            raise ValueError(f"config.head_dim={head_dim}: must equal hidden_size // num_attention_heads={cfg.head_dim}")
        return cfg

    def to_hf(self) -> dict:
        """A transformers-compatible config dict (new `rope_parameters` spelling)."""
        rope = {"rope_type": self.rope_type, "rope_theta": self.rope_theta,
                "partial_rotary_factor": self.partial_rotary_factor}
        if self.rope_type != "default":
            rope["factor"] = self.rope_factor
        eos = self.eos_token_id
        id2label, label2id = self.labels()
        heads = {"pad_token_id": self.pad_token_id, "id2label": {str(k): v for k, v in id2label.items()},
                 "label2id": label2id, "problem_type": self.problem_type}
        if self.classifier_dropout is not None:
            heads["classifier_dropout"] = self.classifier_dropout
        return {
            "model_type": "stablelm",
            "architectures": list(self.architectures),
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            "layer_norm_eps": self.layer_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "use_qkv_bias": self.use_qkv_bias,
            "qk_layernorm": self.qk_layernorm,
            "use_parallel_residual": self.use_parallel_residual,
            "partial_rotary_factor": self.partial_rotary_factor,
            "rope_theta": self.rope_theta,
            "rope_parameters": rope,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos[0] if len(eos) == 1 else eos,
            **heads,
        }

    # ---- the project's own config.json ----
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "StableLMConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"config: unknown fields {sorted(unknown)}")
        return cls(**d)


# Published values of the public checkpoints (their config.json on the Hugging Face hub).
PRESETS = {
    "stablelm-3b-4e1t": dict(vocab_size=50304, hidden_size=2560, intermediate_size=6912, num_hidden_layers=32,
                             num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                             rope_theta=10000.0, bos_token_id=0, eos_token_id=[0]),
    "stablelm-zephyr-3b": dict(vocab_size=50304, hidden_size=2560, intermediate_size=6912, num_hidden_layers=32,
                               num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                               rope_theta=10000.0, bos_token_id=0, eos_token_id=[0]),
    "stable-code-3b": dict(vocab_size=50304, hidden_size=2560, intermediate_size=6912, num_hidden_layers=32,
                           num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=16384,
                           rope_theta=1000000.0, bos_token_id=0, eos_token_id=[0]),
    "stablelm-2-1_6b": dict(vocab_size=100352, hidden_size=2048, intermediate_size=5632, num_hidden_layers=24,
                            num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                            rope_theta=10000.0, use_qkv_bias=True, bos_token_id=100257, eos_token_id=[100257]),
    "stablelm-2-12b": dict(vocab_size=100352, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                           num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=4096,
                           rope_theta=10000.0, qk_layernorm=True, use_parallel_residual=True,
                           bos_token_id=100257, eos_token_id=[100257]),
    # Small random-weight default for CPU runs and tests: the 3B layout scaled down.
    "tiny": dict(vocab_size=512, hidden_size=128, intermediate_size=352, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, max_position_embeddings=512, bos_token_id=0, eos_token_id=[0]),
}


def preset(name: str, **overrides) -> StableLMConfig:
    """Config of a public checkpoint (or "tiny"), optionally with fields overridden."""
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; presets: {sorted(PRESETS)}")
    return StableLMConfig(**{**PRESETS[name], **overrides})
