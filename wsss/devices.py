"""Where torch work runs: one rule for every stage (``device: auto|cpu|cuda``)."""

from __future__ import annotations

import torch

from wsss.errors import UserError


def resolve_device(device: str | torch.device) -> torch.device:
    """``auto`` picks CUDA when present; asking for CUDA without it is a user error. A
    `torch.device` is already resolved and comes back as is."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("runtime.device is 'cuda' but no CUDA device is available")
    return torch.device(device)
