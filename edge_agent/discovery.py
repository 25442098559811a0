"""Home Assistant MQTT discovery: the agent shows up as one device with a few sensors.

Every sensor reads the retained ``T/state`` snapshot through a ``value_template``, so no extra
topics or publishes per frame are needed (each counting line adds an `in` and an `out` sensor
that read the retained ``T/counts``); availability follows the retained ``T/status``
(``online``, and ``offline`` as Last Will). The config messages are retained, sent on every
connect and again whenever Home Assistant announces ``online`` on ``{prefix}/status`` (it
forgets non-retained discovery when it restarts).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass

from edge_agent import __version__


@dataclass(frozen=True)
class Sensor:
    key: str  # the field of the T/state snapshot
    name: str
    icon: str
    unit: str | None = None
    state_class: str | None = None
    device_class: str | None = None
    diagnostic: bool = False
    topic: str = "state"  # the retained topic under T it reads
    template: str = ""  # default: the snapshot field `key`


SENSORS: tuple[Sensor, ...] = (
    Sensor("tracks", "Faces in view", "mdi:face-recognition", "faces", "measurement"),
    Sensor("people_today", "People today", "mdi:account-group", "people", "total_increasing"),
    Sensor("last_gender", "Last gender", "mdi:gender-male-female"),
    Sensor("last_age", "Last age", "mdi:account-clock", "years", "measurement"),
    Sensor("fps", "Frame rate", "mdi:speedometer", "fps", "measurement", diagnostic=True),
    Sensor("rss_mb", "Memory (RSS)", "mdi:memory", "MiB", "measurement", "data_size",
           diagnostic=True),
    Sensor("pace", "Keeping up", "mdi:speedometer-slow", diagnostic=True),  # ok / behind
)


def node_id(device_id: str) -> str:
    """Discovery topic levels and ids allow only ``[a-zA-Z0-9_-]``."""
    return re.sub(r"[^a-zA-Z0-9_-]", "_", device_id)


def line_sensors(lines: Sequence[str]) -> list[Sensor]:
    """Today's `in` and `out` of each counting line, from ``T/counts``."""
    return [Sensor(f"line_{name}_{d}", f"{name} {d} today", icon, "people", "total_increasing",
                   topic="counts", template=f"{{{{ value_json.lines['{name}']['{d}'] }}}}")
            for name in lines for d, icon in (("in", "mdi:login"), ("out", "mdi:logout"))]


def config_topics(prefix: str, device_id: str, lines: Sequence[str] = ()) -> list[str]:
    node = node_id(device_id)
    return [f"{prefix}/sensor/{node}/{s.key}/config" for s in (*SENSORS, *line_sensors(lines))]


def messages(prefix: str, base_topic: str, device_id: str,
             lines: Sequence[str] = ()) -> list[tuple[str, str]]:
    """(topic, compact JSON) for every sensor's retained discovery config."""
    node = node_id(device_id)
    device = {"identifiers": [f"edge_agent_{node}"], "name": f"edge-agent {device_id}",
              "manufacturer": "edge-agent", "model": "edge-agent", "sw_version": __version__}
    out = []
    sensors = (*SENSORS, *line_sensors(lines))
    for topic, s in zip(config_topics(prefix, device_id, lines), sensors, strict=True):
        cfg: dict[str, object] = {
            "name": s.name,
            "unique_id": f"edge_agent_{node}_{s.key}",
            "state_topic": f"{base_topic}/{s.topic}",
            "value_template": s.template or f"{{{{ value_json.{s.key} }}}}",
            "availability_topic": f"{base_topic}/status",
            "payload_available": "online",
            "payload_not_available": "offline",
            "icon": s.icon,
            "device": device,
            "origin": {"name": "edge-agent", "sw_version": __version__},
        }
        if s.unit:
            cfg["unit_of_measurement"] = s.unit
        if s.state_class:
            cfg["state_class"] = s.state_class
        if s.device_class:
            cfg["device_class"] = s.device_class
        if s.diagnostic:
            cfg["entity_category"] = "diagnostic"
        out.append((topic, json.dumps(cfg, separators=(",", ":"))))
    return out
