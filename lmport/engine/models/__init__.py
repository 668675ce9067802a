"""Registry of native model implementations, keyed by the HF `architectures` name."""

from __future__ import annotations

import torch
from transformers import PretrainedConfig

from lmport.engine.errors import UnsupportedModel
from lmport.engine.models.bert import BertModel
from lmport.engine.models.gemma import Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3ForConditionalGeneration
from lmport.engine.models.granite import GraniteForCausalLM
from lmport.engine.models.llama import LlamaForCausalLM
from lmport.engine.models.mixtral import MixtralForCausalLM
from lmport.engine.models.olmo2 import Olmo2ForCausalLM
from lmport.engine.models.opt import OPTForCausalLM
from lmport.engine.models.qwen3 import Qwen3ForCausalLM
from lmport.engine.models.qwen3_moe import Qwen3MoeForCausalLM

# Mistral, Qwen2 and Phi-3 are Llama with different config defaults (sliding window, qkv bias, LongRoPE and partial
# rotary; Phi-3 checkpoints store qkv_proj / gate_up_proj fused already); one class serves all.
# BertModel is an encoder: it serves embeddings (EncoderEngine), not generation.
MODEL_REGISTRY: dict[str, type[torch.nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "Phi3ForCausalLM": LlamaForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
    "Qwen3MoeForCausalLM": Qwen3MoeForCausalLM,
    "MixtralForCausalLM": MixtralForCausalLM,
    "Olmo2ForCausalLM": Olmo2ForCausalLM,
    "GraniteForCausalLM": GraniteForCausalLM,
    "OPTForCausalLM": OPTForCausalLM,
    "Gemma2ForCausalLM": Gemma2ForCausalLM,
    "Gemma3ForCausalLM": Gemma3ForCausalLM,
    "Gemma3ForConditionalGeneration": Gemma3ForConditionalGeneration,  # its text part only
    "BertModel": BertModel,
}
# configs converted from GGUF may lack `architectures`: model_type -> architecture
_MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM", "phi3": "Phi3ForCausalLM",
                "qwen3": "Qwen3ForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM", "mixtral": "MixtralForCausalLM",
                "olmo2": "Olmo2ForCausalLM", "granite": "GraniteForCausalLM", "opt": "OPTForCausalLM",
                "gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM"}


def get_model_class(hf_config: PretrainedConfig) -> type[torch.nn.Module]:
    architectures = getattr(hf_config, "architectures", None) or []
    for arch in architectures:
        if arch in MODEL_REGISTRY:
            return MODEL_REGISTRY[arch]
    if not architectures and hf_config.model_type in _MODEL_TYPES:
        return MODEL_REGISTRY[_MODEL_TYPES[hf_config.model_type]]
    raise UnsupportedModel(f"model architecture {architectures or '(none in config.json)'} is not supported; "
                           f"supported architectures: {', '.join(MODEL_REGISTRY)}")


__all__ = ["MODEL_REGISTRY", "BertModel", "LlamaForCausalLM", "get_model_class"]
