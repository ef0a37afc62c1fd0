"""A user's first hour (issue 27): the messages, help texts and rules a newcomer meets after the
quick start. Each test states the problem it fixed ("Before: ...")."""

from __future__ import annotations

import json
import shutil

import pytest

from k2jax.cli import main
from k2jax.tokenizer import K2Tokenizer, sentencepiece_file, tokenizer_files
from k2jax.errors import UserError
from test_data_prepare import random_text, spm_model  # noqa: F401  (a SentencePiece fixture)


def run(argv) -> int:
    return main([str(a) for a in argv])


def error_line(capsys, argv) -> str:
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == 2, err
    return err


def test_unknown_flag_prints_the_subcommands_usage(capsys):
    """Before: the top-level usage (`usage: k2jax [-h] [--version] COMMAND ...`)."""
    with pytest.raises(SystemExit) as exit_info:
        main(["data", "prepare-chat", "--tokenizer", "t", "--input", "i", "--out", "o",
              "--bogus"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err.startswith("usage: k2jax data prepare-chat ")
    assert "k2jax data prepare-chat: error: unrecognized arguments: --bogus" in err


def test_errors_name_the_subcommand(capsys, tmp_path):
    """Before: `k2jax data: error: ...` for any data subcommand."""
    err = error_line(capsys, ["data", "prepare-chat", "--tokenizer", tmp_path / "none.model",
                              "--input", "i", "--out", tmp_path / "o"])
    assert err.startswith("k2jax data prepare-chat: error: ")
    assert "none.model: tokenizer not found" in err and err.count("\n") == 1


def test_every_option_shows_its_default(capsys):
    """Before: `generate --help` showed `--max-new-tokens N` and `--seed SEED` without theirs."""
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    out = capsys.readouterr().out
    assert "--max-new-tokens N    default: 64" in out
    assert "--seed SEED           default: 0" in out


def test_prepare_chat_help_shows_its_own_defaults_once(capsys):
    """Before: the config's default twice, and --seq-len's as K2-65B's 2048."""
    with pytest.raises(SystemExit):
        main(["data", "prepare-chat", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert out.count("(default: k2-chat)") == 1 and "K2-Chat's) (default" in out
    assert "k2-chat: 8192" in out and "k2-65b: 2048" not in out


def test_tokenizer_is_a_model_file_or_a_directory_everywhere(spm_model, tmp_path):
    """Before: a directory was refused by `data prepare` and a .model file by `convert
    orbax-to-hf --tokenizer`; a missing file said "expected a SentencePiece .model file"."""
    directory = tmp_path / "tok"
    directory.mkdir()
    shutil.copy(spm_model, directory / "tokenizer.model")
    assert K2Tokenizer(directory).sp_size == K2Tokenizer(spm_model).sp_size
    assert tokenizer_files(spm_model) == [str(spm_model)]
    assert tokenizer_files(directory) == [str(directory / "tokenizer.model")]
    assert sentencepiece_file(directory) == str(directory / "tokenizer.model")
    with pytest.raises(UserError, match="missing.model: tokenizer not found"):
        K2Tokenizer(tmp_path / "missing.model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="empty: no tokenizer files in this directory"):
        tokenizer_files(tmp_path / "empty")
    hf_only = tmp_path / "hf_only"
    hf_only.mkdir()
    (hf_only / "tokenizer.json").write_text("{}")
    with pytest.raises(UserError, match="hf_only: no tokenizer.model in this directory"):
        K2Tokenizer(hf_only)


def test_data_prepare_output_is_indexed_and_trainable(spm_model, tmp_path, capsys):
    """Before: the next command failed with `not indexed` until `k2jax data index`."""
    import random

    text = tmp_path / "notes.txt"
    text.write_text(random_text(random.Random(3), 400))
    out = tmp_path / "mine"
    assert run(["data", "prepare", "--tokenizer", spm_model, "--input", text, "--out", out,
                 "--num-chunks", "2", "--seq-len", "16", "--quiet"]) == 0
    assert "indexed" in capsys.readouterr().out
    assert sorted(p.name for p in (out / ".k2index").glob("chunk_*.json")) == [
        "chunk_0.json", "chunk_1.json"]
    assert run(["data", "batch", "--data", out, "--order", "0,1", "--step", "0",
                 "--global-batch", "2", "--seq-len", "16", "--vocab-size", "318",
                 "--out", tmp_path / "b.npy"]) == 0, capsys.readouterr().err


def test_data_prepare_says_when_chunks_are_empty(spm_model, tmp_path, capsys):
    text = tmp_path / "short.txt"
    text.write_text("the quick brown fox")  # one short document: one row at most
    assert run(["data", "prepare", "--tokenizer", spm_model, "--input", text, "--out",
                tmp_path / "o", "--num-chunks", "4", "--seq-len", "16", "--quiet"]) == 0
    assert "of the 4 chunk files hold no row" in capsys.readouterr().err


def test_prepare_chat_refuses_more_chunks_than_rows(spm_model, tmp_path, capsys):
    """Before: `--num-chunks 2` on conversations packing into one row wrote an empty
    chunk_0.jsonl, rc 0."""
    chats = tmp_path / "c.jsonl"
    chats.write_text(json.dumps({"messages": [{"role": "user", "content": "fox"},
                                              {"role": "assistant", "content": "dog"}]}) + "\n")
    err = error_line(capsys, ["data", "prepare-chat", "--tokenizer", spm_model, "--input", chats,
                              "--out", tmp_path / "o", "--num-chunks", "2",
                              "model.vocab_size=336", "data.seq_len=32"])
    assert "pack into 1 rows of data.seq_len=32, fewer than num_chunks=2" in err
    assert not (tmp_path / "o").exists()  # a refused start writes nothing
