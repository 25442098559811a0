"""A throw-away fleet on this machine for the Ansible tests: booted systemd containers with sshd.

Each "Pi" is a systemd-nspawn container booted with systemd (so that `systemctl` and
Type=notify work as on a device), running on an overlay of one cached Debian root, inside a
network namespace of its own that is joined to a bridge we create. The bridge holds the
controller's address (`.1`), where a mosquitto for the health gate listens; nothing binds to
0.0.0.0 and no traffic leaves the addresses made here. `down()` removes every namespace,
bridge, mount and process that `up()` made, and `up()` first clears leftovers of a run that
died, which it recognises by the name prefix.

Usable by hand too::

    python3 tests/ansible/testbed.py up --dir /tmp/fleet   # prints the inventory path
    python3 tests/ansible/testbed.py down --dir /tmp/fleet
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

REPO = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("EDGE_AGENT_TEST_CACHE", "/var/cache/edge-agent-test"))
PREFIX = "eaf"  # every link, namespace and machine made here starts with it
SUBNET = "10.200.5"  # .1 the controller and broker, .11, .12, ... the hosts
BRIDGE = f"{PREFIX}-br0"
BROKER_PORT = 18835
MQTT_USER = "edge"
#: what the role needs on a device besides the test root's packages (python3-apt for the apt
#: module); preinstalled here because the containers have no route to a package mirror.
LAYER_PACKAGES = ["python3-systemd", "python3-apt"]
BASE_PACKAGES = "systemd,systemd-sysv,dbus,python3,python3-venv,openssh-server,sudo"


def log(msg: str) -> None:
    print(f"testbed: {msg}", file=sys.stderr, flush=True)


def run(*cmd: str | Path, check: bool = True, **kw) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(c) for c in cmd], check=check, text=True,
                          capture_output=kw.pop("capture_output", True), **kw)


def container_init(nspawn_pid: int) -> int:
    """PID 1 of the container that this systemd-nspawn boots, as the host sees it; 0 until it runs.

    nspawn's first child is a short-lived helper outside the container's PID namespace: taking
    any child can pick it, and nsenter then finds nothing. Only init is PID 1 in a namespace.
    """
    children = run("pgrep", "-P", str(nspawn_pid), check=False).stdout.split()
    for pid in children:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        nspid = re.search(r"^NSpid:\s*(.*)$", status, re.M)
        if nspid and nspid.group(1).split()[1:] == ["1"]:
            return int(pid)
    return 0


def missing_tools() -> list[str]:
    """Host tools without which no fleet can be made (the test skips naming them)."""
    tools = ["systemd-nspawn", "debootstrap", "ip", "ssh", "ssh-keygen", "mosquitto",
             "mosquitto_sub", "mosquitto_passwd", "nsenter", "mount"]
    return [t for t in tools if shutil.which(t) is None]


# ---------------------------------------------------------------------------------------------
# Root file systems
# ---------------------------------------------------------------------------------------------

def base_root() -> Path:
    """The shared bookworm root with systemd and sshd: scripts/test-root's when it exists (it
    caches it), else one made here with the same debootstrap command."""
    script = REPO / "scripts" / "test-root"
    if script.exists():
        out = run(script, capture_output=True, timeout=1800).stdout.strip().splitlines()
        root = Path(out[-1].strip())
        if not (root / "usr/lib/systemd/systemd").exists():
            raise RuntimeError(f"scripts/test-root gave {root}, which has no systemd")
        return root
    root = CACHE / "fleet-base-root"
    if (root / ".complete").exists():
        return root
    log(f"debootstrap bookworm into {root} (a few minutes, once)")
    shutil.rmtree(root, ignore_errors=True)
    root.parent.mkdir(parents=True, exist_ok=True)
    run("debootstrap", "--variant=minbase", f"--include={BASE_PACKAGES}", "bookworm", root,
        "http://deb.debian.org/debian", timeout=1800)
    (root / ".complete").touch()
    return root


def fleet_layer(base: Path) -> Path:
    """An overlay upper dir on `base` with what a Raspberry Pi OS image already has for us: a
    `pi` user with passwordless sudo, python3-systemd and python3-apt. Cached per base root."""
    stamp = base / "var/lib/dpkg/status"
    key = hashlib.sha256(f"{base}:{stamp.stat().st_mtime_ns}:{LAYER_PACKAGES}".encode())
    layer = CACHE / f"fleet-layer-{key.hexdigest()[:12]}"
    if (layer / ".complete").exists():
        return layer / "upper"
    log(f"building the fleet layer {layer}")
    shutil.rmtree(layer, ignore_errors=True)
    for d in ("upper", "work", "merged"):
        (layer / d).mkdir(parents=True)
    merged = layer / "merged"
    run("mount", "-t", "overlay", "overlay", "-o",
        f"lowerdir={base},upperdir={layer / 'upper'},workdir={layer / 'work'}", merged)
    try:
        for sub in ("proc", "sys", "dev"):
            run("mount", "--bind", f"/{sub}", merged / sub)
        shutil.copy("/etc/resolv.conf", merged / "etc/resolv.conf")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        policy = merged / "usr/sbin/policy-rc.d"
        had_policy = policy.exists()
        if not had_policy:
            policy.write_text("#!/bin/sh\nexit 101\n")
            policy.chmod(0o755)
        run("chroot", merged, "apt-get", "update", "-qq", env=env, timeout=600)
        run("chroot", merged, "apt-get", "install", "-y", "-qq", "--no-install-recommends",
            *LAYER_PACKAGES, env=env, timeout=900)
        run("chroot", merged, "apt-get", "clean", env=env)
        if not had_policy:
            policy.unlink()
        if run("chroot", merged, "id", "pi", check=False).returncode != 0:
            run("chroot", merged, "useradd", "-m", "-s", "/bin/bash", "pi")
        sudoers = merged / "etc/sudoers.d/010_pi-nopasswd"
        sudoers.write_text("pi ALL=(ALL) NOPASSWD: ALL\n")
        sudoers.chmod(0o440)
    finally:
        for sub in ("dev", "sys", "proc"):
            run("umount", merged / sub, check=False)
        run("umount", merged)
    shutil.rmtree(layer / "work", ignore_errors=True)
    (layer / ".complete").touch()
    return layer / "upper"


def clip(faces: Path) -> Path:
    """A short looping clip with two people walking through, rendered once and cached."""
    out = CACHE / "fleet-clip-v1.mp4"
    if not out.exists():
        from devtools import scenario

        CACHE.mkdir(parents=True, exist_ok=True)
        scn = scenario.plan(faces, people=2, seed=5)
        tmp = CACHE / "fleet-clip-v1.tmp.mp4"
        scenario.render(scn, faces, tmp)
        tmp.rename(out)
        tmp.with_suffix(".mp4.json").unlink(missing_ok=True)
    return out


# ---------------------------------------------------------------------------------------------
# The fleet
# ---------------------------------------------------------------------------------------------

@dataclass
class Host:
    name: str  # inventory name, also the device_id and the container's hostname
    index: int
    workdir: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def netns(self) -> str:
        return f"{PREFIX}-h{self.index}"

    @property
    def address(self) -> str:
        return f"{SUBNET}.{10 + self.index}"

    @property
    def root(self) -> Path:
        return self.workdir / "root"

    def leader_pid(self) -> int:
        assert self.proc is not None
        pid = container_init(self.proc.pid)
        if not pid:
            raise RuntimeError(f"{self.name}: the container has no init process")
        return pid

    def sh(self, command: str, check: bool = True, timeout: float = 60
           ) -> subprocess.CompletedProcess[str]:
        """A command inside the container (all its namespaces), as root."""
        return run("nsenter", "-t", str(self.leader_pid()), "-a", "/bin/sh", "-c", command,
                   check=check, timeout=timeout)


@dataclass
class Testbed:
    workdir: Path
    shared: Path
    hosts: list[Host] = field(default_factory=list)
    broker: subprocess.Popen[bytes] | None = None
    mqtt_password: str = ""
    leftovers: list[str] = field(default_factory=list)  # what `down` could not remove
    _lock_file: TextIO | None = None

    @property
    def controller_address(self) -> str:
        return f"{SUBNET}.1"

    @property
    def key(self) -> Path:
        return self.workdir / "id_ed25519"

    # -- lifecycle ------------------------------------------------------------------------

    def up(self, count: int = 2, lock_timeout: float = 1500) -> None:
        """Only one fleet at a time on a machine: the names and the subnet are fixed, and the
        leftover cleanup would pull the network from under a fleet that is still in use."""
        self._lock(lock_timeout)
        cleanup_leftovers()
        self.workdir.mkdir(parents=True, exist_ok=True)
        base = base_root()
        layer = fleet_layer(base)
        video = clip(self.shared / "data" / "faces")
        run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", self.key)
        self._network()
        self.mqtt_password = hashlib.sha256(os.urandom(16)).hexdigest()[:20]
        self._broker()
        for i in range(1, count + 1):
            host = Host(name=f"pi-h{i}", index=i, workdir=self.workdir / f"{PREFIX}-h{i}")
            self.hosts.append(host)
            self._container(host, base, layer, video)
        for host in self.hosts:
            self._wait_ssh(host)
        self._save()

    def down(self) -> None:
        """Stop and remove everything `up` made; safe to call twice or after a half `up`."""
        for host in self.hosts:
            if host.proc and host.proc.poll() is None:
                host.proc.send_signal(signal.SIGTERM)  # nspawn: an orderly poweroff
        for host in self.hosts:
            if host.proc:
                try:
                    host.proc.wait(30)
                except subprocess.TimeoutExpired:
                    host.proc.kill()
                    host.proc.wait(10)
        if self.broker and self.broker.poll() is None:
            self.broker.terminate()
            try:
                self.broker.wait(5)
            except subprocess.TimeoutExpired:
                self.broker.kill()
        for host in self.hosts:
            _umount(host.root)
        self.hosts.clear()
        if self._lock_file is not None:
            cleanup_leftovers()
            self.leftovers = leftovers()
            self._lock_file.close()  # releases the flock
            self._lock_file = None
        for host_dir in self.workdir.glob(f"{PREFIX}-h*"):
            shutil.rmtree(host_dir, ignore_errors=True)

    def _lock(self, timeout: float) -> None:
        CACHE.mkdir(parents=True, exist_ok=True)
        f = (CACHE / "fleet-testbed.lock").open("w")
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    f.close()
                    raise RuntimeError("another fleet testbed is still running") from None
                time.sleep(1)
        self._lock_file = f

    # -- pieces ---------------------------------------------------------------------------

    def _network(self) -> None:
        run("ip", "link", "add", BRIDGE, "type", "bridge")
        run("ip", "addr", "add", f"{self.controller_address}/24", "dev", BRIDGE)
        run("ip", "link", "set", BRIDGE, "up")

    def _broker(self) -> None:
        bdir = self.workdir / "broker"
        bdir.mkdir(exist_ok=True)
        pw = bdir / "passwd"
        run("mosquitto_passwd", "-c", "-b", pw, MQTT_USER, self.mqtt_password)
        pw.chmod(0o600)
        conf = bdir / "mosquitto.conf"
        conf.write_text(
            f"listener {BROKER_PORT} {self.controller_address}\n"
            "allow_anonymous false\n"
            f"password_file {pw}\n"
            "persistence false\n"
            "user root\n"
            f"log_dest file {bdir / 'mosquitto.log'}\n"
        )
        self.broker = subprocess.Popen(["mosquitto", "-c", str(conf)],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            probe = run("mosquitto_sub", "-h", self.controller_address, "-p", str(BROKER_PORT),
                        "-u", MQTT_USER, "-P", self.mqtt_password, "-t", "probe", "-W", "1",
                        "-C", "1", check=False)
            if probe.returncode == 27:  # connected, timed out waiting for a message
                return
            time.sleep(0.1)
        raise RuntimeError(f"mosquitto did not come up on {self.controller_address}")

    def _container(self, host: Host, base: Path, layer: Path, video: Path) -> None:
        ns, veth = host.netns, f"{PREFIX}-h{host.index}"
        run("ip", "netns", "add", ns)
        run("ip", "link", "add", f"{veth}a", "type", "veth", "peer", "name", f"{veth}b")
        run("ip", "link", "set", f"{veth}a", "master", BRIDGE, "up")
        run("ip", "link", "set", f"{veth}b", "netns", ns)
        run("ip", "-n", ns, "link", "set", f"{veth}b", "name", "eth0")
        run("ip", "-n", ns, "addr", "add", f"{host.address}/24", "dev", "eth0")
        run("ip", "-n", ns, "link", "set", "eth0", "up")
        run("ip", "-n", ns, "link", "set", "lo", "up")

        for d in ("upper", "work", "root"):
            (host.workdir / d).mkdir(parents=True, exist_ok=True)
        run("mount", "-t", "overlay", "overlay", "-o",
            f"lowerdir={layer}:{base},upperdir={host.workdir / 'upper'},"
            f"workdir={host.workdir / 'work'}", host.root)
        root = host.root
        (root / "etc/hostname").write_text(f"{host.name}\n")
        (root / "etc/hosts").write_text(f"127.0.0.1 localhost\n127.0.1.1 {host.name}\n")
        ssh_dir = root / "home/pi/.ssh"
        ssh_dir.mkdir(parents=True, exist_ok=True)
        (ssh_dir / "authorized_keys").write_text(self.key.with_suffix(".pub").read_text())
        uid_gid = run("chroot", root, "id", "-u", "pi").stdout.strip()
        for p in (ssh_dir, ssh_dir / "authorized_keys"):
            os.chown(p, int(uid_gid), int(uid_gid))
        ssh_dir.chmod(0o700)
        srv = root / "srv/edge-agent"
        srv.mkdir(parents=True, exist_ok=True)
        shutil.copy(video, srv / "clip.mp4")
        (srv / "clip.mp4").chmod(0o644)

        console = (host.workdir / "console.log").open("wb")
        host.proc = subprocess.Popen(
            ["systemd-nspawn", "-D", str(root), "-b", "--register=no", "--keep-unit",
             "--console=pipe", "--link-journal=no", f"--machine={PREFIX}-h{host.index}",
             f"--hostname={host.name}", f"--network-namespace-path=/run/netns/{ns}"],
            stdin=subprocess.DEVNULL, stdout=console, stderr=subprocess.STDOUT,
        )

    def _wait_ssh(self, host: Host, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if host.proc and host.proc.poll() is not None:
                raise RuntimeError(f"{host.name}: systemd-nspawn exited "
                                   f"{host.proc.returncode}; see {host.workdir}/console.log")
            r = run("ssh", *self.ssh_options(), f"pi@{host.address}", "true", check=False,
                    timeout=15)
            if r.returncode == 0:
                return
            time.sleep(0.5)
        raise RuntimeError(f"{host.name}: no ssh on {host.address} after {timeout} s")

    def ssh_options(self) -> list[str]:
        return ["-i", str(self.key), "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no",
                "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR",
                "-o", "ConnectTimeout=5"]

    def _save(self) -> None:
        state = {"hosts": [{"name": h.name, "index": h.index, "address": h.address,
                            "pid": h.proc.pid if h.proc else None} for h in self.hosts],
                 "broker_pid": self.broker.pid if self.broker else None,
                 "mqtt_password": self.mqtt_password}
        (self.workdir / "testbed.json").write_text(json.dumps(state, indent=1))


def _umount(path: Path) -> None:
    if os.path.ismount(path) and run("umount", path, check=False).returncode != 0:
        run("umount", "-l", path, check=False)


def cleanup_leftovers() -> None:
    """Remove links, namespaces and overlay mounts of ours that a dead run left behind; they
    are recognised by the `eaf` prefix and the overlay's host dirs, never by guesswork."""
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        mnt = line.split()[4]
        if re.search(rf"/{PREFIX}-h\d+/root$", mnt):
            _umount(Path(mnt))
    netns = run("ip", "netns", "list", check=False).stdout.split("\n")
    for line in netns:
        name = line.split(" ")[0]
        if name.startswith(f"{PREFIX}-h"):
            _kill_netns_processes(name)
            run("ip", "netns", "delete", name, check=False)
    links = run("ip", "-o", "link", "show", check=False).stdout.splitlines()
    for line in links:
        name = line.split(":")[1].strip().split("@")[0]
        if name.startswith(f"{PREFIX}-"):
            run("ip", "link", "delete", name, check=False)


def leftovers() -> list[str]:
    """Namespaces, links and mounts of ours that still exist."""
    found = [n.split(" ")[0] for n in run("ip", "netns", "list", check=False).stdout.splitlines()
             if n.startswith(f"{PREFIX}-")]
    found += [line.split(":")[1].strip().split("@")[0]
              for line in run("ip", "-o", "link", "show", check=False).stdout.splitlines()
              if line.split(":")[1].strip().startswith(f"{PREFIX}-")]
    found += [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()
              if re.search(rf"/{PREFIX}-h\d+/root$", line.split()[4])]
    return found


def _kill_netns_processes(name: str) -> None:
    """Processes still inside one of our namespaces (a container whose nspawn died)."""
    pids = run("ip", "netns", "pids", name, check=False).stdout.split()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("action", choices=("up", "down"))
    p.add_argument("--dir", type=Path, required=True)
    p.add_argument("--hosts", type=int, default=2)
    p.add_argument("--shared", type=Path, default=os.environ.get("EDGE_AGENT_SHARED"),
                   required="EDGE_AGENT_SHARED" not in os.environ,
                   help="research data folder with data/faces/ (default: $EDGE_AGENT_SHARED)")
    args = p.parse_args()
    bed = Testbed(args.dir.resolve(), args.shared.resolve())
    if args.action == "down":
        state = json.loads((args.dir / "testbed.json").read_text())
        for pid in [h["pid"] for h in state["hosts"]] + [state["broker_pid"]]:
            with contextlib.suppress(ProcessLookupError, TypeError):
                os.kill(pid, signal.SIGTERM)
        time.sleep(3)
        bed.hosts = [Host(h["name"], h["index"], args.dir / f"{PREFIX}-h{h['index']}")
                     for h in state["hosts"]]
        bed._lock(60)
        bed.down()
        if bed.leftovers:
            log(f"could not remove: {', '.join(bed.leftovers)}")
            return 1
        return 0
    try:
        bed.up(args.hosts)
    except BaseException:
        bed.down()
        raise
    print(json.dumps({"hosts": {h.name: h.address for h in bed.hosts},
                      "key": str(bed.key), "broker": f"{bed.controller_address}:{BROKER_PORT}",
                      "mqtt_password": bed.mqtt_password}))
    # The processes are our children: keep them by not exiting until told.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    signal.sigwait({signal.SIGTERM, signal.SIGINT})
    bed.down()
    return 0


if __name__ == "__main__":
    sys.exit(main())
