"""The dashboard example in docs/ parses and names only entities that discovery creates."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

from edge_agent import discovery

CARD = Path(__file__).resolve().parent.parent / "docs" / "dashboard-counts.yaml"


def entities(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["entity"]] if isinstance(node.get("entity"), str) else []
        return found + [e for v in node.values() for e in entities(v)]
    if isinstance(node, list):
        return [e for v in node for e in entities(v)]
    return []


def slug(text: str) -> str:
    """Home Assistant's entity id from "device name" + "entity name" (has_entity_name)."""
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


def test_dashboard_card_is_valid_yaml_and_uses_discovered_sensors() -> None:
    card = yaml.safe_load(CARD.read_text())
    assert card["type"] == "vertical-stack" and all("type" in c for c in card["cards"])
    made = set()
    for _, payload in discovery.messages("homeassistant", "edge-agent/pi-kitchen-01",
                                         "pi-kitchen-01", ["door"]):
        cfg = json.loads(payload)
        made.add(f"sensor.{slug(cfg['device']['name'] + ' ' + cfg['name'])}")
    used = entities(card)
    assert used and set(used) <= made, sorted(set(used) - made)
    assert "sensor.edge_agent_pi_kitchen_01_door_in_today" in used


def test_line_sensors_read_the_counts_topic() -> None:
    msgs = dict(discovery.messages("ha", "edge-agent/pi", "pi", ["door"]))
    cfg = json.loads(msgs["ha/sensor/pi/line_door_out/config"])
    assert cfg["state_topic"] == "edge-agent/pi/counts"
    assert cfg["value_template"] == "{{ value_json.lines['door']['out'] }}"
    assert cfg["state_class"] == "total_increasing"
    assert len(msgs) == len(discovery.SENSORS) + 2
