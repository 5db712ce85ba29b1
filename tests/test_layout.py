"""The package layout: imports go one way
(scripts -> webapp/jobs -> training -> evaluation -> losses/datasets -> models -> util)."""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# evaluation sits below training: a run measures itself at its end (metrics.json)
LEVEL = {"util": 0, "models": 1, "datasets": 2, "losses": 2, "evaluation": 3, "training": 4, "webapp": 5,
         "jobs": 5}


def imported_packages(path: Path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        for name in names:
            top = name.split(".")[0]
            if top in LEVEL:
                yield top, node.lineno


def test_no_package_imports_upward_or_sideways():
    wrong = []
    for package, level in LEVEL.items():
        for path in (REPO / package).glob("*.py"):
            for other, line in imported_packages(path):
                if other != package and LEVEL[other] >= level:
                    wrong.append(f"{path.relative_to(REPO)}:{line} imports {other}")
    assert not wrong, "\n".join(wrong)


def test_no_package_is_named_after_the_standard_library_or_a_popular_package():
    taken = {"io", "clip", "typing", "types", "json", "logging", "test", "torch", "numpy", "data"}
    packages = {p.name for p in REPO.iterdir() if (p / "__init__.py").is_file()}
    assert packages == set(LEVEL) and not packages & taken
