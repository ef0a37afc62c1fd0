"""K2Tokenizer and `prepare` on a SentencePiece model trained here (K2's recipe, decodes back)."""

import json
import random
from pathlib import Path

import numpy as np
import pytest
import sentencepiece

from k2jax.data.prepare import prepare_chunks, tokenize_document
from k2jax.errors import UserError
from k2jax.tokenizer import K2_SPECIAL_TOKENS, K2Tokenizer

WORDS = ("the quick brown fox jumps over a lazy dog while data flows through chunk files and "
         "every token finds its step in order").split()


def random_text(rng: random.Random, num_words: int) -> str:
    text = " ".join(rng.choice(WORDS) for _ in range(num_words))
    return text.replace(" dog ", " dog\n", 3).replace(" a ", "  a ", 2)


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory) -> Path:
    """A tiny LLaMA-like SentencePiece model: BPE, byte fallback, identity normalisation."""
    directory = tmp_path_factory.mktemp("spm")
    rng = random.Random(0)
    sentences = [random_text(rng, 12).replace("\n", " ") for _ in range(400)]
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_prefix=str(directory / "tok"), vocab_size=300,
        model_type="bpe", character_coverage=1.0, byte_fallback=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        hard_vocab_limit=False, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    return directory / "tok.model"


def test_special_tokens_follow_the_spm_vocab_and_split_out_first(spm_model):
    tok = K2Tokenizer(spm_model)
    assert tok.special_base_id == tok.sp_size == 300 and tok.vocab_size == 318
    ids = tok.encode("fox<filename>dog</s><reponame>")
    assert 300 + K2_SPECIAL_TOKENS.index("<filename>") == 304 and 304 in ids
    assert ids[-2:] == [2, 317]
    assert tok.encode("</s>") == [2]  # EOS id, not the characters of a control piece
    assert tok.encode("<reponame>") == [317]
    assert 1 not in tok.encode("the fox")  # no BOS
    assert tok.decode(ids) == "fox<filename>dog</s><reponame>"
    shifted = K2Tokenizer(spm_model, special_base_id=32000)
    assert shifted.encode("<fim_prefix>") == [32000] and shifted.vocab_size == 32018
    with pytest.raises(UserError, match="overlaps"):
        K2Tokenizer(spm_model, special_base_id=10)
    with pytest.raises(UserError, match="token id 999 is outside"):
        tok.decode([999])


def test_documents_are_split_into_4096_word_pieces(spm_model):
    tok = K2Tokenizer(spm_model)
    rng = random.Random(1)
    text = random_text(rng, 9000)
    words = (text + "</s>").split(" ")
    expected = []
    for start in (0, 4096, 8192):
        expected += tok.encode(" ".join(words[start:start + 4096]))
    assert tokenize_document(tok, text) == expected
    assert tok.decode(expected) == text + "</s>"


def test_prepare_follows_k2s_recipe_and_decodes_back(spm_model, tmp_path):
    tok = K2Tokenizer(spm_model)
    rng = random.Random(2)
    docs = [random_text(rng, n) for n in (50, 5000, 7, 300)]
    jsonl = tmp_path / "web.jsonl"
    jsonl.write_text("".join(json.dumps({"text": d, "meta": 1}) + "\n" for d in docs))
    plain = tmp_path / "code.txt"
    plain_doc = "<reponame>k2jax\n<filename>a.py\n" + random_text(rng, 400)
    plain.write_text(plain_doc)
    seq_len, num_chunks = 16, 3
    summary = prepare_chunks(tok, [jsonl, plain], tmp_path / "out", num_chunks, seq_len,
                             "test-source", progress=False)

    rows = {}  # (src_filename, line_idx_in_src) -> tokens; and per chunk, the written order
    written = []
    for chunk in range(num_chunks):
        lines = (tmp_path / "out" / f"chunk_{chunk}.jsonl").read_text().splitlines()
        written.append([])
        for line in lines:
            obj = json.loads(line)
            assert len(obj["token_ids"]) == seq_len and 1 not in obj["token_ids"]  # no BOS
            assert obj["source"] == "test-source"
            assert obj["subset_name"] == Path(obj["src_filename"]).stem
            rows[(obj["src_filename"], obj["line_idx_in_src"])] = obj["token_ids"]
            written[chunk].append((obj["src_filename"], obj["line_idx_in_src"]))
    assert summary["rows"] == len(rows) == sum(summary["rows_per_chunk"])

    # Each source's rows, in order, decode to a prefix of its documents + EOS (tail dropped).
    for name, full_text in [("web.jsonl", "".join(d + "</s>" for d in docs)),
                            ("code.txt", plain_doc + "</s>")]:
        count = sum(1 for key in rows if key[0] == name)
        stream = [t for i in range(count) for t in rows[(name, i)]]
        decoded = tok.decode(stream)
        assert full_text.startswith(decoded)
        dropped = len(tok.encode(full_text[len(decoded):]))
        assert dropped < seq_len + 2  # at most one partial row (a cut piece may re-tokenize)

    # Row r (numbered over inputs in order) went to chunk r % N, shuffled with 11111 + chunk.
    web_rows = sum(1 for key in rows if key[0] == "web.jsonl")
    global_keys = [("web.jsonl", i) for i in range(web_rows)] + \
        [("code.txt", i) for i in range(len(rows) - web_rows)]
    for chunk in range(num_chunks):
        unshuffled = global_keys[chunk::num_chunks]
        order = np.random.default_rng(11111 + chunk).permutation(len(unshuffled))
        assert written[chunk] == [unshuffled[i] for i in order]


def test_prepare_rejects_bad_input(spm_model, tmp_path):
    tok = K2Tokenizer(spm_model)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"txt": 1}\n')
    with pytest.raises(UserError, match=r"bad\.jsonl:2: expected a JSON object with a string"):
        prepare_chunks(tok, [bad], tmp_path / "o", 1, 8, progress=False)
    with pytest.raises(UserError, match="input file not found"):
        prepare_chunks(tok, [tmp_path / "nope.txt"], tmp_path / "o", 1, 8, progress=False)
