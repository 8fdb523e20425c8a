"""Where code runs and how reproducibly: device choice, seeds, full/default mode, progress bars."""
from __future__ import annotations

import os
import random

import numpy as np
import torch

__all__ = ["device", "seed_everything", "full_mode", "progress"]


def device(prefer: str | None = None) -> torch.device:
    """The device the book computes on: CUDA when present, else CPU.

    ``prefer`` ("cpu" or "cuda") or the environment variable ``TUTORIAL_MOE_DEVICE``
    overrides the choice, e.g. to time the CPU path on a GPU machine.
    """
    choice = prefer or os.environ.get("TUTORIAL_MOE_DEVICE")
    if choice is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice not in ("cpu", "cuda"):
        raise ValueError(f"device: prefer={choice!r} is not allowed; use 'cpu' or 'cuda'")
    if choice == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: prefer='cuda' but torch.cuda.is_available() is False; use 'cpu'")
    return torch.device(choice)


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch (CPU and CUDA); returns a torch.Generator seeded the same.

    On CPU the same seed gives bit-identical training runs in this package.
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed_everything: seed must be an int, got {type(seed).__name__} {seed!r}")
    if seed < 0:
        raise ValueError(f"seed_everything: seed={seed} is negative; use an int >= 0")
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def full_mode() -> bool:
    """True when ``TUTORIAL_MOE_FULL=1``: chapters switch to full-size data and training."""
    return os.environ.get("TUTORIAL_MOE_FULL", "0").strip().lower() in ("1", "true", "yes")


def progress(iterable=None, **kwargs):
    """A tqdm.auto progress bar (a notebook widget in Jupyter, text elsewhere).

    ``TUTORIAL_MOE_PROGRESS=0`` silences every bar (used by the test runner to keep logs short).
    """
    from tqdm.auto import tqdm

    if os.environ.get("TUTORIAL_MOE_PROGRESS", "1") == "0":
        kwargs["disable"] = True
    kwargs.setdefault("leave", False)
    kwargs.setdefault("mininterval", 0.5)
    return tqdm(iterable, **kwargs)
