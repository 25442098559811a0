"""The fleet rollout (deploy/ansible) run for real against booted systemd containers.

Two "Pis" (tests/ansible/testbed.py: systemd-nspawn containers with sshd, each in a network
namespace on a private bridge, a mosquitto on the bridge for the health gate) go through what an
operator does: first install, an idempotent re-run, an upgrade that rolls through canary first,
and an upgrade whose broken configuration fails the canary's gate, is rolled back and stops the
rollout before the second host is touched.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from conftest import MODELS, NO_SHARED, REPO, SHARED, fetch_models

sys.path.insert(0, str(Path(__file__).resolve().parent / "ansible"))
import testbed

ANSIBLE_DIR = REPO / "deploy" / "ansible"
BIN = Path(sys.executable).parent
VAULT_PASSWORD = "fleet-test-vault"
IN_CI = os.environ.get("CI", "").lower() == "true"
RECAP = re.compile(r"^(\S+)\s*: ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)"
                   r"\s+skipped=(\d+)\s+rescued=(\d+)\s+ignored=(\d+)", re.M)


def _tool(name: str) -> str | None:
    """Ansible's commands from this interpreter's venv first (the `test` extra installs them)."""
    return str(BIN / name) if (BIN / name).exists() else shutil.which(name)


def _missing(*, fleet: bool) -> str | None:
    """Why these tests cannot run here, or None. In CI (root, CI=true) a reason is a failure."""
    need = [t for t in ("ansible-playbook", "ansible-lint", "ansible-vault") if not _tool(t)]
    if fleet:
        if os.geteuid() != 0:
            return "needs root (network namespaces, overlay mounts, systemd-nspawn)"
        need += testbed.missing_tools()
        if SHARED is None:
            return f"the fleet's clip is generated from the face data: {NO_SHARED}"
    if need:
        return f"missing tools: {', '.join(need)} (scripts/install-system-deps, pip '.[test]')"
    return None


def _require(*, fleet: bool) -> None:
    reason = _missing(fleet=fleet)
    if reason and IN_CI and os.geteuid() == 0:
        pytest.fail(f"CI must run the Ansible tests: {reason}")
    if reason:
        pytest.skip(reason)


def _ansible_env(workdir: Path) -> dict[str, str]:
    """Each run its own control-socket folder: a reused ControlPersist master once sent a run
    to an earlier host."""
    (workdir / "cp").mkdir(parents=True, exist_ok=True)
    return {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "ANSIBLE_NOCOLOR": "1",
            "ANSIBLE_FORCE_COLOR": "0", "ANSIBLE_SSH_CONTROL_PATH_DIR": str(workdir / "cp"),
            "ANSIBLE_LOCAL_TEMP": str(workdir / "tmp"), "ANSIBLE_HOST_KEY_CHECKING": "False"}


# ---------------------------------------------------------------------------------------------
# Static checks
# ---------------------------------------------------------------------------------------------

def test_syntax_check(tmp_path: Path) -> None:
    _require(fleet=False)
    r = subprocess.run([_tool("ansible-playbook"), "--syntax-check", "-i",
                        "inventory/example/hosts.yml", "site.yml"], cwd=ANSIBLE_DIR,
                       env=_ansible_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def test_ansible_lint_production(tmp_path: Path) -> None:
    """Linted in a copy: ansible-lint writes a .ansible/ cache into the project it lints."""
    _require(fleet=False)
    copy = tmp_path / "ansible"
    shutil.copytree(ANSIBLE_DIR, copy, ignore=shutil.ignore_patterns(".wheelhouse", ".ansible"))
    r = subprocess.run([_tool("ansible-lint"), "--profile", "production", "--offline"],
                       cwd=copy, env=_ansible_env(tmp_path), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Profile 'production' was required, and it passed" in r.stdout + r.stderr


# ---------------------------------------------------------------------------------------------
# The fleet
# ---------------------------------------------------------------------------------------------

@dataclass
class Run:
    rc: int
    log: str
    seconds: float

    @property
    def recap(self) -> dict[str, dict[str, int]]:
        """The last PLAY RECAP, per host."""
        keys = ("ok", "changed", "unreachable", "failed", "skipped", "rescued", "ignored")
        last = self.log.rsplit("PLAY RECAP", 1)[-1]
        return {m[0]: dict(zip(keys, map(int, m[1:]), strict=True))
                for m in RECAP.findall(last)}


@dataclass
class Fleet:
    bed: testbed.Testbed
    workdir: Path
    base_version: str
    timings: dict[str, float]

    @property
    def inventory(self) -> Path:
        return self.workdir / "inventory"

    def play(self, name: str, src: Path) -> Run:
        start = time.monotonic()
        r = subprocess.run(
            [_tool("ansible-playbook"), "-i", str(self.inventory), "site.yml",
             "--vault-password-file", str(self.workdir / "vault-pass"),
             "-e", f"edge_agent_src={src}"],
            cwd=ANSIBLE_DIR, env=_ansible_env(self.workdir / f"ansible-{name}"),
            capture_output=True, text=True, timeout=900,
        )
        run = Run(r.returncode, r.stdout + r.stderr, time.monotonic() - start)
        (self.workdir / f"{name}.log").write_text(run.log)
        self.timings[name] = round(run.seconds, 1)
        print(f"\nansible-playbook ({name}): rc {run.rc} in {run.seconds:.1f} s", file=sys.stderr)
        return run

    def sh(self, host: int, command: str) -> str:
        return self.bed.hosts[host].sh(command).stdout.strip()

    def current(self, host: int) -> str:
        """The release the `current` symlink points at."""
        return self.sh(host, "readlink /opt/edge-agent/venv").split("/")[1]

    def running_version(self, host: int) -> str:
        return self.sh(host, "/opt/edge-agent/venv/bin/edge-agent --version").split()[-1]

    def active(self, host: int) -> str:
        return self.bed.hosts[host].sh("systemctl is-active edge-agent", check=False
                                       ).stdout.strip()

    def status(self, host: int) -> str:
        """The retained T/status on the broker, as the health gate reads it."""
        r = subprocess.run(
            ["mosquitto_sub", "-h", self.bed.controller_address, "-p", str(testbed.BROKER_PORT),
             "-u", testbed.MQTT_USER, "-P", self.bed.mqtt_password, "-C", "1", "-W", "5",
             "-t", f"fleettest/{self.bed.hosts[host].name}/status"],
            capture_output=True, text=True, timeout=10)
        return r.stdout.strip()

    def started_at(self, host: int) -> str:
        return self.sh(host, "systemctl show -p ExecMainStartTimestampMonotonic edge-agent")


def _source_copy(dest: Path, version: str | None) -> Path:
    """What the controller builds a release from, with the version string bumped if asked
    (pyproject.toml and __version__, which `edge-agent --version` reports)."""
    dest.mkdir(parents=True)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, dest / name)
    for name in ("edge_agent", "models"):
        shutil.copytree(REPO / name, dest / name, symlinks=True,
                        ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "deploy" / "systemd", dest / "deploy" / "systemd")
    if version:
        for rel, pattern in (("pyproject.toml", r'^version = "[^"]+"'),
                             ("edge_agent/__init__.py", r'^__version__ = "[^"]+"')):
            path = dest / rel
            text, n = re.subn(pattern, pattern.split(" = ")[0].lstrip("^") + f' = "{version}"',
                              path.read_text(), count=1, flags=re.M)
            assert n == 1, f"no version string in {path}"
            path.write_text(text)
    return dest


def _write_inventory(fleet: Fleet) -> None:
    bed, inv = fleet.bed, fleet.inventory
    (inv / "group_vars" / "all").mkdir(parents=True)
    (inv / "group_vars" / "edge_agents").mkdir(parents=True)
    (inv / "host_vars").mkdir()
    hosts = {"edge_agents": {"hosts": {h.name: {"ansible_host": h.address} for h in bed.hosts}}}
    (inv / "hosts.yml").write_text(json.dumps(hosts, indent=1))
    (inv / "group_vars" / "all" / "controller.yml").write_text(json.dumps({
        "edge_agent_models_src": str(MODELS),
        "edge_agent_wheelhouse_dir": str(fleet.workdir / "wheelhouse"),
    }, indent=1))
    (inv / "group_vars" / "edge_agents" / "main.yml").write_text(json.dumps({
        "ansible_user": "pi",
        "ansible_ssh_private_key_file": str(bed.key),
        "ansible_ssh_common_args": " ".join(bed.ssh_options()[2:]),
        "edge_agent_camera": "test",
        "edge_agent_source_uri": "/srv/edge-agent/clip.mp4",
        "edge_agent_source_loop": True,
        "edge_agent_mqtt_host": bed.controller_address,
        "edge_agent_mqtt_port": testbed.BROKER_PORT,
        "edge_agent_mqtt_topic_prefix": "fleettest",
        "edge_agent_mqtt_username": testbed.MQTT_USER,
        "edge_agent_mqtt_password": "{{ vault_edge_agent_mqtt_password }}",
        "edge_agent_gate_timeout_s": 40,
        "edge_agent_gate_settle_s": 3,
    }, indent=1))
    vault = inv / "group_vars" / "edge_agents" / "vault.yml"
    vault.write_text(json.dumps({"vault_edge_agent_mqtt_password": bed.mqtt_password}))
    (fleet.workdir / "vault-pass").write_text(VAULT_PASSWORD + "\n")
    subprocess.run([_tool("ansible-vault"), "encrypt", "--vault-password-file",
                    str(fleet.workdir / "vault-pass"), str(vault)], check=True,
                   capture_output=True, env=_ansible_env(fleet.workdir))
    assert vault.read_text().startswith("$ANSIBLE_VAULT;")


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    _require(fleet=True)
    fetch_models()  # into MODELS, the per-user cache
    workdir = tmp_path_factory.mktemp("fleet")
    bed = testbed.Testbed(workdir / "bed", SHARED)
    start = time.monotonic()
    try:
        bed.up(2)
        base = re.search(r'^version = "([^"]+)"', (REPO / "pyproject.toml").read_text(), re.M)
        assert base
        f = Fleet(bed, workdir, base[1], {"testbed_up": round(time.monotonic() - start, 1)})
        _write_inventory(f)
        yield f
        print(f"\nfleet timings (s): {json.dumps(f.timings)}", file=sys.stderr)
    finally:
        bed.down()
    assert bed.leftovers == [], "the testbed left these behind"


@pytest.mark.timeout(1800)
def test_first_install_starts_every_host_behind_the_gate(fleet: Fleet) -> None:
    run = fleet.play("install", _source_copy(fleet.workdir / "src-base", None))
    assert run.rc == 0, run.log[-6000:]
    v = fleet.base_version
    for i, host in enumerate(fleet.bed.hosts):
        assert run.recap[host.name]["failed"] == 0
        assert fleet.current(i) == v
        assert fleet.running_version(i) == v
        assert fleet.active(i) == "active"
        assert fleet.status(i) == "online", f"{host.name} is not online on the broker"
        # The password reached the agent (the broker refuses anonymous clients) through a
        # root-only credential file, and is in no other file the role wrote.
        mode = fleet.sh(i, "stat -c '%a %U' /etc/credstore/mqtt-password")
        assert mode == "600 root"
        assert fleet.sh(i, "cat /etc/credstore/mqtt-password") == fleet.bed.mqtt_password
        hits = fleet.bed.hosts[i].sh(
            f"grep -rl {fleet.bed.mqtt_password} /etc/edge-agent /opt/edge-agent/last-good "
            "/etc/systemd/system", check=False).stdout
        assert hits == ""
        # python3-systemd comes from Debian, seen through --system-site-packages.
        assert fleet.sh(i, "/opt/edge-agent/venv/bin/python -c 'import systemd.daemon as d; "
                           "print(d.__file__)'").startswith("/usr/lib/python3/dist-packages/")
    # The canary went first, alone: one rollout play per batch.
    assert run.log.count("PLAY [Roll out edge-agent]") == 2


@pytest.mark.timeout(900)
def test_second_run_changes_nothing(fleet: Fleet) -> None:
    before = [fleet.started_at(i) for i in range(len(fleet.bed.hosts))]
    run = fleet.play("idempotent", _source_copy(fleet.workdir / "src-again", None))
    assert run.rc == 0, run.log[-6000:]
    assert set(run.recap) == {"localhost", *(h.name for h in fleet.bed.hosts)}
    changed = {host: counts["changed"] for host, counts in run.recap.items()}
    assert changed == dict.fromkeys(changed, 0), run.log[-6000:]
    assert [fleet.started_at(i) for i in range(len(fleet.bed.hosts))] == before, \
        "a run with nothing to change restarted the agent"


@pytest.mark.timeout(900)
def test_upgrade_rolls_through_and_keeps_the_old_release(fleet: Fleet) -> None:
    new = f"{fleet.base_version}.post1"
    run = fleet.play("upgrade", _source_copy(fleet.workdir / "src-post1", new))
    assert run.rc == 0, run.log[-6000:]
    for i in range(len(fleet.bed.hosts)):
        assert fleet.current(i) == new
        assert fleet.running_version(i) == new
        assert fleet.status(i) == "online"
        releases = fleet.sh(i, "ls /opt/edge-agent/releases").split()
        assert sorted(releases) == sorted([fleet.base_version, new])
        assert fleet.sh(i, "cat /opt/edge-agent/last-good/version") == new


@pytest.mark.timeout(900)
def test_broken_config_fails_the_canary_rolls_it_back_and_stops(fleet: Fleet) -> None:
    good, bad = f"{fleet.base_version}.post1", f"{fleet.base_version}.post2"
    canary, other = fleet.bed.hosts[0].name, fleet.bed.hosts[1].name
    # Valid YAML that check-config accepts, but the agent exits 3 at start: no models there.
    (fleet.inventory / "host_vars" / f"{canary}.yml").write_text(json.dumps(
        {"edge_agent_config_extra": {"models": {"dir": "/nonexistent/models"}}}))
    run = fleet.play("rollback", _source_copy(fleet.workdir / "src-post2", bad))
    assert run.rc != 0, "the rollout went on although the canary failed its health gate"
    assert run.recap[canary]["failed"] == 1 and run.recap[canary]["rescued"] == 1
    assert f"rolled back to {good}, which passed the gate" in run.log
    assert "model file missing" in run.log, "the failure message should say why"
    # The canary runs the last good release and configuration again.
    assert fleet.current(0) == good
    assert fleet.running_version(0) == good
    assert fleet.active(0) == "active"
    assert fleet.status(0) == "online"
    assert "nonexistent" not in fleet.sh(0, "cat /etc/edge-agent/edge-agent.yaml")
    # The rollout stopped: the second host was never touched by the rollout play.
    assert run.recap[other]["changed"] == 0
    assert fleet.current(1) == good
    assert bad not in fleet.sh(1, "ls /opt/edge-agent/releases")
    assert fleet.status(1) == "online"


@pytest.mark.timeout(900)
def test_config_the_agent_rejects_never_reaches_the_pi(fleet: Fleet) -> None:
    """check-config of the new release vets the rendered file before it replaces the old one,
    so nothing is restarted and the rollout stops at the canary."""
    good = f"{fleet.base_version}.post1"
    canary = fleet.bed.hosts[0].name
    before = fleet.started_at(0)
    config_before = fleet.sh(0, "cat /etc/edge-agent/edge-agent.yaml")
    (fleet.inventory / "host_vars" / f"{canary}.yml").write_text(json.dumps(
        {"edge_agent_detect_every_n_frames": 0}))
    run = fleet.play("invalid-config", fleet.workdir / "src-post2")
    assert run.rc != 0
    assert run.recap[canary]["failed"] == 1 and run.recap[canary]["rescued"] == 0
    assert "detect.every_n_frames: expected an integer >= 1" in run.log
    assert fleet.sh(0, "cat /etc/edge-agent/edge-agent.yaml") == config_before
    assert fleet.started_at(0) == before, "the agent was restarted"
    assert fleet.current(0) == good
    assert fleet.status(0) == "online"
    assert run.recap[fleet.bed.hosts[1].name]["changed"] == 0


@pytest.mark.timeout(900)
def test_a_list_of_cameras_runs_one_instance_each(fleet: Fleet) -> None:
    """edge_agent_cameras on one host: the single service gives way to one edge-agent@<name>
    per camera, each its own device on the broker with its own configuration and spool; the
    other host keeps its single service."""
    new = f"{fleet.base_version}.post3"
    canary, multi = fleet.bed.hosts[0].name, fleet.bed.hosts[1].name
    (fleet.inventory / "host_vars" / f"{canary}.yml").write_text("{}")
    cameras = [{"name": "door", "source_uri": "/srv/edge-agent/clip.mp4"},
               {"name": "yard", "source_uri": "/srv/edge-agent/clip.mp4",
                "config_extra": {"detect": {"every_n_frames": 3}}}]
    (fleet.inventory / "host_vars" / f"{multi}.yml").write_text(json.dumps(
        {"edge_agent_cameras": cameras}))
    run = fleet.play("cameras", _source_copy(fleet.workdir / "src-post3", new))
    assert run.rc == 0, run.log[-6000:]
    host = fleet.bed.hosts[1]
    assert host.sh("systemctl is-active edge-agent", check=False).stdout.strip() != "active"
    assert host.sh("systemctl is-enabled edge-agent", check=False).stdout.strip() != "enabled"
    pids = set()
    for cam in ("door", "yard"):
        unit = f"edge-agent@{cam}"
        assert host.sh(f"systemctl is-active {unit}").stdout.strip() == "active"
        assert host.sh(f"systemctl is-enabled {unit}").stdout.strip() == "enabled"
        pids.add(host.sh(f"systemctl show -p MainPID --value {unit}").stdout.strip())
        cfg = yaml.safe_load(host.sh(f"cat /etc/edge-agent/{cam}.yaml").stdout)
        assert cfg["device_id"] == f"{multi}-{cam}" and cfg["camera"] == cam
        assert cfg["spool"]["path"] == f"/var/lib/edge-agent-{cam}/spool.db"
        assert cfg["mqtt"]["password_credential"] == f"mqtt-password-{cam}"
        assert host.sh(f"test -s /var/lib/edge-agent-{cam}/spool.db && "
                       f"stat -c %a /etc/credstore/mqtt-password-{cam}").stdout.strip() == "600"
        r = subprocess.run(
            ["mosquitto_sub", "-h", fleet.bed.controller_address, "-p",
             str(testbed.BROKER_PORT), "-u", testbed.MQTT_USER, "-P", fleet.bed.mqtt_password,
             "-C", "1", "-W", "5", "-t", f"fleettest/{multi}-{cam}/status"],
            capture_output=True, text=True, timeout=10)
        assert r.stdout.strip() == "online", f"{multi}-{cam} is not online on the broker"
    assert len(pids) == 2
    assert yaml.safe_load(host.sh("cat /etc/edge-agent/yard.yaml").stdout
                          )["detect"]["every_n_frames"] == 3
    assert fleet.active(0) == "active" and fleet.current(0) == new
