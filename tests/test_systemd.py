"""The unit file under real systemd: `systemd-analyze` on deploy/systemd/edge-agent.service, then a
Debian root (scripts/test-root) booted with systemd-nspawn, the agent installed in a venv built
inside it from wheels made on the host, started, starved of its watchdog, pushed over its memory
ceiling, reloaded and stopped, with the journal read back.

The nspawn tier needs root, systemd-nspawn and debootstrap; elsewhere it skips saying so, in CI
(CI=true) it must run. Caches live in /var/cache/edge-agent-test (root, wheels, venv); a warm run
takes about a minute.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import REPO, SAMPLE_CLIP

sys.path.insert(0, str(Path(__file__).resolve().parent / "ansible"))
from testbed import container_init

pytestmark = pytest.mark.timeout(900)  # a cold cache builds the root, wheels and venv first

UNIT = REPO / "deploy" / "systemd" / "edge-agent.service"
CACHE = Path(os.environ.get("TEST_ROOT_CACHE", "/var/cache/edge-agent-test"))
CI = os.environ.get("CI") == "true"
VENV = "/opt/edge-agent/venv"
TEST_DIR = "/opt/edge-agent-test"  # models and clip, read-only in the machine
STALL_ENTRY = Path(__file__).with_name("systemd_stall.py")


def _analyze(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    if not shutil.which("systemd-analyze"):
        pytest.skip("systemd-analyze is not installed (apt-get install systemd)")
    return subprocess.run(["systemd-analyze", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=60)


def _render_unit(tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at a binary that exists here, as verify demands."""
    text = UNIT.read_text().replace(f"{VENV}/bin/edge-agent", sys.executable + " -m edge_agent")
    path = tmp_path / "edge-agent.service"
    path.write_text(text)
    return path


def test_unit_file_verifies_clean(tmp_path: Path) -> None:
    unit = _render_unit(tmp_path)
    r = _analyze("verify", str(unit), cwd=tmp_path)
    assert r.returncode == 0
    assert r.stdout + r.stderr == "", r.stdout + r.stderr


def test_unit_file_verify_output_catches_mistakes(tmp_path: Path) -> None:
    """The check above means something: verify exits 0 on errors and only prints them."""
    unit = _render_unit(tmp_path)
    unit.write_text(unit.read_text().replace("Type=notify", "Type=notfy"))
    r = _analyze("verify", str(unit), cwd=tmp_path)
    assert "notfy" in r.stdout + r.stderr


def test_unit_file_exposure_is_at_most_2(tmp_path: Path) -> None:
    unit = _render_unit(tmp_path)
    r = _analyze("security", "--offline=true", str(unit), cwd=tmp_path)
    m = re.search(r"Overall exposure level for edge-agent\.service: (\d+\.\d+)", r.stdout)
    assert m, r.stdout + r.stderr
    assert float(m.group(1)) <= 2.0, r.stdout


def test_unit_file_has_the_required_settings() -> None:
    text = UNIT.read_text()
    settings = dict(re.findall(r"^(\w+)=(.*)$", text, re.M))
    assert settings["Type"] == "notify" and int(settings["WatchdogSec"]) > 0
    assert settings["Restart"] == "on-failure" and "StartLimitBurst" in settings
    assert settings["ExecStart"] == f"{VENV}/bin/edge-agent run -c /etc/edge-agent/edge-agent.yaml"
    assert settings["DynamicUser"] == "yes" and settings["SupplementaryGroups"] == "video"
    assert "PrivateDevices" not in settings and "video4linux" in settings["DeviceAllow"]
    assert settings["LoadCredential"].split(":")[0] == "mqtt-password"
    for key in ("StateDirectory", "ProtectSystem", "ProtectHome", "PrivateTmp",
                "NoNewPrivileges", "RestrictAddressFamilies", "MemoryHigh", "MemoryMax"):
        assert key in settings, key
    assert "@system-service" in text


# --- a real systemd in a container ------------------------------------------------------------


def _nspawn_ready() -> None:
    """Skip (outside CI) unless this host can build and boot a container."""
    missing = [t for t in ("systemd-nspawn", "debootstrap", "nsenter") if not shutil.which(t)]
    reason = None
    if os.geteuid() != 0:
        reason = "needs root to boot a systemd-nspawn container"
    elif missing:
        reason = f"{', '.join(missing)} not installed (scripts/install-system-deps)"
    if reason:
        if CI:
            pytest.fail(f"CI must run the systemd tests: {reason}")
        pytest.skip(reason)


def _cached(name: str, key: str, build: Callable[[Path], None]) -> Path:
    """CACHE/name-key, built once into a temporary folder and renamed when complete."""
    final = CACHE / f"{name}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    if final.exists():
        return final
    tmp = final.with_name(final.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    build(tmp)
    if final.exists():  # another run built it meanwhile
        shutil.rmtree(tmp)
    else:
        tmp.rename(final)
    return final


def _project_requirements() -> list[str]:
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return [*meta["dependencies"], *meta["optional-dependencies"]["systemd"]]


def _run(cmd: list[str], timeout: float = 600, **kw: Any) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    assert r.returncode == 0, f"{cmd}: {r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    return r


@pytest.fixture(scope="module")
def test_root() -> Path:
    _nspawn_ready()
    r = _run([str(REPO / "scripts" / "test-root")], timeout=1200)
    return Path(r.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Host-built wheels of the dependencies (cached) plus this checkout's own wheel."""
    reqs = _project_requirements()
    deps = _cached("wheels", "\n".join([sys.version[:4], *reqs]), lambda d: _run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--wheel-dir", str(d), *reqs]))
    house = tmp_path_factory.mktemp("wheels")
    for whl in deps.glob("*.whl"):
        try:
            os.link(whl, house / whl.name)
        except OSError:  # another file system
            shutil.copy(whl, house / whl.name)
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--wheel-dir", str(house),
          str(REPO)])
    return house


def _nspawn(root: Path, *args: str) -> list[str]:
    return ["systemd-nspawn", "-q", "-D", str(root), "--register=no", "--keep-unit",
            "--private-network", "--volatile=overlay", *args]


@pytest.fixture(scope="module")
def venv(test_root: Path, wheelhouse: Path) -> Path:
    """A venv made by the machine's own Python from the wheels: what a fleet role installs."""
    reqs = _project_requirements()
    dep_wheels = sorted(w.name for w in wheelhouse.glob("*.whl")
                        if not w.name.startswith("edge_agent-"))

    def build(d: Path) -> None:
        _run(_nspawn(test_root, f"--bind={d}:{VENV}", f"--bind-ro={wheelhouse}:/wheels",
                     "sh", "-c", f"python3 -m venv {VENV} && {VENV}/bin/pip install -q "
                     f"--no-index --find-links /wheels " + " ".join(f"'{r}'" for r in reqs)))

    path = _cached("venv", f"{test_root.name}\n" + "\n".join(dep_wheels), build)
    _run(_nspawn(test_root, f"--bind={path}:{VENV}", f"--bind-ro={wheelhouse}:/wheels",
                 f"{VENV}/bin/pip", "install", "-q", "--no-index", "--no-deps",
                 "--force-reinstall", "--find-links", "/wheels", "edge-agent"))
    return path


def _agent_config(**changes: Any) -> str:
    cfg: dict[str, Any] = {
        "device_id": "nspawn-pi",
        "camera": "porch",
        "source": {"uri": f"{TEST_DIR}/clip/scene.mp4", "loop": True},
        "models": {"dir": f"{TEST_DIR}/models"},
        "mqtt": {"host": "127.0.0.1", "port": 1883, "state_interval_s": 2},
        "spool": {"path": "/var/lib/edge-agent/spool.db"},
    }
    for key, value in changes.items():
        section, _, name = key.partition("__")
        if name:
            cfg[section][name] = value
        else:
            cfg[section] = value
    return yaml.safe_dump(cfg)


class Machine:
    """A booted container; `sh` runs a command inside it (nsenter into its init's namespaces)."""

    def __init__(self, proc: subprocess.Popen[bytes], etc: Path, dropins: Path) -> None:
        self.proc = proc
        self.etc = etc
        self.dropins = dropins
        self.leader = 0

    def sh(self, command: str, check: bool = True,
           timeout: float = 60) -> subprocess.CompletedProcess[str]:
        r = subprocess.run(["nsenter", "-t", str(self.leader), "-a", "sh", "-c", command],
                           capture_output=True, text=True, timeout=timeout)
        if check:
            assert r.returncode == 0, f"{command}: {r.returncode}\n{r.stdout}\n{r.stderr}"
        return r

    def show(self, *props: str) -> dict[str, str]:
        out = self.sh(f"systemctl show edge-agent -p {','.join(props)}").stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def wait_for(self, cond: Callable[[], bool], timeout: float, what: str) -> float:
        t0 = time.monotonic()
        while not cond():
            assert time.monotonic() - t0 < timeout, f"timed out after {timeout} s: {what}"
            time.sleep(0.2)
        return time.monotonic() - t0

    def journal(self, since_cursor: str | None = None) -> list[dict[str, Any]]:
        after = f"--after-cursor='{since_cursor}'" if since_cursor else ""
        out = self.sh(f"journalctl -o json --no-pager {after}").stdout
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def cursor(self) -> str:
        entries = self.journal()
        return entries[-1]["__CURSOR"] if entries else ""

    def dropin(self, text: str) -> None:
        (self.dropins / "test.conf").write_text("[Service]\n" + text)
        self.sh("systemctl daemon-reload")


@pytest.fixture(scope="module")
def machine(test_root: Path, venv: Path, tmp_path_factory: pytest.TempPathFactory,
            models_dir: Path) -> Iterator[Machine]:
    work = tmp_path_factory.mktemp("machine")
    clip_dir, etc, dropins = work / "clip", work / "etc", work / "dropins"
    for d in (clip_dir, etc, dropins):
        d.mkdir()
    shutil.copy(SAMPLE_CLIP, clip_dir / "scene.mp4")
    shutil.copy(STALL_ENTRY, clip_dir)
    (etc / "edge-agent.yaml").write_text(_agent_config())
    # Fast enough for a test; everything else is the shipped unit.
    (dropins / "test.conf").write_text("[Service]\n")
    proc = subprocess.Popen(
        _nspawn(test_root, "-b", "--console=pipe", f"--machine=edge-agent-test-{os.getpid()}",
                f"--bind-ro={venv}:{VENV}", f"--bind-ro={models_dir}:{TEST_DIR}/models",
                f"--bind-ro={clip_dir}:{TEST_DIR}/clip", f"--bind={etc}:/etc/edge-agent",
                f"--bind-ro={UNIT}:/etc/systemd/system/edge-agent.service",
                f"--bind={dropins}:/etc/systemd/system/edge-agent.service.d"),
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    m = Machine(proc, etc, dropins)
    try:
        t0 = time.monotonic()
        while not m.leader:
            assert proc.poll() is None, "systemd-nspawn exited during boot"
            assert time.monotonic() - t0 < 30, "no container init after 30 s"
            m.leader = container_init(proc.pid)
            time.sleep(0.1)
        try:
            m.wait_for(lambda: m.sh("systemctl is-system-running", check=False).stdout.strip()
                       in ("running", "degraded"), 180, "container boot")
        except AssertionError as e:
            jobs = m.sh("systemctl is-system-running; systemctl list-jobs --no-pager", check=False)
            raise AssertionError(f"{e}\n{jobs.stdout}{jobs.stderr}") from None
        yield m
    finally:
        proc.terminate()  # nspawn asks the container's systemd to power off
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def _msg(entry: dict[str, Any]) -> str:
    return str(entry.get("MESSAGE", ""))


def _agent_entries(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in entries if e.get("SYSLOG_IDENTIFIER") == "edge-agent"]


def _systemd_says(entries: list[dict[str, Any]], text: str) -> list[dict[str, Any]]:
    return [e for e in entries if e.get("_PID") == "1" and text in _msg(e)]


def test_start_reaches_active_after_ready(machine: Machine) -> None:
    t0 = time.monotonic()
    machine.sh("systemctl start edge-agent")  # Type=notify: returns once READY=1 came
    started = time.monotonic() - t0
    s = machine.show("ActiveState", "SubState", "StatusText", "MainPID", "User")
    assert (s["ActiveState"], s["SubState"]) == ("active", "running"), s
    assert "fps" in s["StatusText"] and "source open" in s["StatusText"], s
    user = machine.sh(f"ps -o user= -p {s['MainPID']}").stdout.strip()
    assert user not in ("root", ""), f"runs as {user!r}"
    print(f"systemctl start returned after {started:.1f} s; status: {s['StatusText']}")
    time.sleep(6)  # a STATUS= refresh and some tracks
    assert machine.show("SubState")["SubState"] == "running"


def test_journal_holds_structured_lines(machine: Machine) -> None:
    entries = _agent_entries(machine.journal())
    assert entries, "no journal entry from the agent"
    native = [e for e in entries if e["_TRANSPORT"] == "journal"]
    assert native, "nothing logged through the journal's native protocol"
    assert all(e.get("CAMERA") == "porch" and e.get("DEVICE") == "nspawn-pi" for e in native)
    assert not [e for e in entries if e["_TRANSPORT"] != "journal" and "WARN" in _msg(e)], \
        "OpenCV's stdout warnings should be off (OPENCV_LOG_LEVEL in the unit)"
    assert any(e.get("TRACK") and e.get("EVENT") == "new" for e in native), \
        "no track line with TRACK="
    assert any(e.get("ERROR_KIND") == "mqtt" for e in native), "no broker warning"
    assert all(e.get("PRIORITY") in {"3", "4", "6"} for e in native)
    lines_per_s = len(entries) / max(1.0, float(entries[-1]["__REALTIME_TIMESTAMP"]) / 1e6
                                     - float(entries[0]["__REALTIME_TIMESTAMP"]) / 1e6)
    assert lines_per_s < 5, f"{lines_per_s:.1f} log lines per second: something logs per frame"


def test_reload_applies_a_new_config(machine: Machine) -> None:
    cursor = machine.cursor()
    pid = machine.show("MainPID")["MainPID"]
    (machine.etc / "edge-agent.yaml").write_text(_agent_config(camera="garden"))
    machine.sh("systemctl reload edge-agent")
    machine.wait_for(lambda: any("reloaded" in _msg(e)
                                 for e in _agent_entries(machine.journal(cursor))), 15, "reload")
    assert machine.show("MainPID")["MainPID"] == pid, "reload must not restart the process"
    new = [e for e in _agent_entries(machine.journal(cursor)) if "reloaded" in _msg(e)]
    assert new[0]["CAMERA"] == "garden" and "camera" in _msg(new[0])


def test_mqtt_password_arrives_as_a_credential(machine: Machine) -> None:
    """LoadCredential=mqtt-password: /etc/credstore/mqtt-password, readable only by the agent."""
    machine.sh("mkdir -p /etc/credstore && umask 077 && printf s3cret > "
               "/etc/credstore/mqtt-password && systemctl restart edge-agent")
    pid = machine.show("MainPID")["MainPID"]
    env = dict(v.split("=", 1) for v in machine.sh(f"tr '\\0' '\\n' < /proc/{pid}/environ")
               .stdout.splitlines() if "=" in v)
    path = f"{env['CREDENTIALS_DIRECTORY']}/mqtt-password"
    assert machine.sh(f"cat {path}").stdout == "s3cret"
    user = machine.sh(f"stat -c %U {path}").stdout.strip()
    assert user != "root" and machine.sh(f"stat -c %a {path}").stdout.strip() == "400"
    machine.sh("rm /etc/credstore/mqtt-password && systemctl restart edge-agent")


def test_watchdog_restarts_a_stalled_loop(machine: Machine) -> None:
    """A test-only entry point (tests/systemd_stall.py) blocks the frame loop's read for good
    after 4 s: the pings stop, systemd aborts the process (faulthandler prints where it hung)
    and starts a new one."""
    machine.dropin(f"WatchdogSec=3\nRestartSec=1\nSyslogIdentifier=edge-agent\nExecStart=\n"
                   f"ExecStart={VENV}/bin/python {TEST_DIR}/clip/{STALL_ENTRY.name} 4 "
                   "run -c /etc/edge-agent/edge-agent.yaml\n")
    cursor = machine.cursor()
    machine.sh("systemctl restart edge-agent")
    first = machine.show("MainPID")["MainPID"]
    machine.wait_for(lambda: machine.show("MainPID")["MainPID"] not in (first, "0"), 30,
                     "a restart after the watchdog fired")
    machine.wait_for(lambda: machine.show("SubState")["SubState"] == "running", 30, "running")
    entries = machine.journal(cursor)
    stalled = [e for e in _agent_entries(entries) if "stalling the frame loop" in _msg(e)]
    fired = _systemd_says(entries, "Watchdog timeout")
    started = _systemd_says(entries, "Started edge-agent")
    assert stalled and fired and len(started) >= 2, [e.get("MESSAGE") for e in entries][-30:]
    t_stall = int(stalled[0]["__REALTIME_TIMESTAMP"]) / 1e6
    t_fired = int(fired[0]["__REALTIME_TIMESTAMP"]) / 1e6
    t_back = int(started[1]["__REALTIME_TIMESTAMP"]) / 1e6
    print(f"watchdog fired {t_fired - t_stall:.1f} s after the stall (WatchdogSec=3), "
          f"agent ready again {t_back - t_stall:.1f} s after it")
    assert t_fired - t_stall < 3 + 1.5
    stderr = [_msg(e) for e in entries if e.get("_COMM") == "edge-agent"
              or e.get("SYSLOG_IDENTIFIER") == "edge-agent"]
    assert any("Fatal Python error: Aborted" in m for m in stderr), "no faulthandler dump"
    assert any(STALL_ENTRY.name in m and "read_or_stall" in m for m in stderr), \
        "dump lacks the stuck frame"
    machine.dropin("")
    machine.sh("systemctl restart edge-agent")


def test_memory_ceiling_exit_75_is_restarted(machine: Machine) -> None:
    machine.dropin("RestartSec=1\n")
    cursor = machine.cursor()
    (machine.etc / "edge-agent.yaml").write_text(_agent_config(memory={"ceiling_mb": 40}))
    machine.sh("systemctl restart edge-agent", check=False)
    machine.wait_for(lambda: int(machine.show("NRestarts")["NRestarts"]) >= 1, 30,
                     "a restart after exit 75")
    entries = machine.journal(cursor)
    assert any(e.get("ERROR_KIND") == "memory_ceiling" for e in _agent_entries(entries))
    assert _systemd_says(entries, "status=75"), "systemd did not see exit status 75"
    (machine.etc / "edge-agent.yaml").write_text(_agent_config())
    machine.sh("systemctl reset-failed edge-agent; systemctl restart edge-agent")
    assert machine.show("SubState")["SubState"] == "running"


def test_stop_is_clean_and_quick(machine: Machine) -> None:
    cursor = machine.cursor()
    t0 = time.monotonic()
    machine.sh("systemctl stop edge-agent")
    took = time.monotonic() - t0
    s = machine.show("ActiveState", "Result", "ExecMainStatus")
    assert s["ActiveState"] == "inactive" and s["Result"] == "success", s
    assert s["ExecMainStatus"] == "0", s
    assert took < 8, f"stop took {took:.1f} s"
    print(f"systemctl stop took {took:.1f} s")
    assert not _systemd_says(machine.journal(cursor), "SIGKILL")


# --- one instance per camera: deploy/systemd/edge-agent@.service -------------------------------

TEMPLATE = REPO / "deploy" / "systemd" / "edge-agent@.service"
# The settings an instance changes; everything else (the hardening) must be the same as the unit's.
_PER_INSTANCE = {"Description", "ExecStart", "User", "StateDirectory", "LoadCredential"}


def _render_instance(tmp_path: Path, instance: str = "front") -> Path:
    """The template as an instance file, with an ExecStart that exists here (for verify)."""
    text = TEMPLATE.read_text().replace(f"{VENV}/bin/edge-agent", sys.executable + " -m edge_agent")
    path = tmp_path / f"edge-agent@{instance}.service"
    path.write_text(text)
    return path


def test_template_unit_verifies_clean(tmp_path: Path) -> None:
    r = _analyze("verify", str(_render_instance(tmp_path)), cwd=tmp_path)
    assert r.returncode == 0
    assert r.stdout + r.stderr == "", r.stdout + r.stderr


def test_template_unit_exposure_is_at_most_2(tmp_path: Path) -> None:
    r = _analyze("security", "--offline=true", str(_render_instance(tmp_path)), cwd=tmp_path)
    m = re.search(r"Overall exposure level for edge-agent@front\.service: (\d+\.\d+)", r.stdout)
    assert m, r.stdout + r.stderr
    assert float(m.group(1)) <= 2.0, r.stdout


def test_template_unit_differs_only_per_instance() -> None:
    def settings(path: Path) -> dict[str, list[str]]:
        found: dict[str, list[str]] = {}
        for key, value in re.findall(r"^(\w+)=(.*)$", path.read_text(), re.M):
            found.setdefault(key, []).append(value)
        return found

    unit, template = settings(UNIT), settings(TEMPLATE)
    assert unit.keys() | {"User"} == template.keys()
    differ = {k for k in template if unit.get(k) != template[k]}
    assert differ == _PER_INSTANCE, differ
    assert template["ExecStart"] == [f"{VENV}/bin/edge-agent run -c /etc/edge-agent/%i.yaml"]
    assert template["User"] == ["edge-agent-%i"]
    assert template["StateDirectory"] == ["edge-agent-%i"]
    assert template["LoadCredential"] == ["mqtt-password-%i"]


def _instance_config(instance: str) -> str:
    return _agent_config(device_id=f"nspawn-pi-{instance}", camera=instance,
                         spool={"path": f"/var/lib/edge-agent-{instance}/spool.db"},
                         mqtt={"host": "127.0.0.1", "port": 1883, "state_interval_s": 1,
                               "password_credential": f"mqtt-password-{instance}"})


def _show_unit(machine: Machine, unit: str, *props: str) -> dict[str, str]:
    out = machine.sh(f"systemctl show {unit} -p {','.join(props)}").stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


class _ContainerBroker:
    """The host's mosquitto and a mosquitto_sub, both in the container's network namespace, so
    the instances reach it on their own 127.0.0.1:1883 (the container has no other network)."""

    def __init__(self, leader: int, work: Path) -> None:
        conf = work / "mosquitto.conf"
        conf.write_text("listener 1883 127.0.0.1\nallow_anonymous true\nuser root\n")
        self.log = work / "sub.log"
        enter = ["nsenter", "-t", str(leader), "-n"]
        self.broker = subprocess.Popen([*enter, "mosquitto", "-c", str(conf)],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.3)
        with self.log.open("w") as out:
            self.sub = subprocess.Popen([*enter, "mosquitto_sub", "-v", "-t", "edge-agent/#"],
                                        stdout=out, stderr=subprocess.STDOUT)

    def messages(self) -> list[tuple[str, str]]:
        lines = self.log.read_text().splitlines()
        return [(t, p) for t, _, p in (line.partition(" ") for line in lines)]

    def close(self) -> None:
        for p in (self.sub, self.broker):
            p.terminate()
            p.wait(10)


def test_two_instances_run_side_by_side(machine: Machine,
                                        tmp_path_factory: pytest.TempPathFactory) -> None:
    """Two cameras on one Pi: both READY at once, each with its own user, topics and spool;
    restarting one leaves the other's process and its stream of events alone."""
    if not shutil.which("mosquitto_sub"):
        pytest.skip("mosquitto not installed (scripts/install-system-deps)")
    instances = ("front", "back")
    for name in instances:
        (machine.etc / f"{name}.yaml").write_text(_instance_config(name))
    shutil.copy(TEMPLATE, machine.etc / "edge-agent@.service")
    machine.sh("cp /etc/edge-agent/edge-agent@.service /etc/systemd/system/ && "
               "systemctl daemon-reload")
    broker = _ContainerBroker(machine.leader, tmp_path_factory.mktemp("broker"))
    units = [f"edge-agent@{name}" for name in instances]
    try:
        machine.sh(f"systemctl start {' '.join(units)}")  # returns once both sent READY=1
        shown = {u: _show_unit(machine, u, "ActiveState", "SubState", "MainPID") for u in units}
        assert all(s["SubState"] == "running" for s in shown.values()), shown
        pids = {u: s["MainPID"] for u, s in shown.items()}
        uids = {u: machine.sh(f"ps -o uid= -p {pid}").stdout.strip() for u, pid in pids.items()}
        assert len(set(uids.values())) == 2 and "0" not in uids.values(), uids

        def topics() -> set[str]:
            return {t for t, _ in broker.messages()}

        wanted = {f"edge-agent/nspawn-pi-{n}/{kind}" for n in instances
                  for kind in ("status", "state", "events")}
        machine.wait_for(lambda: wanted <= topics(), 60, f"messages on {sorted(wanted)}")
        for name in instances:
            spool = f"/var/lib/edge-agent-{name}/spool.db"
            owner = machine.sh(f"stat -L -c %u {spool}").stdout.strip()
            assert owner == uids[f"edge-agent@{name}"], (spool, owner, uids)

        machine.sh("systemctl restart edge-agent@back")
        after = {u: _show_unit(machine, u, "SubState", "MainPID", "NRestarts") for u in units}
        assert after["edge-agent@front"]["MainPID"] == pids["edge-agent@front"], after
        assert after["edge-agent@back"]["MainPID"] != pids["edge-agent@back"], after
        assert all(s["SubState"] == "running" for s in after.values()), after
        seen = len(broker.messages())
        machine.wait_for(lambda: any(t == "edge-agent/nspawn-pi-front/state"
                                     for t, _ in broker.messages()[seen:]),
                         10, "the front camera's state refreshed while back restarted")
        offline = [t for t, p in broker.messages() if p == "offline"]
        assert offline == ["edge-agent/nspawn-pi-back/status"], offline
    finally:
        machine.sh(f"systemctl stop {' '.join(units)}", check=False)
        broker.close()
