"""Data: row sources (synthetic, K2 chunk files), the global row order, per-step batches."""
