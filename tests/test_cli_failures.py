"""`rewrite` failure paths: every failure exits with its documented code (2: the user can act) and one
paragraph naming the file and what to do; outputs stay atomic and inputs are never overwritten."""
from __future__ import annotations

import errno
import hashlib
import io
from pathlib import Path

import pytest
import torch

import fixtures_models as fm
from rewriter.cli import main

MLP = "fixtures_models:tiny_mlp"


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli_failures")
    fp32 = folder / "mlp.pt2"
    torch.export.save(torch.export.export(fm.tiny_mlp(), (torch.randn(*fm.MLP_SHAPE),)), str(fp32))
    other = folder / "transformer.pt2"
    torch.export.save(torch.export.export(fm.tiny_transformer(), (torch.randn(*fm.TRANSFORMER_SHAPE),)),
                      str(other))
    wide = folder / "wide.pt2"  # takes the MLP's input, returns another shape
    torch.export.save(torch.export.export(torch.nn.Linear(16, 3), (torch.randn(*fm.MLP_SHAPE),)), str(wide))
    converted = folder / "mlp-fp16.pt2"
    assert main(["-q", "convert", str(fp32), "-o", str(converted)]) == 0
    return {"fp32": fp32, "other": other, "wide": wide, "converted": converted}


class _FullDisk(io.RawIOBase):
    """A file whose first write lands and whose next one finds the disk full."""

    def __init__(self, path):
        self.real = open(path, "wb")
        self.writes = 0

    def writable(self):
        return True

    def write(self, data):
        self.writes += 1
        if self.writes > 1 or len(data) > 1000:
            self.real.write(bytes(data)[:100])
            raise OSError(errno.ENOSPC, "No space left on device")
        return self.real.write(data)

    def close(self):
        self.real.close()
        super().close()


def test_disk_full_while_writing_the_program_exits_2_naming_the_file(tmp_path, monkeypatch, capsys):
    from rewriter import io as rio

    # the real Prepared.write: the archive is built in memory, then written with Python's file API,
    # whose write raises ENOSPC here (torch's C++ writer would abort the process: exit 134)
    monkeypatch.setattr(rio, "open", lambda path, mode="r", *a, **k: _FullDisk(path), raising=False)
    out, report = tmp_path / "out.pt2", tmp_path / "r.html"
    code = main(["convert", MLP, "--input-shape", "4,16", "-o", str(out), "--report", str(report)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert str(out) in err and "is full" in err and "ENOSPC" in err and "another folder" in err
    assert "bug" not in err
    assert not out.exists() and not report.exists() and _leftovers(tmp_path) == []


def test_disk_full_while_writing_a_diff_report_exits_2(models, tmp_path, monkeypatch, capsys):
    def full(self, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full)
    page = tmp_path / "d.html"
    code = main(["diff", str(models["fp32"]), str(models["converted"]), "--html", str(page)])
    err = capsys.readouterr().err
    assert code == 2 and "--html file" in err and str(page) in err and "is full" in err
    assert not page.exists() and _leftovers(tmp_path) == []


def test_read_only_output_folder_exits_2_before_any_work(tmp_path, monkeypatch, capsys):
    import rewriter
    from rewriter import files

    folder = tmp_path / "ro"
    folder.mkdir()
    real_access = files.os.access
    monkeypatch.setattr(files.os, "access",
                        lambda p, mode: False if Path(p) == folder else real_access(p, mode))
    monkeypatch.setattr(rewriter, "convert", lambda *a, **k: pytest.fail("converted before checking"))
    code = main(["convert", MLP, "--input-shape", "4,16", "-o", str(folder / "out.pt2")])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "read-only or not writable" in err and str(folder) in err and "choose a folder" in err


def test_read_only_filesystem_at_write_time_exits_2(tmp_path, monkeypatch, capsys):
    from rewriter import files

    def refuse(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(files.tempfile, "mkstemp", refuse)  # what root meets on a read-only mount
    out = tmp_path / "out.pt2"
    code = main(["convert", MLP, "--input-shape", "4,16", "-o", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "EROFS" in err and str(out) in err and "this is a bug" not in err.lower()
    assert not out.exists() and _leftovers(tmp_path) == []


@pytest.mark.parametrize("which, expected", [
    ("other", "does not accept the inputs"),      # another model: it cannot take MODEL's inputs
    ("wide", "does not match"),                   # takes them, returns another shape
    ("converted", "is itself a converted model"),
])
def test_bench_reference_that_does_not_match_exits_2(models, which, expected, capsys):
    code = main(["bench", str(models["converted"]), "--reference", str(models[which]), "--repeat", "1",
                 "--warmup", "0", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert expected in err and str(models[which]) in err and "original fp32 model" in err


def test_bench_reference_with_an_unconverted_model_exits_2(models, capsys):
    code = main(["bench", str(models["fp32"]), "--reference", str(models["fp32"]), "--repeat", "1",
                 "--device", "cpu"])
    assert code == 2 and "drop --reference" in capsys.readouterr().err


def test_input_is_never_overwritten_even_with_force(models, capsys):
    before = _digest(models["fp32"])
    assert main(["convert", str(models["fp32"]), "-o", str(models["fp32"]), "--force"]) == 2
    assert "never overwritten" in capsys.readouterr().err
    assert main(["diff", str(models["fp32"]), str(models["converted"]), "--json", str(models["fp32"]),
                 "--force"]) == 2
    assert _digest(models["fp32"]) == before


def test_existing_output_needs_force_and_is_replaced_atomically(models, tmp_path, capsys):
    out = tmp_path / "out.pt2"
    out.write_bytes(b"precious")
    assert main(["-q", "convert", str(models["fp32"]), "-o", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err and out.read_bytes() == b"precious"
    assert main(["-q", "convert", str(models["fp32"]), "-o", str(out), "--force"]) == 0
    assert out.stat().st_size > 1000 and _leftovers(tmp_path) == []


@pytest.fixture
def full_disk(tmp_path):
    """A 20 KiB tmpfs (root only): a real disk that fills up, where the system allows mounting one."""
    import shutil
    import subprocess

    mount = tmp_path / "full"
    mount.mkdir()
    if shutil.which("mount") is None or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=20k", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root); the monkeypatched tests above cover the path")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True)


def test_real_full_disk_exits_2_not_134(full_disk, capsys):
    # torch's C++ archive writer aborted the process (exit 134) here; the archive is now written by Python
    out = full_disk / "m.pt2"
    code = main(["convert", MLP, "--input-shape", "4,16", "-o", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "ENOSPC" in err and str(out) in err
    assert list(full_disk.iterdir()) == []
