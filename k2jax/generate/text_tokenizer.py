"""Text <-> token ids for generation and lm-eval: a SentencePiece model file (K2's tokenizer,
k2jax.tokenizer) or the Hugging Face tokenizer files of a checkpoint directory."""

from __future__ import annotations

import os
from typing import Optional, Sequence

from k2jax.errors import UserError
from k2jax.optional import require

HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


class TextTokenizer:
    """encode(text) -> ids (no BOS added), decode(ids) -> text; eos_id, bos_id (None when the
    tokenizer has none) and vocab_size (ids a model must be able to embed)."""

    def __init__(self, path: str):
        self.path = path
        if os.path.isdir(path) and any(os.path.isfile(os.path.join(path, name))
                                       for name in HF_TOKENIZER_FILES):
            transformers = require("transformers", f"tokenizer {path} (Hugging Face files)")
            try:
                self.hf = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
            except (OSError, ValueError) as err:
                raise UserError(f"tokenizer {path}: not a readable Hugging Face tokenizer "
                                f"({str(err).splitlines()[0]})") from None
            self.sp = None
            self.eos_id: Optional[int] = self.hf.eos_token_id
            self.bos_id: Optional[int] = self.hf.bos_token_id
            self.vocab_size = len(self.hf)
            return
        from k2jax.tokenizer import K2Tokenizer

        # A .model file or a directory with tokenizer.model (k2jax.tokenizer's one rule).
        self.hf, self.sp = None, K2Tokenizer(path)
        self.eos_id = self.sp.eos_id if self.sp.eos_id >= 0 else None
        self.bos_id = self.sp.bos_id if self.sp.bos_id >= 0 else None
        self.vocab_size = self.sp.vocab_size

    def encode(self, text: str) -> list[int]:
        if self.hf is not None:
            return self.hf.encode(text, add_special_tokens=False)
        return self.sp.encode(text)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        if self.hf is not None:
            return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)
        if skip_special_tokens:
            ids = [i for i in ids if i not in (self.eos_id, self.bos_id)]
        return self.sp.decode(ids)

    def check_fits(self, model_vocab: int) -> None:
        if self.vocab_size > model_vocab:
            raise UserError(f"tokenizer {self.path}: {self.vocab_size} tokens do not fit the "
                            f"model's vocabulary of {model_vocab} (model.vocab_size)")
