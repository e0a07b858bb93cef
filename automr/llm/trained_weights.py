"""The weights a fine-tuning recipe trains: capture, save, load, restore (one home for both recipes).

Why it exists: `finetune --recipe lora` trains LoRA adapters (saved as a peft adapter folder,
`adapter/`); `--recipe full` trains every parameter (saved as a Hugging Face checkpoint folder,
`model/`: config.json + model.safetensors, loadable by `AutoModelForCausalLM.from_pretrained`).
The loop, checkpoints and `load_finetuned` call these functions and never ask which recipe it is.

Full weights are the model's `named_parameters()`, which lists a tied parameter once (SmolLM2
ties lm_head to the input embedding): the same keys `save_pretrained` writes. Nothing here
is a pickle: safetensors and JSON only.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from automr.errors import UserError

if TYPE_CHECKING:  # pragma: no cover
    import torch

Recipe = Literal["lora", "full"]

# Where each recipe's weights live inside a finetune output (and its checkpoint/ folder).
WEIGHTS_DIR: dict[str, str] = {"lora": "adapter", "full": "model"}
# The files that make a weights folder complete.
WEIGHTS_FILES: dict[str, tuple[str, ...]] = {
    "lora": ("adapter_config.json", "adapter_model.safetensors"),
    "full": ("config.json", "model.safetensors"),
}
_TENSORS = {"lora": "adapter_model.safetensors", "full": "model.safetensors"}

# `--target-modules all-linear`: every linear layer of a Llama-family decoder block.
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def expand_target_modules(names: list[str]) -> list[str]:
    """`all-linear` (alone or among other names) stands for ALL_LINEAR."""
    out: list[str] = []
    for n in names:
        for m in ALL_LINEAR if n == "all-linear" else (n,):
            if m not in out:
                out.append(m)
    return out


def tensors_file(folder: Path, recipe: str) -> Path:
    """The safetensors file of a weights folder (what `load_finetuned` digests into the model's name)."""
    return Path(folder) / _TENSORS[recipe]


def weights_complete(folder: Path, recipe: str) -> bool:
    return all((Path(folder) / f).is_file() for f in WEIGHTS_FILES[recipe])


def trained_state(model: Any, recipe: str) -> dict[str, "torch.Tensor"]:
    """The trained weights, copied to CPU (for the best-so-far and checkpoints)."""
    if recipe == "lora":
        from peft import get_peft_model_state_dict

        state = get_peft_model_state_dict(model)
    else:
        state = dict(model.named_parameters())  # a tied parameter once, under its first name
    return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}


def save_weights(model: Any, weights: dict[str, "torch.Tensor"], folder: Path, recipe: str) -> None:
    """Write `weights` as a peft adapter folder (lora) or a Hugging Face checkpoint folder (full)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if recipe == "lora":
        model.peft_config["default"].save_pretrained(str(folder))
    else:
        model.config.save_pretrained(str(folder))
    tensors = {k: v.contiguous() for k, v in weights.items()}
    save_file(tensors, str(tensors_file(folder, recipe)), metadata={"format": "pt"})


def load_weights(folder: Path, recipe: str) -> dict[str, "torch.Tensor"]:
    from safetensors.torch import load_file

    return load_file(str(tensors_file(folder, recipe)))


def restore_weights(model: Any, weights: dict[str, "torch.Tensor"], recipe: str) -> None:
    """Put saved weights back into `model` (the LoRA-wrapped model, or the plain one for full)."""
    import torch

    if recipe == "lora":
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, weights)
        return
    params = dict(model.named_parameters())
    if set(params) != set(weights):
        missing, extra = sorted(set(params) - set(weights)), sorted(set(weights) - set(params))
        raise UserError(
            f"full fine-tuning weights do not fit the model: missing {missing[:5]}, unexpected {extra[:5]}; "
            "they were trained on another base model (see the output's config.yaml)."
        )
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(weights[name])
