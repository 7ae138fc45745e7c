"""The Dockerfile, checked without a Docker daemon: every COPY source exists and is in the build
context (.dockerignore), the base image and packages are pinned (requirements.lock), each target
deploy/k8s uses exists, and every entry command (the targets' CMD and the commands the manifests run
in each image) is a real command: a `detops` verb that answers --help, or `bentoml serve` of the
service class that exists."""

from __future__ import annotations

import ast
import fnmatch
import json
import re
from pathlib import Path

import pytest

from tests.unit.test_k8s import pod_templates, rendered

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
IMAGE_PREFIX = "ghcr.io/detops/detops-"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in lines]


def stages() -> dict[str, list[tuple[str, str]]]:
    """Each `FROM ... AS name` stage's instructions."""
    found: dict[str, list[tuple[str, str]]] = {}
    current = None
    for op, args in instructions():
        if op == "FROM":
            current = args.split()[-1] if " AS " in args.upper() else args
            found[current] = []
        elif current is not None:
            found[current].append((op, args))
    return found


def context_allows(path: str) -> bool:
    """Whether .dockerignore lets `path` into the build context (last matching rule wins)."""
    allowed = True
    for rule in (ROOT / ".dockerignore").read_text().splitlines():
        rule = rule.strip()
        if not rule or rule.startswith("#"):
            continue
        negate, pattern = rule.startswith("!"), rule.lstrip("!").rstrip("/")
        if fnmatch.fnmatch(path, pattern) or path.startswith(pattern + "/") or pattern == "*":
            allowed = negate
    return allowed


def cli_command_ok(argv: list[str]) -> str:
    """'' when `argv` is a real entry command, else why not."""
    if argv[0] == "detops":
        from typer.testing import CliRunner

        from pipelines.cli.main import app

        words = [a for a in argv[1:] if not a.startswith("-")][:2]
        verb = words[:2] if words[0] == "deploy" else words[:1]
        options = [a.split("=")[0] for a in argv[1:] if a.startswith("--")]
        result = CliRunner().invoke(app, [*verb, "--help"])
        if result.exit_code != 0:
            return f"detops {' '.join(verb)}: not a verb ({result.output.strip()[:200]})"
        unknown = [o for o in options if o not in result.output]
        return f"detops {' '.join(verb)}: unknown options {unknown}" if unknown else ""
    if argv[:2] == ["bentoml", "serve"]:
        module, _, cls = argv[2].partition(":")
        path = ROOT / (module.replace(".", "/") + ".py")
        if not path.is_file():
            return f"{argv[2]}: no {path.relative_to(ROOT)}"
        if cls not in {n.name for n in ast.parse(path.read_text()).body if isinstance(n, ast.ClassDef)}:
            return f"{argv[2]}: no class {cls}"
        return ""
    if argv[0] in {"/bin/sh", "sleep", "python"}:
        return ""
    return f"{argv}: unknown entry command"


def test_copy_sources_exist_and_are_in_the_build_context() -> None:
    copies = [args.split() for stage in stages().values() for op, args in stage if op == "COPY"]
    assert copies
    for *sources, _dest in copies:
        for source in sources:
            assert (ROOT / source).exists(), f"COPY {source}: missing"
            assert context_allows(source), f"COPY {source}: excluded by .dockerignore"


def test_versions_are_pinned() -> None:
    image = re.search(r"ARG PYTHON_IMAGE=(\S+)", DOCKERFILE.read_text()).group(1)
    assert re.fullmatch(r"python:\d+\.\d+\.\d+-slim-\w+", image), image
    text = " ".join(args for op, args in instructions() if op == "RUN")
    assert "-r /tmp/requirements.txt" in text and "requirements.lock" in text  # packages: the lock's pins
    assert not re.search(r"pip install (?!--no-deps -e \.)(?!--index-url)", text)  # nothing unpinned besides


def test_every_image_the_manifests_use_is_a_target() -> None:
    used = {c["image"] for o in rendered("production") for _, t in pod_templates([o])
            for c in t["spec"].get("initContainers", []) + t["spec"]["containers"] if c["image"].startswith(IMAGE_PREFIX)}
    targets = set(stages())
    assert used and {i.removeprefix(IMAGE_PREFIX).split(":")[0] for i in used} <= targets


def test_entry_commands_are_real_commands() -> None:
    commands = []
    for name, stage in stages().items():
        commands += [json.loads(args) for op, args in stage if op in {"CMD", "ENTRYPOINT"}]
    for obj in rendered("production"):
        for _, template in pod_templates([obj]):
            for container in template["spec"].get("initContainers", []) + template["spec"]["containers"]:
                if container["image"].startswith(IMAGE_PREFIX):
                    command = container.get("command", [])
                    if command[:1] == ["/bin/sh"]:  # a script: each detops line in it
                        commands += [line.split() for line in re.findall(r"detops [^;|&\n]+", command[-1])]
                    elif command:
                        commands.append(command)
    assert len(commands) >= 8
    problems = [p for p in (cli_command_ok([a for a in c if "$(" not in a and "{{" not in a]) for c in commands) if p]
    assert problems == []


@pytest.mark.parametrize("argv, problem", [
    (["detops", "wroker"], "not a verb"),
    (["detops", "deploy", "watch", "--kubernetess"], "unknown options"),
    (["bentoml", "serve", "serving.service:Detektor"], "no class"),
])
def test_a_misspelled_entry_command_is_caught(argv: list[str], problem: str) -> None:
    assert problem in cli_command_ok(argv)
