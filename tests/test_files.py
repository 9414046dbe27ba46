"""rewriter.files: atomic outputs; writes the system refuses become InputErrors naming the file."""
import errno
import os

import pytest

from rewriter import files
from rewriter.errors import InputError


def _hidden(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_atomic_write_replaces_only_with_force(tmp_path):
    out = tmp_path / "a.txt"
    with files.atomic_write(out) as tmp:
        tmp.write_text("one")
    with pytest.raises(InputError, match="already exists"):
        with files.atomic_write(out) as tmp:
            tmp.write_text("two")
    assert out.read_text() == "one"
    with files.atomic_write(out, force=True) as tmp:
        tmp.write_text("two")
    assert out.read_text() == "two" and _hidden(tmp_path) == []


@pytest.mark.parametrize("code, words", [(errno.ENOSPC, "is full"), (errno.EROFS, "read-only"),
                                         (errno.EACCES, "read-only")])
def test_refused_write_names_the_file_and_leaves_nothing(tmp_path, code, words):
    out = tmp_path / "model.pt2"
    with pytest.raises(InputError) as info:
        with files.atomic_write(out, what="output") as tmp:
            tmp.write_bytes(b"half")
            raise OSError(code, os.strerror(code))
    message = str(info.value)
    assert str(out) in message and words in message and errno.errorcode[code] in message
    assert "no partial file" in message
    assert not out.exists() and _hidden(tmp_path) == []


def test_unknown_oserror_is_not_disguised_as_user_error(tmp_path):
    with pytest.raises(OSError) as info:
        with files.atomic_write(tmp_path / "x") as tmp:
            tmp.write_text("x")
            raise OSError("no errno: a bug somewhere")
    assert not isinstance(info.value, InputError)
    assert _hidden(tmp_path) == []


def test_read_only_folder_is_refused_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setattr(files.os, "access", lambda path, mode: False)
    with pytest.raises(InputError, match="read-only or not writable"):
        files.check_writable(tmp_path / "x.pt2", force=False)


def test_temp_file_creation_refused_by_a_read_only_filesystem(tmp_path, monkeypatch):
    def refuse(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(files.tempfile, "mkstemp", refuse)
    monkeypatch.setattr(files.tempfile, "mkdtemp", refuse)
    for writer in (files.atomic_write, files.atomic_write_dir):
        with pytest.raises(InputError, match="EROFS"):
            with writer(tmp_path / "m.onnx"):
                pass


def test_atomic_write_dir_moves_side_files_and_main_last(tmp_path):
    out = tmp_path / "m.onnx"
    with files.atomic_write_dir(out) as tmp:
        tmp.write_bytes(b"model")
        (tmp.parent / "m.onnx.data").write_bytes(b"weights")
    assert out.read_bytes() == b"model" and (tmp_path / "m.onnx.data").read_bytes() == b"weights"
    assert _hidden(tmp_path) == []


def test_same_file(tmp_path):
    a = tmp_path / "a"
    a.write_text("x")
    (tmp_path / "link").symlink_to(a)
    assert files.same_file(a, tmp_path / "link") and files.same_file(a, tmp_path / "." / "a")
    assert not files.same_file(a, tmp_path / "b")


def test_nested_writes_blame_the_file_that_failed(tmp_path):
    first, second = tmp_path / "model.pt2", tmp_path / "report.html"
    with pytest.raises(InputError) as info:
        with files.atomic_write(first, what="output") as a, files.atomic_write(second, what="report") as b:
            with files.writing(b):
                b.write_text("report")
            with files.writing(a):
                raise OSError(errno.ENOSPC, "No space left on device")
    assert "cannot write output" in str(info.value) and str(first) in str(info.value)
    assert not first.exists() and _hidden(tmp_path) == []
