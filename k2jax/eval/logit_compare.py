"""Agreement between two models' logits on the same rows, computed in float64 on the host.

All inputs are numpy: logits float32 [B, S, V], tokens int32 [B, S], loss_mask float32 [B, S].
Rows are processed one at a time so a K2 row (seq_len x vocab_size logits) costs ~0.5 GB in float64.
"""

from __future__ import annotations

import numpy as np


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def masked_loss(logits_BxSxV: np.ndarray, tokens_BxS: np.ndarray, loss_mask_BxS: np.ndarray
                ) -> tuple[float, float]:
    """K2's loss (sum over masked predictions, mask count): position i predicts token i + 1,
    the last position never counts."""
    total, count = 0.0, 0.0
    for b in range(tokens_BxS.shape[0]):
        logp = _log_softmax(logits_BxSxV[b].astype(np.float64))
        nll = -logp[np.arange(tokens_BxS.shape[1] - 1), tokens_BxS[b, 1:]]
        mask = loss_mask_BxS[b, :-1].astype(np.float64)
        total += float((nll * mask).sum())
        count += float(mask.sum())
    return total, count


def compare_logits(reference_BxSxV: np.ndarray, candidate_BxSxV: np.ndarray,
                   tokens_BxS: np.ndarray, loss_mask_BxS: np.ndarray) -> dict:
    """max |candidate - reference|, mean KL(reference || candidate) per position, top-1
    agreement (fraction of positions whose argmax agrees) and both losses."""
    if reference_BxSxV.shape != candidate_BxSxV.shape:
        raise ValueError(f"logit shapes differ: {reference_BxSxV.shape} vs "
                         f"{candidate_BxSxV.shape}")
    max_abs, kl_sum, agree, positions = 0.0, 0.0, 0, 0
    for b in range(reference_BxSxV.shape[0]):
        ref = reference_BxSxV[b].astype(np.float64)
        cand = candidate_BxSxV[b].astype(np.float64)
        max_abs = max(max_abs, float(np.abs(cand - ref).max()))
        logp_ref, logp_cand = _log_softmax(ref), _log_softmax(cand)
        kl_sum += float((np.exp(logp_ref) * (logp_ref - logp_cand)).sum())
        agree += int((ref.argmax(-1) == cand.argmax(-1)).sum())
        positions += ref.shape[0]
    ref_sum, count = masked_loss(reference_BxSxV, tokens_BxS, loss_mask_BxS)
    cand_sum, _ = masked_loss(candidate_BxSxV, tokens_BxS, loss_mask_BxS)
    return {"max_abs": max_abs, "mean_kl": kl_sum / positions, "top1_agreement": agree / positions,
            "loss_reference": ref_sum / count if count else float("nan"),
            "loss_candidate": cand_sum / count if count else float("nan"),
            "positions": positions, "tokens": int(count)}


def compare_hidden_states(reference: list[tuple[str, np.ndarray]],
                          candidate: list[np.ndarray]) -> list[dict]:
    """Per named stage: max abs difference and that relative to max |reference|."""
    rows = []
    for (name, ref), cand in zip(reference, candidate):
        ref64, cand64 = ref.astype(np.float64), np.asarray(cand, np.float64)
        diff = float(np.abs(cand64 - ref64).max())
        rows.append({"name": name, "max_abs": diff,
                     "relative": diff / max(float(np.abs(ref64).max()), 1e-30)})
    return rows
