"""Helpers for the data tests: tiny K2-format chunk files and a plain-Python reference reader."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np

SEQ_LEN = 8
VOCAB = 32032


def row_tokens(chunk_id: int, line: int, seq_len: int = SEQ_LEN) -> list[int]:
    """Distinct, recognisable content per (chunk, line): [chunk, line, then a mix]."""
    return [chunk_id, line] + [(chunk_id * 131 + line * 17 + j * 7) % 997
                               for j in range(seq_len - 2)]


def write_chunk(directory: Path, chunk_id: int, num_lines: int, seq_len: int = SEQ_LEN,
                masked_lines: tuple[int, ...] = ()) -> Path:
    """chunk_{id}.jsonl with `num_lines` rows; lines in `masked_lines` carry a tgt_mask."""
    path = Path(directory) / f"chunk_{chunk_id}.jsonl"
    with open(path, "w") as f:
        for line in range(num_lines):
            obj = {"token_ids": row_tokens(chunk_id, line, seq_len), "source": "test",
                   "subset_name": "s", "src_filename": "f", "line_idx_in_src": line}
            if line in masked_lines:
                obj["tgt_mask"] = [(j + line) % 2 for j in range(seq_len)]
            f.write(json.dumps(obj) + "\n")
    return path


def reference_rows(directory: Path, chunk_order: list[int], use_tgt_mask: bool = True
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Every line of every file in order-list order, read the obvious way.

    Returns tokens int32 [N, S] and K2's loss mask float32 [N, S] (position i weighs target
    i + 1 by tgt_mask[i + 1] if `use_tgt_mask`, else 1; the last position is 0).
    """
    tokens, masks = [], []
    for chunk_id in chunk_order:
        with open(Path(directory) / f"chunk_{chunk_id}.jsonl") as f:
            for line in f:
                obj = json.loads(line)
                ids = obj["token_ids"]
                tgt: Optional[list] = obj.get("tgt_mask") if use_tgt_mask else None
                mask = [float(tgt[i + 1]) if tgt else 1.0 for i in range(len(ids) - 1)] + [0.0]
                tokens.append(ids)
                masks.append(mask)
    return np.asarray(tokens, np.int32), np.asarray(masks, np.float32)


def k2_stage1_line_counts(chunk_id: int) -> int:
    """Small, uneven line counts so step boundaries fall inside chunks."""
    return 2 + (chunk_id * 7) % 5
