"""`k2jax aot --hlo-out gs://...`: GCS has no directories, so the HLO goes to a prefix that holds
nothing yet, and the one-line contract holds (no traceback on stderr)."""

import subprocess
import sys

import pytest

from train_utils import REPO, SMALL_MODEL, TINY, subprocess_env


@pytest.mark.slow
def test_hlo_out_to_gs(gcs_server, gcs_bucket):
    pytest.importorskip("libtpu")
    target = f"{gcs_bucket}/aot/v5e-4/step.hlo"  # nothing under gs://BUCKET/aot yet
    cmd = [sys.executable, "-m", "k2jax.cli", "aot", "--config", str(TINY), "--topology",
           "v5e-4", "--json", "--hlo-out", target, *SMALL_MODEL, "mesh.fsdp=2", "mesh.tensor=2",
           "data.micro_batch_size=2", "model.attention=xla"]
    proc = subprocess.run(cmd, env=subprocess_env(), cwd=REPO, timeout=300,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert gcs_server.list_objects(f"{gcs_bucket}/aot/") == ["aot/v5e-4/step.hlo"]
    assert b"HloModule" in gcs_server.read_object(target)
