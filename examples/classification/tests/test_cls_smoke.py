"""The README's smoke command runs WKD with non-zero weights: it is run as written (``--out`` in a temporary
folder) and its logged WKD-L / WKD-F weights and loss terms must be > 0 at every logged step."""
from __future__ import annotations

import os
import re
import sys

sys.path.insert(0, os.path.dirname(__file__))
from cls_helpers import REPO, train_losses  # noqa: E402

from examples.classification import train  # noqa: E402
from examples.common.readme_smoke import readme_command, with_out  # noqa: E402


def test_readme_smoke_command_logs_nonzero_wkd_terms(tmp_path, capsys):
    args = readme_command(REPO / "examples" / "classification" / "README.md", "examples.classification.train")
    assert re.search(r"wkd_lf\.yaml$", args[args.index("--config") + 1]), "the smoke run exercises WKD-L + WKD-F"
    summary = train.main(with_out(args, tmp_path / "smoke"))
    assert not summary["stopped_early"]
    for key in ("train/w_wkd_l", "train/w_wkd_f", "train/loss_wkd_l", "train/loss_wkd_f"):
        values = train_losses(tmp_path / "smoke", key)
        assert values and all(v > 0 for v in values.values()), (key, values)
