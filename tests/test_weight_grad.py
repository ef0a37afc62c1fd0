"""`train.gradient_dtype`: weight gradients out of the matmuls in fp32 (K2's Megatron: fp32
main_grad and fp32 all-reduce), and the dtype of every gradient reduction in the TPU HLO."""

import functools
import json
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from k2jax.model import K2Model, masked_next_token_loss
from k2jax.model.weight_grad import matmul, weight_gradient_dtype
from train_utils import REPO, SMALL_MODEL, TINY, small_config, subprocess_env


def _bf16_representable(x) -> bool:
    x = np.asarray(x, np.float32)
    return np.array_equal(x, np.asarray(jnp.asarray(x).astype(jnp.bfloat16).astype(jnp.float32)))


@functools.lru_cache(maxsize=None)  # one init for both gradient dtypes (issue 16 point 8)
def _model_tokens_params():
    config = small_config("unused", "model.compute_dtype=bfloat16")
    model = K2Model(config.model)
    tokens = jax.random.randint(jax.random.key(0), (4, 16), 0, 128)
    params = jax.jit(model.init)(jax.random.key(1), tokens)["params"]  # eager: op by op
    return model, tokens, params


def _weight_grads(gradient_dtype):
    model, tokens, params = _model_tokens_params()

    def loss(p):
        loss_sum, count = masked_next_token_loss(model.apply({"params": p}, tokens), tokens,
                                                 jnp.ones((4, 16)))
        return loss_sum / count

    with weight_gradient_dtype(gradient_dtype):  # read at trace time: `loss` is new per call
        grads = jax.jit(jax.grad(loss))(params)
    # The embedding's gradient is an fp32 scatter-add of bf16 rows either way.
    return {jax.tree_util.keystr(path): g for path, g in
            jax.tree_util.tree_leaves_with_path(grads) if "embed_tokens" not in
            jax.tree_util.keystr(path)}


@pytest.mark.slow  # two bf16/fp32 gradient compiles of a small model: ~30 s idle
def test_fp32_weight_gradients_are_not_bf16_rounded():
    grads32, grads16 = _weight_grads("float32"), _weight_grads("bfloat16")
    assert len(grads32) == 11  # q k v o gate up down, 2 norm scales, final norm, lm_head
    for name, g in grads16.items():
        assert g.dtype == jnp.float32 and _bf16_representable(g), name
    for name, g in grads32.items():
        assert g.dtype == jnp.float32 and not _bf16_representable(g), name
        # The same gradient, without bf16 rounding: within bf16's relative precision.
        np.testing.assert_allclose(np.asarray(g), np.asarray(grads16[name]), rtol=2e-2,
                                   atol=2e-2 * float(jnp.abs(g).max()))


def test_matmul_forward_and_input_gradient_are_unchanged():
    x = jax.random.normal(jax.random.key(0), (6, 8), jnp.bfloat16)
    w = jax.random.normal(jax.random.key(1), (8, 5), jnp.float32)
    dy = jax.random.normal(jax.random.key(2), (6, 5), jnp.float32)
    for preferred in (None, jnp.float32):
        outs = {}
        for dtype in ("bfloat16", "float32"):
            with weight_gradient_dtype(dtype):
                y, vjp = jax.vjp(lambda a, b: matmul(a, b, preferred), x, w)
                outs[dtype] = (y, *vjp(dy.astype(y.dtype)))
        y16, dx16, dw16 = outs["bfloat16"]
        y32, dx32, dw32 = outs["float32"]
        assert y16.dtype == y32.dtype and np.array_equal(y16, y32)
        assert dx32.dtype == jnp.bfloat16 and np.array_equal(dx16, dx32)
        exact = np.asarray(x, np.float32).T @ np.asarray(dy.astype(y32.dtype), np.float32)
        assert dw32.dtype == jnp.float32
        np.testing.assert_allclose(dw32, exact, rtol=1e-5, atol=1e-5)


def collectives(hlo_text: str, *kinds: str) -> list[str]:
    """Result types of every collective of `kinds` (e.g. all-reduce) of an optimized HLO."""
    pattern = re.compile(r"^\s*(?:ROOT\s+)?\S+\s*=\s*(.*?)\s(?:%s)(?:-start)?\("
                         % "|".join(map(re.escape, kinds)), re.M)
    return sorted(re.sub(r"\{[^}]*\}", "", m.group(1)) for m in pattern.finditer(hlo_text))


def _aot_hlo(tmp_path, gradient_dtype) -> str:
    out = tmp_path / f"step_{gradient_dtype}.hlo"
    cmd = [sys.executable, "-m", "k2jax.cli", "aot", "--config", str(TINY), "--topology",
           "v5p-8", "--json", "--no-flops", "--hlo-out", str(out), *SMALL_MODEL,
           "model.hidden_size=64", "model.intermediate_size=128", "model.compute_dtype=bfloat16",
           "model.attention=xla", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=1",
           f"train.gradient_dtype={gradient_dtype}"]
    proc = subprocess.run(cmd, env=subprocess_env(), cwd=REPO, timeout=600,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["mesh"] == {"data": 2, "fsdp": 2, "tensor": 1}
    assert report["hlo_out"] == str(out) and report["gradient_dtype"] == gradient_dtype
    return out.read_text()


@pytest.mark.slow
def test_tpu_gradient_reductions_run_in_fp32(tmp_path):
    """v5p:2x2x1, data 2 x fsdp 2: with float32 no all-reduce / reduce-scatter carries bf16;
    with bfloat16 the weight gradients' do (so this test can fail)."""
    pytest.importorskip("libtpu")
    hlo = {d: _aot_hlo(tmp_path, d) for d in ("float32", "bfloat16")}
    reductions = {d: collectives(text, "all-reduce", "reduce-scatter") for d, text in hlo.items()}
    assert reductions["float32"] and not [r for r in reductions["float32"] if "bf16" in r]
    assert [r for r in reductions["bfloat16"] if "bf16" in r]
    # The forward weight all-gathers are untouched: the same (bf16) gathers either way.
    gathers = {d: collectives(text, "all-gather") for d, text in hlo.items()}
    assert gathers["float32"] == gathers["bfloat16"]
    assert [g for g in gathers["float32"] if g.startswith("bf16")]
    assert not list(tmp_path.glob(".*tmp*"))  # written atomically: no staging file left


def test_hlo_out_directory_must_exist(tmp_path, capsys):
    from k2jax.cli import main

    assert main(["aot", "--config", str(TINY), "--topology", "v5p-8",
                 "--hlo-out", str(tmp_path / "missing" / "step.hlo")]) == 2
    assert "--hlo-out" in capsys.readouterr().err
