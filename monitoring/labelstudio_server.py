"""A real Label Studio server for tests and the loop demo: installed into its own virtual environment
(it wants pandas 3, which breaks Evidently in the project's), started on 127.0.0.1 with a known user
and legacy API token, stopped by PID (pipelines.processes)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from pipelines import processes
from pipelines.environment import PROJECT_ROOT
from pipelines.errors import DetopsError

VERSION = "1.23.2"
DEFAULT_VENV = PROJECT_ROOT / ".venv-labelstudio"
# The server's exact dependency set (it wants pandas 3, so it cannot share the project's venv).
SERVER_LOCK = PROJECT_ROOT / "requirements-labelstudio.lock"
DATABASE = "label_studio.sqlite3"  # the SQLite file Label Studio keeps in its data directory


def executable(venv: Path | str = DEFAULT_VENV) -> Path:
    """The `label-studio` command of the venv."""
    return Path(venv) / "bin" / "label-studio"


def template_database(venv: Path | str = DEFAULT_VENV) -> Path:
    """An empty Label Studio database with every migration applied, kept in the venv: a server starts
    from a copy of it instead of migrating a new database (most of a fresh start's minute)."""
    return Path(venv) / "template" / DATABASE


def ensure_installed(venv: Path | str = DEFAULT_VENV, timeout_s: float = 900.0) -> Path:
    """Create `venv` and pip-install label-studio (requirements-labelstudio.lock) into it unless already
    there (~1 GB, minutes the first time), then migrate the template database once. Returns the
    `label-studio` executable."""
    venv = Path(venv)
    exe = executable(venv)
    python = venv / "bin" / "python"
    try:
        if not exe.exists():
            if not python.exists():
                subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
            subprocess.run([str(python), "-m", "pip", "install", "-q", "-r", str(SERVER_LOCK)], check=True,
                           timeout=timeout_s)
        template = template_database(venv)
        if not template.exists():
            # Django's own `manage.py migrate` (Label Studio's development instructions), into a scratch
            # folder moved into place once complete: an interrupted run leaves no half-migrated template.
            manage = next((venv / "lib").glob("python3*/site-packages/label_studio/manage.py"))
            scratch = Path(tempfile.mkdtemp(prefix="template.partial-", dir=venv))
            subprocess.run([str(python), str(manage), "migrate", "--no-color", "--verbosity", "0"], check=True,
                           timeout=timeout_s, env=_server_env(scratch), capture_output=True)
            try:
                scratch.rename(template.parent)
            except OSError:  # another install finished first: its template serves as well
                if not template.exists():
                    raise
                shutil.rmtree(scratch, ignore_errors=True)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, StopIteration) as exc:
        detail = (getattr(exc, "stderr", None) or b"").decode(errors="replace").strip().splitlines()[-1:]
        raise DetopsError(f"installing label-studio=={VERSION} into {venv} failed: {exc!r} "
                          f"{' '.join(detail)}") from None
    except OSError as exc:
        raise DetopsError(f"installing label-studio=={VERSION} into {venv} failed: {exc}") from None
    return exe


def start(data_dir: Path, port: int, username: str, password: str, token: str, *,
          venv: Path | str = DEFAULT_VENV, document_root: Path | None = None,
          timeout_s: float = 180.0) -> int:
    """Start Label Studio on 127.0.0.1:`port` with its data in `data_dir`, wait for /health, and return
    its PID (stop it with `pipelines.processes.stop`); `token` is the user's legacy API token (what
    LABEL_STUDIO_API_KEY carries). `document_root` enables local-files serving from that folder (how
    `detops push` shares images)."""
    exe = executable(venv)
    if not exe.exists():
        raise DetopsError(f"{exe}: Label Studio is not installed (call ensure_installed)")
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    template = template_database(venv)
    if template.exists() and not (data_dir / DATABASE).exists():
        shutil.copy2(template, data_dir / DATABASE)
    env = _server_env(data_dir)
    if document_root is not None:
        env |= {"LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED": "true",
                "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": str(Path(document_root).resolve())}
    log = data_dir / "server.log"
    process = processes.spawn(
        [str(exe), "start", "--no-browser", "--internal-host", processes.HOST, "--port", str(port),
         "--username", username, "--password", password, "--user-token", token,
         "--enable-legacy-api-token"],  # 1.23 disables legacy tokens by default: the SDK's api_key is one
        env=env, log=log)
    try:
        processes.wait_ready(f"http://{processes.HOST}:{port}/health", pid=process.pid, log=log, timeout_s=timeout_s)
    except DetopsError:
        processes.stop(process.pid)
        raise
    return process.pid


def _server_env(data_dir: Path) -> dict[str, str]:
    """Label Studio's environment: its data in `data_dir`, no sign-up, nothing sent out (analytics, the
    version check against PyPI)."""
    return {**os.environ, "LABEL_STUDIO_BASE_DATA_DIR": str(data_dir),
            "LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK": "true", "COLLECT_ANALYTICS": "false",
            "LATEST_VERSION_CHECK": "false"}
