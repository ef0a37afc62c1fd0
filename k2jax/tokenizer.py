"""K2's tokenizer: the LLaMA SentencePiece model plus 18 added special tokens (docs/k2.md).

Special tokens are split out of the text before SentencePiece sees it, as Hugging Face's
tokenizer does for added tokens. `</s>`, `<s>` and `<unk>` are split out the same way and map
to the model's own EOS/BOS/UNK ids: in LLaMA's model they are control pieces, which
SentencePiece would otherwise tokenize as the literal characters '<', '/', 's', '>'.
No BOS is added (K2's training data has none).
"""

from __future__ import annotations

import os
import re
from typing import Optional, Sequence

from etils import epath

from k2jax.errors import UserError

# In id order from the base id (32000 in K2): docs/k2.md (order confirmed by K2's tokenizer files).
K2_SPECIAL_TOKENS = (
    "<fim_prefix>", "<fim_middle>", "<fim_suffix>", "<fim_pad>", "<filename>", "<gh_stars>",
    "<issue_start>", "<issue_comment>", "<issue_closed>", "<jupyter_start>", "<jupyter_text>",
    "<jupyter_code>", "<jupyter_output>", "<empty_output>", "<commit_before>", "<commit_msg>",
    "<commit_after>", "<reponame>",
)
EOS_TEXT = "</s>"
# What a tokenizer directory may hold (a Hugging Face checkpoint's tokenizer files).
SENTENCEPIECE_FILE = "tokenizer.model"
TOKENIZER_FILES = (SENTENCEPIECE_FILE, "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "added_tokens.json")


def tokenizer_files(path: str | os.PathLike) -> list[str]:
    """The one rule for every `tokenizer` argument: a SentencePiece .model file, or a directory
    holding tokenizer files (TOKENIZER_FILES, e.g. a Hugging Face checkpoint). Returns the
    files found (a file: itself); UserError if the path does not exist or holds none."""
    root = epath.Path(path)  # local or gs://
    path = os.fspath(path)
    if root.is_file():
        return [path]
    if not root.is_dir():
        raise UserError(f"{path}: tokenizer not found (expected a SentencePiece .model file or a "
                        f"directory with {SENTENCEPIECE_FILE})")
    found = [os.fspath(root / name) for name in TOKENIZER_FILES if (root / name).is_file()]
    if not found:
        raise UserError(f"{path}: no tokenizer files in this directory (expected one of "
                        f"{', '.join(TOKENIZER_FILES)})")
    return found


def sentencepiece_file(path: str | os.PathLike) -> str:
    """The SentencePiece model of a `tokenizer` argument: the file itself, or a directory's
    tokenizer.model (UserError naming the path when there is none)."""
    files = tokenizer_files(path)
    if len(files) == 1 and files[0] == os.fspath(path):  # a .model file itself
        return files[0]
    model = os.fspath(epath.Path(path) / SENTENCEPIECE_FILE)
    if model not in files:
        raise UserError(f"{os.fspath(path)}: no {SENTENCEPIECE_FILE} in this directory "
                        "(a SentencePiece model is needed)")
    return model


class K2Tokenizer:
    """encode(text) -> list[int] ids (no BOS); decode(ids) -> text.

    `special_base_id`: id of the first added token; default the SentencePiece vocabulary size
    (32000 for LLaMA's model, K2's layout). `vocab_size` is the number of real tokens (32018 for
    K2); the model's embedding may be padded beyond it (K2's model.vocab_size).
    """

    def __init__(self, model_path: str | os.PathLike, special_base_id: Optional[int] = None,
                 special_tokens: Sequence[str] = K2_SPECIAL_TOKENS):
        import sentencepiece

        path = sentencepiece_file(model_path)  # a .model file or a directory holding one
        self.sp = sentencepiece.SentencePieceProcessor()
        try:
            self.sp.Load(path)
        except (OSError, RuntimeError) as err:
            raise UserError(f"{path}: not a SentencePiece model ({err})") from None
        self.sp_size = self.sp.GetPieceSize()
        self.special_base_id = self.sp_size if special_base_id is None else special_base_id
        if self.special_base_id < self.sp_size:
            raise UserError(f"special token base id {self.special_base_id} overlaps the "
                            f"SentencePiece vocabulary of {self.sp_size} pieces")
        self.eos_id = self.sp.eos_id()
        self.bos_id = self.sp.bos_id()
        self.token_to_id: dict[str, int] = {
            tok: self.special_base_id + i for i, tok in enumerate(special_tokens)}
        for text, piece_id in (("</s>", self.eos_id), ("<s>", self.bos_id),
                               ("<unk>", self.sp.unk_id())):
            if piece_id >= 0:
                self.token_to_id[text] = piece_id
        self.id_to_token = {i: t for t, i in self.token_to_id.items()}
        self.vocab_size = self.special_base_id + len(special_tokens)
        # Longest first, so a token that is a prefix of another never splits it.
        alternatives = sorted(self.token_to_id, key=len, reverse=True)
        self._split = re.compile("(" + "|".join(map(re.escape, alternatives)) + ")")

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`: special tokens split out first, each other span by SentencePiece."""
        ids: list[int] = []
        for i, span in enumerate(self._split.split(text)):
            if i % 2:  # re.split puts the captured separators at odd positions
                ids.append(self.token_to_id[span])
            elif span:
                ids.extend(self.sp.EncodeAsIds(span))
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`; runs of SentencePiece ids between special tokens decode as one span."""
        parts: list[str] = []
        run: list[int] = []
        for token in ids:
            token = int(token)
            if token in self.id_to_token:
                if run:
                    parts.append(self.sp.DecodeIds(run))
                    run = []
                parts.append(self.id_to_token[token])
            elif 0 <= token < self.sp_size:
                run.append(token)
            else:
                raise self._unknown_id(token)
        if run:
            parts.append(self.sp.DecodeIds(run))
        return "".join(parts)

    def _unknown_id(self, token: int) -> UserError:
        return UserError(f"token id {token} is outside the tokenizer's vocabulary (SentencePiece "
                         f"0..{self.sp_size - 1}, special {self.special_base_id}.."
                         f"{self.vocab_size - 1})")

    def decode_as_hf(self, ids: Sequence[int]) -> str:
        """Text of `ids` as K2's Hugging Face tokenizer decoded it (K2's FIM step relies on it).

        `LlamaTokenizerFast.decode(ids, skip_special_tokens=False)` of 2023 (huggyllama/llama-7b's
        tokenizer.json) runs ONE decoder chain over all tokens, special ones included as their
        text: '▁' -> ' ', runs of byte pieces -> UTF-8 (an invalid run -> one U+FFFD per byte),
        concatenation, then one leading space stripped from the whole string. Unlike `decode`,
        a space-prefixed piece after a special token keeps its space.
        """
        out: list[str] = []
        byte_run = bytearray()
        for token in ids:
            token = int(token)
            if 0 <= token < self.sp_size and self.sp.IsByte(token):
                byte_run.append(int(self.sp.IdToPiece(token)[3:5], 16))  # '<0xNN>'
                continue
            if byte_run:
                out.append(_bytes_or_replacement(bytes(byte_run)))
                byte_run.clear()
            if token in self.id_to_token:
                out.append(self.id_to_token[token])
            elif 0 <= token < self.sp_size:
                out.append(self.sp.IdToPiece(token).replace("\u2581", " "))
            else:
                raise self._unknown_id(token)
        if byte_run:
            out.append(_bytes_or_replacement(bytes(byte_run)))
        text = "".join(out)
        return text[1:] if text.startswith(" ") else text


def _bytes_or_replacement(data: bytes) -> str:
    """tokenizers' ByteFallback: valid UTF-8 decodes, otherwise one U+FFFD per byte."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return "\ufffd" * len(data)
