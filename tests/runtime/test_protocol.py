"""The launcher-worker protocol has one owner, shoal/runtime/protocol.py: a SHOAL_* environment name
written anywhere else in the package, the benchmarks or the tests is a second definition that can
drift from the first (a launcher setting one spelling, a worker reading another)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from shoal.runtime import protocol

ROOT = Path(__file__).resolve().parents[2]
OWNER = ROOT / "shoal" / "runtime" / "protocol.py"
NAME = re.compile(r"\bSHOAL_[A-Z0-9_]+")
# Names that are not part of the launcher-worker protocol, each allowed only where it belongs:
ELSEWHERE = {
    # the user's own setting (README, docs/plan.md): where downloads and calibrations are cached
    "SHOAL_CACHE": ("shoal/data/datasets.py", "tests/"),
    # variables of the job files that `shoal render` writes (docs/clusters.md), read by the job's
    # shell lines before any Shoal process starts; their tests read the rendered files
    "SHOAL_CONFIG": ("shoal/launch/render/", "tests/clusters/"),
    "SHOAL_RDZV": ("shoal/launch/render/",),
    "SHOAL_RDZV_PORT": ("shoal/launch/render/",),
}
TEST_ONLY = "SHOAL_TEST_"  # a test model's own switches (tests/fault/crashing_model.py, tests/observe/slow_model.py)


def docstrings(tree: ast.AST) -> set[int]:
    """ids of the string nodes that are docstrings: prose may name a variable without defining it."""
    found = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list):
            for i, stmt in enumerate(body):  # a module's, class's or function's first string, or one after an assignment
                if (isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant)
                        and isinstance(stmt.value.value, str) and (i == 0 or isinstance(body[i - 1], (ast.Assign, ast.AnnAssign)))):
                    found.add(id(stmt.value))
    return found


def names_written(path: Path) -> set[str]:
    """SHOAL_* names in a file's code: string constants (not docstrings) and keyword names
    (`launcher_environment(SHOAL_X=...)` sets a variable too)."""
    tree = ast.parse(path.read_text())
    prose = docstrings(tree)
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in prose:
            names.update(NAME.findall(node.value))
        elif isinstance(node, ast.keyword) and node.arg:
            names.update(NAME.findall(node.arg))
    return names


def test_protocol_names_are_written_only_in_the_protocol_module():
    misplaced = []
    for folder in ("shoal", "benchmarks", "tests", "examples"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path in (OWNER, Path(__file__).resolve()):  # the owner, and this file's list of exceptions
                continue
            where = path.relative_to(ROOT).as_posix()
            for name in names_written(path):
                allowed = ELSEWHERE.get(name, ())
                if any(where.startswith(place) for place in allowed):
                    continue
                if name.startswith(TEST_ONLY) and where.startswith("tests/"):
                    continue
                misplaced.append(f"{where}: {name}")
    assert misplaced == [], ("SHOAL_* names outside shoal/runtime/protocol.py; import its *_ENV constant "
                             f"instead: {misplaced}")


def test_each_protocol_name_is_defined_once():
    envs = {k: v for k, v in vars(protocol).items() if k.endswith("_ENV")}
    assert len(set(envs.values())) == len(envs), envs
    assert all(v.startswith("SHOAL_") for v in envs.values()), envs
    # the module names every SHOAL_* it holds in a constant, so nothing else has to spell one
    assert names_written(OWNER) == set(envs.values())


def test_exit_codes_tell_the_launcher_apart():
    from shoal.config import USER_ERROR
    codes = [USER_ERROR, protocol.STORE_LOST_EXIT, *protocol.PREEMPTED_CODES]
    assert len(set(codes)) == len(codes) and 0 not in codes and 1 not in codes  # 1: any Python traceback
    assert protocol.preempted_exit_code(15) == 143  # what a shell reports for a process ended by SIGTERM
