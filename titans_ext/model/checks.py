"""Argument checks of the model API: each error names the argument and says what was expected."""

import numbers

import torch

from ..ops.checks import value_checks_enabled


def check_positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int >= 1, got {value!r}")
    if value < 1:
        raise ValueError(f"{name}: expected an int >= 1, got {value}")


def check_nonnegative_int(name, value):
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int >= 0, got {value!r}")
    if value < 0:
        raise ValueError(f"{name}: expected an int >= 0, got {value}")


def check_positive_number(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a number > 0, got {value!r}")
    if not value > 0:
        raise ValueError(f"{name}: expected a number > 0, got {value}")


def check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"{name}: expected one of {choices}, got {value!r}")


def check_input(name, x, dim):
    """``x`` must be a float tensor ``[B, T, dim]``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor [B, T, {dim}], got {type(x).__name__}")
    if x.dim() != 3 or x.shape[-1] != dim:
        raise ValueError(f"{name}: expected shape [B, T, dim] with dim={dim}, got {list(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got {x.dtype}")


def check_tokens(name, tokens, vocab_size):
    """``tokens`` must be an integer tensor ``[B, T]``; its ids are checked against the vocabulary
    where value checks run (:func:`titans_ext.ops.checks.value_checks_enabled`: by default on CPU,
    not on a GPU, where reading them would be a host sync)."""
    if not isinstance(tokens, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor of token ids [B, T], got {type(tokens).__name__}")
    if tokens.dim() != 2:
        raise ValueError(f"{name}: expected shape [B, T], got {list(tokens.shape)}")
    if tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
        raise TypeError(f"{name}: expected integer token ids, got {tokens.dtype}")
    if tokens.numel() and value_checks_enabled(tokens.device):
        low, high = torch.stack([tokens.min(), tokens.max()]).tolist()
        if low < 0 or high >= vocab_size:
            raise ValueError(f"{name}: token ids must lie in [0, {vocab_size}), got values in [{low}, {high}]")


def check_unit_interval(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a number in [0, 1], got {value!r}")
    if not 0 <= value <= 1:
        raise ValueError(f"{name}: expected a number in [0, 1], got {value}")
