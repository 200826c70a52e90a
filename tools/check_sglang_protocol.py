"""Do this project's SGLang payloads match a given SGLang version? Route by route, from its source.

    pip download sglang==0.5.23 --no-deps -d /tmp/sgl && unzip -q /tmp/sgl/sglang-*.whl -d /tmp/sgl/whl
    python tools/check_sglang_protocol.py /tmp/sgl/whl            # a report; exit status 1 on a mismatch
    python tools/check_sglang_protocol.py /tmp/sgl/whl --json     # the spec read from the wheel

The wheel is read, not imported (sglang needs a GPU stack): ``srt/entrypoints/http_server.py``
says which request class each route parses its body into, ``srt/managers/io_struct.py`` holds
those classes (their fields, and which have no default, i.e. are required), and ``/generate``'s
sampling parameters are those of ``api/v1/api_types.py`` ``SamplingParams`` (its contract check,
where the wheel has one) or else of ``srt/sampling/sampling_params.py``. The ``--json``
output of 0.5.23, trimmed to the routes the project and its stand-in server use, is
``tests/rollout/fixtures/sglang_0.5.23_routes.json``.
"""

import argparse
import ast
import json
import sys
from pathlib import Path

from srpo_megatron.testing.sglang_protocol import check_payloads, project_payloads

ROUTE_DECORATORS = ("post", "api_route", "get", "put")


def _classes(tree: ast.Module) -> dict[str, ast.ClassDef]:
    return {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}


def _fields(name: str, classes: dict[str, ast.ClassDef]) -> dict[str, bool]:
    """``{field: required}`` of class ``name``, base classes of the same file first."""
    node, out = classes[name], {}
    for base in node.bases:
        if isinstance(base, ast.Name) and base.id in classes:
            out |= _fields(base.id, classes)
    for stmt in node.body:
        if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
            continue
        if isinstance(stmt.annotation, ast.Subscript) and _name(stmt.annotation.value) == "ClassVar":
            continue  # not a field
        out[stmt.target.id] = stmt.value is None
    return out


def _name(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return None


def _body_class(function: ast.AsyncFunctionDef | ast.FunctionDef) -> str | None:
    """The request class a route handler's ``obj`` parameter is parsed into: ``obj: X`` or
    ``obj: Annotated[X, Body()]``."""
    for arg in function.args.args:
        if arg.arg != "obj" or arg.annotation is None:
            continue
        annotation = arg.annotation
        if isinstance(annotation, ast.Subscript) and _name(annotation.value) == "Annotated":
            annotation = annotation.slice.elts[0]
        return _name(annotation)
    return None


def _routes(http_server: ast.Module) -> dict[str, str | None]:
    """``{route: request class or None}`` of every route the server declares."""
    out = {}
    for node in ast.walk(http_server):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for decorator in node.decorator_list:
            if (
                isinstance(decorator, ast.Call)
                and _name(decorator.func) in ROUTE_DECORATORS
                and decorator.args
                and isinstance(decorator.args[0], ast.Constant)
                and isinstance(decorator.args[0].value, str)
            ):
                out[decorator.args[0].value.strip("/")] = _body_class(node)
    return out


def _sampling_params(root: Path) -> tuple[str, list[str]]:
    contract = root / "sglang/api/v1/api_types.py"
    if contract.exists():
        classes = _classes(ast.parse(contract.read_text()))
        return "api/v1/api_types.py SamplingParams", sorted(_fields("SamplingParams", classes))
    classes = _classes(ast.parse((root / "sglang/srt/sampling/sampling_params.py").read_text()))
    init = next(
        n for n in classes["SamplingParams"].body if isinstance(n, ast.FunctionDef) and n.name == "__init__"
    )
    return "srt/sampling/sampling_params.py SamplingParams", sorted(a.arg for a in init.args.args[1:])


def read_spec(root: Path) -> dict:
    """The routes, request classes and sampling parameters of the unzipped wheel at ``root``."""
    srt = root / "sglang/srt"
    classes = _classes(ast.parse((srt / "managers/io_struct.py").read_text()))
    contract = root / "sglang/api/v1/api_types.py"
    generate_classes = _classes(ast.parse(contract.read_text())) if contract.exists() else classes
    routes = {}
    for route, class_name in sorted(
        _routes(ast.parse((srt / "entrypoints/http_server.py").read_text())).items()
    ):
        if route == "generate" and contract.exists():
            # the body is parsed into the route's io_struct class; the contract gate in front of it
            # (api/v1/api_types.py GenerateRequest) checks the types of the keys it knows and lets
            # the others through (0.5.23: return_routed_experts reaches GenerateReqInput)
            fields = _fields("GenerateRequest", generate_classes) | _fields(class_name, classes)
        elif class_name in classes:
            fields = _fields(class_name, classes)
        else:  # no JSON body class: an info route, or one taking query parameters (flush_cache)
            class_name, fields = None, {}
        routes[route] = {
            "class": class_name,
            "fields": sorted(fields),
            "required": sorted(f for f, required in fields.items() if required),
        }
    where, sampling = _sampling_params(root)
    return {
        "version": _version(root),
        "routes": routes,
        "sampling_params": {"class": where, "fields": sampling},
    }


def _version(root: Path) -> str:
    """From the wheel's metadata (``sglang/version.py`` imports a generated module)."""
    for line in next(root.glob("sglang-*.dist-info/METADATA")).read_text().splitlines():
        if line.startswith("Version: "):
            return line.removeprefix("Version: ")
    raise ValueError(f"no Version in the METADATA of the wheel at {root}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("wheel_dir", type=Path, help="an unzipped sglang wheel (the folder holding sglang/)")
    parser.add_argument("--json", action="store_true", help="print the spec read from the wheel instead")
    args = parser.parse_args(argv)
    spec = read_spec(args.wheel_dir)
    if args.json:
        print(json.dumps(spec, indent=1, sort_keys=True))
        return 0
    report = check_payloads(project_payloads(), spec)
    print(f"sglang {spec['version']} at {args.wheel_dir}")
    for route, ok, what in report:
        print(f"{'ok      ' if ok else 'MISMATCH'} /{route}: {what}")
    bad = sum(not ok for _, ok, _ in report)
    print(f"{len(report) - bad} of {len(report)} routes match")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
