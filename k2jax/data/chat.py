"""Chat fine-tuning data: conversations -> packed K2-format rows with a loss mask and documents.

Input: jsonl files, one conversation per line, `{"messages": [{"role": "user" | "assistant" |
"system", "content": "..."}, ...]}` (the common format), at least one assistant turn.

Rendering (`data.chat`, K2-Chat's markers in configs/k2-chat.yaml): each turn is its role's
marker then its content; an assistant turn also ends with `assistant_end` (`</s>`, so the model
learns to stop). A system message without a marker (`system_marker: null`) is its plain
content. Markers are tokenizer special tokens (ids after K2's 18 added tokens, in the order
user, assistant, system); each piece is tokenized on its own, so a target mask is exact at
piece boundaries. Loss is on assistant content and `assistant_end` only (`tgt_mask` 1), never
on markers, prompts or system text.

Packing: conversations fill rows of `data.seq_len` tokens in input order; one that does not
fit in the rest of a row starts the next (the rest is padding: token `pad_id`, mask 0).
`chunk_{i}.segments.npy` (k2jax/data/segments.py) gives each token's document number in its
row (1, 2, ...; 0 padding): with `data.reset_attention_mask` / `data.reset_position_ids` the
documents do not attend to each other and restart their positions. Each conversation starts
with a marker or prompt text (mask 0), so no loss ever crosses a document boundary.

A conversation longer than seq_len: `data.chat.overlong` drop (counted) or truncate (its first
seq_len tokens, counted; dropped if no target token is left). Bad input (malformed JSON, no
assistant turn, an unknown role, a `<|...|>` marker inside content) stops with one line naming
file:line.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Iterator, Sequence

import numpy as np
from etils import epath

from k2jax.atomic_write import write_bytes_atomic, write_json_atomic
from k2jax.config import ChatConfig
from k2jax.data import chunk_files
from k2jax.data.segments import write_segments
from k2jax.errors import UserError
from k2jax.tokenizer import K2_SPECIAL_TOKENS, K2Tokenizer

ROLES = ("user", "assistant", "system")
# What a chat marker looks like (K2-Chat's `<|beginofuser|>`, ChatML's `<|im_start|>`): such a
# string inside content would be read as a turn boundary by whoever renders the text again.
MARKER_PATTERN = re.compile(r"<\|[^<>|\s]{1,64}\|>")


@dataclasses.dataclass
class Rendered:
    """One conversation: token ids and target flags (1: a loss is taken on this token)."""

    tokens: list[int]
    targets: list[int]


def chat_tokenizer(model_path: str | os.PathLike, chat: ChatConfig,
                   special_base_id: int | None = None) -> K2Tokenizer:
    """K2's tokenizer with the chat markers added as special tokens after K2's 18."""
    extra = [m for m in chat.markers().values()
             if m not in K2_SPECIAL_TOKENS and m not in ("</s>", "<s>", "<unk>")]
    return K2Tokenizer(model_path, special_base_id, tuple(K2_SPECIAL_TOKENS) + tuple(extra))


def read_conversations(path: epath.Path) -> Iterator[tuple[int, list[dict]]]:
    """(1-based line number, messages) of each non-blank line, validated (module docstring)."""
    with path.open("r") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise UserError(f"{where}: malformed JSON ({err.msg})") from None
            messages = obj.get("messages") if isinstance(obj, dict) else None
            if not isinstance(messages, list) or not messages:
                raise UserError(f"{where}: expected a JSON object with a non-empty 'messages' "
                                f"list of {{'role', 'content'}}")
            for i, message in enumerate(messages):
                if not isinstance(message, dict) or not isinstance(message.get("content"), str):
                    raise UserError(f"{where}: message {i} needs a string 'content'")
                if message.get("role") not in ROLES:
                    raise UserError(f"{where}: message {i} has role {message.get('role')!r}; "
                                    f"expected one of {', '.join(ROLES)}")
            if not any(m["role"] == "assistant" for m in messages):
                raise UserError(f"{where}: no assistant turn (nothing to learn from)")
            yield number, messages


def render(messages: Sequence[dict], chat: ChatConfig, tokenizer: K2Tokenizer,
           where: str) -> Rendered:
    """The tokens and target flags of one validated conversation."""
    markers = chat.markers()
    out = Rendered([], [])

    def add(text: str, target: int) -> None:
        ids = tokenizer.encode(text)
        out.tokens.extend(ids)
        out.targets.extend([target] * len(ids))

    for i, message in enumerate(messages):
        role, content = message["role"], message["content"]
        found = MARKER_PATTERN.search(content)
        if found:
            raise UserError(f"{where}: message {i} ({role}) contains the marker "
                            f"{found.group()!r} (unknown or a turn marker; content must not "
                            f"hold chat markers)")
        if role in markers:
            add(markers[role], 0)
        if role == "assistant":
            add(content + chat.assistant_end, 1)
        else:
            add(content, 0)
    return out


@dataclasses.dataclass
class PackedRows:
    """tokens int32 [R, S], tgt_mask uint8 [R, S], segment_ids uint16 [R, S] (module doc)."""

    tokens: np.ndarray
    tgt_mask: np.ndarray
    segment_ids: np.ndarray
    conversations: int = 0
    dropped: int = 0
    truncated: int = 0


def pack(conversations: Sequence[Rendered], seq_len: int, overlong: str = "drop",
         pad_id: int = 0) -> PackedRows:
    """Conversations into rows in order (module docstring)."""
    rows: list[list[tuple[Rendered, int]]] = []  # per row: (conversation, its length)
    free = 0
    dropped = truncated = 0
    for conv in conversations:
        length = len(conv.tokens)
        if length > seq_len:
            if overlong == "drop" or not any(conv.targets[:seq_len]):
                dropped += 1
                continue
            truncated += 1
            length = seq_len
        if length > free:
            rows.append([])
            free = seq_len
        rows[-1].append((conv, length))
        free -= length
    tokens = np.full((len(rows), seq_len), pad_id, np.int32)
    tgt_mask = np.zeros((len(rows), seq_len), np.uint8)
    segment_ids = np.zeros((len(rows), seq_len), np.uint16)
    for r, row in enumerate(rows):
        at = 0
        for document, (conv, length) in enumerate(row, start=1):
            tokens[r, at:at + length] = conv.tokens[:length]
            tgt_mask[r, at:at + length] = conv.targets[:length]
            segment_ids[r, at:at + length] = document
            at += length
    return PackedRows(tokens, tgt_mask, segment_ids, sum(len(r) for r in rows), dropped,
                      truncated)


def prepare_chat(tokenizer: K2Tokenizer, inputs: Sequence[str | os.PathLike],
                 out_dir: str | os.PathLike, chat: ChatConfig, seq_len: int,
                 vocab_size: int, num_chunks: int = 1, pad_id: int = 0) -> dict:
    """Render, pack and write `chunk_{0..num_chunks-1}.jsonl` (K2's row format plus
    `tgt_mask`), their `.segments.npy` and `prepare-chat.json` (the summary, also returned)."""
    if num_chunks < 1:
        raise UserError(f"num_chunks must be >= 1, got {num_chunks}")
    if seq_len >= np.iinfo(np.uint16).max:
        raise UserError(f"data.seq_len {seq_len}: segment ids are uint16, rows must be shorter "
                        f"than 65535 tokens")
    if tokenizer.vocab_size > vocab_size:
        raise UserError(f"the tokenizer with the chat markers has {tokenizer.vocab_size} ids, "
                        f"more than model.vocab_size={vocab_size}")
    out = epath.Path(out_dir)
    if out.exists() and chunk_files.find_chunk_ids(out):
        raise UserError(f"{out}: already holds chunk files; give an empty or new out_dir")
    rendered = []
    for item in inputs:
        path = epath.Path(item)
        if not path.is_file():
            raise UserError(f"{path}: input file not found")
        rendered += [render(messages, chat, tokenizer, f"{path}:{number}")
                     for number, messages in read_conversations(path)]
    packed = pack(rendered, seq_len, chat.overlong, pad_id)
    if not len(packed.tokens):
        raise UserError(f"no conversation fits data.seq_len={seq_len} ({packed.dropped} "
                        f"dropped as longer; data.chat.overlong=truncate keeps their start)")
    if len(packed.tokens) < num_chunks:  # an empty chunk file would be written silently
        raise UserError(f"the conversations pack into {len(packed.tokens)} rows of "
                        f"data.seq_len={seq_len}, fewer than num_chunks ({num_chunks}; every "
                        f"chunk file needs a row): give num_chunks <= {len(packed.tokens)}")
    out.mkdir(parents=True, exist_ok=True)
    bounds = np.linspace(0, len(packed.tokens), num_chunks + 1).astype(int)
    rows_per_chunk = []
    for chunk, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        lines = "".join(json.dumps({"token_ids": packed.tokens[r].tolist(),
                                    "tgt_mask": packed.tgt_mask[r].tolist(), "source": "chat",
                                    "subset_name": "chat"}) + "\n" for r in range(lo, hi))
        write_bytes_atomic(chunk_files.jsonl_path(out, chunk), lines.encode())
        write_segments(out, chunk, packed.segment_ids[lo:hi])
        rows_per_chunk.append(int(hi - lo))
    summary = {"seq_len": seq_len, "num_chunks": num_chunks, "rows": len(packed.tokens),
               "rows_per_chunk": rows_per_chunk, "conversations": packed.conversations,
               "dropped_overlong": packed.dropped, "truncated_overlong": packed.truncated,
               "target_tokens": int(packed.tgt_mask.sum()),
               "tokens": int((packed.segment_ids > 0).sum()),
               "chat": dataclasses.asdict(chat),
               "marker_ids": {m: tokenizer.encode(m) for m in chat.markers().values()},
               "inputs": [os.fspath(p) for p in inputs]}
    write_json_atomic(out / "prepare-chat.json", summary)
    return summary
