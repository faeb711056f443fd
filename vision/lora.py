"""LoRA adapters: they live in stablelm/lora.py (the classifiers train with them too); kept importable here."""
from stablelm.lora import LM_TARGETS, LoRALinear, apply_lora, lora_parameters  # noqa: F401
