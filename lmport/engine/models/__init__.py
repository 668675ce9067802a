"""Registry of native model implementations, keyed by the HF `architectures` name."""

from __future__ import annotations

from transformers import PretrainedConfig

from lmport.engine.errors import UnsupportedModel
from lmport.engine.models.bert import BertModel
from lmport.engine.models.llama import LlamaForCausalLM

# Mistral and Qwen2 are Llama with different config defaults (sliding window, qkv bias); one class serves all.
# BertModel is an encoder: it serves embeddings (EncoderEngine), not generation.
MODEL_REGISTRY: dict[str, type[LlamaForCausalLM] | type[BertModel]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "BertModel": BertModel,
}
_MODEL_TYPES = {"llama", "mistral", "qwen2"}


def get_model_class(hf_config: PretrainedConfig) -> type[LlamaForCausalLM] | type[BertModel]:
    architectures = getattr(hf_config, "architectures", None) or []
    for arch in architectures:
        if arch in MODEL_REGISTRY:
            return MODEL_REGISTRY[arch]
    if not architectures and hf_config.model_type in _MODEL_TYPES:  # configs converted from GGUF may omit it
        return LlamaForCausalLM
    raise UnsupportedModel(f"model architecture {architectures or '(none in config.json)'} is not supported; "
                           f"supported architectures: {', '.join(MODEL_REGISTRY)}")


__all__ = ["MODEL_REGISTRY", "BertModel", "LlamaForCausalLM", "get_model_class"]
