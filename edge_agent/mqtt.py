"""MQTT delivery: the spool drained to the broker in order, at least once, never blocking.

Topics under ``T = base_topic``: ``T/events`` (QoS 1), ``T/status`` (retained ``online`` /
``offline``, the latter also the Last Will) and ``T/state`` (retained health snapshot).
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode

from edge_agent.config import ConfigError, MqttConfig
from edge_agent.spool import Spool

log = logging.getLogger(__name__)

PASSWORD_ENV = "EDGE_AGENT_MQTT_PASSWORD"
_RESERVE = 8  # paho queue slots that events may not take: status and state must still fit


def _compact(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"))


def _password(cfg: MqttConfig) -> str | None:
    if not cfg.password_file:
        return os.environ.get(PASSWORD_ENV)
    try:
        return Path(cfg.password_file).read_text(encoding="utf-8").rstrip("\r\n")
    except OSError as e:
        raise ConfigError(
            f"mqtt.password_file: cannot read {cfg.password_file}: {e.strerror or e}") from None


class Publisher:
    """Sends spooled events to ``T/events`` and keeps ``T/status`` and ``T/state`` current.

    paho's network thread does all I/O. A sender thread owns the window of in-flight events
    (mid -> seq): paho runs ``on_publish`` under its own message lock, which ``publish()`` also
    takes, so callbacks only queue and wake, and nothing waits on a lock across a paho call.
    Each (re)connect restarts from the oldest unacknowledged event: order is kept, and what
    was in flight is sent again (paho also resends its own copies: duplicates, never gaps).
    """

    def __init__(self, cfg: MqttConfig, base_topic: str, spool: Spool) -> None:
        self._cfg = cfg
        self._spool = spool
        self._t_events = f"{base_topic}/events"
        self._t_status = f"{base_topic}/status"
        self._t_state = f"{base_topic}/state"
        self._window = cfg.max_inflight
        self._queue_max = 2 * self._window + _RESERVE
        self._inflight: dict[int, int] = {}  # sender thread only
        self._cursor = 0  # highest seq sent in the current session
        self._acks: queue.SimpleQueue[tuple[int, bool]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._count_lock = threading.Lock()
        self._outstanding = 0  # messages paho holds until acknowledged, all topics
        self._session = 0
        self._connected = False
        self._stopping = False
        self._reconnects = 0
        self._warned_rejects = False

        c = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=cfg.client_id or base_topic.replace("/", "-"),
            protocol=mqtt.MQTTv5 if cfg.protocol == "5" else mqtt.MQTTv311,
        )
        c.max_inflight_messages_set(self._window)
        c.max_queued_messages_set(self._queue_max)
        c.reconnect_delay_set(cfg.reconnect_min_s, cfg.reconnect_max_s)
        c.will_set(self._t_status, "offline", qos=1, retain=True)
        password = _password(cfg)
        if cfg.username:
            c.username_pw_set(cfg.username, password)
        elif password:
            log.warning("mqtt: a password is set but no mqtt.username; connecting without both")
        c.on_connect = self._on_connect
        c.on_connect_fail = self._on_connect_fail
        c.on_disconnect = self._on_disconnect
        c.on_publish = self._on_publish
        self._client = c
        self._sender = threading.Thread(target=self._run, name="mqtt-sender", daemon=True)
        self._sender.start()
        c.connect_async(cfg.host, cfg.port, keepalive=cfg.keepalive_s)
        c.loop_start()

    @property
    def connected(self) -> bool:
        return self._connected

    @property
    def reconnects(self) -> int:
        """Successful connects after the first one."""
        return self._reconnects

    @property
    def inflight(self) -> int:
        return len(self._inflight)

    def publish_event(self, event: dict[str, Any]) -> int:
        """Spool `event` and wake the sender; returns its ``seq``. Disk only, no network wait."""
        seq = self._spool.append(event)
        self._wake.set()
        return seq

    def publish_state(self, state: dict[str, Any]) -> None:
        """Retained snapshot; dropped while offline since a newer one will follow."""
        if self._connected and self._outstanding < self._queue_max - _RESERVE // 2:
            self._send(self._t_state, _compact(state), retain=True)

    def drain(self, timeout: float) -> bool:
        """Wait up to `timeout` s until the broker has acknowledged every spooled event."""
        deadline = time.monotonic() + timeout
        while self._spool.depth() > 0:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            time.sleep(min(0.02, left))
        return True

    def stop(self, timeout: float = 2.0) -> None:
        """Announce ``offline``, disconnect cleanly; unacknowledged events stay spooled."""
        if self._stopping:
            return
        self._stopping = True
        self._wake.set()
        self._sender.join(timeout)
        if self._connected:
            info = self._send(self._t_status, "offline", retain=True)
            if info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS:
                info.wait_for_publish(timeout)
        self._client.disconnect()
        self._client.loop_stop()
        if not self._sender.is_alive():
            self._apply_acks()

    def _send(self, topic: str, payload: str, retain: bool = False) -> mqtt.MQTTMessageInfo:
        with self._count_lock:
            self._outstanding += 1
        info = self._client.publish(topic, payload, qos=1, retain=retain)
        if info.rc == MQTTErrorCode.MQTT_ERR_QUEUE_SIZE:
            with self._count_lock:
                self._outstanding -= 1
        return info

    def _run(self) -> None:
        session = 0
        while not self._stopping:
            self._wake.wait(1.0)
            self._wake.clear()
            try:
                session = self._pump(session)
            except Exception:
                log.exception("mqtt sender failed; retrying in 1 s")
                time.sleep(1.0)

    def _pump(self, session: int) -> int:
        """Apply acks, then fill the window from the spool, oldest first."""
        self._apply_acks()
        current = self._session
        if current != session:
            self._inflight.clear()
            self._cursor = 0
        room = min(self._window - len(self._inflight),
                   self._queue_max - _RESERVE - self._outstanding)
        if not self._connected or self._stopping or room <= 0:
            return current
        for seq, payload in self._spool.pending(self._cursor, room):
            info = self._send(self._t_events, payload)
            if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                break
            self._inflight[info.mid] = seq
            self._cursor = seq
        return current

    def _apply_acks(self) -> None:
        while True:
            try:
                mid, failed = self._acks.get_nowait()
            except queue.Empty:
                break
            seq = self._inflight.pop(mid, None)
            if seq is None:
                continue
            if failed and not self._warned_rejects:
                self._warned_rejects = True
                log.warning("mqtt broker rejected event seq %d; not retried", seq)
            self._spool.ack(seq)

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any,
                    properties: Any) -> None:
        if reason.is_failure:
            log.error("mqtt %s:%d refused the connection: %s; retrying with back-off",
                      self._cfg.host, self._cfg.port, reason)
            return
        self._send(self._t_status, "online", retain=True)
        if self._session:
            self._reconnects += 1
        self._session += 1
        self._connected = True
        self._warned_rejects = False
        log.info("mqtt connected to %s:%d", self._cfg.host, self._cfg.port)
        self._wake.set()

    def _on_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        log.warning("mqtt cannot reach %s:%d; retrying with back-off",
                    self._cfg.host, self._cfg.port)

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any,
                       properties: Any) -> None:
        was, self._connected = self._connected, False
        if was and not self._stopping:
            log.warning("mqtt connection to %s:%d lost: %s", self._cfg.host, self._cfg.port,
                        reason)
        self._wake.set()

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason: Any,
                    properties: Any) -> None:
        with self._count_lock:
            self._outstanding -= 1
        self._acks.put((mid, reason.is_failure))
        self._wake.set()
