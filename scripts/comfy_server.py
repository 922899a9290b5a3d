"""Run a real ComfyUI server headless on loopback and talk to it over HTTP.

Standard library only, so the demo command and the live-server tests can use it
from any Python that can see this file (``scripts/`` is not a package; load it
by path, see ``tests/live/conftest.py``).

Typical use::

    with ComfyServer(comfy_dir, base_directory=work_dir) as server:
        entry = server.run(load_api_workflow("workflow_api.json"), timeout=600)
        images = outputs_of(entry, "9")["images"]

Notes on ``--base-directory`` (ComfyUI 0.3.75, see its ``folder_paths.py``):
it moves ``models/``, ``custom_nodes/``, ``input/``, ``output/``, ``temp/`` and
``user/`` under the given folder. ``main.py`` crashes at start-up when
``<base>/custom_nodes`` does not exist, and with a fresh ``custom_nodes`` the
packs installed next to ComfyUI (our own included) would no longer load. So
``ComfyServer`` creates that folder and symlinks into it the entries of
``<comfy_dir>/custom_nodes`` (or the packs given as ``custom_nodes=``). The
SQLite database is *not* moved by ``--base-directory`` (it stays in
``<comfy_dir>/user/comfyui.db``); ``ComfyServer`` points ``--database-url`` at
``<base>/user/comfyui.db`` so servers do not share one database file.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

__all__ = [
    "ComfyServer",
    "ComfyServerError",
    "ComfyTimeout",
    "ComfyHTTPError",
    "PromptRejected",
    "PromptFailed",
    "load_api_workflow",
    "default_comfy_dir",
    "default_front_end_root",
    "frontend_root",
    "outputs_of",
]

LOOPBACK = "127.0.0.1"
ROOT = Path(__file__).resolve().parents[1]
# Which ComfyUI the demo, the tests and the benchmarks run (scripts/setup.sh makes both):
# DRIFTSCOPE_COMFYUI names its folder (default: ComfyUI 0.33.0 in .comfyui/ComfyUI), and
# DRIFTSCOPE_FRONTEND_ROOT a frontend to serve instead of the one installed in the venv
# (passed as --front-end-root; `make test` serves 0.3.75 the frontend it pins).
COMFY_ENV = "DRIFTSCOPE_COMFYUI"
FRONTEND_ENV = "DRIFTSCOPE_FRONTEND_ROOT"
DEFAULT_COMFY_DIR = ROOT / ".comfyui" / "ComfyUI"


def default_comfy_dir() -> Path:
    """The ComfyUI folder selected by DRIFTSCOPE_COMFYUI, else .comfyui/ComfyUI."""
    return Path(os.environ.get(COMFY_ENV) or DEFAULT_COMFY_DIR).resolve()


def default_front_end_root() -> Path | None:
    """The frontend folder selected by DRIFTSCOPE_FRONTEND_ROOT, else None (the venv's)."""
    value = os.environ.get(FRONTEND_ENV)
    return Path(value).resolve() if value else None


def frontend_root(version: str) -> Path:
    """Static files of a frontend package that scripts/setup.sh installed under .comfyui/."""
    return ROOT / ".comfyui" / f"frontend-{version}" / "comfyui_frontend_package" / "static"

STARTUP_TIMEOUT = 120.0
STOP_GRACE = 10.0
LOG_TAIL_LINES = 60


class ComfyServerError(RuntimeError):
    """Anything that went wrong with the server process or its HTTP API."""


class ComfyTimeout(ComfyServerError, TimeoutError):
    """The server did not start, or a prompt did not finish, in time."""


class ComfyHTTPError(ComfyServerError):
    """The server answered with an HTTP error status."""

    def __init__(self, method: str, path: str, status: int, body: str):
        self.method = method
        self.path = path
        self.status = status
        self.body = body
        super().__init__(f"{method} {path} -> HTTP {status}: {body[:4000]}")

    def json(self):
        """The error body parsed as JSON, or None if it is not JSON."""
        try:
            return json.loads(self.body)
        except ValueError:
            return None


class PromptRejected(ComfyServerError):
    """POST /prompt refused the prompt (validation failed).

    ``error`` and ``node_errors`` are the server's JSON fields; ``prompt_id`` is
    set only when the server queued the valid part of the prompt anyway.
    """

    def __init__(self, body: dict, prompt_id: str | None = None):
        self.body = body
        self.error = body.get("error")
        self.node_errors = body.get("node_errors") or {}
        self.prompt_id = prompt_id
        if prompt_id is None:
            head = "ComfyUI rejected the prompt"
        else:
            head = (f"ComfyUI queued prompt {prompt_id} with only its valid outputs; "
                    "some nodes failed validation")
        lines = [head + ":"]
        if isinstance(self.error, dict):
            lines.append(f"  {self.error.get('message', '')} {self.error.get('details', '')}".rstrip())
        elif self.error:
            lines.append(f"  {self.error}")
        for node_id, info in self.node_errors.items():
            for err in info.get("errors", []):
                lines.append(f"  node {node_id} ({info.get('class_type', '?')}): "
                             f"{err.get('message', '')}: {err.get('details', '')}")
        lines.append("server response: " + json.dumps(body, default=str)[:8000])
        super().__init__("\n".join(lines))


class PromptFailed(ComfyServerError):
    """A queued prompt ended with status "error" (an exception or an interrupt)."""

    def __init__(self, prompt_id: str, history_entry: dict, error: dict | None,
                 interrupted: bool = False):
        self.prompt_id = prompt_id
        self.history_entry = history_entry
        self.error = error or {}
        self.interrupted = interrupted
        self.node_id = self.error.get("node_id")
        self.node_type = self.error.get("node_type")
        self.exception_type = self.error.get("exception_type")
        self.exception_message = self.error.get("exception_message")
        self.traceback = self.error.get("traceback")
        if interrupted:
            msg = f"prompt {prompt_id} was interrupted at node {self.node_id} ({self.node_type})"
        elif error:
            msg = (f"prompt {prompt_id} failed at node {self.node_id} ({self.node_type}): "
                   f"{self.exception_type}: {self.exception_message}")
        else:
            msg = f"prompt {prompt_id} ended with status 'error' and no execution_error message"
        super().__init__(msg)


def _free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def _port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex((LOOPBACK, port)) == 0


class ComfyServer:
    """A ComfyUI server process on 127.0.0.1, used as a context manager.

    ``comfy_dir``: the ComfyUI checkout (the folder holding ``main.py``).
    ``python``: interpreter that has ComfyUI's requirements.
    ``port``: None picks a free loopback port.
    ``extra_args``: more ``main.py`` arguments.
    ``base_directory``: passed as ``--base-directory`` (created if needed; see
    the module docstring for what moves and how custom nodes stay loaded).
    ``env``: extra environment variables, merged over ``os.environ``.
    ``log_path``: where the server's stdout+stderr go; default
    ``<base_directory>/comfyui-server.log``, or a temporary file without a base
    directory.
    ``custom_nodes``: only with ``base_directory``: the packs to symlink into
    ``<base>/custom_nodes``, as paths (linked under their own name) or a
    mapping name -> path; None mirrors ``<comfy_dir>/custom_nodes``.
    """

    def __init__(self, comfy_dir, python=sys.executable, port=None, extra_args=(),
                 base_directory=None, env=None, log_path=None, *,
                 custom_nodes=None, startup_timeout=STARTUP_TIMEOUT,
                 request_timeout=60.0, front_end_root="env"):
        self.comfy_dir = Path(comfy_dir).resolve()
        self.python = os.fspath(python)
        self._port = port
        self.extra_args = [os.fspath(a) for a in extra_args]
        # "env": DRIFTSCOPE_FRONTEND_ROOT if set; None: the frontend installed in the venv
        self.front_end_root = default_front_end_root() if front_end_root == "env" else (
            Path(front_end_root).resolve() if front_end_root is not None else None)
        self.base_directory = Path(base_directory).resolve() if base_directory is not None else None
        self.env = dict(env or {})
        if log_path is not None:
            self.log_path = Path(log_path)
        elif self.base_directory is not None:
            self.log_path = self.base_directory / "comfyui-server.log"
        else:
            self.log_path = None  # a temporary file, chosen in start()
        self.custom_nodes = custom_nodes
        self.startup_timeout = float(startup_timeout)
        self.request_timeout = float(request_timeout)
        self.client_id = uuid.uuid4().hex
        self.process: subprocess.Popen | None = None
        self.startup_seconds: float | None = None
        self._log_file = None
        # Never send loopback requests through an HTTP proxy from the environment.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    # ------------------------------------------------------------------ life cycle
    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
        return False

    @property
    def port(self) -> int:
        if self._port is None:
            raise ComfyServerError("the server has no port yet: call start() first")
        return int(self._port)

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def output_directory(self) -> Path:
        return (self.base_directory or self.comfy_dir) / "output"

    @property
    def input_directory(self) -> Path:
        return (self.base_directory or self.comfy_dir) / "input"

    def command(self) -> list[str]:
        """The command line start() runs (the port must be known)."""
        cmd = [self.python, "main.py", "--cpu", "--listen", LOOPBACK, "--port", str(self.port),
               "--use-pytorch-cross-attention", "--disable-auto-launch"]
        if self.base_directory is not None:
            cmd += ["--base-directory", str(self.base_directory)]
            if "--database-url" not in self.extra_args:
                db = self.base_directory / "user" / "comfyui.db"
                cmd += ["--database-url", "sqlite:///" + db.as_posix()]
        if self.front_end_root is not None and "--front-end-root" not in self.extra_args:
            cmd += ["--front-end-root", str(self.front_end_root)]
        return cmd + self.extra_args

    def _prepare_base_directory(self) -> None:
        base = self.base_directory
        nodes_dir = base / "custom_nodes"
        nodes_dir.mkdir(parents=True, exist_ok=True)
        (base / "user").mkdir(exist_ok=True)
        if self.custom_nodes is None:
            source = self.comfy_dir / "custom_nodes"
            packs = {}
            if source.is_dir():
                packs = {p.name: p for p in sorted(source.iterdir()) if p.name != "__pycache__"}
        elif isinstance(self.custom_nodes, dict):
            packs = {str(k): Path(v) for k, v in self.custom_nodes.items()}
        else:
            packs = {Path(p).name: Path(p) for p in self.custom_nodes}
        for name, target in packs.items():
            link = nodes_dir / name
            if link.exists() or link.is_symlink():
                continue  # keep what the caller put there
            target = target.resolve()
            if not target.exists():
                raise ComfyServerError(f"custom node pack {target} does not exist")
            os.symlink(target, link, target_is_directory=target.is_dir())

    def start(self) -> "ComfyServer":
        """Start the server and wait until GET /system_stats answers."""
        if self.process is not None:
            if self.running:
                return self
            raise ComfyServerError("this ComfyServer has already run; make a new one")
        if not (self.comfy_dir / "main.py").is_file():
            raise ComfyServerError(f"no ComfyUI main.py in {self.comfy_dir}")
        if self._port is None:
            self._port = _free_loopback_port()
        elif _port_in_use(self.port):
            raise ComfyServerError(f"port {self.port} on {LOOPBACK} is already in use")
        if self.base_directory is not None:
            self._prepare_base_directory()
        if self.log_path is None:
            fd, name = tempfile.mkstemp(prefix="comfyui-server-", suffix=".log")
            os.close(fd)
            self.log_path = Path(name)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)

        env = dict(os.environ)
        env.update(self.env)
        env.setdefault("PYTHONUNBUFFERED", "1")
        self._log_file = open(self.log_path, "wb")
        t0 = time.monotonic()
        self.process = subprocess.Popen(
            self.command(), cwd=self.comfy_dir, env=env,
            stdin=subprocess.DEVNULL, stdout=self._log_file, stderr=subprocess.STDOUT,
            start_new_session=(os.name == "posix"),
        )
        try:
            self._wait_until_up(t0)
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - t0
        return self

    def _wait_until_up(self, t0: float) -> None:
        deadline = t0 + self.startup_timeout
        while True:
            code = self.process.poll()
            if code is not None:
                raise ComfyServerError(
                    f"ComfyUI exited with code {code} during start-up; log {self.log_path}:\n"
                    + self.log_tail())
            try:
                self._request("GET", "/system_stats", timeout=2.0)
                return
            except (urllib.error.URLError, OSError, ComfyHTTPError):
                pass
            if time.monotonic() > deadline:
                raise ComfyTimeout(
                    f"ComfyUI did not answer GET /system_stats within {self.startup_timeout:.0f} s;"
                    f" log {self.log_path}:\n" + self.log_tail())
            time.sleep(0.25)

    def stop(self) -> None:
        """Terminate the server; kill it (and its process group) after 10 s. Idempotent."""
        proc = self.process
        if proc is not None:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=STOP_GRACE)
                except subprocess.TimeoutExpired:
                    self._kill_group(proc)
                    proc.kill()
                    proc.wait()
            # Sweep anything the server may have left in its process group.
            self._kill_group(proc)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    @staticmethod
    def _kill_group(proc: subprocess.Popen) -> None:
        if os.name != "posix":
            return
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    # ------------------------------------------------------------------ logs
    def log_text(self) -> str:
        """Everything the server wrote to stdout/stderr so far."""
        if self.log_path is None or not self.log_path.exists():
            return ""
        if self._log_file is not None:
            self._log_file.flush()
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    # ------------------------------------------------------------------ HTTP
    def _request(self, method: str, path: str, body=None, timeout=None):
        data = None
        headers = {}
        if body is not None:
            data = json.dumps(body).encode("utf-8")
            headers["Content-Type"] = "application/json"
        req = urllib.request.Request(self.url + path, data=data, headers=headers, method=method)
        try:
            with self._opener.open(req, timeout=timeout or self.request_timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            text = e.read().decode("utf-8", errors="replace")
            raise ComfyHTTPError(method, path, e.code, text) from None
        if not raw.strip():
            return {}
        return json.loads(raw)

    def get(self, path: str) -> dict:
        return self._request("GET", path)

    def post(self, path: str, obj) -> dict:
        return self._request("POST", path, obj)

    def object_info(self, node_class: str | None = None) -> dict:
        """All node definitions, or the definition of one node class (KeyError if unknown)."""
        if node_class is None:
            return self.get("/object_info")
        info = self.get("/object_info/" + urllib.parse.quote(node_class, safe=""))
        if node_class not in info:
            raise KeyError(f"ComfyUI has no node class {node_class!r}")
        return info[node_class]

    def interrupt(self, prompt_id: str | None = None) -> None:
        """POST /interrupt (only the given prompt, if prompt_id is set)."""
        self.post("/interrupt", {} if prompt_id is None else {"prompt_id": prompt_id})

    def queue(self, prompt: dict, client_id: str | None = None) -> str:
        """POST /prompt; return the prompt_id.

        Raises PromptRejected when the server refuses the prompt (HTTP 400) and
        also when it queues only the valid outputs of a partly invalid prompt.
        """
        payload = {"prompt": prompt, "client_id": client_id or self.client_id}
        try:
            answer = self.post("/prompt", payload)
        except ComfyHTTPError as e:
            body = e.json()
            if e.status == 400 and isinstance(body, dict):
                raise PromptRejected(body) from None
            raise
        prompt_id = answer["prompt_id"]
        if answer.get("node_errors"):
            raise PromptRejected(answer, prompt_id=prompt_id)
        return prompt_id

    def wait(self, prompt_id: str, timeout: float = 600.0) -> dict:
        """Poll /history/{prompt_id} until the prompt has finished; return its history entry."""
        deadline = time.monotonic() + timeout
        delay = 0.05
        while True:
            entry = self.get(f"/history/{urllib.parse.quote(prompt_id, safe='')}").get(prompt_id)
            if entry is not None:
                status = entry.get("status")
                if status is None or status.get("completed") is not None:
                    return entry
            if not self.running:
                raise ComfyServerError(
                    f"ComfyUI exited while prompt {prompt_id} was pending; log {self.log_path}:\n"
                    + self.log_tail())
            if time.monotonic() > deadline:
                raise ComfyTimeout(
                    f"prompt {prompt_id} did not finish within {timeout:.0f} s; "
                    f"log {self.log_path}:\n" + self.log_tail())
            time.sleep(delay)
            delay = min(delay * 1.5, 0.5)

    def run(self, prompt: dict, timeout: float = 600.0, client_id: str | None = None) -> dict:
        """Queue a prompt, wait for it, return its history entry; PromptFailed on error."""
        prompt_id = self.queue(prompt, client_id=client_id)
        entry = self.wait(prompt_id, timeout=timeout)
        status = entry.get("status") or {}
        if status.get("status_str") == "error":
            error = None
            interrupted = False
            for event, data in status.get("messages", []):
                if event == "execution_error":
                    error = data
                elif event == "execution_interrupted":
                    error, interrupted = data, True
            raise PromptFailed(prompt_id, entry, error, interrupted=interrupted)
        return entry


def load_api_workflow(path) -> dict:
    """Read a workflow saved in ComfyUI's API format ({node_id: {class_type, inputs}})."""
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if isinstance(data, dict) and "nodes" in data and "links" in data:
        raise ValueError(f"{path} is a UI-format workflow; export it with 'Export (API)'")
    if not isinstance(data, dict) or not all(
            isinstance(v, dict) and "class_type" in v for v in data.values()):
        raise ValueError(f"{path} is not an API-format workflow (node id -> class_type/inputs)")
    return data


def outputs_of(history_entry: dict, node_id) -> dict:
    """The UI outputs (e.g. {"images": [...]}) one node reported in a history entry."""
    outputs = history_entry.get("outputs", {})
    key = str(node_id)
    if key not in outputs:
        raise KeyError(f"node {key} has no outputs in this history entry; nodes with outputs: "
                       f"{sorted(outputs)}; status: {history_entry.get('status')}")
    return outputs[key]
