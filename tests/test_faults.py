"""Stream faults against the whole agent: an RTSP server on loopback that dies and comes back,
hangs with its socket open, sends corrupt data, or changes resolution; a camera missing at start.
Each test measures how long after the server is back the agent delivers frames again (from the
retained `T/state`, every 0.5 s), with the default back-off. Below the agent, with a stand-in
V4L2 capture: a camera unplugged and plugged back, and a capture call that never returns.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from conftest import Broker, RtspServer, free_port
from test_capture import h264_clip
from test_e2e import Recorder
from test_service import Listener, clean_env

from edge_agent import capture
from edge_agent.capture import CameraSource
from edge_agent.config import SourceConfig

pytestmark = pytest.mark.slow

RECOVERY_LIMIT_S = 5.0


class Proxy:
    """A TCP forwarder in front of the RTSP server. `freeze()` stops forwarding in both
    directions and leaves every socket open (a hung server); `garble(True)` corrupts one byte in
    ~200 of what the server sends; `thaw()` drops the frozen connections and forwards anew."""

    def __init__(self, target_port: int) -> None:
        self.target = target_port
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.frozen = threading.Event()
        self.garbling = False
        self.garbled = 0
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target), timeout=2)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._conns += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, False),
                             daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, True),
                             daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, from_server: bool) -> None:
        rng = random.Random(1)
        try:
            while True:
                while self.frozen.is_set():
                    time.sleep(0.05)  # nothing read: the sender's buffers fill, as on a hang
                data = bytearray(src.recv(65536))
                if not data:
                    break
                if from_server and self.garbling:
                    for _ in range(max(1, len(data) // 200)):
                        data[rng.randrange(len(data))] ^= 0xFF
                        self.garbled += 1
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                s.close()

    def freeze(self) -> None:
        self.frozen.set()

    def thaw(self) -> None:
        with self._lock:
            conns, self._conns = self._conns, []
        for s in conns:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
        self.frozen.clear()

    def close(self) -> None:
        self.server.close()
        self.thaw()


class Agent:
    """`edge-agent run` on a stream, with the retained state read back from the broker."""

    def __init__(self, tmp_path: Path, models_dir: Path, broker: Broker, uri: str,
                 env: dict[str, str] | None = None, **source: Any) -> None:
        cfg = {
            "device_id": "test-pi", "camera": "hall",
            "source": {"uri": uri, "read_timeout_s": 2.0, **source},
            "models": {"dir": str(models_dir)},
            "mqtt": {"port": broker.port, "state_interval_s": 0.5},
            "spool": {"path": str(tmp_path / "spool.db")},
        }
        path = tmp_path / "agent.yaml"
        path.write_text(yaml.safe_dump(cfg))
        self.rec = Recorder(broker.port, "edge-agent/test-pi")
        self.proc = subprocess.Popen([sys.executable, "-m", "edge_agent", "run", "-c", str(path)],
                                     stderr=subprocess.PIPE, text=True,
                                     env=clean_env(**(env or {})))
        self.log: list[str] = []
        threading.Thread(target=self._read_log, daemon=True).start()

    def _read_log(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.log.append(line)

    def state(self) -> dict[str, Any]:
        return json.loads(self.rec.retained.get("state", "{}"))

    def wait(self, cond: Callable[[dict[str, Any]], bool], timeout: float, what: str) -> float:
        t0 = time.monotonic()
        ok = self.rec.wait_for(lambda: cond(self.state()), timeout)
        assert ok, f"{what}: not within {timeout} s; state {self.state()}\n" + \
            "".join(self.log[-20:])
        return time.monotonic() - t0

    def flowing(self, timeout: float = 30) -> int:
        """Waits until frames arrive; returns the frame count then."""
        self.wait(lambda s: s.get("source") == "open" and s.get("frames", 0) > 0, timeout,
                  "frames flowing")
        return self.state()["frames"]

    def recovered_after(self, t0: float, frames: int) -> float:
        """Seconds from t0 until the state shows an open source delivering new frames."""
        self.wait(lambda s: s.get("source") == "open" and s["frames"] > frames + 2, 15,
                  "recovery")
        return time.monotonic() - t0

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(15)
        finally:
            self.rec.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self.rec.close()


@pytest.fixture(scope="module")
def long_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return h264_clip(tmp_path_factory.mktemp("clip") / "clip.mp4", frames=900, fps=15)


@pytest.fixture
def rtsp(long_clip: Path) -> Iterator[RtspServer]:
    server = RtspServer(free_port(), long_clip)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def agent_on(tmp_path: Path, models_dir: Path, broker: Broker) -> Iterator[Callable[..., Agent]]:
    started: list[Agent] = []

    def start(uri: str, env: dict[str, str] | None = None, **source: Any) -> Agent:
        started.append(Agent(tmp_path, models_dir, broker, uri, env, **source))
        return started[-1]

    yield start
    for a in started:
        a.kill()


def test_server_dies_and_comes_back(rtsp: RtspServer, agent_on: Callable[..., Agent]) -> None:
    agent = agent_on(rtsp.url)
    agent.flowing()
    rtsp.stop()
    agent.wait(lambda s: s.get("source") == "reconnecting", 5, "reconnecting")
    time.sleep(6)  # long enough for the back-off to reach its ceiling
    frames = agent.state()["frames"]
    rtsp.start()
    took = agent.recovered_after(time.monotonic(), frames)
    print(f"server restart: frames again {took:.2f} s after it was back")
    assert took < RECOVERY_LIMIT_S
    s = agent.state()
    assert s["source_reconnects"] == 1 and s["source_error"]
    assert agent.stop() == 0


def test_server_hangs_without_closing(rtsp: RtspServer,
                                      agent_on: Callable[..., Agent]) -> None:
    proxy = Proxy(rtsp.port)
    try:
        agent = agent_on(f"rtsp://127.0.0.1:{proxy.port}/clip")
        agent.flowing()
        proxy.freeze()
        t_hang = time.monotonic()
        agent.wait(lambda s: s.get("source") == "reconnecting", 10, "hang noticed")
        noticed = time.monotonic() - t_hang
        why = agent.state()["source_error"]
        time.sleep(4)
        assert agent.state()["source"] != "open"
        frames = agent.state()["frames"]
        t0 = time.monotonic()
        proxy.thaw()
        took = agent.recovered_after(t0, frames)
    finally:
        proxy.close()
    print(f"hung server: noticed after {noticed:.2f} s (read_timeout_s 2), frames again "
          f"{took:.2f} s after it answered")
    assert noticed < 2.0 + 1.5
    assert took < RECOVERY_LIMIT_S
    assert "no frame for" in why or "blocked for more than" in why, why
    assert agent.stop() == 0


def test_server_sends_corrupt_data(rtsp: RtspServer, agent_on: Callable[..., Agent]) -> None:
    proxy = Proxy(rtsp.port)
    try:
        agent = agent_on(f"rtsp://127.0.0.1:{proxy.port}/clip")
        agent.flowing()
        proxy.garbling = True
        seen = set()
        t_end = time.monotonic() + 5
        while time.monotonic() < t_end:
            seen.add((agent.state()["source"], agent.state()["source_error"]))
            time.sleep(0.1)
        assert agent.proc.poll() is None, "corrupt data must not end the agent"
        assert proxy.garbled > 10
        print(f"while garbled: {proxy.garbled} bytes flipped, states {seen}")
        frames = agent.state()["frames"]
        t0 = time.monotonic()
        proxy.garbling = False
        proxy.thaw()  # whatever session the garbage left behind is dropped, as a server would
        took = agent.recovered_after(t0, frames)
    finally:
        proxy.close()
    print(f"corrupt stream: frames again {took:.2f} s after the data was clean")
    assert took < RECOVERY_LIMIT_S
    assert agent.stop() == 0


def _testsrc(path: Path, size: str, seconds: int) -> Path:
    """A raw H.264 (Annex B) test pattern, SPS in band: parts concatenate into one stream."""
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i",
                    f"testsrc=size={size}:rate=15", "-t", str(seconds), "-c:v", "libx264",
                    "-preset", "ultrafast", "-g", "15", "-pix_fmt", "yuv420p",
                    "-bsf:v", "h264_mp4toannexb", str(path)], check=True, timeout=60)
    return path


def _mp4(out: Path, *parts: Path) -> Path:
    raw = out.with_suffix(".h264")
    raw.write_bytes(b"".join(p.read_bytes() for p in parts))
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-r", "15", "-f", "h264", "-i", str(raw),
                    "-c", "copy", str(out)], check=True, timeout=60)
    return out


def test_resolution_change_mid_stream_keeps_frames_coming(
        tmp_path: Path, agent_on: Callable[..., Agent]) -> None:
    """OpenCV's FFmpeg reader keeps delivering the size the stream opened with (it scales),
    so a change within one session costs neither a reconnect nor a frame."""
    clip = _mp4(tmp_path / "sizes.mp4", _testsrc(tmp_path / "a.h264", "320x240", 6),
                _testsrc(tmp_path / "b.h264", "480x360", 6))
    server = RtspServer(free_port(), clip)
    server.start()
    try:
        agent = agent_on(server.url)
        agent.flowing()
        time.sleep(7)  # past the switch at 6 s
        s = agent.state()
        assert s["source"] == "open" and s["source_reconnects"] == 0, s
        assert s["fps"] > 10, s
    finally:
        server.stop()
    assert agent.stop() == 0


def test_resolution_change_with_a_new_session(tmp_path: Path, long_clip: Path,
                                              agent_on: Callable[..., Agent]) -> None:
    """A camera reconfigured to another size restarts its stream: the agent reconnects, the
    frames come at the new size and the pipeline ends the open tracks on the change."""
    port = free_port()
    server = RtspServer(port, long_clip)
    server.start()
    agent = agent_on(server.url)
    try:
        agent.flowing()
        server.stop()
        agent.wait(lambda s: s.get("source") == "reconnecting", 5, "reconnecting")
        frames = agent.state()["frames"]
        server = RtspServer(port, _mp4(tmp_path / "big.mp4",
                                       _testsrc(tmp_path / "big.h264", "480x360", 30)))
        t0 = time.monotonic()
        server.start()
        took = agent.recovered_after(t0, frames)
    finally:
        server.stop()
    print(f"new session at a new size: frames again after {took:.2f} s")
    assert took < RECOVERY_LIMIT_S
    assert "frame size changed from (320, 240) to (480, 360)" in "".join(agent.log)
    assert agent.stop() == 0


def test_camera_missing_at_start(agent_on: Callable[..., Agent]) -> None:
    """Not a failed start: READY comes, saying what is being retried."""
    notify = Listener(f"@edge-agent-faults-{os.getpid()}")
    try:
        agent = agent_on("/dev/video9", env={"NOTIFY_SOCKET": notify.address})
        notify.wait_for("READY=1", 30)
        agent.wait(lambda s: s.get("source") == "connecting", 30, "state published")
        time.sleep(2)
        s = agent.state()
        assert agent.proc.poll() is None
        assert s["source"] == "connecting" and s["source_error"] == "no such device", s
        assert agent.stop() == 0
        ready = next(m for _, m in notify.messages() if "READY=1" in m.split("\n"))
    finally:
        notify.close()
    assert "STATUS=0.0 fps, 0 faces" in ready and "source connecting (no such device)" in ready
    assert sum("no such device" in line for line in agent.log) == 1, "one line, not one a try"


# --- below the agent: a stand-in V4L2 device ------------------------------------------------


class FakeCapture:
    """cv2.VideoCapture's grab/retrieve/release, fed by a FakeDevice."""

    def __init__(self, device: FakeDevice) -> None:
        self.device = device
        self.grabbed: tuple[bool, np.ndarray | None] = (False, None)

    def grab(self) -> bool:
        self.grabbed = self.device.read()
        return self.grabbed[0]

    def retrieve(self, image: np.ndarray | None = None) -> tuple[bool, np.ndarray | None]:
        return self.grabbed

    def get(self, prop: int) -> float:
        return -1.0  # no property, timestamps included, as a driver that offers none

    def release(self) -> None:
        self.device.released += 1


class FakeDevice:
    """A camera that can be unplugged (reads fail, the node vanishes) and can hang a read."""

    def __init__(self) -> None:
        self.plugged = True
        self.hang = threading.Event()  # set: reads block until `unhang`
        self.unhang = threading.Event()
        self.released = 0
        self.opens = 0

    def read(self) -> tuple[bool, np.ndarray | None]:
        if self.hang.is_set():
            self.unhang.wait()
        time.sleep(1 / 30)
        if not self.plugged:
            return False, None
        return True, np.zeros((48, 64, 3), np.uint8)


def _camera(monkeypatch: pytest.MonkeyPatch, device: FakeDevice, **cfg: Any) -> CameraSource:
    def fake_open(self: CameraSource) -> FakeCapture:
        if not device.plugged:
            raise OSError("no such device")
        device.opens += 1
        return FakeCapture(device)

    monkeypatch.setattr(CameraSource, "_open", fake_open)
    return CameraSource(replace(SourceConfig(uri="/dev/video0", read_timeout_s=1.0), **cfg))


def _frames_within(src: CameraSource, timeout: float) -> float | None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if src.read(0.1) is not None:
            return time.monotonic() - t0
    return None


def test_camera_unplugged_and_plugged_back(monkeypatch: pytest.MonkeyPatch) -> None:
    device = FakeDevice()
    src = _camera(monkeypatch, device)
    try:
        assert _frames_within(src, 2) is not None and src.state == "open"
        device.plugged = False
        t0 = time.monotonic()
        while src.state == "open" and time.monotonic() - t0 < 3:
            src.read(0.1)
        assert src.state == "reconnecting" and src.reconnects == 1
        time.sleep(5)  # the back-off reaches its ceiling
        assert src.last_error == "no such device"
        device.plugged = True
        took = _frames_within(src, 10)
    finally:
        src.close()
    print(f"camera plugged back: frames again after {took:.2f} s")
    assert took is not None and took < RECOVERY_LIMIT_S
    assert device.released >= 1


def test_a_capture_call_that_never_returns_is_abandoned(monkeypatch: pytest.MonkeyPatch) -> None:
    device = FakeDevice()
    src = _camera(monkeypatch, device, read_timeout_s=0.5, reconnect_min_s=0.05,
                  reconnect_max_s=0.1)
    try:
        assert _frames_within(src, 2) is not None
        device.hang.set()  # every read from now on blocks
        t0 = time.monotonic()
        while src.state == "open" and time.monotonic() - t0 < 3:
            src.read(0.1)
        assert src.state == "reconnecting", src.state
        assert "blocked for more than 1.0 s" in (src.last_error or ""), src.last_error
        noticed = time.monotonic() - t0
        while src.state != "hung" and time.monotonic() - t0 < 10:
            src.read(0.1)
        assert src.state == "hung", "three stuck readers, then no more threads"
        assert len([t for t in threading.enumerate() if t.name == "capture:/dev/video0"]) == \
            capture._MAX_STUCK_READERS
        device.hang.clear()
        device.unhang.set()  # the driver comes back: stuck calls return, their threads end
        took = _frames_within(src, 5)
        assert took is not None and src.state == "open"
    finally:
        t_close = time.monotonic()
        src.close()
        assert time.monotonic() - t_close < 1.5
    print(f"stuck read abandoned after {noticed:.2f} s; frames again {took:.2f} s after the "
          f"driver returned")
    time.sleep(0.3)
    assert device.released == device.opens, "every capture released by its own thread"
