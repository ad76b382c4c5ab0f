"""Top-k soft labels: what a `cache.logits: topk` store keeps, and the dense logits targets are built from.

A store keeps, per (sample, view), the k largest logits z_1..z_k, their classes, and lse = log sum_c exp(z_c)
over all C classes. That makes the softmax at T = 1 exact on the kept classes, p_i = exp(z_i - lse), and gives
the mass outside them exactly, m = 1 - sum_i p_i. `dense_logits` turns this back into C logits, so every method
reads a top-k store as it reads full logits:

- `spread` (the default; FKD's "marginal smoothing"): every other class gets the logit lse + log(m / (C - k)),
  so the softmax at T = 1 gives each kept class its exact p_i and each other class m / (C - k).
- `renormalize`: the other classes get a logit 30 below the smallest kept one (exp(-30) ~ 1e-13 of its mass), so
  the softmax is the kept classes' p_i / sum p_i.

Exact: the softmax at T = 1 on the kept classes (MEAL V2's and MEAL's targets at T = 1), the argmax. Approximate:
the shape of the leftover (spread flat over the other classes), the softmax at T != 1 (KD at T = 4 sees the
reconstructed logits, whose other classes are all equal), and any use of the raw logits beyond the kept ones
(MEAL's logit discriminator sees the reconstruction). The store's fp16 rounds z_i and lse at about 2^-11
relative, as it rounds full logits.
"""

from __future__ import annotations

import numpy as np

LEFTOVER = ("spread", "renormalize")
BELOW = 30.0  # renormalize: how far below the smallest kept logit the other classes sit
TINY = 1e-6  # the leftover mass never goes below this (fp16 rounding can make the kept mass exceed 1)


def dense_logits(values: np.ndarray, classes: np.ndarray, lse: np.ndarray, num_classes: int,
                 leftover: str = "spread") -> np.ndarray:
    """(n, k) top-k logits, (n, k) their classes, (n, 1) log-sum-exp -> (n, C) float32 logits (module doc)."""
    z = values.astype(np.float32)
    lse = lse.astype(np.float32)
    n, k = z.shape
    if leftover == "renormalize" or k >= num_classes:
        fill = z.min(axis=1, keepdims=True) - BELOW  # (n, 1)
    else:
        kept = np.exp(z - lse).sum(axis=1, keepdims=True)  # (n, 1) the kept classes' mass
        fill = lse + np.log(np.maximum(1.0 - kept, TINY) / (num_classes - k))  # (n, 1)
    out = np.broadcast_to(fill, (n, num_classes)).copy()  # (n, C)
    np.put_along_axis(out, classes.astype(np.int64), z, axis=1)
    return out
