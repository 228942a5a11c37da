"""The README's smoke command runs WKD with non-zero weights: it is run as written (``--out`` in a temporary
folder) and its logged WKD-L / WKD-F weights and loss terms must be > 0 at every logged step."""
from __future__ import annotations

import os
import re
import shlex
import sys

sys.path.insert(0, os.path.dirname(__file__))
from cls_helpers import REPO, train_losses  # noqa: E402

from examples.classification import train  # noqa: E402


def readme_command(readme, module: str) -> list:
    """The arguments of the first ``python -m MODULE ... --synthetic ...`` command of ``readme`` (one shell
    command, backslash continuations joined)."""
    text = readme.read_text().replace("\\\n", " ")
    for line in text.splitlines():
        if line.strip().startswith(f"python -m {module} ") and " --synthetic " in line and "[--synthetic]" not in line:
            return shlex.split(line.strip())[3:]
    raise AssertionError(f"no `python -m {module} ... --synthetic` command in {readme}")


def _with_out(args: list, out) -> list:
    i = args.index("--out")
    return args[:i + 1] + [str(out)] + args[i + 2:]


def test_readme_smoke_command_logs_nonzero_wkd_terms(tmp_path, capsys):
    args = readme_command(REPO / "examples" / "classification" / "README.md", "examples.classification.train")
    assert re.search(r"wkd_lf\.yaml$", args[args.index("--config") + 1]), "the smoke run exercises WKD-L + WKD-F"
    summary = train.main(_with_out(args, tmp_path / "smoke"))
    assert not summary["stopped_early"]
    for key in ("train/w_wkd_l", "train/w_wkd_f", "train/loss_wkd_l", "train/loss_wkd_f"):
        values = train_losses(tmp_path / "smoke", key)
        assert values and all(v > 0 for v in values.values()), (key, values)
