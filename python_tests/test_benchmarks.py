"""The benchmark scripts (bench/) run and write the one row schema (bench/_common.ROW_FIELDS).

Every per-op script runs its --smoke configuration on CPU; all of them (and bench/compare_pot.py on a tiny size)
run one after the other in a single subprocess, so that torch is imported once. Each CSV must have exactly the
schema's columns, rows for every requested mode and every default backend and baseline, finite times in the
order p20 <= median <= p80, and our backends' max_rel_err (value for fwd, gradient for bwd and fwd+bwd, against the
op's float64 reference) below the bound of the op. The numbers themselves are not checked (no timing assertions).
A RowWriter killed after two rows leaves parseable CSV, JSON and markdown files with those rows.
"""
import csv
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
sys.path.insert(0, str(BENCH))
from _common import MODES, ROW_FIELDS  # noqa: E402

import wkd_kernels as wk  # noqa: E402

# Bound on our backends' max_rel_err in the smoke configuration (float32, seeded inputs; measured values in
# parentheses): a few float32 roundings times the conditioning of the op.
#   sinkhorn 10 iterations, reg 0.05 (4e-7); feature_stats sums over <= 36 positions (2e-7); sqrtm and
#   nuclear_norm Newton-Schulz on well-conditioned 8x8-16x16 matrices (5e-7, 9e-7); bures_wasserstein three
#   roots' errors added (2.5e-6); gaussian_wasserstein: the C x C path at grid 2 of a 6x6 map has 9 positions for 8
#   channels, nearly singular covariances (plus eps I) whose square-root gradient amplifies rounding (4.4e-5).
ERROR_BOUNDS = {"sinkhorn": 1e-5, "feature_stats": 1e-5, "sqrtm": 1e-5, "nuclear_norm": 1e-5,
                "bures_wasserstein": 3e-5, "gaussian_wasserstein": 5e-4}
BASELINES = {"sinkhorn": ["plain PyTorch (matmul + autograd)"], "feature_stats": ["plain PyTorch (cell slicing)"],
             "sqrtm": ["plain PyTorch (eigh)"], "nuclear_norm": ["plain PyTorch (svdvals)"],
             "bures_wasserstein": ["plain PyTorch (eigh)"],
             "gaussian_wasserstein": ["published diag formula (plain PyTorch)",
                                      "plain PyTorch (CxC covariances, eigh)", "plain PyTorch (low-rank, svdvals)"]}
OUR_BACKENDS = (["cpu"] if wk.HAS_C_EXT else []) + ["torch"]

RUNNER = textwrap.dedent("""
    import contextlib, io, runpy, sys
    sys.path.insert(0, {bench!r})
    for script, argv in {jobs!r}:
        sys.argv = [script] + argv
        out = io.StringIO()
        try:
            with contextlib.redirect_stdout(out):
                runpy.run_path(script, run_name="__main__")
        except BaseException:
            print(out.getvalue())
            raise
""")


@pytest.fixture(scope="module")
def smoke_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    jobs = [(str(BENCH / f"bench_{op}.py"), ["--smoke", "--device", "cpu", "--out", str(out)]) for op in ERROR_BOUNDS]
    jobs.append((str(BENCH / "compare_pot.py"), ["--device", "cpu", "--sizes", "8x50", "--reps", "2", "--pot-reps",
                                                 "1", "--pot-batch-rows", "4", "--out", str(out)]))
    # a backend that cannot run on these tensors, and a time limit already passed: rows that say so, no crash
    jobs.append((str(BENCH / "bench_sqrtm.py"), ["--device", "cpu", "--backends", "cuda,torch", "--baselines", "none",
                                                 "--sizes", "2x4", "--modes", "fwd,bwd", "--reps", "1",
                                                 "--out", str(out / "failing")]))
    jobs.append((str(BENCH / "bench_sinkhorn.py"), ["--smoke", "--device", "cpu", "--time-limit", "0",
                                                    "--out", str(out / "time_limit")]))
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-c", RUNNER.format(bench=str(BENCH), jobs=jobs)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def read_rows(path):
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return tuple(reader.fieldnames), list(reader)


def finite(x):
    return x not in ("", None) and math.isfinite(float(x))


@pytest.mark.parametrize("op", list(ERROR_BOUNDS))
def test_smoke_rows_follow_the_schema(smoke_dir, op):
    header, rows = read_rows(smoke_dir / f"bench_{op}.csv")
    assert header == ROW_FIELDS
    assert rows, f"bench_{op}.py wrote no rows"
    shapes = {r["shape"] for r in rows}
    assert len(shapes) >= 2, f"--smoke should measure at least two sizes, got {shapes}"
    for shape in shapes:
        for mode in MODES:
            got = {r["backend"] for r in rows if r["shape"] == shape and r["mode"] == mode}
            missing = set(OUR_BACKENDS) - got
            assert not missing, f"{op} {shape} {mode}: no rows for backends {missing}"
            applicable = [b for b in BASELINES[op] if any(r["backend"] == b for r in rows if r["shape"] == shape)]
            assert set(applicable) <= got
    for op_baseline in BASELINES[op]:
        assert any(r["backend"] == op_baseline for r in rows), f"{op}: no rows of the baseline {op_baseline!r}"
    for r in rows:
        assert r["op"] == op and r["dtype"] == "float32" and r["mode"] in MODES
        assert r["peak_mem_mb"] == "", "CPU rows leave peak_mem_mb empty"
        if r["note"].startswith("skipped") or "; skipped" in r["note"]:
            assert r["median_ms"] == "" and r["backend"] not in OUR_BACKENDS
            continue
        assert all(finite(r[c]) for c in ("median_ms", "p20_ms", "p80_ms")), r
        assert 0 < float(r["p20_ms"]) <= float(r["median_ms"]) <= float(r["p80_ms"]), r
        assert finite(r["max_rel_err"]), r
        if r["backend"] in OUR_BACKENDS:
            assert float(r["max_rel_err"]) < ERROR_BOUNDS[op], r


@pytest.mark.parametrize("op", list(ERROR_BOUNDS))
def test_smoke_json_and_markdown_hold_the_rows(smoke_dir, op):
    _, rows = read_rows(smoke_dir / f"bench_{op}.csv")
    data = json.loads((smoke_dir / f"bench_{op}.json").read_text())
    assert data["meta"]["op"] == op and "loadavg_at_end" in data["meta"]
    assert len(data["rows"]) == len(rows) and [r["backend"] for r in data["rows"]] == [r["backend"] for r in rows]
    md = (smoke_dir / f"bench_{op}.md").read_text().strip().splitlines()
    assert md[0] == "| " + " | ".join(ROW_FIELDS) + " |" and len(md) == 2 + len(rows)


def test_compare_pot_writes_the_schema(smoke_dir):
    header, rows = read_rows(smoke_dir / "compare_pot.csv")
    assert header == ROW_FIELDS
    for backend in OUR_BACKENDS + ["plain PyTorch (matmul + autograd)"]:
        got = {r["mode"] for r in rows if r["backend"] == backend}
        assert got == {"fwd", "fwd+bwd"}, (backend, got)
    for r in rows:
        assert r["op"] == "sinkhorn" and r["shape"] == "B=8 C=50 reg=0.05 iters=10"
        assert 0 < float(r["p20_ms"]) <= float(r["median_ms"]) <= float(r["p80_ms"])
        if r["backend"] in OUR_BACKENDS:
            assert float(r["max_rel_err"]) < ERROR_BOUNDS["sinkhorn"], r


def test_a_backend_that_cannot_run_gives_failed_rows(smoke_dir):
    header, rows = read_rows(smoke_dir / "failing" / "bench_sqrtm.csv")
    assert header == ROW_FIELDS
    assert sorted((r["backend"], r["mode"]) for r in rows) == [("cuda", "bwd"), ("cuda", "fwd"), ("torch", "bwd"),
                                                               ("torch", "fwd")]
    for r in rows:
        if r["backend"] == "cuda":
            assert r["median_ms"] == "" and "failed: ValueError" in r["note"] and "CUDA tensors" in r["note"], r
        else:
            assert finite(r["median_ms"]) and float(r["max_rel_err"]) < ERROR_BOUNDS["sqrtm"], r


def test_time_limit_skips_the_remaining_sizes(smoke_dir):
    _, rows = read_rows(smoke_dir / "time_limit" / "bench_sinkhorn.csv")
    assert len({r["shape"] for r in rows}) == 2 and len(rows) == 2 * len(MODES) * (len(OUR_BACKENDS) + 1)
    assert all(r["median_ms"] == "" and "skipped: --time-limit 0 s reached" in r["note"] for r in rows)


def test_row_writer_killed_mid_run_keeps_its_rows(tmp_path):
    script = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {str(BENCH)!r})
        from _common import RowWriter, bench_row
        w = RowWriter({str(tmp_path / 'r.csv')!r}, {str(tmp_path / 'r.json')!r}, {str(tmp_path / 'r.md')!r},
                      meta={{"run": "killed"}})
        w.add(bench_row("sqrtm", "cpu", "fwd", "B=2 n=3", "float32", "test CPU", times_ms=[1.0, 2.0, 3.0],
                        max_rel_err=1e-7))
        w.add(bench_row("sqrtm", "torch", "bwd", {{"B": 2, "n": 3}}, "float32", "test CPU", times_ms=[4.0],
                        note="second"))
        os._exit(3)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, proc.stderr
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["meta"] == {"run": "killed"}
    assert [(r["backend"], r["mode"], r["shape"]) for r in data["rows"]] == [("cpu", "fwd", "B=2 n=3"),
                                                                            ("torch", "bwd", "B=2 n=3")]
    assert data["rows"][0]["median_ms"] == 2.0 and data["rows"][1]["note"] == "second"
    assert list(data["rows"][0]) == list(ROW_FIELDS)
    header, rows = read_rows(tmp_path / "r.csv")
    assert header == ROW_FIELDS and [r["backend"] for r in rows] == ["cpu", "torch"]
    assert len((tmp_path / "r.md").read_text().strip().splitlines()) == 4
    assert not list(tmp_path.glob("*.tmp")), "no temporary file is left behind"
