"""Chat SFT (issue 19 point 3-4): `data prepare-chat`, assistant-only loss, packed documents
that do not see each other, read back through the training loader."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from k2jax.cli import main
from k2jax.config import ChatConfig, load_config
from k2jax.data.chat import chat_tokenizer, pack, prepare_chat, render, render_prompt
from k2jax.data.chunk_index import build_index
from k2jax.data.loader import StepLoader
from k2jax.data.segments import positions_within_documents
from k2jax.errors import ConfigError
from k2jax.model import K2Model
from k2jax.sharding.mesh import build_mesh
from k2jax.tokenizer import K2_SPECIAL_TOKENS
from k2jax.train.step import make_loss_and_gradients
from test_data_prepare import spm_model  # noqa: F401  (a tiny SentencePiece model fixture)
from train_utils import TINY

CHAT = ChatConfig(user_marker="<|beginofuser|>", assistant_marker="<|beginofsystem|>")
SEQ = 128
CONVERSATIONS = [
    [{"role": "user", "content": "the quick fox"}, {"role": "assistant", "content": "a dog"}],
    [{"role": "system", "content": "be brief"}, {"role": "user", "content": "fox dog"},
     {"role": "assistant", "content": "the fox"}, {"role": "user", "content": "and"},
     {"role": "assistant", "content": "a quick dog jumps"}],
    [{"role": "user", "content": "dog"}, {"role": "assistant", "content": "fox fox the"}],
]
MODEL = ["model.vocab_size=336", "model.hidden_size=32", "model.intermediate_size=64",
         "model.num_layers=2", "model.num_heads=2", "model.num_kv_heads=2"]


def write_jsonl(path, conversations):
    path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in conversations))
    return path


def sft_config(data_dir, *extra):
    return load_config(TINY, MODEL + [
        "data.source=k2", f"data.path={data_dir}", "data.order=sequential",
        f"data.seq_len={SEQ}", "data.use_tgt_mask=true", "data.reset_attention_mask=true",
        "data.reset_position_ids=true", "data.global_batch_size=1", "data.micro_batch_size=1",
        *extra])


def test_render_takes_loss_on_assistant_content_and_end_only(spm_model):
    tok = chat_tokenizer(spm_model, CHAT)
    user, assistant = tok.encode(CHAT.user_marker), tok.encode(CHAT.assistant_marker)
    assert user == [318] and assistant == [319]  # added after K2's 18 special tokens
    out = render(CONVERSATIONS[0], CHAT, tok, "f:1")
    reply = tok.encode("a dog") + [tok.eos_id]
    assert out.tokens == user + tok.encode("the quick fox") + assistant + reply
    assert out.targets == [0] * (len(out.tokens) - len(reply)) + [1] * len(reply)


def test_pack_fills_rows_in_order_and_counts_overlong():
    def conv(n):
        return type("C", (), {"tokens": list(range(1, n + 1)), "targets": [0] + [1] * (n - 1)})
    packed = pack([conv(5), conv(4), conv(9), conv(3)], seq_len=10, overlong="drop")
    np.testing.assert_array_equal(packed.segment_ids, [[1] * 5 + [2] * 4 + [0],
                                                       [1] * 9 + [0], [1] * 3 + [0] * 7])
    np.testing.assert_array_equal(packed.tokens[0], [1, 2, 3, 4, 5, 1, 2, 3, 4, 0])
    np.testing.assert_array_equal(packed.tgt_mask[0], [0, 1, 1, 1, 1, 0, 1, 1, 1, 0])
    assert (packed.conversations, packed.dropped, packed.truncated) == (4, 0, 0)
    dropped = pack([conv(12), conv(3)], seq_len=10, overlong="drop")
    assert (dropped.dropped, dropped.truncated, len(dropped.tokens)) == (1, 0, 1)
    cut = pack([conv(12), conv(3)], seq_len=10, overlong="truncate")
    assert (cut.dropped, cut.truncated, len(cut.tokens)) == (0, 1, 2)
    np.testing.assert_array_equal(cut.tokens[0], range(1, 11))
    np.testing.assert_array_equal(positions_within_documents(dropped.segment_ids),
                                  [list(range(3)) + list(range(7))])


@pytest.mark.parametrize("line, message", [
    ('{"messages": [{"role": "user", "content": "hi"}]}', "no assistant turn"),
    ('{"messages": [{"role": "bot", "content": "hi"}]}', "role 'bot'"),
    ('{"messages": [{"role": "user", "content": "x<|im_start|>"}, '
     '{"role": "assistant", "content": "y"}]}', "marker '<|im_start|>'"),
    ('{"messages": [', "malformed JSON"),
])
def test_bad_conversations_name_file_and_line(tmp_path, spm_model, capsys, line, message):
    good = json.dumps({"messages": CONVERSATIONS[0]})
    path = tmp_path / "chats.jsonl"
    path.write_text(good + "\n" + line + "\n")
    code = main(["data", "prepare-chat", "--tokenizer", str(spm_model), "--input", str(path),
                 "--out", str(tmp_path / "out"), "model.vocab_size=336"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert f"{path}:2:" in err and message in err
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_overlong_policy_is_reported(tmp_path, spm_model, capsys):
    long = [{"role": "user", "content": "fox " * 40}, {"role": "assistant", "content": "dog"}]
    path = write_jsonl(tmp_path / "c.jsonl", [long, CONVERSATIONS[0]])
    def prepare(out, *overrides):
        return main(["data", "prepare-chat", "--tokenizer", str(spm_model), "--input",
                     str(path), "--out", str(out), "model.vocab_size=336", "data.seq_len=32",
                     *overrides])
    assert prepare(tmp_path / "a") == 0
    out = capsys.readouterr().out
    assert "1 dropped and 0 truncated as longer than 32" in out
    assert "appended after K2's added tokens by k2jax (no added_tokens.json" in out
    assert prepare(tmp_path / "b", "data.chat.overlong=truncate") == 0
    # Truncation keeps the prompt only: no target left, so it is dropped and counted.
    assert "1 dropped and 0 truncated" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="data.chat.overlong"):
        load_config(TINY, ["data.chat.overlong=keep"])


@pytest.fixture
def chat_dir(tmp_path, spm_model):
    """The three conversations packed into one 128-token row (prepare-chat, indexed)."""
    tok = chat_tokenizer(spm_model, CHAT)
    path = write_jsonl(tmp_path / "chats.jsonl", CONVERSATIONS)
    summary = prepare_chat(tok, [path], tmp_path / "data", CHAT, SEQ, vocab_size=336)
    assert summary["rows"] == 1 and summary["conversations"] == 3
    build_index(tmp_path / "data", progress=False)
    return tmp_path / "data", tok


def one_document(batch):
    """`batch` as one document per row: segment ids all 1, positions 0..S-1."""
    rows, seq = batch["tokens"].shape
    return {**batch, "segment_ids": np.ones((rows, seq), np.int32),
            "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (rows, seq))}


def summed_losses(config, batches):
    """(sum of masked token losses, its gradients) of each batch: one compile for all."""
    mesh = build_mesh(config.mesh)
    params = K2Model(config.model).init(jax.random.key(0), batches[0]["tokens"])["params"]
    fn = jax.jit(make_loss_and_gradients(config, mesh))
    out = []
    for batch in batches:
        loss, grads, count = fn(params, {k: jnp.asarray(v) for k, v in batch.items()})
        out.append((float(loss) * float(count),
                    jax.tree.map(lambda g: np.asarray(g) * float(count), grads)))
    return out


def alone(tok, messages):
    """One conversation by itself in a row (plain positions, one document)."""
    conv = render(messages, CHAT, tok, "t")
    tokens = np.zeros((1, SEQ), np.int32)
    mask = np.zeros((1, SEQ), np.float32)
    tokens[0, :len(conv.tokens)] = conv.tokens
    mask[0, :len(conv.tokens) - 1] = conv.targets[1:]
    return one_document({"tokens": tokens, "loss_mask": mask})


@pytest.mark.slow  # packed and per-conversation compiles: ~13 s idle
def test_packed_loss_is_the_sum_of_per_conversation_losses(chat_dir):
    data_dir, tok = chat_dir
    config = sft_config(data_dir)
    batch = StepLoader.from_config(config).global_batch(0)  # the training loader's rows
    assert set(batch) == {"tokens", "loss_mask", "segment_ids", "positions"}
    # The same row without document separation: later conversations see earlier ones.
    (packed_sum, packed_grads), (mixed_sum, _), *singles = summed_losses(
        config, [batch, one_document(batch)] + [alone(tok, m) for m in CONVERSATIONS])
    sums, grads = zip(*singles)
    assert packed_sum == pytest.approx(sum(sums), rel=1e-5)
    for p, *parts in zip(jax.tree.leaves(packed_grads), *map(jax.tree.leaves, grads)):
        np.testing.assert_allclose(p, sum(parts), rtol=2e-4, atol=2e-6)
    assert abs(mixed_sum - sum(sums)) > 1e-4 * sum(sums)  # 20x the tolerance above


@pytest.mark.slow  # two gradient compiles: ~12 s idle
def test_prompt_change_leaves_masked_and_other_document_gradients_alone(chat_dir):
    data_dir, tok = chat_dir
    config = sft_config(data_dir)
    batch = StepLoader.from_config(config).global_batch(0)
    model = K2Model(config.model)
    params = model.init(jax.random.key(1), batch["tokens"])["params"]

    def logit_grads(tokens, segments, positions):
        from k2jax.model import masked_next_token_loss

        def loss(logits):
            return masked_next_token_loss(logits, tokens, jnp.asarray(batch["loss_mask"]))[0]
        logits = model.apply({"params": params}, tokens, positions, segments)
        return np.asarray(jax.grad(loss)(logits))  # d loss / d logits [1, S, V]

    seg = batch["segment_ids"]
    second = np.flatnonzero(seg[0] == 2)
    prompt = second[1]  # a prompt (system text) token of conversation 2: never a target
    assert batch["loss_mask"][0, prompt - 1] == 0
    changed = batch["tokens"].copy()
    changed[0, prompt] = (changed[0, prompt] + 7) % 300
    before = logit_grads(batch["tokens"], seg, batch["positions"])
    after = logit_grads(changed, seg, batch["positions"])
    masked = batch["loss_mask"][0] == 0
    assert not before[0, masked].any() and not after[0, masked].any()
    others = seg[0] != 2  # conversations 1 and 3 cannot see conversation 2
    np.testing.assert_array_equal(before[0, others], after[0, others])
    assert not np.array_equal(before[0, second], after[0, second])  # its own replies can
    # Without separation conversation 3 sees the change.
    plain = np.broadcast_to(np.arange(SEQ), (1, SEQ))
    mixed_before = logit_grads(batch["tokens"], None, plain)
    mixed_after = logit_grads(changed, None, plain)
    assert not np.array_equal(mixed_before[0, seg[0] == 3], mixed_after[0, seg[0] == 3])


def test_segments_file_missing_is_one_line(chat_dir):
    data_dir, _ = chat_dir
    (data_dir / "chunk_0.segments.npy").unlink()
    with pytest.raises(Exception, match="chunk_0.segments.npy: segment ids not found"):
        StepLoader.from_config(sft_config(data_dir)).global_batch(0)
    with pytest.raises(ConfigError, match="data.reset_attention_mask"):
        load_config(TINY, ["data.reset_attention_mask=true"])  # synthetic data has no documents


@pytest.mark.slow  # one training compile
def test_trainer_reads_chat_rows_with_documents(chat_dir, tmp_path):
    from k2jax.train.trainer import Trainer
    from train_utils import read_metrics

    data_dir, _ = chat_dir
    config = sft_config(data_dir, "train.steps=1", "train.checkpoint_every=1",
                        f"train.run_dir={tmp_path / 'run'}", "train.peak_flops_per_device=1e11",
                        "train.log_every=1")
    Trainer(config).run()
    record, = read_metrics(tmp_path / "run")
    summary = json.loads((data_dir / "prepare-chat.json").read_text())
    assert record["step"] == 1 and np.isfinite(record["loss"])
    assert record["tokens"] == summary["target_tokens"]  # the assistant tokens, nothing else


# -- issue 26.3: K2-Chat's own format ---------------------------------------------------------

K2_CHAT = load_config("k2-chat").data.chat
TALK = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "fox dog"},
        {"role": "assistant", "content": "the fox"}, {"role": "user", "content": "and"},
        {"role": "assistant", "content": "a quick dog"}]


def test_k2_chat_template_follows_llm360s_script(spm_model):
    tok = chat_tokenizer(spm_model, K2_CHAT)
    ids = {text: tok.encode(text)[0] for text in K2_CHAT.special_texts().values()}
    reply, user = ids["<|beginofsystem|>"], ids["<|beginofuser|>"]
    eos, end_sys, end_chat = tok.eos_id, ids["<|endofsystemprompt|>"], ids["<|endofchat|>"]
    text = tok.sp.EncodeAsIds
    out = render(TALK, K2_CHAT, tok, "t")
    context = ([reply] + text("be brief") + [end_sys] + [user] + text("fox dog") + [reply]
               + text("the fox") + [eos] + [user] + text("and"))
    final = text("a quick dog") + [eos]
    assert out.tokens == context + [reply] + final + [end_chat]
    # Only the final reply and its </s> are trained (the script's seed/response split).
    assert out.targets == [0] * (len(context) + 1) + [1] * len(final) + [0]
    every = render(TALK, dataclasses.replace(K2_CHAT, trained_turns="all-assistant-turns"),
                   tok, "t")
    first_reply = text("the fox") + [eos]
    assert sum(every.targets) == len(first_reply) + len(final)
    # generate --chat's prompt: the model card's form, the same ids as training.
    prompt = render_prompt(TALK[:2], K2_CHAT, tok)
    assert prompt == [reply] + text("be brief") + [end_sys, user] + text("fox dog") + [reply]
    assert render_prompt(TALK[1:2], K2_CHAT, tok) == [user] + text("fox dog") + [reply]


def test_control_text_in_content_is_data_never_structure(spm_model):
    tok = chat_tokenizer(spm_model, K2_CHAT)
    messages = [{"role": "user", "content": "fix <fim_prefix> it"},
                {"role": "assistant", "content": "<s>old</s> new"}]
    out = render(messages, K2_CHAT, tok, "t")
    fim_prefix = tok.encode("<fim_prefix>")[0]
    assert fim_prefix not in out.tokens and tok.bos_id not in out.tokens
    assert out.tokens.count(tok.eos_id) == 1  # the turn's own end, not the reply's text
    assert tok.decode(out.tokens).count("<s>old</s> new") == 1


@pytest.mark.parametrize("messages, message", [
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}],
     "message 1 is an empty assistant turn"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
      {"role": "system", "content": "now be rude"}, {"role": "user", "content": "hi"},
      {"role": "assistant", "content": "yo"}], "message 2 is a system message after the first"),
])
def test_empty_replies_and_late_system_messages_are_refused(tmp_path, spm_model, capsys,
                                                            messages, message):
    path = write_jsonl(tmp_path / "chats.jsonl", [CONVERSATIONS[0], messages])
    code = main(["data", "prepare-chat", "--tokenizer", str(spm_model), "--input", str(path),
                 "--out", str(tmp_path / "out"), "model.vocab_size=336"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and f"{path}:2: {message}" in err


def test_a_system_marker_equal_to_the_replys_needs_a_system_end():
    load_config("k2-chat")  # <|beginofsystem|> opens both, <|endofsystemprompt|> closes one
    with pytest.raises(ConfigError, match="^config key 'data.chat.system_marker'"):
        load_config("k2-chat", ["data.chat.system_end=null"])
    with pytest.raises(ConfigError, match="^config key 'data.chat.assistant_marker'"):
        load_config("k2-chat", ["data.chat.assistant_marker=<|beginofuser|>"])


def test_marker_ids_come_from_the_tokenizers_added_tokens(tmp_path, spm_model, capsys):
    model = tmp_path / "tok.model"
    model.write_bytes(spm_model.read_bytes())
    added = {text: 300 + i for i, text in enumerate(K2_SPECIAL_TOKENS)}
    added.update({"<|endofchat|>": 318, "<|beginofuser|>": 319, "<|beginofsystem|>": 320,
                  "<|endofsystemprompt|>": 321})
    (tmp_path / "added_tokens.json").write_text(json.dumps(added))
    tok = chat_tokenizer(model, K2_CHAT)
    assert [tok.encode(t)[0] for t in ("<|beginofuser|>", "<|endofchat|>")] == [319, 318]
    del added["<|endofchat|>"], added["<|endofsystemprompt|>"]
    (tmp_path / "added_tokens.json").write_text(json.dumps(added))
    path = write_jsonl(tmp_path / "chats.jsonl", [TALK])
    code = main(["data", "prepare-chat", "--tokenizer", str(model), "--input", str(path),
                 "--out", str(tmp_path / "out"), "model.vocab_size=336"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "data.chat.system_end '<|endofsystemprompt|>' is not an added token of" in err


def test_generate_chat_prompts_use_the_training_template(spm_model):
    from k2jax.commands.generate import chat_prompt_ids

    tok = chat_tokenizer(spm_model, K2_CHAT)
    [prompt] = chat_prompt_ids(["fox dog"], "k2-chat", str(spm_model))
    training = render(TALK[1:3], K2_CHAT, tok, "t").tokens
    assert prompt == training[:len(prompt)]  # the reply follows the same prefix in training
    assert prompt[-1] == tok.encode("<|beginofsystem|>")[0]


@pytest.fixture
def chat_hf(tmp_path):
    """A tiny random transformers model over the chat tokenizer's 336 ids, saved."""
    from hf_models import tiny_llama

    tiny_llama(vocab_size=336, max_positions=SEQ).save_pretrained(tmp_path / "hf")
    return tmp_path / "hf"


def sft_yaml(path, data_dir, *extra):
    import yaml

    path.write_text(yaml.safe_dump(sft_config(data_dir, *extra).to_dict()))
    return path


@pytest.mark.slow  # a training-loss compile and an eval-loss run: ~10 s idle
def test_eval_loss_on_chat_rows_is_their_training_loss(chat_dir, chat_hf, tmp_path, capsys):
    """eval-loss reads packed chat rows as training does (segment ids, per-document positions,
    target masks, logits rounded to model.logits_dtype) and reports the train step's loss."""
    import dataclasses

    from k2jax.weights import open_weights

    data_dir, _ = chat_dir
    extra = ("model.logits_dtype=bfloat16",)
    config = sft_config(data_dir, *extra)
    weights = open_weights(hf=str(chat_hf))
    config = dataclasses.replace(config, model=weights.for_inference(
        "fp32", "xla", "float32", logits_dtype="bfloat16"))
    mesh = build_mesh(config.mesh)
    params = weights.on_mesh(config.model, mesh, config.mesh.rules)
    batch = StepLoader.from_config(config).global_batch(0)
    train_loss = float(jax.jit(make_loss_and_gradients(config, mesh))(
        params, {k: jnp.asarray(v) for k, v in batch.items()})[0])

    def eval_loss(*overrides):
        code = main(["eval-loss", "--hf", str(chat_hf), "--config",
                     str(sft_yaml(tmp_path / "sft.yaml", data_dir, *extra)), "--steps", "0",
                     "--rope-freq-dtype", "float32", "--json", *overrides])
        out = capsys.readouterr().out
        assert code == 0
        return json.loads(out)

    record = eval_loss()
    assert record["loss"] == pytest.approx(train_loss, rel=1e-6)
    summary = json.loads((data_dir / "prepare-chat.json").read_text())
    assert record["tokens"] == summary["target_tokens"]
    # The same row as one sequence (conversations seeing each other) is another number.
    mixed = eval_loss("data.reset_attention_mask=false", "data.reset_position_ids=false")
    assert abs(mixed["loss"] - train_loss) > 1e-3 * train_loss


@pytest.mark.slow  # both stacks' forward on one packed row: ~8 s idle
def test_compare_hf_runs_packed_chat_rows_per_document(chat_dir, chat_hf, tmp_path, capsys):
    """compare-hf on packed chat rows gives transformers the per-document view k2jax's segment
    ids give (before, it ran the packed row as ONE sequence and still exited 0)."""
    from k2jax.eval.hf_reference import hf_forward, load_hf_model
    from k2jax.eval.logit_compare import masked_loss

    data_dir, _ = chat_dir
    code = main(["compare-hf", "--hf", str(chat_hf), "--config",
                 str(sft_yaml(tmp_path / "sft.yaml", data_dir)), "--step", "0", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["passed"], report
    assert report["documents"] == ["positions", "segment_ids"]
    batch = StepLoader.from_config(sft_config(data_dir)).global_batch(0)
    one_sequence, _ = hf_forward(load_hf_model(str(chat_hf)), batch["tokens"])
    total, count = masked_loss(one_sequence, batch["tokens"], batch["loss_mask"])
    assert count == report["tokens"]
    assert abs(total / count - report["loss_reference"]) > 1e-3 * report["loss_reference"]
