"""A synthetic row source with learnable structure, a pure function of (seed, row).

Each row is an arithmetic progression modulo a small alphabet, with a row-specific start and
stride: a model that reads the context can predict every token after the second, so the loss
falls visibly within a few hundred steps of the tiny config. Its chunks (what a rollback by
chunk moves) are consecutive windows of `chunk_rows` rows (data.synthetic_chunk_rows), with no
file behind them.
"""

from __future__ import annotations

import numpy as np

from k2jax.data.source import RowPlaces, shifted_loss_mask

ALPHABET_OFFSET = 3  # keep clear of pad/bos/eos ids 0..2


class SyntheticSource:
    num_rows = None

    def __init__(self, vocab_size: int, seq_len: int, seed: int, alphabet: int = 64,
                 poison_rows: list[list[int]] = (), poison_kind: str = "random",
                 chunk_rows: int = 1_000_000):
        self.seq_len = seq_len
        self.chunk_rows = chunk_rows
        self.seed = seed
        self.vocab_size = vocab_size
        self.alphabet = max(2, min(alphabet, vocab_size - ALPHABET_OFFSET))
        self.poison_rows = [tuple(w) for w in poison_rows]
        self.poison_kind = poison_kind

    def _poisoned(self, row: int) -> bool:
        return any(start <= row < start + count for start, count in self.poison_rows)

    def read_rows(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        rows = np.asarray(rows, np.int64)
        tokens = np.empty((len(rows), self.seq_len), np.int32)
        positions = np.arange(self.seq_len, dtype=np.int64)
        for i, row in enumerate(rows):
            rng = np.random.default_rng([self.seed, int(row)])
            start, stride = rng.integers(0, self.alphabet, size=2)
            stride = 1 + stride % 7
            tokens[i] = ALPHABET_OFFSET + (start + stride * positions) % self.alphabet
        mask = shifted_loss_mask(len(rows), self.seq_len)
        for i, row in enumerate(rows):
            if self._poisoned(int(row)):
                if self.poison_kind == "random":
                    rng = np.random.default_rng([self.seed, int(row), 1])
                    tokens[i] = rng.integers(0, self.vocab_size, self.seq_len)
                else:
                    mask[i, 0] = np.nan
        return tokens, mask

    def locate(self, rows: np.ndarray) -> RowPlaces:
        rows = np.asarray(rows, np.int64)
        chunk = rows // self.chunk_rows
        start = chunk * self.chunk_rows
        return RowPlaces(position=chunk, chunk_id=chunk, line=rows - start, chunk_start=start,
                         chunk_end=start + self.chunk_rows)

    def chunk_file(self, chunk_id: int) -> None:
        return None
