"""Faster dropout for training on CPUs.

PyTorch draws CPU dropout masks with `bernoulli_`, one random number per element: on the 2-core
machines here that was 27% of a MiniLM training step (MRPC and WikiText-2 batches, bf16). Here each
64-bit random integer gives four 16-bit draws, and an element is kept when its draw is at least
p * 65536 (p rounded to 1/65536; the kept values are scaled by 1 / (1 - that p), so the expectation
is exact). Masks come from torch's global generator, so seeding (and our per-step reseeding, which
makes resumes exact) works as before; they differ from torch.nn.Dropout's masks for the same seed.

`install(model)` swaps every nn.Dropout for `FastDropout` and routes attention through
`attention_forward`, which does the attention-probability dropout the same way (PyTorch's SDPA
falls back to its math kernel with bernoulli when dropout is on) and calls transformers' own SDPA
whenever there is no dropout (evaluation). `uninstall(model)` restores the model's attention setting
before it is saved, so nothing of this reaches config.json.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

NAME = "sdpa_fast_dropout"
_RESOLUTION = 1 << 16


def keep_mask(shape, p: float, device) -> tuple[torch.Tensor, float]:
    """(boolean mask of kept elements, scale) for dropout probability p."""
    numel = 1
    for s in shape:
        numel *= s
    words = torch.randint(-(1 << 63), (1 << 63) - 1, ((numel + 3) // 4,), dtype=torch.int64, device=device)
    draws = words.view(torch.int16)[:numel].view(shape)
    dropped = round(p * _RESOLUTION)
    return draws >= dropped - (_RESOLUTION >> 1), _RESOLUTION / (_RESOLUTION - dropped)


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    if not training or p == 0:
        return x
    if p >= 1:
        return torch.zeros_like(x)
    keep, scale = keep_mask(x.shape, p, x.device)
    # one multiply by a mask already scaled and in x's dtype (autograd keeps it for the backward)
    return x * keep.to(x.dtype).mul_(scale)


class FastDropout(nn.Dropout):
    """nn.Dropout with the mask drawn as above (a subclass, so isinstance checks still hold)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)


def attention_forward(module, query, key, value, attention_mask: Optional[torch.Tensor], dropout: float = 0.0,
                      scaling: Optional[float] = None, **kwargs):
    """transformers attention interface: SDPA without dropout, else softmax(QK^T) with fast dropout."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if dropout == 0 or not module.training or kwargs.get("is_causal") or getattr(module, "is_causal", False):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    scaling = query.size(-1) ** -0.5 if scaling is None else scaling
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:  # SDPA-style: True = attend
            scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + attention_mask.to(scores.dtype)
    # In the scores' dtype, like SDPA's math kernel (PyTorch's CPU softmax accumulates in fp32 inside);
    # under autocast a plain softmax would round-trip the (batch, heads, length, length) tensor via fp32.
    with torch.autocast(query.device.type, enabled=False):
        probs = torch.softmax(scores, dim=-1)
    probs = globals()["dropout"](probs, dropout, True)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), None


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    if NAME not in AttentionInterface._global_mapping:
        AttentionInterface.register(NAME, attention_forward)
        AttentionMaskInterface.register(NAME, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


def install(model) -> dict:
    """Use fast dropout in `model` (in place). Returns what `uninstall` needs."""
    swapped = 0
    for parent in model.modules():
        for name, child in list(parent.named_children()):
            if type(child) is nn.Dropout:
                setattr(parent, name, FastDropout(child.p, child.inplace).train(child.training))
                swapped += 1
    config = getattr(model, "config", None)
    previous = getattr(config, "_attn_implementation", None)
    attention = previous == "sdpa"
    if attention:
        _register()
        _set_attention(model, NAME)
    return {"dropout_modules": swapped, "attention": attention, "previous": previous}


def uninstall(model, installed: dict) -> None:
    """Put the model's own attention setting back (before saving; the dropout modules can stay)."""
    if installed.get("attention"):
        _set_attention(model, installed["previous"])


def _set_attention(model, name: str) -> None:
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_attn_implementation"):
            config._attn_implementation = name
