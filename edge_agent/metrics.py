"""Metrics without a port: the `T/state` figures as a Prometheus node_exporter textfile
(`metrics.textfile`), rewritten atomically at every state interval. node_exporter's textfile
collector reads `*.prom` files from one folder; a temporary file in that folder renamed over
the old one means it never reads half a file. Under the systemd unit the folder must be made
writable (`ReadWritePaths=`)."""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Mapping
from typing import Any

log = logging.getLogger(__name__)

PREFIX = "edge_agent_"
# Figures that only grow while the process lives; Prometheus handles their reset at a restart.
COUNTERS = frozenset({"frames", "memory_sheds", "source_reconnects", "spool_dropped",
                      "events_lost", "reconnects"})
# Text states, exported as one series per state with the value 1.
STATES = ("source", "broker", "memory", "pace")


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render(state: Mapping[str, Any], device: str, camera: str) -> str:
    """The exposition format: numeric fields as gauges (counters for COUNTERS), STATES as
    `edge_agent_<key>_state{state="..."} 1`, all labelled with device and camera."""
    labels = f'device="{_label(device)}",camera="{_label(camera)}"'
    lines: list[str] = []
    for key, value in state.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        kind = "counter" if key in COUNTERS else "gauge"
        name = PREFIX + key + ("_total" if kind == "counter" else "")
        lines += [f"# HELP {name} T/state field {key}.", f"# TYPE {name} {kind}",
                  f"{name}{{{labels}}} {value}"]
    for key in STATES:
        if isinstance(state.get(key), str):
            name = f"{PREFIX}{key}_state"
            lines += [f"# HELP {name} T/state field {key}: the current state has the value 1.",
                      f"# TYPE {name} gauge",
                      f'{name}{{{labels},state="{_label(state[key])}"}} 1']
    return "\n".join(lines) + "\n"


class Textfile:
    """Writes the textfile; a failing write is logged once per distinct error, never raised:
    metrics must not stop the frame loop."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._last_error: str | None = None

    def write(self, state: Mapping[str, Any], device: str, camera: str) -> bool:
        folder = os.path.dirname(os.path.abspath(self.path))
        tmp = None
        try:
            fd, tmp = tempfile.mkstemp(prefix=".edge-agent-", suffix=".tmp", dir=folder)
            with os.fdopen(fd, "w") as f:
                f.write(render(state, device, camera))
            os.chmod(tmp, 0o644)
            os.replace(tmp, self.path)
        except OSError as e:
            if tmp:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
            if e.strerror != self._last_error:
                log.warning("metrics.textfile %s not written: %s", self.path, e.strerror,
                            extra={"ERROR_KIND": "metrics"})
                self._last_error = e.strerror
            return False
        self._last_error = None
        return True
