"""The deployment files (``deploy/``, ``.dockerignore``), checked as far as this machine allows.

No container runtime runs here, so the image is not built. Instead the Dockerfile's own steps
are replayed: its COPY instructions (filtered by ``.dockerignore``, as Docker would) fill a
scratch build context and its ``pip install`` RUN lines run there, word for word, in a fresh
virtual environment; the result must provide the ``pgws-relay`` command and the console the
image serves. The compose file must carry Econia's ``ws`` settings; the systemd unit must pass
``systemd-analyze verify`` without a warning, where that command exists, and keep its
hardening and restart rules wherever it does not; its MemoryDenyWriteExecute is tried for real,
with the relay run under the kernel's equivalent (PR_SET_MDWE) where the kernel has it.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from websockets.sync.client import connect

from relay import __version__, config
from tests import helpers
from tests.helpers import RELAY, RelayProcess, notify, relay_env, token, unique_channel

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
COMPOSE = ROOT / "deploy" / "compose.yaml"
UNIT = ROOT / "deploy" / "pgws-relay.service"
#: Econia's `ws` service (spec: econia.md, section 1), which the compose file must reproduce.
ECONIA_WS_ENV = {
    "PGWS_DB_URI": "postgres://econia:econia@postgres/econia",
    "PGWS_JWT_SECRET": "econia_0000000000000000000000000",
    "PGWS_CHECK_LISTENER_INTERVAL": "1000",
    "PGWS_LISTEN_CHANNEL": "econiaws",
}
HEALTHCHECK = ["python", "-c", "import urllib.request,sys; "
               "urllib.request.urlopen('http://127.0.0.1:9090/health', timeout=3)"]
PIP_TIMEOUT = 300


def dockerfile_instructions(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined and comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for line in path.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        keyword, _, arguments = pending.strip().partition(" ")
        instructions.append((keyword.upper(), " ".join(arguments.split())))
        pending = ""
    return instructions


def dockerignored(relative: str, patterns: list[str]) -> bool:
    """Whether Docker leaves ``relative`` out of the build context (last matching rule wins;
    a rule matching a parent directory covers what is inside it)."""
    excluded = False
    parts = relative.split("/")
    for pattern in patterns:
        negated = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        if any(fnmatch.fnmatchcase("/".join(parts[:n]), pattern)
               for n in range(1, len(parts) + 1)):
            excluded = not negated
    return excluded


def dockerignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def copy_into_context(sources: list[str], destination: Path, patterns: list[str]) -> None:
    """Docker's COPY from the repository root, minus what .dockerignore leaves out."""
    for source in sources:
        assert not dockerignored(source, patterns), f".dockerignore drops COPY source {source}"
        origin = ROOT / source
        if origin.is_dir():  # Its contents, not the directory itself, as Docker does.
            for path in sorted(origin.rglob("*")):
                relative = path.relative_to(ROOT).as_posix()
                if path.is_file() and not dockerignored(relative, patterns):
                    copied = destination / path.relative_to(origin)
                    copied.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(path, copied)
        else:
            destination.mkdir(parents=True, exist_ok=True)
            shutil.copy2(origin, destination / origin.name)


def test_dockerignore_keeps_the_context_small() -> None:
    patterns = dockerignore_patterns()
    for kept in ("pyproject.toml", "README.md", "LICENSE", "relay/console/index.html",
                 "relay/cli.py"):
        assert not dockerignored(kept, patterns), kept
    for dropped in (".venv/bin/python", ".git/config", "bench/results/x.json", "tests/x.py",
                    "relay/__pycache__/cli.cpython-312.pyc", ".env"):
        assert dockerignored(dropped, patterns), dropped


def test_dockerfile_declares_the_image() -> None:
    instructions = dockerfile_instructions()
    keywords = [keyword for keyword, _ in instructions]
    assert re.fullmatch(r"python:3\.\d+-slim", instructions[0][1]), instructions[0]
    user = [arguments for keyword, arguments in instructions if keyword == "USER"]
    assert user and user[-1] not in ("root", "0"), "the relay must not run as root"
    assert keywords.index("USER") < keywords.index("ENTRYPOINT")
    env = " ".join(arguments for keyword, arguments in instructions if keyword == "ENV")
    assert "PGWS_ADMIN_PORT=9090" in env.split()
    root_path = re.search(r"PGWS_ROOT_PATH=(\S+)", env)
    assert root_path, "the image serves the console, as upstream's serves its client example"
    # The link PGWS_ROOT_PATH names is made from what the installed package says.
    assert any(keyword == "RUN" and f'ln -s "$(python -m relay.console)" {root_path.group(1)}'
               in arguments for keyword, arguments in instructions)
    assert ("EXPOSE", "3000") in instructions
    options, _, command = dict(instructions)["HEALTHCHECK"].partition(" CMD ")
    assert json.loads(command) == HEALTHCHECK, "slim images have no curl: python's urllib"
    compile(HEALTHCHECK[2], "HEALTHCHECK", "exec")
    assert "--timeout=" in options
    assert dict(instructions)["ENTRYPOINT"] == '["pgws-relay"]'


@pytest.mark.slow
def test_dockerfile_install_steps_in_a_fresh_virtualenv(tmp_path: Path) -> None:
    """The image's COPY and pip steps, word for word, give the command and the console."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120,
                   stdin=subprocess.DEVNULL)
    env = {key: value for key, value in os.environ.items()
           if key not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(VIRTUAL_ENV=str(venv), PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}")
    context = tmp_path / "context"
    patterns = dockerignore_patterns()
    workdir = "/"
    pip_runs = []
    for keyword, arguments in dockerfile_instructions():
        here = context / workdir.lstrip("/")
        if keyword == "WORKDIR":
            workdir = os.path.join(workdir, arguments)
        elif keyword == "COPY":
            *sources, destination = arguments.split()
            assert not any(s.startswith("--") for s in sources), "COPY flags are not replayed"
            copy_into_context(sources, here / destination, patterns)
        elif keyword == "RUN" and arguments.startswith("pip install"):
            here.mkdir(parents=True, exist_ok=True)
            done = subprocess.run(["sh", "-c", arguments], cwd=here, env=env, text=True,
                                  capture_output=True, timeout=PIP_TIMEOUT,
                                  stdin=subprocess.DEVNULL)
            assert done.returncode == 0, f"{arguments}\n{done.stdout}\n{done.stderr}"
            pip_runs.append(arguments)
    assert pip_runs, "no RUN pip install line in the Dockerfile"

    version = subprocess.run([str(venv / "bin" / "pgws-relay"), "--version"], env=env,
                             capture_output=True, text=True, timeout=60, check=True)
    assert version.stdout.strip() == f"pgws-relay {__version__}"
    # From a directory without the sources: the installed package, its data files with it.
    printed = subprocess.run([str(venv / "bin" / "python"), "-m", "relay.console"], env=env,
                             cwd=tmp_path, capture_output=True, text=True, timeout=60,
                             check=True).stdout.strip()
    console = Path(printed)
    assert console.is_absolute() and console.is_relative_to(venv), printed
    assert {"index.html", "console.js", "console.css"} <= {p.name for p in console.iterdir()}
    assert (console / "index.html").read_bytes() == \
        (ROOT / "relay" / "console" / "index.html").read_bytes()
    # The licence travels with the installed package's metadata.
    show = subprocess.run([str(venv / "bin" / "pip"), "show", "-f", "pgws-relay"], env=env,
                          capture_output=True, text=True, timeout=60, check=True).stdout
    assert re.search(r"licenses/LICENSE$", show, re.MULTILINE), show


def _compose_env_lines(text: str) -> dict[str, str]:
    """``KEY: value`` lines of the ws service's environment, read as text (no YAML library)."""
    block = re.search(r"^  ws:\n((?:    .*\n|\s*\n)+)", text, re.MULTILINE)
    assert block, "no ws service"
    found = {}
    for match in re.finditer(r'^      (PGWS_\w+): "?([^"\n#]*?)"?\s*$', block.group(1),
                             re.MULTILINE):
        found[match.group(1)] = match.group(2)
    return found


def test_compose_runs_the_relay_as_econias_ws_service() -> None:
    text = COMPOSE.read_text()
    assert _compose_env_lines(text) == ECONIA_WS_ENV
    try:
        import yaml
    except ImportError:
        yaml = None
    if yaml is not None:  # The structure too, where PyYAML is at hand.
        services = yaml.safe_load(text)["services"]
        ws, postgres = services["ws"], services["postgres"]
        assert {k: str(v) for k, v in ws["environment"].items()} == ECONIA_WS_ENV
        assert ws["ports"] == ["3001:3000"]
        assert ws["depends_on"]["postgres"]["condition"] == "service_healthy"
        assert (COMPOSE.parent / ws["build"]["context"] / ws["build"]["dockerfile"]).resolve() \
            == DOCKERFILE
        assert postgres["environment"] == {"POSTGRES_USER": "econia",
                                           "POSTGRES_PASSWORD": "econia",
                                           "POSTGRES_DB": "econia"}
    else:
        assert re.search(r'^      - "3001:3000"$', text, re.MULTILINE)
        assert re.search(r"^      dockerfile: deploy/Dockerfile$", text, re.MULTILINE)
        assert re.search(r"^      context: \.\.$", text, re.MULTILINE)
        assert re.search(r"^        condition: service_healthy$", text, re.MULTILINE)
        for key in ("POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB"):
            assert re.search(rf"^      {key}: econia$", text, re.MULTILINE), key
    grace = re.search(r"^    stop_grace_period: (\d+)s$", text, re.MULTILINE)
    assert grace and int(grace.group(1)) > _shutdown_timeout()


def _shutdown_timeout() -> float:
    return config.load({"PGWS_DB_URI": "postgres://x@127.0.0.1/x",
                        "PGWS_JWT_SECRET": "reallyreallyreallyreallyverysafe"}).shutdown_timeout


def _unit_settings(text: str) -> dict[str, list[str]]:
    """``Key=value`` lines of the [Service] section (a key may repeat)."""
    section, settings = "", {}
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("["):
            section = line
        elif section == "[Service]" and "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    return settings


def _seconds(value: str) -> float:
    match = re.fullmatch(r"(\d+)(s|min)?", value)
    assert match, value
    return int(match.group(1)) * (60 if match.group(2) == "min" else 1)


def test_systemd_unit_hardening_and_restart_rules() -> None:
    settings = {key: values[-1] for key, values in _unit_settings(UNIT.read_text()).items()}
    expected = {"DynamicUser": "yes", "NoNewPrivileges": "yes", "ProtectSystem": "strict",
                "ProtectHome": "yes", "PrivateTmp": "yes", "PrivateDevices": "yes",
                "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
                "MemoryDenyWriteExecute": "yes", "Restart": "on-failure",
                "KillSignal": "SIGTERM", "CapabilityBoundingSet": ""}
    assert {key: settings.get(key) for key in expected} == expected
    assert settings["EnvironmentFile"].startswith("/etc/")
    assert settings["ExecStart"].endswith("/pgws-relay")
    assert int(settings["LimitNOFILE"]) >= 65536
    assert _seconds(settings["TimeoutStopSec"]) > _shutdown_timeout()
    assert "2" in settings["RestartPreventExitStatus"].split()


def test_config_errors_exit_2_which_the_unit_does_not_restart() -> None:
    env = relay_env()
    del env["PGWS_DB_URI"]
    done = subprocess.run([RELAY], env=env, capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL)
    assert done.returncode == 2, done
    assert "PGWS_DB_URI" in done.stdout + done.stderr


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze not installed; the key checks above still run")
def test_systemd_unit_verifies_cleanly(tmp_path: Path) -> None:
    # verify insists that ExecStart exists: point it at the command these tests run.
    unit = tmp_path / UNIT.name
    unit.write_text(re.sub(r"(?m)^ExecStart=.*$", f"ExecStart={RELAY}", UNIT.read_text()))
    done = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                          text=True, timeout=60, stdin=subprocess.DEVNULL, cwd=tmp_path)
    # Unknown keys and bad values are only warnings: any output is a failure.
    assert (done.returncode, done.stdout + done.stderr) == (0, "")


#: Run the rest of the command line under the kernel's MemoryDenyWriteExecute (PR_SET_MDWE,
#: Linux 6.3+, the same rule systemd enforces with seccomp: no memory both writable and
#: executable, ever), kept across execve.
_MDWE_SET = """import ctypes, os, sys
if ctypes.CDLL(None, use_errno=True).prctl(65, 1, 0, 0, 0) != 0:  # PR_SET_MDWE, REFUSE_EXEC_GAIN
    sys.exit(f"PR_SET_MDWE failed: errno {ctypes.get_errno()}")
"""
_MDWE = _MDWE_SET + "os.execv(sys.argv[1], sys.argv[1:])\n"
_PROBE = """import ctypes, mmap
try:
    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
except PermissionError:
    print(ctypes.CDLL(None).prctl(66, 0, 0, 0, 0), "refused")  # PR_GET_MDWE
"""


def test_relay_runs_under_memory_deny_write_execute(tmp_path: Path, monkeypatch,
                                                     start_relay) -> None:
    """The unit's MemoryDenyWriteExecute=yes: the relay reads, writes and verifies tokens
    with writable+executable memory forbidden (CPython, psycopg, cryptography need none)."""
    probe = subprocess.run([sys.executable, "-c", _MDWE, sys.executable, "-c", _PROBE],
                           capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    if "PR_SET_MDWE failed" in probe.stderr:
        pytest.skip(f"this kernel has no PR_SET_MDWE (Linux 6.3+): {probe.stderr.strip()}")
    assert probe.stdout.split() == ["1", "refused"], probe  # Set, kept across exec, enforced.
    wrapper = tmp_path / "pgws-relay-mdwe"
    wrapper.write_text(f"#!{sys.executable}\n{_MDWE_SET}"
                       f"os.execv({RELAY!r}, [{RELAY!r}, *sys.argv[1:]])\n")
    wrapper.chmod(0o755)
    monkeypatch.setattr(helpers, "RELAY", str(wrapper))
    relay: RelayProcess = start_relay()
    channel = unique_channel("mdwe")
    with connect(relay.url(f"/{channel}/{token({'mode': 'rw'})}"), open_timeout=10) as client:
        notify(relay.env["PGWS_LISTEN_CHANNEL"], f'{{"channel": "{channel}", "payload": 1}}')
        assert client.recv(timeout=helpers.TIMEOUT) == f'{{"channel": "{channel}", "payload": 1}}'
        client.send("written")
        assert '"payload":"written"' in client.recv(timeout=helpers.TIMEOUT)
    assert relay.proc.poll() is None, relay.log
