"""Seed every random number generator a run touches, in one visible place."""

import random

import numpy as np
import torch


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch (all devices); return the generator that shuffles batches.

    The shuffling generator is separate from the global one, so anything else that draws random
    numbers (dropout, init) cannot change the order batches are seen in.
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)
