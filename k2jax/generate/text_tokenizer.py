"""Text <-> token ids for generation and lm-eval: a SentencePiece model file (K2's tokenizer,
k2jax.tokenizer) or the Hugging Face tokenizer files of a checkpoint directory."""

from __future__ import annotations

import os
from typing import Optional, Sequence

from k2jax.errors import UserError
from k2jax.optional import require
from k2jax.storage import remote

HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
# What a tokenizer directory on gs:// is copied without: the weights beside it.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".msgpack", ".h5")


class TextTokenizer:
    """encode(text) -> ids (no BOS added), decode(ids) -> text; eos_id, bos_id (None when the
    tokenizer has none) and vocab_size (ids a model must be able to embed)."""

    def __init__(self, path: str):
        self.path = path
        local = remote.local_copy(path, WEIGHT_SUFFIXES)  # transformers/SentencePiece: local only
        if os.path.isdir(local) and any(os.path.isfile(os.path.join(local, name))
                                        for name in HF_TOKENIZER_FILES):
            transformers = require("transformers", f"tokenizer {path} (Hugging Face files)")
            try:
                self.hf = transformers.AutoTokenizer.from_pretrained(local, local_files_only=True)
            except (OSError, ValueError) as err:
                raise UserError(f"tokenizer {path}: not a readable Hugging Face tokenizer "
                                f"({str(err).splitlines()[0]})") from None
            self.sp = None
            self.eos_id: Optional[int] = self.hf.eos_token_id
            self.bos_id: Optional[int] = self.hf.bos_token_id
            self.vocab_size = len(self.hf)
            return
        from k2jax.tokenizer import K2Tokenizer, sentencepiece_file

        # A .model file or a directory with tokenizer.model (k2jax.tokenizer's one rule),
        # checked where it is (its errors name `path`), loaded from the local copy.
        sentencepiece_file(path)
        self.hf, self.sp = None, K2Tokenizer(local)
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
