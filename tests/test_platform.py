"""Platform choice, TPU > GPU > CPU: no TPU chip and libtpu installed -> the CPU, silently; an
NVIDIA GPU with jax's CUDA plugin -> CUDA; the user's JAX_PLATFORMS and real TPU hosts are left
alone; `k2jax --version`."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from k2jax import __version__
from k2jax.cli import main
from k2jax.platform import choose_platform, nvidia_gpus_present, tpu_chips_present

REPO = Path(__file__).resolve().parents[1]


def fake_host(tmp_path, vendors=(), accel=False, dev_names=(), classes=None):
    sys_root, dev_root = tmp_path / "sys", tmp_path / "dev"
    dev_root.mkdir(parents=True)
    for i, vendor in enumerate(vendors):
        device = sys_root / "bus" / "pci" / "devices" / f"0000:00:0{i}.0"
        device.mkdir(parents=True)
        (device / "vendor").write_text(vendor + "\n")
        (device / "class").write_text((classes[i] if classes else "0x020000") + "\n")
    if accel:
        (dev_root / "accel0").write_text("")
    for name in dev_names:
        (dev_root / name).write_text("")
    return str(sys_root), str(dev_root)


@pytest.mark.parametrize("vendors, accel, present", [
    ((), False, False),
    (("0x8086", "0x10de"), False, False),  # Intel and NVIDIA only
    (("0x8086", "0x1ae0"), False, True),   # a Google PCI device (v5e/v6e over VFIO)
    ((), True, True),                      # /dev/accel0 (v4, v5p)
])
def test_tpu_chips_present(tmp_path, vendors, accel, present):
    assert tpu_chips_present(*fake_host(tmp_path, vendors, accel)) is present


@pytest.mark.parametrize("vendors, classes, dev_names, present", [
    ((), None, (), False),
    ((), None, ("nvidiactl", "nvidia-uvm"), False),             # driver nodes, no GPU
    ((), None, ("nvidiactl", "nvidia0"), True),                 # /dev/nvidia0
    (("0x10de",), ("0x030200",), (), True),                     # NVIDIA 3D controller (H100)
    (("0x10de",), ("0x068000",), (), False),                    # an NVIDIA bridge, not a GPU
])
def test_nvidia_gpus_present(tmp_path, vendors, classes, dev_names, present):
    host = fake_host(tmp_path, vendors, dev_names=dev_names, classes=classes)
    assert nvidia_gpus_present(*host) is present


@pytest.mark.parametrize("installed, host, want", [
    (("jax_cuda13_plugin",), "gpu", "cuda,cpu"),
    (("jax_cuda12_plugin", "libtpu"), "gpu", "cuda,cpu"),
    (("jax_cuda13_plugin",), "none", "cpu"),   # the plugin, no GPU: no CUDA warning
    (("jax_cuda13_plugin", "libtpu"), "tpu", None),  # TPU first
    ((), "gpu", None),                         # no plugin: JAX's own choice (the CPU)
])
def test_choose_platform_prefers_tpu_then_gpu(tmp_path, monkeypatch, installed, host, want):
    monkeypatch.setattr("importlib.util.find_spec",
                        lambda name: object() if name in installed else None)
    roots = fake_host(tmp_path, accel=host == "tpu",
                      dev_names=("nvidia0",) if host == "gpu" else ())
    env = {}
    choose_platform(env, *roots)
    assert env.get("JAX_PLATFORMS") == want
    env = {"JAX_PLATFORMS": "cpu"}
    choose_platform(env, *roots)
    assert env == {"JAX_PLATFORMS": "cpu"}  # the user's choice wins


def test_choose_platform(tmp_path, monkeypatch):
    monkeypatch.setattr("importlib.util.find_spec",
                        lambda name: object() if name == "libtpu" else None)
    no_tpu, tpu = fake_host(tmp_path / "a"), fake_host(tmp_path / "b", accel=True)
    env = {}
    choose_platform(env, *no_tpu)
    assert env == {"JAX_PLATFORMS": "cpu"}
    env = {"JAX_PLATFORMS": "tpu"}
    choose_platform(env, *no_tpu)
    assert env == {"JAX_PLATFORMS": "tpu"}  # the user's choice wins
    env = {}
    choose_platform(env, *tpu)
    assert env == {}  # a TPU host: JAX picks the TPU


def test_cli_on_a_cpu_host_prints_no_libtpu_noise():
    pytest.importorskip("libtpu")
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    code = ("import sys; from k2jax.platform import choose_platform; choose_platform(); "
            "import jax; print(jax.default_backend())")
    result = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "cpu"
    assert "unexpected worker hostname" not in result.stderr


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"k2jax {__version__}"


@pytest.mark.parametrize("module, purpose", [("matplotlib", "compare-curves --out (the PNG)"),
                                             ("torch", "reading PyTorch .bin shards")])
def test_missing_optional_dependency_names_the_extra(monkeypatch, module, purpose):
    from k2jax.errors import UserError
    from k2jax.optional import require

    monkeypatch.setitem(sys.modules, module, None)  # import -> ImportError
    with pytest.raises(UserError, match=rf"needs {module}, which is not installed: "
                                        r"pip install 'k2jax\[compare\]'"):
        require(module, purpose)


def test_compare_curves_without_matplotlib_is_one_line(tmp_path, monkeypatch, capsys):
    run = tmp_path / "metrics.jsonl"
    run.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n')
    reference = tmp_path / "wandb.csv"
    reference.write_text("Step,loss\n1,2.0\n2,1.5\n")
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    code = main(["compare-curves", "--run", str(run), "--reference", str(reference),
                 "--out", str(tmp_path / "c.png")])
    assert code == 2
    assert "pip install 'k2jax[compare]'" in capsys.readouterr().err
