"""Random samples for the workers that need a few short sequences and nothing else."""

from __future__ import annotations

import random
from typing import List, Optional

from gspo_megatron.learner.batch import Sample


def random_samples(n: int, seed: int = 0, advantage: Optional[float] = None) -> List[Sample]:
    """``n`` samples of 3-8 prompt and 2-9 response tokens below 200 (the tiny models' vocabulary
    is 250); ``advantage``: one value for all, or uniform in [-1, 1] per sample when None."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        prompt = [rng.randrange(200) for _ in range(rng.randint(3, 8))]
        response = [rng.randrange(200) for _ in range(rng.randint(2, 9))]
        adv = rng.uniform(-1, 1) if advantage is None else advantage
        out.append(Sample(prompt, response, adv, None))
    return out
