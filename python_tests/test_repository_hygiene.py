"""Structure the design asks for (docs/design.md sections 1 and 2), checked on the source tree itself:

* no import cycle inside ``wkd_kernels``, counting the imports inside functions (lazy ones) too;
* no module imports a private name (``_x``) from another module of the package;
* every repository file a comment or docstring names exists (no references to files outside the repository);
* the package reads the environment in ``wkd_kernels/settings.py`` and ``wkd_kernels/_build.py`` only;
* no tracked file cites a tracker (a numbered issue or item).
"""
import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PKG = REPO / "wkd_kernels"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _package_modules():
    return {_module_name(p): p for p in PKG.rglob("*.py")}


def _resolve(module: str, is_pkg: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if is_pkg else module.split(".")[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(modules):
    """module -> list of (imported module, imported names) for every import statement, lazy ones included."""
    out = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        is_pkg = path.name == "__init__.py"
        edges = []
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                edges += [(a.name, []) for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                target = _resolve(name, is_pkg, node)
                names = [a.name for a in node.names]
                # `from . import x` imports the submodule x
                subs = [f"{target}.{n}" for n in names if f"{target}.{n}" in modules]
                edges += [(s, []) for s in subs] + [(target, [n for n in names if f"{target}.{n}" not in modules])]
        out[name] = [(t, n) for t, n in edges if t in modules or t.startswith("wkd_kernels")]
    return out


def test_no_import_cycle_in_the_package():
    modules = _package_modules()
    graph = {m: sorted({t for t, _ in edges if t in modules and t != m}) for m, edges in _imports(modules).items()}
    # a package imports its own submodules from __init__ and they import siblings: only module -> module edges
    # between non-package modules and from a module to a package that does not contain it can close a cycle.
    def relevant(src, dst):
        return not dst.startswith(src + ".") and not src.startswith(dst + ".")

    state, stack, cycles = {}, [], []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for d in graph[m]:
            if not relevant(m, d):
                continue
            if state.get(d) == 1:
                cycles.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m)
    assert not cycles, "import cycles in wkd_kernels: " + "; ".join(" -> ".join(c) for c in cycles)


def test_no_private_names_imported_across_modules():
    modules = _package_modules()
    bad = []
    for src, edges in _imports(modules).items():
        for target, names in edges:
            bad += [f"{src} imports {n} from {target}" for n in names
                    if n.startswith("_") and n not in ("__version__", "_C")]
    assert not bad, bad


_PATH = re.compile(r"(?<![\w./-])((?:csrc|wkd_kernels|python_tests|bench|examples|docs|\.ci)/[\w./<>-]*[\w>])")


def test_files_named_in_the_source_exist():
    missing = []
    for path in list(PKG.rglob("*.py")) + list((REPO / "csrc").rglob("*.*")) + [REPO / "README.md",
                                                                               REPO / "docs" / "design.md"]:
        for ref in _PATH.findall(path.read_text()):
            ref = ref.rstrip(".")
            if "<" in ref or "*" in ref or "{" in ref:  # a pattern (csrc/cpu/<op>.cpp), not a file
                continue
            if not (REPO / ref).exists():
                missing.append(f"{path.relative_to(REPO)} names {ref}")
    assert not missing, missing
    assert "../shared" not in "".join(p.read_text() for p in PKG.rglob("*.py"))


def test_environment_read_in_one_place():
    readers = sorted(str(p.relative_to(REPO)) for p in PKG.rglob("*.py")
                     if re.search(r"os\.environ|os\.getenv", p.read_text()))
    assert readers == ["wkd_kernels/_build.py", "wkd_kernels/settings.py"], readers


# A reader has the repository, not the tracker it was planned in: a numbered issue or item points nowhere. Say what
# was meant instead (the paper's table or section, a docs/ section).
_TRACKER_WORDS = re.compile(r"\b([Ii]ssues?|[Ii]tems?)[ _]?[0-9]+")


def _tracked_text_files():
    import subprocess

    try:
        names = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):  # not a git checkout (an sdist): the files on disk
        return [p for p in REPO.rglob("*") if p.is_file() and ".git" not in p.parts]
    return [REPO / n for n in names.splitlines() if n]


def test_no_tracker_references_in_tracked_files():
    hits = []
    for path in _tracked_text_files():
        if path.suffix not in {".py", ".md", ".yaml", ".yml", ".toml", ".cpp", ".cu", ".cuh", ".h", ".sh", ".txt", ""}:
            continue
        try:
            text = path.read_text()
        except (UnicodeDecodeError, OSError):
            continue
        for i, line in enumerate(text.splitlines(), 1):
            if _TRACKER_WORDS.search(line):
                hits.append(f"{path.relative_to(REPO)}:{i}: {line.strip()[:100]}")
    assert not hits, "tracker references (say what they meant instead):\n" + "\n".join(hits)
