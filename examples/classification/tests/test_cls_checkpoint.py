"""examples/common/checkpoint.py: verified loading (SHA-256 header, zip CRC-32s), errors naming the file, no code run
from untrusted pickles (teacher files and --resume), temporary files of killed saves."""
from __future__ import annotations

import io
import os
import struct
import subprocess
import sys
import warnings
import zipfile

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from cls_helpers import REPO, subprocess_env, tiny_config  # noqa: E402

from examples.classification import train  # noqa: E402
from examples.classification.models import build_model  # noqa: E402
from examples.common.checkpoint import (CheckpointError, UntrustedCheckpointError, load_checkpoint,  # noqa: E402
                                        read_torch_file, save_checkpoint)


class _WritesMarker:
    """Unpickling it calls exec, which writes ``marker``: what a malicious checkpoint would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('code ran')",)


def _state():
    return {"w": torch.arange(64.0), "epoch": 3, "rng": np.random.get_state()}


def test_bit_flipped_checkpoint_is_refused_naming_the_file(tmp_path):
    path = tmp_path / "last.pth"
    save_checkpoint(path, _state())
    good = path.read_bytes()
    assert load_checkpoint(path)["epoch"] == 3
    for where in (len(good) // 2, len(good) - 40):  # the pickle / tensor data / zip directory
        flipped = bytearray(good)
        flipped[where] ^= 0x10
        path.write_bytes(bytes(flipped))
        with pytest.raises(CheckpointError, match="corrupted") as err:
            load_checkpoint(path)
        assert str(path) in str(err.value)


def test_bit_flipped_plain_torch_file_is_refused_by_its_zip_crc(tmp_path):
    """Files without the header (other code bases' teachers, older checkpoints): the zip records' CRC-32s, which
    torch.load does not check, are verified."""
    path = tmp_path / "teacher.pth"
    torch.save({"w": torch.arange(1000.0)}, path)
    raw = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as z:
        rec = next(i for i in z.infolist() if i.filename.endswith("data/0"))  # the tensor's bytes
    name_len, extra_len = struct.unpack_from("<HH", raw, rec.header_offset + 26)  # the local header's
    raw[rec.header_offset + 30 + name_len + extra_len + 100] ^= 0x01  # a bit of w[25]
    assert torch.load(io.BytesIO(bytes(raw)), weights_only=True)["w"][25] != 25  # torch.load alone: no error
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="CRC-32") as err:
        read_torch_file(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize("damage", ["truncated", "header_only", "garbage", "empty", "bad_header"])
def test_unreadable_checkpoint_errors_name_the_file(tmp_path, damage):
    path = tmp_path / "last.pth"
    save_checkpoint(path, _state())
    good = path.read_bytes()
    header_end = good.index(b"\n") + 1
    path.write_bytes({"truncated": good[:len(good) // 2], "header_only": good[:header_end],
                      "garbage": b"not a checkpoint at all" * 10, "empty": b"",
                      "bad_header": good[:header_end - 5] + b"x\n" + good[header_end:]}[damage])
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    assert str(path) in str(err.value)
    assert "weights_only` set to `False`" not in str(err.value)  # not torch's advice to unpickle anyway


def test_code_running_pickle_is_refused_and_does_not_run(tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / "last.pth"
    save_checkpoint(path, {"model": {"w": torch.zeros(2)}, "payload": _WritesMarker(marker)})  # valid checksum
    with pytest.raises(UntrustedCheckpointError) as err:
        load_checkpoint(path)
    msg = str(err.value)
    assert str(path) in msg and "builtins.exec" in msg and "--trust-checkpoint" in msg
    assert not marker.exists()
    load_checkpoint(path, trusted=True)  # the explicit opt-in unpickles it all: the pickle really runs code
    assert marker.read_text() == "code ran"


def test_teacher_file_that_runs_code_is_refused_and_does_not_run(tmp_path):
    """build_model(checkpoint=...) (teachers, students) never falls back to weights_only=False."""
    marker = tmp_path / "marker"
    path = tmp_path / "teacher.pth"
    torch.save({"model": build_model("resnet8", 10).net.state_dict(), "extra": _WritesMarker(marker)}, path)
    with pytest.raises(UntrustedCheckpointError, match="--trust-checkpoint") as err:
        build_model("resnet8", 10, checkpoint=str(path))
    assert str(path) in str(err.value)
    assert not marker.exists()


def test_crd_teacher_with_numpy_scalars_loads_weights_only(tmp_path):
    """The published CRD teachers hold NumPy scalars next to the weights: allowed, with no fallback or warning."""
    src = build_model("resnet8", 10)
    path = tmp_path / "ckpt_epoch_240.pth"
    torch.save({"epoch": 240, "model": src.net.state_dict(), "accuracy": np.float64(71.5),
                "best_epoch": np.int64(231), "loss": np.float32(0.25)}, path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dst = build_model("resnet8", 10, checkpoint=str(path))
    for k, v in src.net.state_dict().items():
        assert torch.equal(v, dst.net.state_dict()[k]), k


def test_numpy_1_pickled_scalars_load_weights_only(tmp_path):
    """Teachers pickled under NumPy 1 name ``numpy.core.multiarray.scalar`` (NumPy 2: ``numpy._core``): allowed
    under both names. The file is this process's torch.save output with the module name rewritten."""
    buf = io.BytesIO()
    torch.save({"accuracy": np.float64(71.5), "w": torch.arange(3.0)}, buf)
    src, path = zipfile.ZipFile(io.BytesIO(buf.getvalue())), tmp_path / "numpy1.pth"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for info in src.infolist():
            data = src.read(info.filename)
            if info.filename.endswith("data.pkl"):  # protocol 2: GLOBAL opcodes are newline-terminated text
                assert b"numpy._core.multiarray\nscalar" in data
                data = data.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")
            z.writestr(info.filename, data)
    obj = read_torch_file(path)
    assert obj["accuracy"] == 71.5 and torch.equal(obj["w"], torch.arange(3.0))


def test_resume_refuses_a_code_running_last_pth_unless_trusted(tmp_path):
    cfg = tiny_config(tmp_path, "ce", epochs=2, steps=1)
    out, marker = tmp_path / "out", tmp_path / "marker"
    train.main(["--config", str(cfg), "--out", str(out), "train.stop_after_epochs=1"])
    state = load_checkpoint(out / "last.pth")
    state["config"] = {**state["config"], "evil": _WritesMarker(marker)}
    save_checkpoint(out / "last.pth", state)
    with pytest.raises(UntrustedCheckpointError, match="--trust-checkpoint") as err:
        train.main(["--config", str(cfg), "--out", str(out), "--resume"])
    assert str(out / "last.pth") in str(err.value)
    assert not marker.exists()
    summary = train.main(["--config", str(cfg), "--out", str(out), "--resume", "--trust-checkpoint",
                          str(out / "last.pth")])
    assert marker.exists() and summary["steps"] == 2


def test_killed_save_leaves_no_temporary_file_after_the_next_save(tmp_path):
    """A save killed mid-write (no finally runs) leaves its temporary file; the next save removes it."""
    path = tmp_path / "last.pth"
    save_checkpoint(path, {"epoch": 1})
    script = ("import os, torch\n"
              "from examples.common import checkpoint as c\n"
              "os.fsync = lambda fd: os._exit(9)  # killed between writing and renaming\n"
              f"c.save_checkpoint({str(path)!r}, {{'epoch': 2, 'w': torch.zeros(1000)}})\n")
    proc = subprocess.run([sys.executable, "-c", script], cwd=str(REPO), env=subprocess_env(), timeout=120)
    assert proc.returncode == 9
    left = sorted(p.name for p in tmp_path.iterdir())
    assert len(left) == 2 and left[0].startswith(".last.pth.") and left[0].endswith(".tmp")
    assert load_checkpoint(path)["epoch"] == 1  # the previous checkpoint is intact
    save_checkpoint(path, {"epoch": 3})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pth"]
    assert load_checkpoint(path)["epoch"] == 3


def test_failed_save_removes_its_temporary_file(tmp_path, monkeypatch):
    path = tmp_path / "last.pth"
    save_checkpoint(path, {"epoch": 1})

    def failing_replace(src, dst):
        raise KeyboardInterrupt  # not an Exception: still cleaned up

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"epoch": 2})
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pth"]
    assert load_checkpoint(path)["epoch"] == 1
