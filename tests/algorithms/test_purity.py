import ast
import pathlib

import srpo_megatron.algorithms

PACKAGE = pathlib.Path(srpo_megatron.algorithms.__file__).parent


def test_algorithms_import_neither_megatron_nor_torch_distributed():
    for path in sorted(PACKAGE.glob("*.py")):
        tree = ast.parse(path.read_text())
        assert ast.get_docstring(tree), f"{path.name} needs a module docstring with its formula"
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            for name in names:
                assert not name.startswith(("megatron", "torch.distributed")), f"{path.name} imports {name}"
