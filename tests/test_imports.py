"""The package's dependency direction, read from the imports of every module (lazy ones inside
functions included): each folder (or top-level module) of ``srpo_megatron`` imports only the ones
below it in ``ALLOWED``, and no two import each other, directly or around a cycle.

    trainer, train.py (the CLI)  -> everything (nothing imports them)
    format_warmup.py             -> models, data, rewards, runtime (tools/make_tiny_model.py's loop)
    testing/                     -> rollout, models, runtime (the SGLang stand-in server, a CPU tool)
    rollout/                     -> models, runtime
    config.py                    -> algorithms (its config section)
    models/, ops/, data/, rewards/ -> runtime
    algorithms/                  -> ops at most, and never megatron or torch.distributed
    compare.py (srpo-compare)    -> plot, runtime (it runs the trainer as a program)
    convert_ckpt.py (srpo-convert-ckpt) -> models, runtime (the checkpoint converters' command line)
    runtime/, plot.py            -> nothing of ours
    errors.py                    <- anyone (UserError)
"""

import ast
import pathlib

import pytest

import srpo_megatron

ALLOWED = {
    "train": set(),  # everything: filled in below
    "trainer": set(),
    "format_warmup": {"models", "data", "rewards", "runtime"},
    "testing": {"rollout", "models", "runtime"},
    "rollout": {"models", "runtime"},
    "config": {"algorithms"},
    "models": {"runtime"},
    "ops": {"runtime"},
    "data": {"runtime"},
    "rewards": {"runtime"},
    "algorithms": {"ops"},
    "runtime": set(),
    "plot": set(),
    "compare": {"plot", "runtime"},
    "convert_ckpt": {"models", "runtime"},
    "errors": set(),
    "__init__": set(),
}
EVERYTHING = set(ALLOWED) - {"train", "trainer"}
ALLOWED["train"], ALLOWED["trainer"] = EVERYTHING | {"trainer"}, EVERYTHING
ANYONE_MAY_IMPORT = {"errors"}
NEVER_IN = {"algorithms": ("megatron", "torch.distributed")}


def _unit(package: pathlib.Path, path: pathlib.Path) -> str:
    """The folder or top-level module a file belongs to: rollout/weight_sync/buckets.py -> rollout."""
    parts = path.relative_to(package).parts
    return parts[0] if len(parts) > 1 else parts[0].removesuffix(".py")


def _imports(path: pathlib.Path, package_name: str) -> list[str]:
    """Every module name a file imports (absolute; relative imports resolved within the package)."""
    tree = ast.parse(path.read_text())
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # from .x import y / from .. import y
                base = path.parent.parts[: len(path.parent.parts) - node.level + 1]
                top = len(base) - 1 - base[::-1].index(package_name)  # the package's own folder
                anchor = list(base[top:])
                names.append(".".join(anchor + ([node.module] if node.module else [])))
            else:
                names.append(node.module or "")
    return names


def import_violations(package: pathlib.Path) -> list[str]:
    """What breaks the rules in the package at ``package`` (a directory), one line each."""
    name = package.name
    problems, edges = [], {}
    for path in sorted(package.rglob("*.py")):
        unit = _unit(package, path)
        if unit not in ALLOWED:
            problems.append(f"{path.relative_to(package)}: {unit!r} has no rule in ALLOWED")
            continue
        for module in _imports(path, name):
            for prefix in NEVER_IN.get(unit, ()):
                if module == prefix or module.startswith(prefix + "."):
                    problems.append(f"{path.relative_to(package)} imports {module} ({unit}/ must not)")
            if not module.startswith(name + "."):
                continue
            target = module.split(".")[1]
            if target == unit:
                continue
            edges.setdefault(unit, set()).add(target)
            if target not in ALLOWED[unit] and target not in ANYONE_MAY_IMPORT:
                problems.append(
                    f"{path.relative_to(package)} imports {module}: {unit} -> {target} is not allowed"
                )
    problems += [f"import cycle: {' -> '.join(cycle)}" for cycle in _cycles(edges)]
    return problems


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """One cycle through each unit that is on one (depth-first search)."""
    found, state = [], {}  # state: 1 on the current path, 2 done

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                found.append(path[path.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    return found


def test_the_package_follows_the_dependency_rules():
    assert import_violations(pathlib.Path(srpo_megatron.__file__).parent) == []


def test_every_algorithm_module_states_its_formula():
    for path in sorted((pathlib.Path(srpo_megatron.__file__).parent / "algorithms").glob("*.py")):
        assert ast.get_docstring(ast.parse(path.read_text())), (
            f"{path.name} needs a docstring with its formula"
        )


@pytest.mark.parametrize(
    "files, expected",
    [
        ({"ops/k.py": "import srpo_megatron.trainer.loop\n"}, "ops -> trainer is not allowed"),
        (
            {"data/d.py": "def f():\n    from srpo_megatron.rewards import r\n"},
            "data -> rewards is not allowed",
        ),
        ({"algorithms/a.py": "import torch.distributed as dist\n"}, "imports torch.distributed"),
        ({"rollout/x/y.py": "from ...trainer import loop\n"}, "rollout -> trainer is not allowed"),
        ({"newfolder/n.py": "x = 1\n"}, "'newfolder' has no rule"),
        (
            {"train.py": "import srpo_megatron.trainer\n", "trainer/t.py": "import srpo_megatron.train\n"},
            "import cycle: train -> trainer -> train",
        ),
    ],
)
def test_a_wrong_import_is_reported(tmp_path, files, expected):
    package = tmp_path / "srpo_megatron"
    for rel, text in {"__init__.py": "", "runtime/r.py": "import os\n", **files}.items():
        (package / rel).parent.mkdir(parents=True, exist_ok=True)
        (package / rel).write_text(text)
    problems = import_violations(package)
    assert any(expected in p for p in problems), problems
