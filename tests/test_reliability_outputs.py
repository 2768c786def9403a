"""Reliability of outputs: one training run per output folder (a lock that also works on shared
storage), no silent replacement of an output that appeared meanwhile, --force replaces only what
the tool writes (never the current directory), and an interrupted convert / export leaves no
temporary folder (and the next one removes what a killed one left)."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from helpers import hf_model
from jais2_jax.cli.main import main
from jais2_jax.training import data
from jais2_jax.training import trainer
from jais2_jax.training.export import export_run_to_hf
from jais2_jax.training.run_config import RunConfig
from jais2_jax.training.trainer import train
from jais2_jax.utils import lock
from jais2_jax.utils.fsutil import OWNER_FILE, staged_output

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOST = socket.gethostname()
NS = os.readlink("/proc/self/ns/pid")  # this process's PID namespace


def _dead_pid() -> int:
    """The pid of a process of this host that has ended (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", ""])
    proc.wait()
    return proc.pid


def _wait_for(condition, what, proc=None, timeout=180):
    """Polls `condition` (a readiness signal: a file or folder appearing) until it holds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the process ended (exit {proc.returncode}) before {what}: "
                        f"{proc.stdout.read() if proc.stdout else ''}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.01)


def _error_lines(capsys):
    return [line for line in capsys.readouterr().err.splitlines() if line.strip()]


# ------------------------------------------------------------------ 1. one run per output folder
@pytest.fixture(scope="module")
def store(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "store"
    data.prepare_data([os.path.join(ROOT, "data", "corpus")], os.path.join(ROOT, "data", "tokenizer"),
                      str(out), eval_fraction=0.1, show_progress=False)
    return str(out)


def _run(store, out, **kw):
    base = dict(model="jais2-tiny", data=store, output_dir=str(out), seq_len=32, batch_size=8,
                loss_chunk=16, dtype="float32", remat_policy="none", lr=3e-3, warmup_steps=0,
                total_steps=2, log_every=1, eval_every=0, checkpoint_every=2, data_threads=1)
    base.update(kw)
    return RunConfig(**base)


def test_a_second_run_on_a_locked_output_dir_is_refused(store, tmp_path, capsys):
    """Another process holds the output folder (through the library, as a running `jais2 train`
    does): `jais2 train` on it exits 1 with one line naming the folder and the holder, and writes
    nothing there (the bug: it resumed from the other run's checkpoint and rewrote its metrics)."""
    out = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys\nfrom jais2_jax.utils import lock\n"
         "with lock.locked(sys.argv[1]):\n    print('locked', flush=True)\n    sys.stdin.read()\n",
         str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert holder.stdout.readline().strip() == "locked"  # the readiness signal
        record = json.loads((out / lock.LOCK_NAME).read_text())
        assert record["pid"] == holder.pid and record["host"] == HOST and record["token"]
        config = tmp_path / "run.yaml"
        config.write_text(json.dumps(_run(store, out, lr=1e-3).to_dict()))
        capsys.readouterr()
        assert main(["train", str(config), "--no-progress", "--distributed", "off"]) == 1
        err = _error_lines(capsys)
        assert len(err) == 1 and err[0].startswith("jais2 train: error: "), err
        assert str(out) in err[0] and "in use" in err[0], err
        assert f"pid {holder.pid}" in err[0] and f"host {HOST}" in err[0], err
        with pytest.raises(lock.FolderInUse, match=f"pid {holder.pid}"):
            train(_run(store, out), show_progress=False)
        assert sorted(os.listdir(out)) == [lock.LOCK_NAME]  # nothing written by the refused runs
        assert json.loads((out / lock.LOCK_NAME).read_text()) == record  # still the holder's
    finally:
        holder.stdin.close()
        assert holder.wait(timeout=60) == 0
    assert not (out / lock.LOCK_NAME).exists()  # released by the holder at its end


def test_a_stale_lock_of_a_dead_process_is_taken_over(store, tmp_path, capsys):
    """A lock left by a killed run on this host (its pid is gone) is taken over; the run goes on,
    and releases its own lock at its end."""
    out = tmp_path / "run"
    out.mkdir()
    stale = {"host": HOST, "pidns": NS, "pid": _dead_pid(), "time": time.time() - 60, "token": "stale"}
    (out / lock.LOCK_NAME).write_text(json.dumps(stale))
    result = train(_run(store, out), show_progress=False)
    assert result["status"] == "done" and result["step"] == 2
    assert "took over the stale lock" in capsys.readouterr().err
    assert not (out / lock.LOCK_NAME).exists()
    assert (out / "checkpoints" / "2").is_dir()
    assert not [f for f in os.listdir(out) if f.startswith(lock.LOCK_NAME + ".")]  # no leftovers


def test_a_lock_of_another_container_on_this_host_is_not_taken_over(store, tmp_path):
    """Containers with host networking share the host name but not the pids: a holder in another
    PID namespace cannot be checked, so its lock is refused, not taken over (its live run would
    be written over)."""
    out = tmp_path / "run"
    out.mkdir()
    other = {"host": HOST, "pidns": "pid:[1]", "pid": _dead_pid(), "time": time.time(),
             "token": "x"}
    (out / lock.LOCK_NAME).write_text(json.dumps(other))
    with pytest.raises(lock.FolderInUse):
        train(_run(store, out), show_progress=False)
    assert json.loads((out / lock.LOCK_NAME).read_text())["token"] == "x"
    assert sorted(os.listdir(out)) == [lock.LOCK_NAME]


def test_a_lock_of_another_host_is_refused_with_the_file_to_remove(store, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    other = {"host": HOST + "-elsewhere", "pid": 1234, "time": time.time(), "token": "x"}
    (out / lock.LOCK_NAME).write_text(json.dumps(other))
    with pytest.raises(lock.FolderInUse) as info:
        train(_run(store, out), show_progress=False)
    message = str(info.value)
    assert str(out) in message and "another host" in message and "pid 1234" in message
    assert f"remove {out / lock.LOCK_NAME}" in message and "\n" not in message
    assert sorted(os.listdir(out)) == [lock.LOCK_NAME]
    with lock.locked(out, enabled=False):  # a process other than 0: never touches the lock
        pass
    assert json.loads((out / lock.LOCK_NAME).read_text()) == other


def test_the_lock_is_released_when_the_run_fails(store, tmp_path, monkeypatch):
    out = tmp_path / "run"

    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:  # train's up-front check of the shardings, before the lock
            assert not out.exists()
            return None
        assert (out / lock.LOCK_NAME).exists()  # the program under the lock
        raise RuntimeError("out of memory while compiling")
    monkeypatch.setattr(trainer, "build_train_program", failing)
    with pytest.raises(RuntimeError, match="out of memory"):
        train(_run(store, out), show_progress=False)
    assert os.listdir(out) == []


def test_only_one_of_racing_takeovers_wins(tmp_path):
    """Four processes find the same stale lock: exactly one of them holds the folder."""
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / lock.LOCK_NAME).write_text(json.dumps(
        {"host": HOST, "pidns": NS, "pid": _dead_pid(), "time": 0, "token": "stale"}))
    script = ("import sys\nfrom jais2_jax.utils import lock\n"
              "try:\n    record = lock.acquire(sys.argv[1])\n"
              "except lock.FolderInUse:\n    print('refused', flush=True)\n    sys.exit(0)\n"
              "print('won', flush=True)\nsys.stdin.read()\nlock.release(sys.argv[1], record)\n")
    procs = [subprocess.Popen([sys.executable, "-c", script, str(folder)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, cwd=ROOT) for _ in range(4)]
    answers = [p.stdout.readline().strip() for p in procs]  # each has decided
    for p in procs:
        p.stdin.close()
        assert p.wait(timeout=60) == 0
    assert sorted(answers) == ["refused", "refused", "refused", "won"], answers
    assert os.listdir(folder) == []


# --------------------------------------------------------- 2. an output that appeared meanwhile
@pytest.mark.parametrize("theirs", [["model.txt"], []])
def test_an_output_that_appears_meanwhile_is_kept(tmp_path, theirs):
    """Another writer's output appears at the target while ours is staged (the race of two
    converts): ours is discarded with an error naming the target, theirs is untouched (also an
    empty folder, which a plain rename would silently replace)."""
    out = tmp_path / "out"
    with pytest.raises(FileExistsError, match=f"{out} appeared while"):
        with staged_output(out, force=False) as tmp:
            with open(os.path.join(tmp, "model.txt"), "w") as f:
                f.write("ours")
            out.mkdir()  # the other writer finishes first
            for name in theirs:
                (out / name).write_text("theirs")
    assert sorted(os.listdir(out)) == theirs and all(
        (out / name).read_text() == "theirs" for name in theirs)
    assert os.listdir(tmp_path) == ["out"]  # our temporary folder is gone


def test_two_converts_to_one_new_output(hf_src, tmp_path, monkeypatch, capsys):
    """A second `jais2 convert` to the same new output finishes while the first is writing: the
    first exits 1 naming the output, which stays the second's (the bug: both exit 0, the second
    silently replaced)."""
    from jais2_jax.checkpoint import convert
    out = tmp_path / "ob"
    real = convert.copy_tokenizer_files
    raced = []

    def race(src, dst):
        if not raced:  # the first convert, with its temporary folder made: the second runs
            raced.append(dst)
            assert main(["convert", str(hf_src), str(out), "--dtype", "bfloat16", "--quiet"]) == 0
        return real(src, dst)
    monkeypatch.setattr(convert, "copy_tokenizer_files", race)
    capsys.readouterr()
    assert main(["convert", str(hf_src), str(out), "--quiet"]) == 1
    err = _error_lines(capsys)
    assert len(err) == 1 and f"{out} appeared while" in err[0], err
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"  # the second's
    assert sorted(os.listdir(tmp_path)) == ["ob"]


# ------------------------------------------------------------ 3. --force replaces only our own
@pytest.fixture(scope="module")
def hf_src(tmp_path_factory):
    folder = tmp_path_factory.mktemp("src") / "hf"
    hf_model(seed=6).save_pretrained(folder, max_shard_size="20KB")
    return folder


@pytest.fixture(scope="module")
def orbax_src(hf_src, tmp_path_factory):
    folder = tmp_path_factory.mktemp("orbax") / "ob"
    assert main(["convert", str(hf_src), str(folder), "--quiet"]) == 0
    return folder


def _precious(folder):
    folder.mkdir(parents=True)
    (folder / "thesis.tex").write_text("years of work")
    (folder / "config.json").write_text("{}")  # a config.json alone is not a checkpoint


def _fails_one_line(capsys, argv, *phrases):
    capsys.readouterr()
    assert main(argv + ["--quiet"]) == 1
    err = _error_lines(capsys)
    assert len(err) == 1 and err[0].startswith(f"jais2 {argv[0]}: error: "), err
    for phrase in phrases:
        assert phrase in err[0], (phrase, err)


def test_convert_force_replaces_only_an_orbax_model_folder(hf_src, tmp_path, capsys):
    work = tmp_path / "work"
    _precious(work)
    _fails_one_line(capsys, ["convert", str(hf_src), str(work), "--force"], str(work),
                    "is not an Orbax model folder")
    assert (work / "thesis.tex").read_text() == "years of work"
    assert sorted(os.listdir(tmp_path)) == ["work"]
    # What convert wrote, and an empty folder, are replaced.
    for out in (tmp_path / "ob", tmp_path / "empty"):
        out.mkdir()
        if out.name == "ob":
            assert main(["convert", str(hf_src), str(out), "--force", "--quiet"]) == 0
        assert main(["convert", str(hf_src), str(out), "--force", "--quiet"]) == 0
        assert (out / "config.json").is_file() and (out / "params").is_dir()
    assert sorted(os.listdir(tmp_path)) == ["empty", "ob", "work"]


def test_convert_force_never_replaces_the_current_directory(hf_src, tmp_path, monkeypatch,
                                                            capsys):
    """`jais2 convert ../base . --force` from inside a folder deleted everything in it. Refused,
    even when the folder is an earlier convert's output, and for a folder holding the current
    directory too."""
    work = tmp_path / "work"
    _precious(work)
    shutil.copytree(hf_src, tmp_path / "base")
    monkeypatch.chdir(work)
    _fails_one_line(capsys, ["convert", "../base", ".", "--force"], "current directory")
    assert sorted(os.listdir(work)) == ["config.json", "thesis.tex"]
    assert main(["convert", "../base", "ob", "--quiet"]) == 0
    monkeypatch.chdir(work / "ob")
    _fails_one_line(capsys, ["convert", "../../base", ".", "--force"], "current directory")
    monkeypatch.chdir(work / "ob" / "params")
    _fails_one_line(capsys, ["convert", "../../../base", "..", "--force"],
                    "holding the current directory")
    assert (work / "ob" / "params").is_dir() and (work / "thesis.tex").exists()


def test_export_force_replaces_only_an_hf_folder(orbax_src, tmp_path, monkeypatch, capsys):
    work = tmp_path / "work"
    _precious(work)
    _fails_one_line(capsys, ["export", str(orbax_src), str(work), "--force"], str(work),
                    "is not an HF checkpoint folder")
    # a training run's export checks the same before loading anything
    with pytest.raises(ValueError, match="is not an HF checkpoint folder"):
        export_run_to_hf(tmp_path / "no-run", work, force=True)
    assert (work / "thesis.tex").read_text() == "years of work"
    hf = tmp_path / "hf"
    assert main(["export", str(orbax_src), str(hf), "--quiet"]) == 0
    assert main(["export", str(orbax_src), str(hf), "--force", "--quiet"]) == 0  # ours: replaced
    monkeypatch.chdir(hf)
    _fails_one_line(capsys, ["export", str(orbax_src), ".", "--force"], "current directory")
    assert (hf / "model.safetensors").exists() or any(
        f.endswith(".safetensors") for f in os.listdir(hf))
    assert sorted(os.listdir(tmp_path)) == ["hf", "work"]


# ------------------------------------------------------ 4. interrupted and killed convert / export
# The child runs the real CLI (`python -m jais2_jax.cli`) with slow reads, as from slow storage:
# the signal comes while writer threads are busy. It marks its first read by creating a file.
SLOW_CHILD = """
import os, runpy, signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal, even if run in the
# background of a shell (which starts it with SIGINT ignored)
marker = sys.argv[1]
def slow(read):
    def wrapped(*args, **kwargs):
        if not os.path.exists(marker):
            open(marker, "w").close()
        time.sleep(0.3)  # slow storage, not synchronisation
        return read(*args, **kwargs)
    return wrapped
from jais2_jax.checkpoint import convert
from jais2_jax.checkpoint.hf import HFCheckpoint
HFCheckpoint.read = slow(HFCheckpoint.read)
convert.to_hf = slow(convert.to_hf)
sys.argv = ["jais2"] + sys.argv[2:]
runpy.run_module("jais2_jax.cli", run_name="__main__", alter_sys=True)
"""


def _interrupt(tmp_path, argv, out, sig, when):
    """Runs `jais2 ARGV` in a child, sends `sig` once `when` ("temp" folder or first "read")
    appeared; returns (exit status, output)."""
    marker = tmp_path / "first-read"
    proc = subprocess.Popen([sys.executable, "-c", SLOW_CHILD, str(marker), *argv, "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    try:
        if when == "temp":
            _wait_for(lambda: any(f.startswith(f".{out.name}.tmp-")
                                  for f in os.listdir(out.parent)), "the temporary folder", proc)
        else:
            _wait_for(marker.exists, "the first block read", proc)
        proc.send_signal(sig)
        output, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, output


@pytest.mark.parametrize("when", ["temp", "read"])
def test_sigterm_during_convert_leaves_no_temporary_folder(hf_src, tmp_path, when):
    outs = tmp_path / "outs"
    outs.mkdir()
    out = outs / "ob"
    rc, output = _interrupt(tmp_path, ["convert", str(hf_src), str(out)], out, signal.SIGTERM,
                            when)
    assert rc == 128 + signal.SIGTERM, output
    assert "jais2 convert: interrupted by SIGTERM" in output and "Traceback" not in output, output
    assert os.listdir(outs) == []  # no output, no .ob.tmp-* (nor files a writer made later)


def test_sigint_during_export_leaves_no_temporary_folder(orbax_src, tmp_path):
    outs = tmp_path / "outs"
    outs.mkdir()
    out = outs / "hf"
    rc, output = _interrupt(tmp_path, ["export", str(orbax_src), str(out)], out, signal.SIGINT,
                            "read")
    assert rc == 128 + signal.SIGINT, output
    assert "jais2 export: interrupted by SIGINT" in output, output
    assert os.listdir(outs) == []


def _temporary(parent, name, owner, files=("half.bin",), age=0.0):
    folder = parent / name
    folder.mkdir()
    for f in files:
        (folder / f).write_text("partial")
    if owner is not None:
        (folder / OWNER_FILE).write_text(json.dumps(owner))
    if age:
        then = time.time() - age
        os.utime(folder, (then, then))
    return folder


def test_the_next_convert_removes_what_a_killed_one_left(hf_src, tmp_path, capsys):
    dead = {"host": HOST, "pidns": NS, "pid": _dead_pid(), "time": time.time()}
    gone = [_temporary(tmp_path, ".ob.tmp-killed", dead),
            _temporary(tmp_path, ".ob.old-killed", dead),
            _temporary(tmp_path, ".ob.tmp-ancient", None, age=2 * 24 * 3600)]
    kept = [_temporary(tmp_path, ".ob.tmp-live", {"host": HOST, "pidns": NS, "pid": os.getpid()}),
            _temporary(tmp_path, ".ob.tmp-remote", {"host": HOST + "-elsewhere", "pid": 1}),
            _temporary(tmp_path, ".ob.tmp-recent", None),
            _temporary(tmp_path, ".other.tmp-killed", dead)]
    assert main(["convert", str(hf_src), str(tmp_path / "ob"), "--quiet"]) == 0
    assert all(not f.exists() for f in gone) and all(f.exists() for f in kept)
    assert sorted(os.listdir(tmp_path)) == sorted(["ob"] + [f.name for f in kept])
    assert f"removed {gone[0]}" in capsys.readouterr().err


def test_an_output_moved_aside_by_a_killed_run_is_put_back(hf_src, orbax_src, tmp_path, capsys):
    """Killed between moving the old output aside and renaming the new one in: the next run
    puts the old one back (rather than removing it with the temporary folders)."""
    dead = {"host": HOST, "pidns": NS, "pid": _dead_pid(), "time": time.time()}
    aside = _temporary(tmp_path, ".ob.old-killed", dead, files=())
    shutil.copytree(orbax_src, aside / "x")
    capsys.readouterr()
    assert main(["convert", str(hf_src), str(tmp_path / "ob"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "put" in err and "back" in err and "exists; pass --force" in err, err
    assert sorted(os.listdir(tmp_path)) == ["ob"]
    assert sorted(os.listdir(tmp_path / "ob")) == sorted(os.listdir(orbax_src))
