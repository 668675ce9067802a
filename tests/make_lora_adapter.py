"""Write a random PEFT LoRA adapter for the bundled SmolLM2 (rank 8 on q/v/o and the MLP, B != 0 so it changes the
output) into the directory given: `python tests/make_lora_adapter.py OUT_DIR`. The client suites run this to get an
adapter without any download; the Python tests import `make_adapter`."""

from __future__ import annotations

import sys
from pathlib import Path


def make_adapter(out: Path, seed: int = 0) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from lmport.engine.loader import resolve_model

    if (out / "adapter_model.safetensors").is_file():
        return out
    base = AutoModelForCausalLM.from_pretrained(resolve_model("smollm2"), dtype=torch.float32)
    torch.manual_seed(seed)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, init_lora_weights=False,
                                            target_modules=["q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)  # strong enough to change greedy text within a few tokens
    model.save_pretrained(out)
    return out


if __name__ == "__main__":
    print(make_adapter(Path(sys.argv[1])))
