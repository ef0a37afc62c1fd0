"""A plain-Python transcription of K2's data preparation (LLM360/k2-data-prep), for tests.

It follows K2's four scripts step by step, with their files on disk and their loops, so that
`k2jax data prepare` (one pass, no intermediate files) can be checked against it:
`tokenize_datasets.py` (tokenize_subsets), `starcoder_fim_main.py` (fim_subsets), `gather.py`
(gather_chunk) and `shuffle.py` (shuffle_chunks). Changes from K2, all forced:

- paths and sizes are arguments instead of module constants (K2: 360 chunks, 2048 tokens);
- no multiprocessing pools (K2's pools keep order; they only changed speed);
- K2's FIM generators were never seeded (numpy's global state in forked workers; Python's
  `random.seed(time.time() + chunk)` in gather.py). Here numpy is seeded per (file, FIM copy)
  with `np.random.seed([seed, file position, copy])` and gather's draw with
  `random.seed(f"{seed}:{file position}:{chunk}")`: the documented seeding of k2jax;
- the tokenizer is `HFLlamaTokenizer2023`, a stand-in for the `LlamaTokenizerFast` K2 loaded
  ('huggyllama/llama-7b' + 18 added special tokens), written from how that tokenizer behaved
  (tokenizers' legacy Llama pipeline), on top of a SentencePiece model trained by the test.
"""

from __future__ import annotations

import json
import os
import random
import re

import numpy as np
import sentencepiece

ADDITIONAL_SPECIAL_TOKENS = [
    "<fim_prefix>", "<fim_middle>", "<fim_suffix>", "<fim_pad>", "<filename>", "<gh_stars>",
    "<issue_start>", "<issue_comment>", "<issue_closed>", "<jupyter_start>", "<jupyter_text>",
    "<jupyter_code>", "<jupyter_output>", "<empty_output>", "<commit_before>", "<commit_msg>",
    "<commit_after>", "<reponame>",
]
WORD_BUFFER_SIZE = 2048 * 2


class HFLlamaTokenizer2023:
    """What K2's scripts used of LlamaTokenizerFast (transformers 4.3x, tokenizers' legacy Llama
    pipeline): added tokens are cut out of the text first; every other non-empty segment is
    normalized on its own ('▁' prepended, ' ' -> '▁') and BPE-encoded, which is SentencePiece's
    encoding of that segment. decode runs the decoder chain Replace('▁', ' '), ByteFallback,
    Fuse, Strip(1 leading space) over all tokens, added ones as their text."""

    def __init__(self, spm_path):
        self.sp = sentencepiece.SentencePieceProcessor(model_file=str(spm_path))
        size = self.sp.get_piece_size()
        self.vocab = {self.sp.id_to_piece(i): i for i in range(size)}
        for i, token in enumerate(ADDITIONAL_SPECIAL_TOKENS):
            self.vocab[token] = size + i
        self.eos_token, self.eos_token_id = "</s>", self.vocab["</s>"]
        self.all_special_tokens = ["<s>", "</s>", "<unk>"] + ADDITIONAL_SPECIAL_TOKENS
        self._id_to_token = {i: t for t, i in self.vocab.items()}
        self._added = re.compile("(" + "|".join(map(re.escape, self.all_special_tokens)) + ")")

    def __call__(self, text, add_special_tokens=False):
        assert not add_special_tokens
        ids = []
        for segment in self._added.split(text):
            if segment in self.all_special_tokens:
                ids.append(self.vocab[segment])
            elif segment:
                ids.extend(self.sp.encode(segment))
        return {"input_ids": ids}

    def decode(self, ids, skip_special_tokens=False):
        assert not skip_special_tokens
        pieces = [self._id_to_token[int(i)].replace("\u2581", " ") for i in ids]
        out, pending = [], b""
        for piece in pieces + [None]:
            if piece is not None and re.fullmatch(r"<0x[0-9A-F]{2}>", piece):
                pending += bytes([int(piece[3:5], 16)])
                continue
            if pending:
                try:
                    out.append(pending.decode("utf-8"))
                except UnicodeDecodeError:
                    out.append("\ufffd" * len(pending))
                pending = b""
            if piece is not None:
                out.append(piece)
        text = "".join(out)
        return text[1:] if text.startswith(" ") else text


# ---------------------------------------------------------------- tokenize_datasets.py

def tokenize_text(text, tokenizer):
    cuts = [text]
    for special_token in tokenizer.all_special_tokens:
        next_cuts = []
        for cut in cuts:
            for i, part in enumerate(cut.split(special_token)):
                if i != 0:
                    next_cuts.append(special_token)
                next_cuts.append(part)
        cuts = next_cuts
    token_ids = []
    for cut in cuts:
        token_ids.extend(tokenizer(cut, add_special_tokens=False)["input_ids"])
    return token_ids


def example_iterator(filename, subset_name, eos_token):
    text_key = "content" if subset_name == "refinedweb" or subset_name.startswith("starcoder") \
        else "text"
    word_buffer = []
    for line in open(filename):
        example = json.loads(line)
        if isinstance(example[text_key], dict):
            assert subset_name == "pile-of-law"
            text = example[text_key][text_key]
        else:
            text = example[text_key]
        text = text + eos_token
        word_buffer.extend(text.split(" "))
        while len(word_buffer) >= WORD_BUFFER_SIZE:
            yield " ".join(word_buffer[:WORD_BUFFER_SIZE])
            word_buffer = word_buffer[WORD_BUFFER_SIZE:]
    yield " ".join(word_buffer)


def tokenize_subsets(chunked_dir, output_dir, tokenizer, context_length):
    for subset_name in os.listdir(chunked_dir):
        for name in os.listdir(f"{chunked_dir}/{subset_name}"):
            chunk_filename = f"{chunked_dir}/{subset_name}/{name}"
            os.makedirs(f"{output_dir}/{subset_name}", exist_ok=True)
            with open(f"{output_dir}/{subset_name}/{name}", "w") as output_file:
                examples = list(example_iterator(chunk_filename, subset_name,
                                                 tokenizer.eos_token))
                token_buffer = []
                for example in examples:
                    token_buffer.extend(tokenize_text(example, tokenizer))
                    while len(token_buffer) >= context_length:
                        output_file.write(json.dumps({
                            "token_ids": token_buffer[:context_length],
                            "source": subset_name}) + "\n")
                        token_buffer = token_buffer[context_length:]


# ---------------------------------------------------------------- starcoder_fim_main.py

def fim_tokenize(text, tokenizer):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def permute(sample, tokenizer, fim_rate, spm_rate):
    """truncate_or_pad is False in K2's call, so that branch is left out."""
    suffix_id, prefix_id, middle_id = (tokenizer.vocab[t] for t in
                                       ["<fim_suffix>", "<fim_prefix>", "<fim_middle>"])
    if np.random.binomial(1, fim_rate):
        contents = tokenizer.decode(sample, skip_special_tokens=False)
        boundaries = list(np.random.randint(low=0, high=len(contents) + 1, size=2))
        boundaries.sort()
        prefix = np.array(fim_tokenize(contents[:boundaries[0]], tokenizer), dtype=np.int64)
        middle = np.array(fim_tokenize(contents[boundaries[0]:boundaries[1]], tokenizer),
                          dtype=np.int64)
        suffix = np.array(fim_tokenize(contents[boundaries[1]:], tokenizer), dtype=np.int64)
        if np.random.binomial(1, spm_rate):
            new_sample = np.concatenate([[prefix_id, suffix_id], suffix, [middle_id], prefix,
                                         middle])
        else:
            new_sample = np.concatenate([[prefix_id], prefix, [suffix_id], suffix, [middle_id],
                                         middle])
    else:
        new_sample = sample
    return new_sample


def fim(token_ids, tokenizer, fim_rate, spm_rate):
    sample = np.array(token_ids, dtype=np.int64)
    sample_len = sample.shape[0]
    if fim_rate != 0:
        eod = tokenizer.eos_token_id
        pad = tokenizer.vocab["<fim_pad>"]
        segment_breaks = np.argwhere(sample == eod)
        if segment_breaks.shape != (0, 1):
            curr_start_position = 0
            new_samples = []
            for loc in np.nditer(segment_breaks):
                if loc - curr_start_position > 0:
                    permuted = permute(sample[curr_start_position:loc], tokenizer, fim_rate,
                                       spm_rate)
                    new_samples += [permuted, [eod]]
                curr_start_position = loc + 1
            new_samples.append(permute(sample[curr_start_position:], tokenizer, fim_rate,
                                       spm_rate))
            sample = np.concatenate(new_samples)
        else:
            sample = permute(sample, tokenizer, fim_rate, spm_rate)
    diff = sample.shape[0] - sample_len
    if diff > 0:
        sample = sample[:sample_len]
    elif diff < 0:
        sample = np.concatenate([sample, np.full((-1 * diff), pad)])
    assert sample.shape[0] == sample_len
    return sample.tolist()


def fim_subsets(tokenized_dir, output_dir, tokenizer, spm_rate, seed, file_positions):
    for subset_name in os.listdir(tokenized_dir):
        if not subset_name.startswith("starcoder."):
            continue
        for name in os.listdir(f"{tokenized_dir}/{subset_name}"):
            subset_output_dir = f"{output_dir}/{subset_name}.spm{spm_rate}"
            os.makedirs(subset_output_dir, exist_ok=True)
            # K2: unseeded. Copy 1 is spm0.0, copy 2 is spm1.0.
            np.random.seed([seed, file_positions[(subset_name, name)], 1 + int(spm_rate)])
            with open(f"{subset_output_dir}/{name}", "w") as output_file:
                for line in open(f"{tokenized_dir}/{subset_name}/{name}"):
                    example = json.loads(line)
                    example["token_ids"] = fim(example["token_ids"], tokenizer, 1.0, spm_rate)
                    output_file.write(json.dumps(example) + "\n")


# ---------------------------------------------------------------- gather.py

FIM_RATE = 0.5
SPM_RATE = 0.5


def distribute_samples_starcoder(dirs, subset_name, filename, output_file, file_idx_to_write,
                                 tgt_file_idx, n_repeat, n_chunks, seed, position):
    examples_path = f"{dirs['tokenized']}/{subset_name}/{filename}"
    fim_path = f"{dirs['fim']}/{subset_name}.spm0.0/{filename}"
    spm_path = f"{dirs['fim']}/{subset_name}.spm1.0/{filename}"
    pseudo_n_chunks = int(n_chunks / n_repeat)
    file_idx_to_write = file_idx_to_write % pseudo_n_chunks
    random.seed(f"{seed}:{position}:{tgt_file_idx}")  # K2: time.time() + tgt_file_idx
    for line_idx, (line, line_fim, line_spm) in enumerate(
            zip(open(examples_path), open(fim_path), open(spm_path))):
        if file_idx_to_write == tgt_file_idx % pseudo_n_chunks:
            src_filename = examples_path
            if random.random() < FIM_RATE:
                line = line_fim
                src_filename = fim_path
                if random.random() < SPM_RATE:
                    line = line_spm
                    src_filename = spm_path
            example = json.loads(line)
            example["subset_name"] = subset_name
            example["src_filename"] = src_filename
            example["line_idx_in_src"] = line_idx
            output_file.write(json.dumps(example) + "\n")
        file_idx_to_write = (file_idx_to_write + 1) % pseudo_n_chunks
    return file_idx_to_write


def distribute_samples(dirs, subset_name, filename, output_file, file_idx_to_write,
                       tgt_file_idx, n_repeat, n_chunks):
    examples_path = f"{dirs['tokenized']}/{subset_name}/{filename}"
    pseudo_n_chunks = int(n_chunks / n_repeat)
    file_idx_to_write = file_idx_to_write % pseudo_n_chunks
    for line_idx, line in enumerate(open(examples_path)):
        if file_idx_to_write == tgt_file_idx % pseudo_n_chunks:
            example = json.loads(line)
            example["subset_name"] = subset_name
            example["src_filename"] = examples_path
            example["line_idx_in_src"] = line_idx
            output_file.write(json.dumps(example) + "\n")
        file_idx_to_write = (file_idx_to_write + 1) % pseudo_n_chunks
    return file_idx_to_write


def gather_chunk(dirs, tgt_file_idx, n_chunks, seed, file_positions):
    output_file = open(f"{dirs['gathered']}/chunk_{tgt_file_idx}.jsonl", "w")
    file_idx_to_write = 0
    for subset_name in sorted(os.listdir(dirs["tokenized"])):
        if subset_name == "redpajama.c4":
            continue
        elif subset_name in ["dm-math", "pubmed-abstracts", "uspto"]:
            n_repeat = 3
        elif subset_name == "redpajama.wikipedia":
            n_repeat = 6
        elif subset_name == "redpajama.arxiv":
            n_repeat = 1
        elif subset_name.startswith("redpajama."):
            n_repeat = 3
        elif subset_name.startswith("starcoder."):
            n_repeat = 0.5
        else:
            n_repeat = 1
        for filename in sorted(os.listdir(f"{dirs['tokenized']}/{subset_name}")):
            assert filename.endswith(".jsonl")
            if subset_name.startswith("starcoder."):
                file_idx_to_write = distribute_samples_starcoder(
                    dirs, subset_name, filename, output_file, file_idx_to_write, tgt_file_idx,
                    n_repeat, n_chunks, seed, file_positions[(subset_name, filename)])
            else:
                file_idx_to_write = distribute_samples(
                    dirs, subset_name, filename, output_file, file_idx_to_write, tgt_file_idx,
                    n_repeat, n_chunks)
    output_file.close()


# ---------------------------------------------------------------- shuffle.py

SEED_BASE = 11111


def shuffle_chunks(chunk_dir, output_dir, n_chunks):
    os.makedirs(output_dir, exist_ok=True)
    for chunk_idx in range(n_chunks):
        lines = open(f"{chunk_dir}/chunk_{chunk_idx}.jsonl").readlines()
        random.seed(SEED_BASE + chunk_idx)
        random.shuffle(lines)
        with open(f"{output_dir}/chunk_{chunk_idx}.jsonl", "w") as output_file:
            for line in lines:
                output_file.write(line.strip() + "\n")


# ---------------------------------------------------------------- the whole recipe

def run_k2_recipe(chunked_dir, work_dir, spm_path, n_chunks, context_length, seed):
    """K2's scripts in order on `chunked_dir/{subset}/{file}.jsonl`; returns the dirs used."""
    tokenizer = HFLlamaTokenizer2023(spm_path)
    dirs = {k: f"{work_dir}/{k}" for k in ("tokenized", "fim", "gathered", "final")}
    for d in dirs.values():
        os.makedirs(d, exist_ok=True)
    tokenize_subsets(chunked_dir, dirs["tokenized"], tokenizer, context_length)
    # A file's position in gather's visiting order seeds its FIM generators.
    ordered = [(s, f) for s in sorted(os.listdir(dirs["tokenized"]))
               for f in sorted(os.listdir(f"{dirs['tokenized']}/{s}"))]
    file_positions = {key: i for i, key in enumerate(ordered)}
    for spm_rate in (0.0, 1.0):  # K2 ran starcoder_fim_main.py with spm_rate=0. and 1.
        fim_subsets(dirs["tokenized"], dirs["fim"], tokenizer, spm_rate, seed, file_positions)
    for tgt_file_idx in range(n_chunks):
        gather_chunk(dirs, tgt_file_idx, n_chunks, seed, file_positions)
    shuffle_chunks(dirs["gathered"], dirs["final"], n_chunks)
    return dirs
