"""train/launch_tpu_pod.sh, run against a stand-in `gcloud` that executes the worker command
locally: the arguments reach train.py intact, its output lands in the worker's log, and the
launcher exits with train.py's status (3: non-finite steps, 143: preempted), not tee's."""

import json
import os
import stat
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAKE_GCLOUD = """#!/bin/bash
# stand-in for `gcloud compute tpus tpu-vm ssh ... --command CMD`: run CMD as a worker's bash would
for ((i = 1; i <= $#; i++)); do
  if [ "${!i}" = "--command" ]; then j=$((i + 1)); exec bash -c "${!j}"; fi
done
exit 99
"""
FAKE_TRAIN = """import json, sys
print("train.py ran")
with open("argv.json", "w") as f:
    json.dump(sys.argv[1:], f)
sys.exit(int(sys.argv[sys.argv.index("--exit") + 1]))
"""


def _executable(path, text):
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, os.stat(path).st_mode | stat.S_IEXEC)


@pytest.mark.parametrize("code", [0, 3, 143])
def test_tpu_launcher_passes_arguments_and_exit_status(tmp_path, code):
    bin_dir, repo = tmp_path / "bin", tmp_path / "repo"
    (repo / "train").mkdir(parents=True)
    bin_dir.mkdir()
    _executable(bin_dir / "gcloud", FAKE_GCLOUD)
    os.symlink(sys.executable, bin_dir / "python")
    (repo / "train" / "train.py").write_text(FAKE_TRAIN)
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", REPO_DIR=str(repo))
    args = ["my-tpu", "us-central2-b", "run config.yaml", "--set", "lr=3e-4 ", "--exit", str(code)]
    proc = subprocess.run(["bash", os.path.join(ROOT, "train", "launch_tpu_pod.sh"), *args],
                          env=env, capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == code, proc.stderr
    assert json.loads((repo / "argv.json").read_text()) == [
        "run config.yaml", "--set", "lr=3e-4 ", "--exit", str(code), "--no-progress"]
    logs = list(repo.glob("train-*.log"))
    assert len(logs) == 1 and "train.py ran" in logs[0].read_text()
