"""dvc.yaml: each stage depends on every module of stages/ that its command imports, directly or through other
modules, at the top or inside a function, and on no other; so a change to any code a stage runs reruns it.
Read from the source (ast), not by running the stages."""
import ast
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def module_file(name: str) -> Path | None:
    """stages.x -> stages/x.py, stages -> stages/__init__.py; None for a name that is not a module of stages/
    (a function or class imported from one)."""
    parts = name.split(".")
    if parts[0] != "stages":
        return None
    path = ROOT / "stages" / "__init__.py" if len(parts) == 1 else ROOT.joinpath(*parts).with_suffix(".py")
    return path if path.is_file() else None


def imported(path: Path) -> set[str]:
    """The modules of stages/ a file imports anywhere in it: `import stages.x`, `from stages import x`,
    `from stages.x import y`, and the package stages itself, which every one of them runs first."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names |= {node.module, *(f"{node.module}.{alias.name}" for alias in node.names)}
    modules = {name for name in names if module_file(name)}
    return modules | {"stages"} if modules else modules


def import_closure(module: str) -> set[str]:
    """Every file of stages/ that running `python -m module` may import, as dvc.yaml names them."""
    seen, todo = set(), [module, "stages"]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(imported(module_file(name)))
    return {module_file(name).relative_to(ROOT).as_posix() for name in seen}


@pytest.mark.parametrize("name", list(STAGES))
def test_each_stage_depends_on_every_module_of_stages_its_command_imports_and_no_other(name):
    command = re.fullmatch(r"python -m (stages\.\w+)", STAGES[name]["cmd"])
    assert command, f"dvc.yaml: stage {name} does not run a module of stages/ ({STAGES[name]['cmd']})"
    deps = {dep if isinstance(dep, str) else next(iter(dep)) for dep in STAGES[name]["deps"]}
    code = import_closure(command.group(1))
    assert not code - deps, f"dvc.yaml: stage {name} runs {sorted(code - deps)} but does not depend on them"
    listed = {dep for dep in deps if dep.startswith("stages/")}
    assert not listed - code, f"dvc.yaml: stage {name} depends on {sorted(listed - code)}, which it never imports"


def test_the_closure_follows_imports_inside_functions_and_through_other_modules():
    evaluate = import_closure("stages.evaluate")
    # engines (through inference) imports synthetic inside calibration_inputs (the int8 graph's ranges), and the
    # package runs first
    assert {"stages/__init__.py", "stages/inference.py", "stages/engines.py", "stages/synthetic.py"} <= evaluate
    assert "stages/models.py" not in evaluate  # serving needs the layers, not the builders
    # the data stages' code reaches training through their outputs alone (balance names their paths itself)
    train = import_closure("stages.train")
    assert "stages/balance.py" in train and not {"stages/index.py", "stages/split.py"} & train
