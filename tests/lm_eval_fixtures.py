"""A tiny Hugging Face checkpoint with its own word-level tokenizer, and small local lm-eval tasks
(multiple choice, generation, rolling log-likelihood) written as YAML + jsonl (no hub)."""

from __future__ import annotations

import json
import random
from pathlib import Path

from hf_models import tiny_llama

WORDS = ("the quick brown fox jumps over lazy dog a cat sat on mat red green blue sky sea "
         "one two three four five six seven eight nine ten is was and or not yes no big "
         "small old new up down left right").split()
SPECIAL = ("<pad>", "<unk>", "</s>")  # ids 0, 1, 2: the tiny model's pad and EOS ids


def save_word_tokenizer(directory: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIAL + tuple(WORDS))}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>")
    fast.save_pretrained(directory)


def build_checkpoint(directory: Path, num_kv_heads: int = 2, max_positions: int = 64) -> Path:
    model = tiny_llama(num_kv_heads=num_kv_heads, max_positions=max_positions, seed=3)
    model.save_pretrained(directory)
    save_word_tokenizer(directory)
    return directory


def sentence(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


def write_tasks(directory: Path, docs: int = 12) -> list[str]:
    """Three tasks in `directory`; returns their names."""
    rng = random.Random(0)
    mc = [{"question": sentence(rng, rng.randint(2, 9)),
           "choices": [sentence(rng, rng.randint(1, 4)) for _ in range(4)],
           "answer": rng.randrange(4)} for _ in range(docs)]
    gen = [{"prompt": sentence(rng, rng.randint(2, 12)), "target": sentence(rng, 2)}
           for _ in range(docs)]
    # Longer than max_length 64 for some rows: several rolling windows.
    text = [{"text": sentence(rng, rng.randint(5, 90))} for _ in range(docs // 2)]
    for name, rows in (("mc", mc), ("gen", gen), ("text", text)):
        with open(directory / f"{name}.jsonl", "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)

    def dataset(name: str) -> str:
        return (f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: "
                f"{directory / (name + '.jsonl')}\ntest_split: test\n")

    (directory / "k2jax_tiny_mc.yaml").write_text(
        "task: k2jax_tiny_mc\n" + dataset("mc") + "output_type: multiple_choice\n"
        "doc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{answer}}'\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    (directory / "k2jax_tiny_gen.yaml").write_text(
        "task: k2jax_tiny_gen\n" + dataset("gen") + "output_type: generate_until\n"
        "doc_to_text: '{{prompt}}'\ndoc_to_target: '{{target}}'\n"
        "generation_kwargs:\n  until: ['dog', 'cat']\n  max_gen_toks: 10\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n")
    (directory / "k2jax_tiny_text.yaml").write_text(
        "task: k2jax_tiny_text\n" + dataset("text") + "output_type: loglikelihood_rolling\n"
        "doc_to_text: ''\ndoc_to_target: '{{text}}'\n"
        "metric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n")
    return ["k2jax_tiny_mc", "k2jax_tiny_gen", "k2jax_tiny_text"]
