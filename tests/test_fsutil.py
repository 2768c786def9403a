"""Output writing helpers: nothing half-written under a final name, inputs never replaced."""

import os

import pytest

from jais2_jax.utils.fsutil import check_apart, staged_output, write_text_atomic


def test_write_text_atomic_replaces_only_when_written(tmp_path):
    path = tmp_path / "samples.txt"
    path.write_text("old", encoding="utf-8")
    with pytest.raises(TypeError):
        write_text_atomic(path, 12345)  # fails inside the write
    assert path.read_text(encoding="utf-8") == "old" and os.listdir(tmp_path) == ["samples.txt"]
    write_text_atomic(path, "new")
    assert path.read_text(encoding="utf-8") == "new" and os.listdir(tmp_path) == ["samples.txt"]
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask  # as open() makes it, not private


def test_staged_output_keeps_the_old_folder_until_the_new_one_is_complete(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "a").write_text("old")
    with pytest.raises(RuntimeError):
        with staged_output(out, force=True) as tmp:
            (tmp_path / os.path.basename(tmp) / "a").write_text("half")
            raise RuntimeError("killed halfway")
    assert (out / "a").read_text() == "old" and os.listdir(tmp_path) == ["out"]
    with staged_output(out, force=True) as tmp:
        with open(os.path.join(tmp, "a"), "w") as f:
            f.write("new")
    assert (out / "a").read_text() == "new" and os.listdir(tmp_path) == ["out"]
    with pytest.raises(FileExistsError, match="--force"):
        with staged_output(out, force=False):
            pass


def test_check_apart(tmp_path):
    (tmp_path / "in").mkdir()
    check_apart(tmp_path / "in" / "out", [tmp_path / "in"])  # an output inside an input: fine
    for out in (tmp_path / "in", tmp_path):
        with pytest.raises(ValueError, match="would replace its input"):
            check_apart(out, [tmp_path / "in"])
    os.symlink(tmp_path / "in", tmp_path / "link")
    with pytest.raises(ValueError, match="would replace its input"):
        check_apart(tmp_path / "link", [tmp_path / "in"])
