"""model.loss_chunk_tokens (model/chunked_loss.py): the loss's logits a chunk of the sequence at
a time. The chunked loss and gradients are the unchunked ones (fp32 sums reordered, <= 1e-6
relative), with bf16-rounded logits, tied embeddings, packed documents and a loss mask;
`auto` leaves small models (tiny, the tests' configs) on the unchunked path."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from k2jax.config import MeshConfig, ModelConfig, load_config
from k2jax.errors import ConfigError
from k2jax.model import K2Model
from k2jax.model import masked_next_token_loss
from k2jax.model import chunked_loss
from k2jax.model.chunked_loss import chunked_next_token_loss, resolve_chunk_tokens
from k2jax.model.transformer import output_logits
from k2jax.sharding.mesh import build_mesh
from k2jax.train.step_loss import StepLoss

SEQ = 16
CONFIG = ModelConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_layers=1,
                     num_heads=2, num_kv_heads=2, max_position_embeddings=SEQ,
                     param_dtype="float32", compute_dtype="float32", remat="none",
                     attention="xla", initializer_range=0.5)  # logits of a few units


def _batch(packed: bool) -> dict:
    tokens = jax.random.randint(jax.random.key(1), (4, SEQ), 0, CONFIG.vocab_size)
    mask = (jax.random.uniform(jax.random.key(2), (4, SEQ)) > 0.3).astype(jnp.float32)
    batch = {"tokens": tokens, "loss_mask": mask}
    if packed:  # two documents a row, the second starting at a row-dependent position
        starts = jnp.array([3, 7, 8, 12])[:, None]
        index = jnp.arange(SEQ)[None, :]
        batch["segment_ids"] = jnp.where(index < starts, 1, 2).astype(jnp.int32)
        batch["positions"] = jnp.where(index < starts, index, index - starts).astype(jnp.int32)
    return batch


def _loss_and_grads(config: ModelConfig, batch: dict, accumulation: int = 1):
    mesh = build_mesh(MeshConfig(fsdp=1), jax.devices()[:1])
    step_loss = StepLoss(config, mesh, load_config("tiny").mesh.rules, rows=4,
                         accumulation=accumulation, gradient_dtype="float32")
    params = nn.meta.unbox(K2Model(config).init(jax.random.key(0), batch["tokens"][:1])["params"])
    return jax.jit(step_loss.value_and_grad)(params, batch)[:2]


def _assert_close(chunked, whole, head_tolerance=1e-6):
    (loss_c, grads_c), (loss_w, grads_w) = chunked, whole
    assert float(loss_c) == pytest.approx(float(loss_w), rel=1e-6)
    for path, g_c in jax.tree_util.tree_leaves_with_path(grads_c):
        g_w = dict(jax.tree_util.tree_leaves_with_path(grads_w))[path]
        name = jax.tree_util.keystr(path)
        scale = float(jnp.max(jnp.abs(g_w)))
        assert scale > 0, name
        tolerance = head_tolerance if "lm_head" in name or "embed_tokens" in name else 1e-6
        # Elementwise, relative to the tensor's largest entry (fp32 sums in another order).
        assert float(jnp.max(jnp.abs(g_c - g_w))) <= tolerance * scale, name


@pytest.mark.parametrize("variant", [
    "per_chunk_head",
    # per_chunk_head is tied too and goes through the same chunks (quick group time: the
    # others run in the slow group; fp32 ~10 s, bf16_logits ~4 s)
    pytest.param("fp32", marks=pytest.mark.slow),
    pytest.param("bf16_logits", marks=pytest.mark.slow),
    pytest.param("tied", marks=pytest.mark.slow), pytest.param("packed", marks=pytest.mark.slow),
    pytest.param("bf16_compute", marks=pytest.mark.slow),  # ~10 s: bf16 CPU matmuls
    pytest.param("per_chunk_head_bf16_compute", marks=pytest.mark.slow)])
def test_chunked_loss_and_gradients_equal_the_whole(variant, monkeypatch):
    config = CONFIG
    if variant.startswith("per_chunk_head"):  # jax.checkpoint'd chunks (a large head's way)
        monkeypatch.setattr(chunked_loss, "HEAD_GATHER_BYTES", 0)
        config = dataclasses.replace(config, tie_word_embeddings=True)
    if variant == "bf16_logits":
        config = dataclasses.replace(config, logits_dtype="bfloat16")
    if variant.endswith("bf16_compute"):  # bf16 matmuls, fp32 weight gradients (weight_grad.matmul)
        config = dataclasses.replace(config, compute_dtype="bfloat16", logits_dtype="bfloat16")
    if variant == "tied":
        config = dataclasses.replace(config, tie_word_embeddings=True)
    batch = _batch(packed=variant == "packed")
    accumulation = 2 if variant == "packed" else 1  # micro-batches: once is enough
    whole = _loss_and_grads(dataclasses.replace(config, loss_chunk_tokens=None), batch,
                            accumulation)
    chunked = _loss_and_grads(dataclasses.replace(config, loss_chunk_tokens=SEQ // 4), batch,
                              accumulation)
    # bf16 compute: the loss and every gradient but the head's (and a tied embedding's) come out
    # bitwise equal; the head's (fp32 sums of bf16 x times dlogits, in 4 chunks) measured 7.9e-6
    # of its largest entry.
    bf16 = variant.endswith("bf16_compute")
    _assert_close(chunked, whole, head_tolerance=2e-5 if bf16 else 1e-6)
    if bf16:
        exact = ["layers", "final_norm"] + ([] if config.tie_word_embeddings else ["embed_tokens"])
        for name in exact:
            assert jax.tree.all(jax.tree.map(jnp.array_equal, chunked[1][name], whole[1][name]))
    if variant == "bf16_logits":  # the rounding is really there: fp32 logits give another loss
        fp32 = _loss_and_grads(dataclasses.replace(CONFIG, loss_chunk_tokens=SEQ // 4), batch)
        assert abs(float(fp32[0]) - float(chunked[0])) > 1e-6


def test_head_gradient_summed_per_batch_shard_then_across():
    """batch_shards > 1 (rows split over devices): dW is accumulated per shard, then summed."""
    keys = jax.random.split(jax.random.key(5), 4)
    hidden = jax.random.normal(keys[0], (4, SEQ, 32))
    head = jax.random.normal(keys[1], (32, 300)) * 0.3
    tokens = jax.random.randint(keys[2], (4, SEQ), 0, 300)
    mask = (jax.random.uniform(keys[3], (4, SEQ)) > 0.3).astype(jnp.float32)

    def whole(h, w):
        return masked_next_token_loss(output_logits(h, w, "float32"), tokens, mask)[0]

    def chunked(h, w):
        return chunked_next_token_loss(h, w, tokens, mask, "float32", SEQ // 4, batch_shards=2)

    loss_w, grads_w = jax.value_and_grad(whole, argnums=(0, 1))(hidden, head)
    loss_c, grads_c = jax.jit(jax.value_and_grad(chunked, argnums=(0, 1)))(hidden, head)
    _assert_close((loss_c, grads_c), (loss_w, grads_w))


def test_chunking_drops_the_whole_logits_from_the_program():
    """The jitted step holds no [micro rows, seq, vocab] tensor, only [.., chunk, vocab] ones."""
    batch = _batch(packed=False)
    config = dataclasses.replace(CONFIG, loss_chunk_tokens=SEQ // 4)
    mesh = build_mesh(MeshConfig(fsdp=1), jax.devices()[:1])
    params = nn.meta.unbox(K2Model(config).init(jax.random.key(0), batch["tokens"][:1])["params"])

    def hlo(cfg):
        step_loss = StepLoss(cfg, mesh, load_config("tiny").mesh.rules, rows=4, accumulation=2)
        return jax.jit(step_loss.value_and_grad).lower(params, batch).as_text()

    whole_logits = f"2x{SEQ}x{CONFIG.vocab_size}xf32"
    assert whole_logits in hlo(dataclasses.replace(config, loss_chunk_tokens=None))
    chunked = hlo(config)
    assert whole_logits not in chunked and f"2x{SEQ // 4}x{CONFIG.vocab_size}xf32" in chunked


def test_auto_leaves_tiny_and_test_models_unchunked():
    tiny = load_config("tiny")
    assert tiny.model.loss_chunk_tokens == "auto"
    rows = tiny.data.micro_batch_size
    assert resolve_chunk_tokens("auto", rows, tiny.data.seq_len, tiny.model.vocab_size) is None
    assert resolve_chunk_tokens(None, 4, 8192, 128256) is None
    assert resolve_chunk_tokens(0, 4, 8192, 128256) is None


def test_auto_chunks_large_vocab_long_sequences():
    # 4 rows x 8192 x 128256 fp32 = 16.8 GB a device: chunks of <= 512 MiB, dividing 8192.
    chunk = resolve_chunk_tokens("auto", 4, 8192, 128256)
    assert chunk == 256 and 4 * chunk * 128256 * 4 <= 512 << 20
    # 1 row, vocab split over 2 devices: 2.1 GB, over the 1 GiB trigger; over 4: 1.05 GB, not.
    assert resolve_chunk_tokens("auto", 1, 8192, 128256 / 2) == 2048
    assert resolve_chunk_tokens("auto", 1, 8192, 128256 / 4) is None
    assert resolve_chunk_tokens("auto", 1, 4096, 128256 / 4) is None  # 525 MB: whole
    assert resolve_chunk_tokens(512, 1, 4096, 32000) == 512
    assert resolve_chunk_tokens(4096, 1, 4096, 32000) is None  # one chunk: the whole path


def test_bad_chunk_sizes_are_one_line():
    with pytest.raises(ConfigError, match=r"model.loss_chunk_tokens.*does not divide "
                                          r"data.seq_len=64"):
        load_config("tiny", ["model.loss_chunk_tokens=24"])
    with pytest.raises(ConfigError, match="model.loss_chunk_tokens.*positive"):
        load_config("tiny", ["model.loss_chunk_tokens=-8"])
    with pytest.raises(ConfigError, match="does not divide the sequence length 100"):
        resolve_chunk_tokens(64, 1, 100, 300)


AOT_MODEL = ["model.vocab_size=128256", "model.hidden_size=512", "model.intermediate_size=1024",
             "model.num_layers=2", "model.num_heads=4", "model.num_kv_heads=4",
             "model.max_position_embeddings=8192", "model.compute_dtype=bfloat16",
             "data.seq_len=8192", "data.global_batch_size=32", "data.micro_batch_size=32"]


def _aot_report(*overrides) -> dict:
    import json
    import subprocess
    import sys

    from train_utils import REPO, TINY, subprocess_env

    cmd = [sys.executable, "-m", "k2jax.cli", "aot", "--config", str(TINY), "--topology",
           "v6e-8", "--json", "--no-flops", *AOT_MODEL, *overrides]
    proc = subprocess.run(cmd, env=subprocess_env(), cwd=REPO, timeout=400,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow  # two v6e-8 AOT compiles with libtpu: ~2 min on 2 shared cores
def test_aot_v6e_chunked_loss_needs_a_fraction_of_the_hbm():
    """`k2jax aot` of a 2-layer, 512-wide model with vocab 128256, seq 8192 and 4 rows a chip
    on v6e-8 (fsdp 8): unchunked 29.05 GB a chip (nearly all the fp32 logits and their
    gradient, 4 x 8192 x 128256 x 4 bytes = 16.8 GB a copy); `auto` (chunks of 256 positions)
    4.49 GB, measured 2026-12-07 (predicted 0.097 s vs 0.120 s a step: the recomputed head
    matmul and the per-chunk head-gradient accumulator). Both have a predicted_mfu."""
    whole = _aot_report("model.loss_chunk_tokens=null")
    chunked = _aot_report()  # auto
    for name, report in (("whole", whole), ("auto", chunked)):
        print(name, {key: report[key] for key in ("bytes_per_chip", "predicted_step_seconds",
                                                  "predicted_mfu")})
    assert whole["bytes_per_chip"] > 25e9
    assert chunked["bytes_per_chip"] < 6e9
    assert whole["predicted_mfu"] and chunked["predicted_mfu"]


SHARDED_CHECK = """
import dataclasses, sys
import flax.linen as nn, jax, jax.numpy as jnp
sys.path.insert(0, "tests")
import test_chunked_loss as t
from k2jax.config import MeshConfig, load_config
from k2jax.model import K2Model
from k2jax.sharding.mesh import build_mesh
from k2jax.train.step_loss import StepLoss

mesh = build_mesh(MeshConfig(data=2, fsdp=2, tensor=2), jax.devices())
batch = t._batch(packed=True)
params = nn.meta.unbox(K2Model(t.CONFIG).init(jax.random.key(0), batch["tokens"][:1])["params"])
results = []
for chunk, gather_bytes in ((None, 1 << 30), (t.SEQ // 4, 1 << 30), (t.SEQ // 4, 0)):
    t.chunked_loss.HEAD_GATHER_BYTES = gather_bytes  # 0: the head gathered per chunk
    config = dataclasses.replace(t.CONFIG, loss_chunk_tokens=chunk)
    step_loss = StepLoss(config, mesh, load_config("tiny").mesh.rules, rows=4, accumulation=1,
                         gradient_dtype="float32")
    results.append(jax.jit(step_loss.value_and_grad)(params, batch)[:2])
t._assert_close(results[1], results[0])
t._assert_close(results[2], results[0])
print("sharded chunked == whole", *(float(r[0]) for r in results))
"""


@pytest.mark.slow  # a subprocess with 8 CPU devices: ~20 s
def test_chunked_equals_whole_on_a_data_fsdp_tensor_mesh():
    """Rows over data x fsdp (batch_shards 4: per-shard head-gradient partial sums), vocab over
    tensor, the head's embed axis over fsdp: the constraints compile and the result holds, with
    the head gathered once and per chunk."""
    import subprocess
    import sys

    from train_utils import REPO, subprocess_env

    env = subprocess_env()
    env["XLA_FLAGS"] = env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    proc = subprocess.run([sys.executable, "-c", SHARDED_CHECK], env=env, cwd=REPO,
                          timeout=300, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "sharded chunked == whole" in proc.stdout
