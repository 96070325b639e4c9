"""No name of ours shadows a dependency's, and every benchmark runs the way its documentation says.

Python imports the first `X` it finds on sys.path, and the repository root is on it whenever pytest,
`python -m ...` or PYTHONPATH=$PWD runs our code; a script's own folder is on it for
`python benchmarks/x.py`, and tests/ for pytest. A package or module of ours named like a module of
an installed distribution then replaces it for every library that imports it. This happened: our
`kernels/` package hid the PyPI `kernels` that transformers 5.25 imports (ImportError inside
transformers), and `benchmarks/kernels.py` hid our own kernels from `python benchmarks/...`.
"""

from __future__ import annotations

import ast
import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT_DIRS = ("benchmarks", "tests", "requirements")  # their modules become top-level names when run from there
OUR_DISTRIBUTION = "grpoflow"


def our_import_names(root: Path = ROOT) -> dict[str, list[str]]:
    """Every top-level name under which Python can import code of ours, with where it comes from.

    Regular packages and modules at the root; the modules of the script folders; and the namespace
    folders at the root (no __init__.py) that our code imports by their own name (`benchmarks`).
    A namespace folder nothing imports by its name (kernels/, reached as grpoflow.kernels) never
    hides a dependency: a regular package anywhere on sys.path wins over it."""
    names: dict[str, list[str]] = {}
    for entry in sorted(root.iterdir()):
        if entry.name.startswith(".") or entry.name == "shared":
            continue
        if entry.suffix == ".py":
            names.setdefault(entry.stem, []).append(entry.name)
        elif entry.is_dir() and (entry / "__init__.py").is_file():
            names.setdefault(entry.name, []).append(f"{entry.name}/")
    for folder in SCRIPT_DIRS:
        for module in sorted((root / folder).glob("*.py")):
            names.setdefault(module.stem, []).append(f"{folder}/{module.name}")
    namespaces = {e.name for e in root.iterdir() if e.is_dir() and not (e / "__init__.py").exists()
                  and not e.name.startswith(".")}
    for name in sorted(_top_level_imports(root) & namespaces):
        names.setdefault(name, []).append(f"{name}/ (imported by name)")
    return names


def _top_level_imports(root: Path) -> set[str]:
    """The first component of every absolute import in our Python files."""
    found: set[str] = set()
    for folder in ("grpoflow", "stages", "flows", "kernels", *SCRIPT_DIRS):
        for path in (root / folder).rglob("*.py"):
            tree = ast.parse(path.read_text(), filename=str(path))
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    found.update(alias.name.split(".")[0] for alias in node.names)
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    found.add(node.module.split(".")[0])
    return found


def dependency_modules() -> dict[str, list[str]]:
    """Top-level module -> the installed distributions (other than ours) that provide it, plus the
    standard library's modules (shadowing `json` or `platform` breaks as surely)."""
    provided = {name: [d for d in dists if _normalise(d) != OUR_DISTRIBUTION]
                for name, dists in importlib.metadata.packages_distributions().items()}
    provided = {name: dists for name, dists in provided.items() if dists}
    for name in sys.stdlib_module_names:
        provided.setdefault(name, ["the standard library"])
    return provided


def clashes(ours: dict[str, list[str]], theirs: dict[str, list[str]]) -> list[str]:
    return [f"{where} is importable as `{name}`, which {', '.join(sorted(set(theirs[name])))} also provides"
            for name, wheres in sorted(ours.items()) if name in theirs for where in wheres]


def _normalise(name: str) -> str:
    return name.lower().replace("-", "_").replace(".", "_")


def test_no_name_of_ours_shadows_an_installed_module():
    found = clashes(our_import_names(), dependency_modules())
    assert not found, "rename these (or import them under grpoflow.*):\n" + "\n".join(found)


def test_the_check_sees_a_shadowing_package_and_a_shadowing_script(tmp_path):
    """The check itself: today's kernels/ layout, and a benchmark named after a dependency, are found."""
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "__init__.py").write_text("")
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "benchmarks" / "kernels.py").write_text("")
    (tmp_path / "benchmarks" / "yaml.py").write_text("")
    (tmp_path / "benchmarks" / "bench.py").write_text("from benchmarks.yaml import x\n")
    (tmp_path / "tests").mkdir()
    ours = our_import_names(tmp_path)
    assert ours == {"kernels": ["kernels/", "benchmarks/kernels.py"], "yaml": ["benchmarks/yaml.py"],
                    "bench": ["benchmarks/bench.py"], "benchmarks": ["benchmarks/ (imported by name)"]}
    found = clashes(ours, {"kernels": ["kernels"], "yaml": ["PyYAML"], "os": ["the standard library"]})
    assert found == ["kernels/ is importable as `kernels`, which kernels also provides",
                     "benchmarks/kernels.py is importable as `kernels`, which kernels also provides",
                     "benchmarks/yaml.py is importable as `yaml`, which PyYAML also provides"]


def test_kernels_import_as_grpoflow_kernels_and_not_by_their_folder_name():
    import grpoflow.kernels.reference as reference

    assert Path(reference.__file__).resolve() == ROOT / "kernels" / "reference.py"
    assert "kernels" not in _top_level_imports(ROOT)


def _entry_points() -> list[Path]:
    """The benchmark scripts: the files with a `__main__` block (common.py is a library)."""
    return [p for p in sorted((ROOT / "benchmarks").glob("*.py")) if '__name__ == "__main__"' in p.read_text()]


@pytest.mark.parametrize("script", _entry_points(), ids=lambda p: p.name)
def test_every_benchmark_runs_as_documented(script):
    """`python benchmarks/<name>.py --help` from the repository root, as RESULTS.md and the shell
    scripts write it: no PYTHONPATH, the script's folder first on sys.path."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, f"benchmarks/{script.name}", "--help"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage:" in done.stdout
