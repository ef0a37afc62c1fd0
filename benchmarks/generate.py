"""Generation and scoring speed: k2jax against Hugging Face transformers on this CPU, side by
side in one run, and the memory of a K2-65B decode step compiled ahead of time for v5p slices.

CPU part (~100 M parameters: hidden 768, 12 layers, 12 heads, K2's vocabulary, fp32): the same
random weights in both frameworks; decode tokens/s of greedy generation (a batch of prompts,
prefill included, compiles excluded: one warm-up call first) and log-likelihood requests/s (what
lm-eval's `loglikelihood` asks: context + continuation, one forward per batch, log-softmax,
gather). Medians of --repeats runs, the frameworks timed in turns.

AOT part: one decode step (one token for every row, reading a K/V cache of --cache-len slots)
of K2-65B in bf16, tensor-parallel over every chip of the slice, compiled with libtpu for each
--topologies slice; per chip: parameters, cache, temporaries, against 95 GiB of v5p HBM.

    JAX_PLATFORMS=cpu python benchmarks/generate.py [--only cpu|aot]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

GIB = 1024 ** 3
K2_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                         "configs", "k2-65b.yaml")
SHAPE_100M = dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                  num_attention_heads=12, num_key_value_heads=12, max_position_embeddings=2048)
SHAPE_TINY = dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2,  # gpu_step --dry
                  num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=2048)



def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def cpu_models(shape=SHAPE_100M):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from k2jax.hf.config_json import model_config_from_hf
    from k2jax.hf.name_map import params_from_hf

    from k2jax.config import load_config

    torch.manual_seed(0)
    vocab = load_config(K2_CONFIG).model.vocab_size  # K2's padded vocabulary
    hf_config = LlamaConfig(**shape, vocab_size=vocab, rms_norm_eps=1e-5, tie_word_embeddings=False,
                            attn_implementation="sdpa", pad_token_id=0, eos_token_id=2,
                            bos_token_id=1)
    model = LlamaForCausalLM(hf_config).eval()
    config = model_config_from_hf(hf_config.to_dict(), param_dtype="float32",
                                  compute_dtype="float32", remat="none", attention="xla")
    weights = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    params = jax.tree.map(jnp.asarray, params_from_hf(weights.__getitem__, config))
    return model, params, config


def cpu_benchmark(args) -> list[tuple[str, float, float]]:
    return speed_comparison(args)


def speed_comparison(args, device: str = "cpu", shape=SHAPE_100M
                     ) -> list[tuple[str, float, float]]:
    """Decode tokens/s and loglikelihood requests/s of k2jax (jax's default device) and
    transformers (torch `device`), medians of args.repeats runs in turns; prints a table."""
    import torch

    from k2jax.generate import Generator
    from k2jax.generate.scoring import Scorer

    torch.set_num_threads(os.cpu_count() or 1)
    model, params, config = cpu_models(shape)
    model = model.to(device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    rng = np.random.default_rng(0)
    top = config.vocab_size
    prompts = [rng.integers(3, top, n).tolist() for n in
               rng.integers(args.prompt_len // 2, args.prompt_len + 1, args.batch)]
    new = args.new_tokens

    generator = Generator(params, config)
    k2jax_generate = lambda: generator.generate(prompts, new)  # no EOS: always `new` tokens
    length = max(map(len, prompts))
    ids = torch.tensor([[0] * (length - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (length - len(p)) + [1] * len(p) for p in prompts],
                        device=device)

    def hf_generate():
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new,
                           min_new_tokens=new, do_sample=False, pad_token_id=0)
        sync()

    pairs = [(rng.integers(3, top, int(c)).tolist(), rng.integers(3, top, 4).tolist())
             for c in rng.integers(32, args.context_len + 1, args.requests)]
    scorer = Scorer(params, config)

    def k2jax_score():
        for start in range(0, len(pairs), args.score_batch):
            scorer.score(pairs[start:start + args.score_batch])

    def hf_score():  # lm-eval's hf backend: right-padded batch, log_softmax, gather
        with torch.no_grad():
            for start in range(0, len(pairs), args.score_batch):
                chunk = pairs[start:start + args.score_batch]
                inputs = [(c + t)[:-1] for c, t in chunk]
                width = max(map(len, inputs))
                batch = torch.tensor([x + [0] * (width - len(x)) for x in inputs],
                                     device=device)
                logp = torch.log_softmax(model(batch).logits, dim=-1)
                for row, (c, t) in enumerate(chunk):
                    span = logp[row, len(c) - 1:len(c) - 1 + len(t)]
                    span.gather(1, torch.tensor(t, device=device)[:, None]).sum().item()

    runs = {"kg": k2jax_generate, "hg": hf_generate, "ks": k2jax_score, "hs": hf_score}
    on_cpu = jax.default_backend() == "cpu"  # k2jax's CPU paths: per-layer weights, fine buckets
    if args.ab:  # k2jax's other paths, in the same turns
        other = Generator(params, config, per_layer_weights=not on_cpu)
        runs["kg_old"] = lambda: other.generate(prompts, new)
        other_scorer = Scorer(params, config, fine_buckets=not on_cpu)
        runs["ks_old"] = lambda: [other_scorer.score(pairs[s:s + args.score_batch])
                                  for s in range(0, len(pairs), args.score_batch)]
    for warm in runs.values():
        warm()  # compiles (k2jax), allocator warm-up (torch)
    times = {name: [] for name in runs}
    for _ in range(args.repeats):  # in turns, so load on this shared machine hits all alike
        for name, fn in runs.items():
            times[name].append(median_seconds(fn, 1))
    med = {k: statistics.median(v) for k, v in times.items()}
    decode_tokens = args.batch * new
    rows = [("decode tokens/s", decode_tokens / med["kg"], decode_tokens / med["hg"]),
            ("loglikelihood requests/s", len(pairs) / med["ks"], len(pairs) / med["hs"])]
    if args.ab:
        rows += [(f"decode, {'scanned' if on_cpu else 'per-layer'} weights",
                  decode_tokens / med["kg_old"], decode_tokens / med["hg"]),
                 (f"loglikelihood, {'2^n' if on_cpu else 'fine'} buckets",
                  len(pairs) / med["ks_old"], len(pairs) / med["hs"])]
    where = f"CPU, {os.cpu_count()} cores" if device == "cpu" else f"{device} (jax: " \
        f"{jax.devices()[0].device_kind})"
    print(f"\n{where}, {sum(x.size for x in jax.tree.leaves(params)) / 1e6:.0f} M parameters, "
          f"fp32, load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}; decode: "
          f"{args.batch} prompts of {args.prompt_len // 2}-{args.prompt_len} tokens + {new} new "
          "(prefill included); "
          f"loglikelihood: {args.requests} requests, contexts 32-{args.context_len} tokens, "
          f"4-token continuations, batches of {args.score_batch}; median of {args.repeats}")
    print(f"{'':28s}{'k2jax':>12s}{'transformers':>14s}{'ratio':>8s}")
    for name, ours, theirs in rows:
        print(f"{name:28s}{ours:12.1f}{theirs:14.1f}{ours / theirs:8.2f}")
    return rows


def aot_decode_memory(topology: str, batch: int, cache_len: int) -> dict:
    from jax.sharding import NamedSharding, PartitionSpec

    from k2jax.aot.topology import parse_slice
    from k2jax.aot.compile_report import topology_devices
    from k2jax.config import MeshConfig, load_config
    from k2jax.weights import inference_model_config
    from k2jax.weights.on_mesh import sharded_abstract_params
    from k2jax.generate import Generator
    from k2jax.generate.batching import batch_shards
    from k2jax.model.kv_cache import KVCache
    from k2jax.sharding.mesh import build_mesh
    from k2jax.sharding.rules import rules_list

    tpu = parse_slice(topology)
    devices = topology_devices(tpu)
    config = inference_model_config(load_config(K2_CONFIG).model, "bf16",
                                    attention="splash")
    mesh_config = MeshConfig(data=1, fsdp=1, tensor=len(devices))
    mesh, rules = build_mesh(mesh_config, devices), mesh_config.rules
    shapes, shardings = sharded_abstract_params(config, mesh, rules)
    params = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                          shapes, shardings)
    table = dict(rules_list(rules))
    spec = lambda *axes: NamedSharding(mesh, PartitionSpec(*axes))
    rows = batch
    assert rows % batch_shards(mesh, rules) == 0
    kv = (config.num_layers, rows, config.num_kv_heads, cache_len, config.resolved_head_dim)
    cache_sharding = spec(None, table["batch"], table["kv_heads"], None, None)
    cache = KVCache(jax.ShapeDtypeStruct(kv, jnp.bfloat16, sharding=cache_sharding),
                    jax.ShapeDtypeStruct(kv, jnp.bfloat16, sharding=cache_sharding),
                    jax.ShapeDtypeStruct((rows, cache_len), bool,
                                         sharding=spec(table["batch"], None)))
    replicated = spec()
    scalar = lambda dtype: jax.ShapeDtypeStruct((), dtype, sharding=replicated)
    vector = lambda dtype: jax.ShapeDtypeStruct((rows,), dtype, sharding=replicated)
    key = jax.eval_shape(lambda: jax.random.key(0))
    generator = Generator(None, config, mesh, rules, decode_chunk=1)
    start = time.perf_counter()
    lowered = generator._decode.lower(
        params, cache, jax.ShapeDtypeStruct((rows, config.vocab_size), jnp.float32,
                                            sharding=replicated),
        vector(jnp.int32), scalar(jnp.int32), vector(bool),
        jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=replicated),
        {"temperature": scalar(jnp.float32), "top_k": scalar(jnp.int32),
         "top_p": scalar(jnp.float32)}, jax.ShapeDtypeStruct((1,), jnp.int32,
                                                             sharding=replicated))
    memory = lowered.compile().memory_analysis()
    total = (memory.argument_size_in_bytes + memory.output_size_in_bytes
             - memory.alias_size_in_bytes + memory.temp_size_in_bytes)
    shard = lambda tree: sum(np.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
                             for x in jax.tree.leaves(tree))
    return {"topology": topology, "chips": len(devices), "mesh": dict(mesh.shape),
            "params_gib": shard(params) / GIB, "cache_gib": shard(cache) / GIB,
            "temp_gib": memory.temp_size_in_bytes / GIB, "total_gib": total / GIB,
            "hbm_gib": tpu.generation.hbm_bytes / GIB,
            "fits": total <= tpu.generation.hbm_bytes,
            "compile_s": time.perf_counter() - start}


def aot_benchmark(args) -> list[dict]:
    print(f"\nK2-65B decode step, bf16, batch {args.aot_batch} x cache {args.cache_len} "
          "tokens, tensor-parallel over all chips, compiled with libtpu (per chip):")
    print(f"{'slice':10s}{'chips':>6s}{'params':>10s}{'KV cache':>10s}{'temp':>9s}"
          f"{'total':>10s}{'HBM':>8s}{'fits':>6s}{'compile':>9s}")
    reports = []
    for topology in args.topologies.split(","):
        r = aot_decode_memory(topology, args.aot_batch, args.cache_len)
        reports.append(r)
        print(f"{r['topology']:10s}{r['chips']:6d}{r['params_gib']:9.1f}G{r['cache_gib']:9.1f}G"
              f"{r['temp_gib']:8.1f}G{r['total_gib']:9.1f}G{r['hbm_gib']:7.0f}G"
              f"{'yes' if r['fits'] else 'no':>6s}{r['compile_s']:8.0f}s", flush=True)
    return reports


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=("cpu", "aot"))
    parser.add_argument("--batch", type=int, default=4, help="decode prompts")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--context-len", type=int, default=256)
    parser.add_argument("--score-batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ab", action="store_true",
                        help="also time k2jax's other paths: scanned vs per-layer decode "
                             "weights, power-of-two vs fine scoring buckets")
    parser.add_argument("--topologies", default="v5p-8,v5p-16,v5p-32")
    parser.add_argument("--aot-batch", type=int, default=32)
    parser.add_argument("--cache-len", type=int, default=4096)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, jax {jax.__version__}, "
          f"{sys.platform}", flush=True)
    if args.only in (None, "cpu"):
        cpu_benchmark(args)
    if args.only in (None, "aot"):
        aot_benchmark(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
