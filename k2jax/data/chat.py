"""Chat fine-tuning data: conversations -> packed K2-format rows with a loss mask and documents.

Input: jsonl files, one conversation per line, `{"messages": [{"role": "user" | "assistant" |
"system", "content": "..."}, ...]}` (the common format), at least one assistant turn.

Rendering follows the declared template `data.chat` (k2jax/config.py ChatConfig; K2-Chat's in
configs/k2-chat.yaml, after LLM360's K2 chat-tokenization script, docs/data.md): an optional
system prompt (first message only) between `system_marker` and `system_end`, user turns after
`user_marker`, assistant turns after `assistant_marker` and ended by `assistant_end` (`</s>`,
so the model learns to stop), then `end_of_chat`. Loss (`tgt_mask` 1) goes to assistant content
and its `assistant_end` only: every assistant turn, or the last one (`trained_turns: final`,
LLM360's script: earlier replies are context). Markers are single tokens whose ids come from
the tokenizer's added tokens (`chat_tokenizer`). Content is data, never structure: it is
tokenized by SentencePiece alone, so `<s>`, `</s>` or K2's FIM tokens written in a reply stay
text (an EOS id mid-answer would teach the model to stop early), and a `<|...|>` marker inside
content is refused (whoever renders the text again would read a turn boundary).

Packing: conversations fill rows of `data.seq_len` tokens in input order; one that does not
fit in the rest of a row starts the next (the rest is padding: token `pad_id`, mask 0).
`chunk_{i}.segments.npy` (k2jax/data/segments.py) gives each token's document number in its
row (1, 2, ...; 0 padding): with `data.reset_attention_mask` / `data.reset_position_ids` the
documents do not attend to each other and restart their positions. Each conversation starts
with a marker or prompt text (mask 0), so no loss ever crosses a document boundary.

A conversation longer than seq_len: `data.chat.overlong` drop (counted) or truncate (its first
seq_len tokens, counted; dropped if no target token is left). Bad input (malformed JSON, no
assistant turn, an empty assistant turn, a system message after the first, an unknown role, a
`<|...|>` marker inside content) stops with one line naming file:line.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Iterator, Optional, Sequence

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
CONTROL_TEXTS = ("</s>", "<s>", "<unk>")  # SentencePiece's own pieces, not added tokens
ADDED_TOKENS_FILE = "added_tokens.json"  # Hugging Face's layout, beside tokenizer.model


@dataclasses.dataclass
class Rendered:
    """One conversation: token ids and target flags (1: a loss is taken on this token)."""

    tokens: list[int]
    targets: list[int]


def read_added_tokens(path: Path) -> dict[str, int]:
    """{token text: id} of a Hugging Face `added_tokens.json`."""
    try:
        table = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"{path}: not a readable JSON object ({err.__class__.__name__})") from None
    if not isinstance(table, dict) or not all(isinstance(i, int) for i in table.values()):
        raise UserError(f"{path}: expected a JSON object of token text -> integer id")
    return table


def chat_tokenizer(model_path: str | os.PathLike, chat: ChatConfig,
                   special_base_id: int | None = None,
                   added_tokens: str | os.PathLike | None = None) -> K2Tokenizer:
    """K2's tokenizer with the template's markers as single tokens.

    The ids are the tokenizer's own: `added_tokens` (a Hugging Face `added_tokens.json`, by
    default the one beside the SentencePiece model, as K2-Chat's repository ships it); a marker
    it does not hold is refused, naming its data.chat key. Without such a file the markers are
    appended after K2's 18 added tokens in template order, and `marker_source` says so (the
    ids are then k2jax's, and a model trained on them needs the same assignment to serve)."""
    given = Path(added_tokens) if added_tokens is not None else None
    beside = Path(model_path).parent / ADDED_TOKENS_FILE
    path = given or (beside if beside.is_file() else None)
    texts = chat.special_texts()
    if path is None:
        extra = [t for t in dict.fromkeys(texts.values())
                 if t not in K2_SPECIAL_TOKENS and t not in CONTROL_TEXTS]
        tokenizer = K2Tokenizer(model_path, special_base_id,
                                tuple(K2_SPECIAL_TOKENS) + tuple(extra))
        tokenizer.marker_source = (f"appended after K2's added tokens by k2jax (no "
                                   f"{ADDED_TOKENS_FILE} beside the tokenizer)")
        return tokenizer
    table = read_added_tokens(path)
    for key, text in texts.items():
        if text not in table and text not in CONTROL_TEXTS:
            raise UserError(f"data.chat.{key} {text!r} is not an added token of {path} (it "
                            f"holds {len(table)}: {', '.join(list(table)[:24])})")
    ordered = sorted(table, key=table.get)
    base = table[ordered[0]] if ordered else special_base_id
    if [table[t] for t in ordered] != list(range(base, base + len(ordered))):
        raise UserError(f"{path}: added token ids are not consecutive from {base}")
    tokenizer = K2Tokenizer(model_path, base, tuple(ordered))
    tokenizer.marker_source = f"from {os.fspath(path)}"
    return tokenizer


def read_conversations(path: epath.Path) -> Iterator[tuple[int, list[dict]]]:
    """(1-based line number, messages) of each non-blank line, validated (module docstring)."""
    with path.open("r") as f:
        for number, line in enumerate(f, start=1):
            if line.strip():
                yield number, checked_messages(line, f"{path}:{number}")


def checked_messages(line: str, where: str) -> list[dict]:
    """The messages of one jsonl line, or UserError naming `where` (file:line)."""
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
        role = message.get("role")
        if role not in ROLES:
            raise UserError(f"{where}: message {i} has role {role!r}; expected one of "
                            f"{', '.join(ROLES)}")
        if role == "system" and i:
            raise UserError(f"{where}: message {i} is a system message after the first; the "
                            f"template renders a system prompt only at the start")
        if role == "assistant" and not message["content"].strip():
            raise UserError(f"{where}: message {i} is an empty assistant turn (its loss would "
                            f"be on the end marker alone)")
    if not any(m["role"] == "assistant" for m in messages):
        raise UserError(f"{where}: no assistant turn (nothing to learn from)")
    return messages


def render(messages: Sequence[dict], chat: ChatConfig, tokenizer: K2Tokenizer,
           where: str) -> Rendered:
    """The tokens and target flags of one validated conversation (module docstring)."""
    out = Rendered([], [])
    last_reply = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    for i, message in enumerate(messages):
        role, content = message["role"], message["content"]
        found = MARKER_PATTERN.search(content)
        if found:
            raise UserError(f"{where}: message {i} ({role}) contains the marker "
                            f"{found.group()!r} (unknown or a turn marker; content must not "
                            f"hold chat markers)")
        trained = role == "assistant" and (chat.trained_turns == "all-assistant-turns"
                                           or i == last_reply)
        _add_turn(out, tokenizer, chat, role, content, int(trained))
    _add_marker(out, tokenizer, chat.end_of_chat, 0)
    return out


def render_prompt(messages: Sequence[dict], chat: ChatConfig, tokenizer: K2Tokenizer
                  ) -> list[int]:
    """The token ids that prompt a reply to `messages` (ending with a user turn): the same
    template as training, then the assistant marker (K2-Chat's model card:
    `<|beginofuser|>{user}<|beginofsystem|>`)."""
    out = Rendered([], [])
    for i, message in enumerate(messages):
        if message["role"] == "system" and i:
            raise UserError(f"message {i} is a system message after the first; the template "
                            f"renders a system prompt only at the start")
        _add_turn(out, tokenizer, chat, message["role"], message["content"], 0)
    _add_marker(out, tokenizer, chat.assistant_marker, 0)
    return out.tokens


def _add_turn(out: Rendered, tokenizer: K2Tokenizer, chat: ChatConfig, role: str,
              content: str, target: int) -> None:
    opening = chat.markers().get(role)
    _add_marker(out, tokenizer, opening, 0)
    ids = tokenizer.sp.EncodeAsIds(content)  # content is data: no special token split out
    out.tokens.extend(ids)
    out.targets.extend([target] * len(ids))
    closing = {"system": chat.system_end, "assistant": chat.assistant_end}.get(role)
    _add_marker(out, tokenizer, closing, target if role == "assistant" else 0)


def _add_marker(out: Rendered, tokenizer: K2Tokenizer, text: Optional[str], target: int
                ) -> None:
    if text is None:
        return
    ids = tokenizer.encode(text)
    if len(ids) != 1:
        raise UserError(f"chat marker {text!r} is {len(ids)} tokens, expected one token of the "
                        f"tokenizer (chat_tokenizer adds the template's markers)")
    out.tokens.extend(ids)
    out.targets.append(target)


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
               "marker_ids": {m: tokenizer.encode(m) for m in chat.special_texts().values()},
               "marker_ids_from": getattr(tokenizer, "marker_source", "the tokenizer"),
               "inputs": [os.fspath(p) for p in inputs]}
    write_json_atomic(out / "prepare-chat.json", summary)
    return summary
