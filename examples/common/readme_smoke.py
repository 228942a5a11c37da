"""The README smoke commands as argument lists, for the tests that run them as written (both tasks' smoke tests)."""
from __future__ import annotations

import shlex
from pathlib import Path


def readme_command(readme: Path, module: str) -> list:
    """The arguments of the first ``python -m MODULE ... --synthetic ...`` command of ``readme`` (one shell
    command, backslash continuations joined)."""
    for line in Path(readme).read_text().replace("\\\n", " ").splitlines():
        if line.strip().startswith(f"python -m {module} ") and " --synthetic " in line and "[--synthetic]" not in line:
            return shlex.split(line.strip())[3:]
    raise AssertionError(f"no `python -m {module} ... --synthetic` command in {readme}")


def with_out(args: list, out) -> list:
    """args with the value of its ``--out`` option replaced by ``out``."""
    i = args.index("--out")
    return args[:i + 1] + [str(out)] + args[i + 2:]
