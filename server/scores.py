"""Softmax scores of logits: the gateway's /v1 answers, and `resnet client`'s from the logits Triton's
classification extension gives, so that every path prints the same probabilities."""

from __future__ import annotations

import numpy as np

NAN_SCORES = (
    "the model's scores for it are NaN: its computation overflowed (past 65504 in an FP16 model, whose FP32 "
    "variant may classify it) or the model is broken"
)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Along the last axis, in the logits' own precision. A logit of +inf (an overflow) takes all the probability,
    shared with any other +inf in its row, as softmax does in the limit (before, inf - inf gave NaN scores, and the
    gateway a 500 writing them as JSON); a row with a NaN logit, or with only -inf, has NaN scores."""
    logits = np.asarray(logits)
    top = logits.max(axis=-1, keepdims=True)
    overflowed = np.isposinf(top)
    if overflowed.any():
        limit = np.where(np.isposinf(logits), 0, -np.inf).astype(logits.dtype)
        logits = np.where(overflowed, limit, logits)
        top = logits.max(axis=-1, keepdims=True)
    with np.errstate(invalid="ignore"):  # -inf - -inf: a row of only -inf
        probabilities = np.exp(logits - top)
        return probabilities / probabilities.sum(axis=-1, keepdims=True)


def unscored_rows(probabilities: np.ndarray) -> list[int]:
    """The rows whose scores are NaN."""
    return np.flatnonzero(np.isnan(probabilities).any(axis=-1)).tolist()
