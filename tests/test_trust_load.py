"""Opening a .pt2 runs no code from it (issue 19 items 1, 2 and 7's checksums): one archive per attack.

Each attack archive is a real converted model whose entries are rewritten the way an attacker could:
a pickled payload in the weights, the constants, an opaque constant, the example inputs, an extra
file, and a side record naming an inductor compiler. The payload writes a marker file when it runs.
"""
import io
import json
import pickle
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import rewriter
from rewriter.cli import main
from rewriter.errors import InputError


class _Payload:
    """Unpickling this runs exec(code): the attack."""

    def __init__(self, code):
        self.code = code

    def __reduce__(self):
        return (exec, (self.code,))


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.register_buffer("scale", torch.full((8,), 0.5))

    def forward(self, x):
        return torch.relu(self.fc(x)) * self.scale


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("trust") / "net-bf16.pt2"
    torch.manual_seed(0)
    gm = rewriter.convert(_Net().eval(), (torch.randn(2, 8),), precision="bf16")
    rewriter.save(gm, path)
    return path


def _rewrite(src: Path, dst: Path, changes: dict) -> Path:
    """Copy archive `src` to `dst` with entries (named relative to the archive root) replaced, added
    (bytes) or edited (a function of the old bytes)."""
    with zipfile.ZipFile(src) as zin:
        names = zin.namelist()
        root = next(n for n in names if n.endswith("archive_version"))[: -len("archive_version")]
        entries = {n[len(root):]: zin.read(n) for n in names}
    for rel, change in changes.items():
        entries[rel] = change(entries.get(rel)) if callable(change) else change
    with zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for rel, blob in entries.items():
            zout.writestr(root + rel, blob)
    return dst


def _torch_save(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _edit_json(fn):
    def edit(old: bytes) -> bytes:
        data = json.loads(old)
        fn(data)
        return json.dumps(data).encode()
    return edit


def _marker_code(marker: Path) -> str:
    return f"open({str(marker)!r}, 'w').write('ran')"


def _pickled_weight(data):
    data["config"]["fc.weight"]["use_pickle"] = True


def _attack(name: str, marker: Path) -> dict:
    payload = _Payload(_marker_code(marker))
    if name == "weights":
        return {"data/weights/model_weights_config.json": _edit_json(_pickled_weight),
                "data/weights/weight_0": _torch_save(payload)}
    if name == "constants":
        entry = {"path_name": "tensor_constant_7", "is_param": False, "use_pickle": True, "tensor_meta": None}
        return {"data/constants/model_constants_config.json":
                _edit_json(lambda d: d["config"].__setitem__("evil", entry)),
                "data/constants/tensor_constant_7": _torch_save(payload)}
    if name == "opaque_constant":
        entry = {"path_name": "opaque_obj_0", "is_param": False, "use_pickle": True, "tensor_meta": None}
        return {"data/constants/model_constants_config.json":
                _edit_json(lambda d: d["config"].__setitem__("evil", entry)),
                "data/constants/opaque_obj_0": pickle.dumps(payload)}
    if name == "example_inputs":
        return {"data/sample_inputs/model.pt": _torch_save(((payload,), {}))}
    raise ValueError(name)


ATTACKS = ("weights", "constants", "opaque_constant", "example_inputs")


@pytest.mark.parametrize("attack", ATTACKS)
def test_load_refuses_pickled_payload(saved, tmp_path, attack):
    marker = tmp_path / "ran.txt"
    evil = _rewrite(saved, tmp_path / f"evil-{attack}.pt2", _attack(attack, marker))
    with pytest.raises(InputError, match="--trust-pickle"):
        rewriter.load(evil)
    assert not marker.exists(), f"the {attack} payload ran"


@pytest.mark.parametrize("command", ["convert", "bench", "diff"])
def test_cli_refuses_pickled_payload_with_exit_2(saved, tmp_path, command, capsys):
    marker = tmp_path / "ran.txt"
    evil = _rewrite(saved, tmp_path / "evil.pt2", _attack("weights", marker))
    argv = {"convert": ["convert", str(evil), "-o", str(tmp_path / "out.pt2")],
            "bench": ["bench", str(evil)],
            "diff": ["diff", str(saved), str(evil)]}[command]
    assert main(argv) == 2
    assert not marker.exists(), "the payload ran"
    assert "trust-pickle" in capsys.readouterr().err


def test_trust_pickle_admits_the_pickled_tensor_weight(saved, tmp_path):
    """A pickled entry holding a plain tensor passes the safe check; trust_pickle skips the check."""
    weight = dict(rewriter.load(saved).named_parameters())["fc.weight"].detach().clone()
    ok = _rewrite(saved, tmp_path / "pickled-tensor.pt2",
                  {"data/weights/model_weights_config.json": _edit_json(_pickled_weight),
                   "data/weights/weight_0": _torch_save(nn.Parameter(weight))})
    gm = rewriter.load(ok)  # the checksum of the recorded weight holds too
    assert torch.equal(dict(gm.named_parameters())["fc.weight"], weight)


def test_extra_file_payload_is_never_unpickled(saved, tmp_path):
    marker = tmp_path / "ran.txt"
    evil = _rewrite(saved, tmp_path / "extra.pt2",
                    {"extra/evil.pkl": pickle.dumps(_Payload(_marker_code(marker)))})
    with pytest.raises(InputError, match="could not read"):  # torch reads extra files as UTF-8 text
        rewriter.load(evil)
    assert not marker.exists()


def test_aotinductor_library_refused(saved, tmp_path):
    evil = _rewrite(saved, tmp_path / "aoti.pt2", {"data/aotinductor/model/model.so": b"\x7fELF"})
    with pytest.raises(InputError, match="AOTInductor"):
        rewriter.load(evil)


# ---------------------------------------------------------------- the side record is data


def _record_edit(fn):
    return {"extra/rewriter.json": _edit_json(fn)}


def _compile_with(options):
    def edit(d):
        d["record"]["config"]["backend"] = "compile"
        d["record"]["config"]["backend_options"] = options
    return edit


@pytest.mark.parametrize("options,reason", [
    ({"options": {"cpp.cxx": "/tmp/evil.sh"}}, "inductor option 'cpp.cxx'"),
    ({"compiler": "my_pkg.backdoor"}, "torch.compile backend 'my_pkg.backdoor'"),
    ({"options": {"max_autotune": "/bin/sh"}}, "only numbers and booleans"),
    ({"shell": "rm -rf /"}, "unknown key 'shell'"),
])
def test_record_backend_options_allow_list(saved, tmp_path, options, reason):
    bad = _rewrite(saved, tmp_path / "bad.pt2", _record_edit(_compile_with(options)))
    with pytest.raises(InputError, match=reason.replace("(", r"\(").replace(".", r"\.")):
        rewriter.load(bad)


def test_record_unknown_key_is_exit_2(saved, tmp_path, capsys):
    bad = _rewrite(saved, tmp_path / "bad.pt2", _record_edit(lambda d: d.__setitem__("hook", "os.system")))
    with pytest.raises(InputError, match="unknown key 'hook'"):
        rewriter.load(bad)
    assert main(["bench", str(bad)]) == 2
    assert "unknown key 'hook'" in capsys.readouterr().err


def test_allowed_compile_options_load(saved, tmp_path):
    ok = _rewrite(saved, tmp_path / "ok.pt2",
                  _record_edit(_compile_with({"options": {"max_autotune": True}, "fullgraph": True})))
    gm = rewriter.load(ok)
    assert gm.meta["rewriter"]["config"]["backend_options"]["options"] == {"max_autotune": True}


def test_saved_record_has_weight_checksums(saved):
    with zipfile.ZipFile(saved) as z:
        record = json.loads(z.read(next(n for n in z.namelist() if n.endswith("rewriter.json"))))
    assert set(record["weights_sha256"]) == {"fc.weight", "fc.bias", "scale"}


def test_corrupted_weight_bytes_detected(saved, tmp_path):
    """Bytes changed in place (zip CRC now wrong) and an entry re-written (CRC right, checksum wrong)."""
    def flip(old: bytes) -> bytes:
        return bytes([old[0] ^ 0xFF]) + old[1:]

    altered = _rewrite(saved, tmp_path / "altered.pt2", {"data/weights/weight_0": flip})
    with pytest.raises(InputError, match="do not match the checksums"):
        rewriter.load(altered)
    assert main(["convert", str(altered), "-o", str(tmp_path / "out.pt2")]) == 2

    raw = bytearray(saved.read_bytes())
    with zipfile.ZipFile(saved) as z:
        info = next(i for i in z.infolist() if i.filename.endswith("data/weights/weight_0"))
    name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26: info.header_offset + 30])
    start = info.header_offset + 30 + name_len + extra_len  # first byte of the data (local header)
    raw[start] ^= 0xFF
    damaged = tmp_path / "damaged.pt2"
    damaged.write_bytes(bytes(raw))
    with pytest.raises(InputError, match="damaged"):
        rewriter.load(damaged)


# ---------------------------------------------------------------- output types load anywhere (item 3)


def test_transformers_output_loads_in_fresh_process(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=32)
    torch.manual_seed(0)
    model = transformers.BertModel(config).eval()
    ids = torch.randint(0, 64, (2, 8))
    path = tmp_path / "bert-bf16.pt2"
    rewriter.save(rewriter.convert(model, (ids,), precision="bf16"), path)
    code = ("import torch, rewriter, sys\n"
            f"gm = rewriter.load({str(path)!r})\n"
            "assert 'transformers.modeling_outputs' in sys.modules\n"
            "out = gm(torch.randint(0, 64, (3, 8)))\n"
            "print(type(out).__name__, out.last_hidden_state.dtype)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=str(Path(__file__).resolve().parents[1]))
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-2:] == ["BaseModelOutputWithPoolingAndCrossAttentions", "torch.float32"]


def test_import_outside_allow_list_is_named(saved, tmp_path):
    bad = _rewrite(saved, tmp_path / "imports.pt2", _record_edit(lambda d: d.__setitem__("imports", ["os"])))
    assert "os" not in rewriter.archive.import_output_modules(["transformers.modeling_outputs"])
    assert rewriter.archive.import_output_modules(["os", "subprocess"]) == ["os", "subprocess"]
    rewriter.load(bad)  # nothing needed from "os": loads, without importing anything
