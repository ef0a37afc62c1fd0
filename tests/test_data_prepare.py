"""K2Tokenizer and `prepare` on a SentencePiece model trained here (K2's recipe, decodes back)."""

import collections
import json
import random
from pathlib import Path

import numpy as np
import pytest
import sentencepiece

import k2_data_prep_reference as reference
from k2jax.cli import main
from k2jax.data.chunk_assignment import (K2_REPEATS, K2_REPEATS_TEXT, ChunkAssigner,
                                         cycle_length, parse_repeats, repeat_for)
from k2jax.data import fim
from k2jax.data.prepare import FimOptions, prepare_chunks, word_pieces
from k2jax.errors import UserError
from k2jax.tokenizer import K2_SPECIAL_TOKENS, K2Tokenizer

WORDS = ("the quick brown fox jumps over a lazy dog while data flows through chunk files and "
         "every token finds its step in order").split()


def random_text(rng: random.Random, num_words: int) -> str:
    text = " ".join(rng.choice(WORDS) for _ in range(num_words))
    return text.replace(" dog ", " dog\n", 3).replace(" a ", "  a ", 2)


def train_tiny_spm(directory: Path) -> list[str]:
    """Train `directory/tok.model`, a tiny LLaMA-like SentencePiece model (BPE, byte fallback,
    identity normalisation); returns the sentences it was trained on."""
    rng = random.Random(0)
    sentences = [random_text(rng, 12).replace("\n", " ") for _ in range(400)]
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_prefix=str(directory / "tok"), vocab_size=300,
        model_type="bpe", character_coverage=1.0, byte_fallback=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        hard_vocab_limit=False, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    return sentences


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("spm")
    train_tiny_spm(directory)
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


def test_one_word_buffer_runs_across_the_documents_of_a_file(spm_model):
    tok = K2Tokenizer(spm_model)
    rng = random.Random(1)
    docs = [random_text(rng, 3000), random_text(rng, 3000), "fox"]
    pieces = list(word_pieces(iter(docs)))
    words = [w for d in docs for w in (d + "</s>").split(" ")]
    assert [len(p.split(" ")) for p in pieces] == [4096, len(words) - 4096]
    assert pieces[0] == " ".join(words[:4096])  # crosses the first document's end
    assert "</s> " + docs[1].split(" ")[0] in pieces[0]
    # The document after </s> is tokenized with its leading space, as K2's word join made it.
    ids = tok.encode(pieces[0])
    after_eos = ids[ids.index(tok.eos_id) + 1:]
    assert tok.decode(after_eos).startswith(" " + docs[1].split(" ")[0] + " ")
    assert list(word_pieces(iter([]))) == [""]


def test_decode_as_hf_keeps_spaces_after_special_tokens(spm_model):
    tok = K2Tokenizer(spm_model)
    ids = tok.encode("fox<filename> dog é</s> the")
    assert tok.decode(ids) == "fox<filename> dog é</s> the"
    assert tok.decode_as_hf(ids) == "fox<filename>  dog é</s>  the"  # each cut's '▁' prefix
    assert tok.decode_as_hf(tok.encode(" a")) == " a"
    assert tok.decode_as_hf([tok.sp.PieceToId("<0xC3>")]) == "\ufffd"


@pytest.mark.parametrize("repeat,cycle,rows", [(3, 120, [[0, 120, 240], [1, 121, 241]]),
                                               (0.5, 720, [[0], [1]]), (1, 360, [[0], [1]])])
def test_k2_repeat_rule(repeat, cycle, rows):
    assert cycle_length("s", repeat, 360) == cycle
    assigner = ChunkAssigner(360)
    assigner.start_file(cycle)
    assert [list(assigner.next_row()) for _ in range(2)] == rows
    assigner.counter = 400
    assigner.start_file(cycle)  # the counter carries over, reduced modulo the new cycle
    assert assigner.counter == 400 % cycle
    assert list(assigner.next_row()) == (list(range(400 % cycle, 360, cycle)))
    assert repeat_for("redpajama.c4", K2_REPEATS) == 0
    assert repeat_for("redpajama.book", K2_REPEATS) == 3
    assert repeat_for("redpajama.wikipedia", K2_REPEATS) == 6
    assert repeat_for("starcoder.python", K2_REPEATS) == 0.5
    assert repeat_for("mine", K2_REPEATS) == 1
    assert parse_repeats(K2_REPEATS_TEXT) == K2_REPEATS
    with pytest.raises(UserError, match="needs at least 6 chunks"):
        cycle_length("redpajama.wikipedia", 6, 5)
    with pytest.raises(UserError, match="^repeat 'x=-1'"):
        parse_repeats("a=2,x=-1")


CODE_WORDS = ("def", "return", "x", "é", "你好", "(", ")", ":", "=", "+", "1")


def write_subsets(root: Path, rng: random.Random) -> None:
    """K2's layout: one directory per subset, *.jsonl files of documents."""
    def code(n):
        body = " ".join(rng.choice(CODE_WORDS) for _ in range(n)).replace(" : ", ":\n    ")
        return f"<reponame>k2/{rng.randint(0, 9)}<filename>m{rng.randint(0, 9)}.py\n" + body

    subsets = {
        # K2's chunked files are 0.jsonl, 1.jsonl, ...: sorted as strings, 10 before 2.
        "web": {"2.jsonl": [{"text": random_text(rng, n)} for n in (3000, 2500, 7, 3500)],
                "10.jsonl": [{"text": random_text(rng, 60)}]},
        "redpajama.wikipedia": {"a.jsonl": [{"text": random_text(rng, 40)}]},
        "dm-math": {"a.jsonl": [{"text": random_text(rng, 90)}, {"text": "1 + 1 = 2"}]},
        "redpajama.c4": {"a.jsonl": [{"text": random_text(rng, 80)}]},
        "pile-of-law": {"a.jsonl": [{"text": {"text": random_text(rng, 70)}}]},
        # A text ending in </s> gives two EOS in a row (an empty FIM piece, dropped by K2).
        "starcoder.python": {f"s{i}.jsonl": [{"content": code(rng.randint(5, 80))}
                                             for _ in range(12)] + [{"content": "x = 1</s>"}]
                             for i in range(2)},
    }
    for subset, files in subsets.items():
        (root / subset).mkdir(parents=True)
        for name, docs in files.items():
            (root / subset / name).write_text("".join(json.dumps(d) + "\n" for d in docs))


def test_fim_row_equals_k2s_fim_at_the_edges(spm_model):
    """EOS first, two EOS in a row, EOS last, no EOS, special tokens and bytes inside a piece."""
    tok = K2Tokenizer(spm_model)
    hf = reference.HFLlamaTokenizer2023(spm_model)
    eos, body = tok.eos_id, tok.encode("<filename>a.py\n def x ( ) : 你好 return 1")
    rows = [[eos] + body[:10] + [eos, eos] + body[10:], body, body[:7] + [eos],
            body[:5] + [eos] + body[5:]]
    changed = 0
    for seed, row in enumerate(rows):
        for spm_rate in (0.0, 1.0):
            np.random.seed([seed, 1])
            expected = reference.fim(row, hf, 1.0, spm_rate)
            got = fim.fim_row(row, tok, np.random.RandomState([seed, 1]), spm_rate)
            assert got == expected and len(got) == len(row)
            changed += got != row
    assert changed >= 6


def test_prepare_equals_k2s_scripts(spm_model, tmp_path):
    """k2jax's one pass == K2's tokenize, FIM, gather and shuffle scripts (tests/
    k2_data_prep_reference.py): identical rows in identical chunk files, in identical order."""
    chunked = tmp_path / "chunked"
    write_subsets(chunked, random.Random(3))
    num_chunks, seq_len, seed = 7, 24, 5
    dirs = reference.run_k2_recipe(chunked, tmp_path / "k2", spm_model, num_chunks, seq_len,
                                   seed)
    summary = prepare_chunks(K2Tokenizer(spm_model), sorted(chunked.iterdir()),
                             tmp_path / "out", num_chunks, seq_len, progress=False,
                             fim_options=FimOptions(seed=seed))
    roots = (dirs["tokenized"] + "/", dirs["fim"] + "/")
    variants = collections.Counter()
    for chunk in range(num_chunks):
        expected = [json.loads(line) for line in
                    open(f"{dirs['final']}/chunk_{chunk}.jsonl")]
        for obj in expected:  # K2 wrote absolute paths; k2jax the part below K2's data roots
            obj["src_filename"] = obj["src_filename"].replace(roots[0], "").replace(roots[1], "")
            variants[obj["src_filename"].split("/")[0]] += 1
        got = [json.loads(line) for line in
               (tmp_path / "out" / f"chunk_{chunk}.jsonl").read_text().splitlines()]
        assert got == expected, f"chunk {chunk}"
    assert summary["rows_per_chunk"] == [
        sum(1 for _ in open(f"{dirs['final']}/chunk_{c}.jsonl")) for c in range(num_chunks)]
    # The comparison covered every rule: repeats (wikipedia in all 7 chunks, dm-math in 3 or 4),
    # c4 left out, both FIM copies and plain code rows, K2's text keys.
    assert variants["starcoder.python.spm0.0"] and variants["starcoder.python.spm1.0"]
    assert variants["starcoder.python"] and variants["pile-of-law"]
    assert "redpajama.c4" not in variants
    wiki_rows = sum(1 for _ in open(f"{dirs['tokenized']}/redpajama.wikipedia/a.jsonl"))
    assert variants["redpajama.wikipedia"] == 7 * wiki_rows > 0


def test_cli_prepare_flags(spm_model, tmp_path, capsys):
    chunked = tmp_path / "chunked"
    write_subsets(chunked, random.Random(4))
    notes = tmp_path / "notes.txt"  # a plain file: one document, subset 'notes'
    notes.write_text(random_text(random.Random(5), 200))
    code = main(["data", "prepare", "--tokenizer", str(spm_model), "--input", str(notes),
                 str(chunked / "web"), str(chunked / "starcoder.python"), "--out",
                 str(tmp_path / "out"), "--num-chunks", "2", "--seq-len", "16", "--quiet",
                 "--repeat", "web=2", "--fim-subsets", "", "--source-name", "mine"])
    assert code == 0
    out = capsys.readouterr().out
    rows = [json.loads(line) for c in range(2)
            for line in (tmp_path / "out" / f"chunk_{c}.jsonl").read_text().splitlines()]
    assert f"wrote {len(rows)} rows" in out
    assert {r["source"] for r in rows} == {"mine"}
    assert {r["subset_name"] for r in rows} == {"notes", "web", "starcoder.python"}
    assert "notes/notes.txt" in {r["src_filename"] for r in rows}
    assert not any(".spm" in r["src_filename"] for r in rows)  # FIM off
    web = [(r["src_filename"], r["line_idx_in_src"]) for r in rows if r["subset_name"] == "web"]
    assert len(web) == 2 * len(set(web))  # repeated into both chunks
    code = main(["data", "prepare", "--tokenizer", str(spm_model), "--input", str(chunked),
                 "--out", str(tmp_path / "o2"), "--repeat", "x"])
    assert code == 2 and "--repeat 'x'" in capsys.readouterr().err


def test_prepare_rejects_bad_input(spm_model, tmp_path):
    tok = K2Tokenizer(spm_model)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"txt": 1}\n')
    with pytest.raises(UserError, match=r"bad\.jsonl:2: expected a JSON object with a string"):
        prepare_chunks(tok, [bad], tmp_path / "o", 1, 8, progress=False)
    with pytest.raises(UserError, match="input file not found"):
        prepare_chunks(tok, [tmp_path / "nope.txt"], tmp_path / "o", 1, 8, progress=False)
