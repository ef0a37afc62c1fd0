"""`k2jax generate`: continue prompts with given weights (KV-cache decoding on the device mesh).

Prompts come from --prompt (repeatable) or --prompts FILE.jsonl (one object a line with a
"prompt" string). Greedy by default; --temperature > 0 samples (with --top-k, --top-p, --seed).
Settings: --config FILE plus mesh.* overrides (the mesh the weights are sharded on, as in
training); the architecture comes from the weights.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

from k2jax import dtypes
from k2jax.commands.cli_args import (add_command, add_weights_args, dtype_metavar, dtype_type,
                                     stderr_log)
from k2jax.errors import UserError

GENERATE_DTYPES = (dtypes.FLOAT32, dtypes.BFLOAT16)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = add_command(subparsers, "generate", "continue text prompts with given weights",
                    "k2jax generate --hf K2-ckpt_360 --prompt 'The capital of France is' "
                    "--max-new-tokens 32 --dtype bf16 mesh.tensor=4", description=__doc__)
    add_weights_args(p)
    p.add_argument("--tokenizer", metavar="PATH", default=None,
                   help="SentencePiece .model file, or a directory with Hugging Face tokenizer "
                        "files (unset: the --hf directory)")
    prompts = p.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--prompt", action="append", metavar="TEXT", help="a prompt (repeat "
                         "for a batch)")
    prompts.add_argument("--prompts", metavar="FILE.jsonl", help="one JSON object a line with "
                         "a \"prompt\" string")
    p.add_argument("--chat", action="store_true",
                   help="each prompt is a user message, rendered with the chat template of "
                        "--config (data.chat; unset: k2-chat) exactly as `data prepare-chat` "
                        "renders training data")
    p.add_argument("--max-new-tokens", type=int, default=64, metavar="N",
                   help="tokens generated per prompt at most")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-k", type=int, default=0, metavar="K", help="0: every token")
    p.add_argument("--top-p", type=float, default=1.0, metavar="P", help="1: every token")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling (--temperature > 0)")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="stop a prompt's generation at this text (repeatable; EOS always stops)")
    p.add_argument("--batch-size", type=int, default=32, metavar="N",
                   help="prompts decoded together")
    p.add_argument("--dtype", default="bf16", type=dtype_type(GENERATE_DTYPES),
                   metavar=dtype_metavar(GENERATE_DTYPES), help="parameter and compute dtype")
    p.add_argument("--json", action="store_true", help="one JSON object per prompt (prompt, "
                   "text, token ids, finish reason) on stdout")
    p.add_argument("--config", default=None, metavar="FILE|PRESET",
                   help="config whose mesh section shards the weights (unset: fsdp over all "
                        "devices)")
    p.add_argument("overrides", nargs="*", metavar="mesh.key=value",
                   help="mesh overrides, e.g. mesh.tensor=4 mesh.fsdp=-1")
    p.set_defaults(flag_words={"temperature": "--temperature", "top_k": "--top-k",
                               "top_p": "--top-p", "max_new_tokens": "--max-new-tokens"})
    p.set_defaults(func=run)


def read_prompts(args: argparse.Namespace) -> list[str]:
    if args.prompt:
        return list(args.prompt)
    try:
        lines = open(args.prompts, encoding="utf-8").read().splitlines()
    except OSError as err:
        raise UserError(f"--prompts {args.prompts}: {err.strerror}") from None
    prompts = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            prompt = json.loads(line)["prompt"]
        except (json.JSONDecodeError, KeyError, TypeError):
            prompt = None
        if not isinstance(prompt, str):
            raise UserError(f"--prompts {args.prompts} line {number}: expected a JSON object "
                            "with a \"prompt\" string")
        prompts.append(prompt)
    if not prompts:
        raise UserError(f"--prompts {args.prompts}: no prompts")
    return prompts


def chat_prompt_ids(texts: list[str], config: str | None, tokenizer_path: str
                    ) -> list[list[int]]:
    """Each text as a one-turn conversation's prompt in the training template (the model
    replies after the assistant marker); marker ids as `data prepare-chat` takes them."""
    from pathlib import Path

    from k2jax.config import load_config
    from k2jax.data.chat import chat_tokenizer, render_prompt

    chat = load_config(config or "k2-chat").data.chat
    model = Path(tokenizer_path)
    if model.is_dir():
        model = model / "tokenizer.model"
    tokenizer = chat_tokenizer(model, chat)
    return [render_prompt([{"role": "user", "content": text}], chat, tokenizer)
            for text in texts]


def mesh_config(args: argparse.Namespace):
    from k2jax.config import config_from_dict, load_config_dict

    for item in args.overrides:
        if not item.strip().startswith("mesh."):
            raise UserError(f"{item}: generate takes mesh.* settings only (the model's come "
                            "from the weights)")
    data = load_config_dict(args.config, args.overrides)
    return config_from_dict({"mesh": data.get("mesh", {})}).mesh


def run(args: argparse.Namespace) -> int:
    from k2jax.generate.sampling import SamplingParams
    from k2jax.generate.text_tokenizer import TextTokenizer
    from k2jax.weights import open_weights

    # Everything a user can get wrong is checked before any weight is read.
    sampling = SamplingParams(args.temperature, args.top_k, args.top_p, args.seed).validate()
    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {args.batch_size}")
    tokenizer_path = args.tokenizer or args.hf
    if tokenizer_path is None:
        raise UserError("--tokenizer is required with --checkpoint")
    texts = read_prompts(args)
    mesh = mesh_config(args)
    weights = open_weights(args.hf, args.checkpoint, stderr_log)
    config = weights.for_inference(args.dtype)
    tokenizer = TextTokenizer(tokenizer_path)
    tokenizer.check_fits(config.vocab_size)
    if tokenizer.vocab_size < config.vocab_size:  # padded embedding rows: never chosen
        sampling = dataclasses.replace(sampling, vocab_limit=tokenizer.vocab_size)
    prompts = (chat_prompt_ids(texts, args.config, tokenizer_path) if args.chat
               else [tokenizer.encode(text) for text in texts])
    context = config.max_position_embeddings
    for i, prompt in enumerate(prompts):
        if not prompt:
            raise UserError(f"prompt {i}: no tokens")
        if len(prompt) + args.max_new_tokens > context:
            raise UserError(f"prompt {i}: {len(prompt)} tokens + --max-new-tokens "
                            f"{args.max_new_tokens} exceed the model's context of {context}")

    from k2jax import distributed

    distributed.initialize()
    import jax

    from k2jax.generate import Generator

    t0 = time.perf_counter()
    loaded = weights.load(config, mesh)
    stderr_log(f"generate: weights on {loaded.mesh.devices.size} device(s) "
               f"(mesh {dict(loaded.mesh.shape)}) in {time.perf_counter() - t0:.1f} s")
    generator = Generator(loaded.params, loaded.config, loaded.mesh, loaded.rules)
    eos = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
    stops = [s for s in args.stop if s]
    t0, produced = time.perf_counter(), 0
    for start in range(0, len(prompts), args.batch_size):
        batch = prompts[start:start + args.batch_size]
        results = generator.generate(
            batch, args.max_new_tokens, sampling, eos_ids=eos,
            stop=(lambda i, tokens: any(s in tokenizer.decode(tokens) for s in stops))
            if stops else None)
        for offset, result in enumerate(results):
            text = tokenizer.decode(result.tokens)
            for stop in stops:
                text = text.split(stop)[0]
            produced += len(result.tokens)
            if jax.process_index() != 0:  # every host of a pod computes the same tokens
                continue
            if args.json:
                print(json.dumps({"prompt": texts[start + offset], "text": text,
                                  "prompt_ids": batch[offset], "token_ids": result.tokens,
                                  "finish_reason": result.finish_reason}), flush=True)
            else:
                print(texts[start + offset] + text, flush=True)
    seconds = time.perf_counter() - t0
    stderr_log(f"generate: {produced} tokens for {len(prompts)} prompt(s) in {seconds:.1f} s "
               f"(compiles included)")
    sys.stdout.flush()
    return 0
