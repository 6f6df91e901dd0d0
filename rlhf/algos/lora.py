"""LoRA for PPO (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models"), with peft.

Each adapted linear layer computes ``W x + (alpha / r) * B A x`` with W frozen and only the
low-rank A (r x in) and B (out x r, zero at the start) trained, so the policy starts exactly at
the base model. The base is also the KL reference rho of seed 002: :class:`AdapterOffReference`
runs the same module with the adapters switched off, so rho costs no second copy of the weights.
"""

from __future__ import annotations

import copy
import inspect

import torch.nn as nn

# the linear layers of a Llama/Mistral/Qwen block, and of a GPT-2 block (peft knows its Conv1D)
_LLAMA = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_GPT2 = ("c_attn", "c_proj", "c_fc")


def default_targets(model: nn.Module) -> list[str]:
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    found = [t for t in (*_LLAMA, *_GPT2) if t in names]
    if not found:
        raise ValueError(f"no known linear layers to adapt in {type(model).__name__}; set lora_target_modules")
    return found


def add_lora(model: nn.Module, rank: int, alpha: float, targets: tuple[str, ...] | list[str] = ()):
    """``model`` wrapped by peft with trainable LoRA adapters (no dropout: PPO needs deterministic
    log-probs); every other weight is frozen. The adapters are injected into ``model`` itself."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as e:  # pragma: no cover - depends on the extra
        from rlhf.errors import ConfigError

        raise ConfigError("finetune=lora needs the peft package (`pip install rlhf-platform[smollm2]`)") from e
    if rank < 1:
        raise ValueError(f"lora_rank must be >= 1, got {rank}")
    targets = list(targets) or default_targets(model)
    # GPT-2's Conv1D stores its weight as (in, out)
    conv1d = any(type(m).__name__ == "Conv1D" for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in targets)
    cfg = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, bias="none", target_modules=targets,
                     fan_in_fan_out=conv1d, task_type="CAUSAL_LM")
    return get_peft_model(model, cfg)


def is_lora(model) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "merge_and_unload")


def merged(model) -> nn.Module:
    """A plain Hugging Face model with the adapters folded into its weights (for saving and
    serving); a model without adapters is returned as it is. The LoRA model is consumed."""
    return model.merge_and_unload() if is_lora(model) else model


def merged_copy(model) -> nn.Module:
    """A plain Hugging Face model with the adapters folded in, leaving ``model`` training on
    (a copy of the weights); a model without adapters is returned as it is."""
    return copy.deepcopy(model).merge_and_unload() if is_lora(model) else model


class AdapterOffReference:
    """rho for a LoRA policy: the policy's own module with its adapters disabled.

    Called like a model (keyword arguments). ``eval`` and ``requires_grad_`` leave the policy
    alone: the base weights are frozen by peft already, and the trainer sets the mode."""

    def __init__(self, policy):
        if not is_lora(policy):
            raise ValueError("AdapterOffReference needs a model with LoRA adapters")
        self.policy = policy
        base = policy.get_base_model()
        self._keeps_logits = "logits_to_keep" in inspect.signature(base.forward).parameters
        self.config = base.config

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, logits_to_keep=0, **kw):
        if self._keeps_logits:
            kw["logits_to_keep"] = logits_to_keep
        with self.policy.disable_adapter():
            return self.policy(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kw)

    __call__ = forward

    def modules(self):
        """The policy's modules (what ``rlhf.models.disable_dropout`` walks): the reference is that
        module, so dropout is off in one when it is off in the other."""
        return self.policy.modules()

    def eval(self):
        return self

    def requires_grad_(self, flag: bool = True):  # noqa: ARG002 - the base stays frozen
        return self
