"""What the project declares about its own code agrees with the code: the .py deps of every DVC stage
(both dvc.yaml files) are exactly the project modules its verb imports, the bento includes exactly
the modules the service imports, and the registry's pyfunc ships what it imports."""

from __future__ import annotations

from pathlib import Path

import pytest
import typer.main
import yaml

from pipelines.cli.main import app
from pipelines.environment import PROJECT_ROOT
from pipelines.imports import project_files

PIPELINES = [PROJECT_ROOT / "dvc.yaml", PROJECT_ROOT / "pipelines" / "monitoring" / "dvc.yaml"]


def verb_files(verb: str) -> list[str]:
    """The project modules `detops <verb>` imports: its CLI module's, and its own function's, transitively."""
    command = typer.main.get_command(app).commands[verb]
    function = getattr(command.callback, "__wrapped__", command.callback)
    return project_files(function.__module__, function.__name__)


def stages() -> list[tuple[Path, str, dict]]:
    return [(path, name, stage) for path in PIPELINES
            for name, stage in yaml.safe_load(path.read_text())["stages"].items()]


@pytest.mark.parametrize(("path", "name", "stage"), stages(), ids=lambda v: v if isinstance(v, str) else "")
def test_stage_deps_are_the_modules_its_verb_imports(path: Path, name: str, stage: dict) -> None:
    program, verb = stage["cmd"].split()[:2]
    assert program == "detops", f"{path.name}: {name}: stages call the detops CLI"
    wdir = (path.parent / stage.get("wdir", ".")).resolve()
    declared = {(wdir / d).resolve().relative_to(PROJECT_ROOT).as_posix()
                for d in stage["deps"] if str(d).endswith(".py")}
    expected = set(verb_files(verb))
    assert not expected - declared, f"{path.name}: {name} imports modules it does not list: {sorted(expected - declared)}"
    assert not declared - expected, f"{path.name}: {name} lists modules it does not import: {sorted(declared - expected)}"


def test_a_new_verb_module_is_no_dependency_of_the_training_stages() -> None:
    # The CLI's assembly and the other stage groups' verb modules stay out of a stage's imports, so
    # adding a verb (or a deploy command) re-runs nothing.
    for verb in ("synthesize", "ingest", "validate", "augment", "train", "evaluate", "register"):
        files = verb_files(verb)
        assert "pipelines/cli/main.py" not in files
        assert "pipelines/cli/monitoring.py" not in files and "pipelines/cli/serving.py" not in files


def test_the_bento_includes_exactly_what_the_service_imports() -> None:
    bentofile = yaml.safe_load((PROJECT_ROOT / "serving" / "bentofile.yaml").read_text())
    included = set(bentofile["include"]) - {"params.yaml"}
    assert included == set(project_files("serving.service"))
    assert not {f for f in included if f.startswith(("pipelines/cli", "tests/"))}
    assert "pipelines/processes.py" not in included  # development tools do not ship


def test_the_pyfunc_ships_the_runtime_it_runs() -> None:
    shipped = project_files("evaluation.pyfunc_model")
    assert {"serving/runtime.py", "serving/calibrator.py", "pipelines/registry.py"} <= set(shipped)
    assert not [f for f in shipped if f.startswith(("training/", "pipelines/cli"))]


def test_the_import_walker_follows_lazy_imports_submodules_and_packages(tmp_path: Path) -> None:
    (tmp_path / "pkg" / "sub").mkdir(parents=True)
    files = {
        "pkg/__init__.py": "",
        "pkg/sub/__init__.py": "import json\n",
        "pkg/sub/leaf.py": "",
        "pkg/helper.py": "from pkg.sub import leaf\n",
        "pkg/unused.py": "",
        "pkg/cli.py": ("import os\nfrom pkg import helper\n\n"
                       "def a():\n    from pkg import unused\n\n"
                       "def b():\n    import pkg.sub\n"),
    }
    for rel, text in files.items():
        (tmp_path / rel).write_text(text)
    assert project_files("pkg.cli", "b", root=tmp_path) == [
        "pkg/__init__.py", "pkg/cli.py", "pkg/helper.py", "pkg/sub/__init__.py", "pkg/sub/leaf.py"]
    assert "pkg/unused.py" in project_files("pkg.cli", root=tmp_path)  # the whole module: every function
    with pytest.raises(ValueError, match="no function 'c'"):
        project_files("pkg.cli", "c", root=tmp_path)
