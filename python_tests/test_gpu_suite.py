"""The GPU suite's own guarantees, checked on CPU: bench/gpu_quick.py keeps every finished row when it is killed,
the step caps of bench/gpu_suite.sh fit a 10-minute command on the GPU machine, and the tolerance plugin names a
tolerance miss as one."""
import csv
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
from _common import ROW_FIELDS  # noqa: E402

COMMAND_LIMIT_S = 600  # one command on the GPU machine
SUITE_LIMIT_S = 480  # what the suite promises (8 minutes), leaving room for the machine's start and the transfers
KILL_AFTER_S = 5  # gpu_suite.sh: timeout --kill-after


def _env(**extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    env["PYTHONPATH"] = os.pathsep.join(p for p in [str(REPO), str(REPO / "python_tests"),
                                                     env.get("PYTHONPATH", "")] if p)
    env.pop("TRITON_INTERPRET", None)
    return env


def test_gpu_quick_killed_after_its_second_row_keeps_the_rows(tmp_path):
    """SIGKILL right after gpu_quick prints its second row: gpu_quick.json parses and holds those rows, in the one
    schema, and the markdown and CSV tables hold them too (RowWriter rewrites them after every row)."""
    # many timed calls per row (each measurement is capped at ~3 s): the run is far from done at the second row
    cmd = [sys.executable, str(REPO / "bench" / "gpu_quick.py"), "--device", "cpu", "--smoke", "--no-calibration",
           "--backends", "torch,cpu,plain-fp32", "--sizes", "4x6,3x5x4,4x7,4x9", "--reps", "1000",
           "--budget-s", "600", "--out", str(tmp_path)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(),
                            cwd=str(REPO))
    printed, lines = [], []
    deadline = time.monotonic() + 300
    try:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("["):  # a row: "[ elapsed s] op | backend | shape | ..."
                printed.append([x.strip() for x in line.split("]", 1)[1].split("|")[:3]])
                if len(printed) == 2:
                    proc.send_signal(signal.SIGKILL)
                    break
            assert time.monotonic() < deadline, "gpu_quick printed no second row within 300 s"
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stdout.close()
    assert len(printed) == 2, f"gpu_quick ended before its second row: {''.join(lines)[-3000:]}"
    assert proc.returncode == -signal.SIGKILL, f"gpu_quick was not killed mid-run (exit {proc.returncode})"

    data = json.loads((tmp_path / "gpu_quick.json").read_text())
    rows = data["rows"]
    assert 2 <= len(rows) < 12, f"{len(rows)} rows after a kill at the second of 12"
    assert [[r["op"], r["backend"], r["shape"]] for r in rows[:2]] == printed
    for r in rows:
        assert tuple(r) == ROW_FIELDS, f"row columns {tuple(r)} are not the schema's {ROW_FIELDS}"
        assert r["mode"] == "fwd+bwd" and r["dtype"] == "float32"
        assert r["median_ms"] > 0 and r["p20_ms"] <= r["median_ms"] <= r["p80_ms"]
        assert r["max_rel_err"] < 1e-4 and r["note"].startswith(("ok", "info")), r
    assert data["meta"]["device_kind"] == "cpu" and data["meta"]["iters"] == 3
    md_rows = [ln for ln in (tmp_path / "gpu_quick.md").read_text().splitlines() if ln.startswith("| sinkhorn")]
    assert len(md_rows) == len(rows)
    with open(tmp_path / "gpu_quick.csv", newline="") as f:
        csv_rows = list(csv.DictReader(f))
    assert [r["backend"] for r in csv_rows[:len(rows)]] == [r["backend"] for r in rows]


def test_step_caps_fit_one_command_on_the_gpu_machine():
    """Every step of gpu_suite.sh runs under one of its CAP_* variables; they sum to at most 8 minutes, and with
    timeout's kill grace per step stay within the 10-minute limit of one command on the GPU machine."""
    text = (REPO / "bench" / "gpu_suite.sh").read_text()
    caps = {name: int(v) for name, v in re.findall(r"^(CAP_\w+)=(\d+)\s*$", text, flags=re.MULTILINE)}
    assert len(caps) >= 6, f"expected the step caps as CAP_NAME=seconds lines, found {caps}"
    used = set(re.findall(r'^\s*(?:elif ! )?run \w+ "\$(CAP_\w+)"', text, flags=re.MULTILINE))
    assert used == set(caps), f"caps defined {sorted(caps)} but run with {sorted(used)}"
    total = sum(caps.values())
    assert total <= SUITE_LIMIT_S, f"the step caps sum to {total} s > {SUITE_LIMIT_S} s: {caps}"
    assert total + KILL_AFTER_S * len(caps) < COMMAND_LIMIT_S, f"{total} s + kill grace exceeds {COMMAND_LIMIT_S} s"
    assert f"--kill-after={KILL_AFTER_S}" in text
    # the header states the sum
    assert f"the caps sum to {total}" in text, "the header's sum of the caps is stale"


def test_tolerance_plugin_names_a_miss_and_an_error(tmp_path):
    """pytest -v -p tolerance: a tolerance miss reads "TOLERANCE MISS (... measured X > tolerance Y ...)" on its own
    line, any other failure "FAILED (<its error>)"; a pass stays PASSED."""
    (tmp_path / "test_demo.py").write_text(textwrap.dedent("""
        import torch
        from tolerance import assert_within

        def test_miss():
            assert_within(torch.full((3,), 1.01), torch.ones(3), 1e-4, "demo value")

        def test_error():
            raise ValueError("boom")

        def test_assert_close_miss():  # conftest.assert_close's message
            raise AssertionError("grad: worst relative error 1.2e-03 (max abs error 1.0e-03) > rtol 1.0e-04 + atol "
                                 "0.0e+00; worst entry at (0, 1)")

        def test_pass():
            assert assert_within(torch.ones(3), torch.ones(3), 0.0, "exact") == 0.0
    """))
    res = subprocess.run([sys.executable, "-m", "pytest", "-v", "-p", "tolerance", "-p", "no:cacheprovider",
                          str(tmp_path / "test_demo.py")], capture_output=True, text=True, env=_env(),
                         cwd=str(tmp_path), timeout=300, check=False)
    out = res.stdout
    line = {n: next((ln for ln in out.splitlines() if f"::{n} " in ln), "")
            for n in ("test_miss", "test_error", "test_assert_close_miss", "test_pass")}
    assert "TOLERANCE MISS (AssertionError: TOLERANCE MISS demo value: measured 1.000e-02 > tolerance 1.0e-04" \
        in line["test_miss"], out
    assert "FAILED (ValueError: boom)" in line["test_error"], out
    assert "TOLERANCE MISS (AssertionError: grad: worst relative error 1.2e-03" in line["test_assert_close_miss"], out
    assert "PASSED" in line["test_pass"], out
    assert "3 failed, 1 passed" in out, out
