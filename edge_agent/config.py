"""Typed configuration: YAML in, frozen dataclasses out, validated once.

Each field may carry bounds in its metadata (``min``, ``max``, ``choices``); the loader checks
types and bounds and raises :class:`ConfigError` naming the key path, e.g.
``detect.every_n_frames: expected an integer >= 1, got 'five'``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import socket
import types
import typing
from collections.abc import Sized
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import yaml

from edge_agent import redact


class ConfigError(ValueError):
    """An invalid configuration; the message starts with the key path."""


def _opt(default: Any, **meta: Any) -> Any:
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class SourceConfig:
    uri: str = ""
    realtime: bool = True
    loop: bool = False
    width: int | None = _opt(None, min=16)
    height: int | None = _opt(None, min=16)
    fps: float | None = _opt(None, min=0.1)
    fourcc: str | None = _opt(None, length=4)
    open_timeout_s: float = _opt(5.0, min=0.1)
    read_timeout_s: float = _opt(5.0, min=0.1)
    reconnect_min_s: float = _opt(0.5, min=0.01)
    reconnect_max_s: float = _opt(2.0, min=0.01)  # a stream that is back is read within ~3 s
    # Wider frames are scaled down once, right after capture (null: never); see performance.md.
    max_width: int | None = _opt(1280, min=160)


@dataclass(frozen=True)
class DetectConfig:
    backend: str = _opt("yunet", choices=("yunet", "ultraface"))
    every_n_frames: int = _opt(5, min=1)
    width: int = _opt(320, min=64)
    score_threshold: float = _opt(0.7, min=0.0, max=1.0)
    nms_threshold: float = _opt(0.3, min=0.0, max=1.0)
    min_face_px: int = _opt(20, min=1)
    motion: MotionConfig = field(default_factory=lambda: MotionConfig())


@dataclass(frozen=True)
class TrackConfig:
    match_iou: float = _opt(0.2, min=0.0, max=1.0)
    max_unseen_s: float = _opt(1.0, min=0.0)
    confirm_hits: int = _opt(2, min=1)
    optical_flow: bool = True


@dataclass(frozen=True)
class ClassifyConfig:
    enabled: bool = True
    samples: int = _opt(3, min=1, max=10)
    window: int = _opt(8, min=1, max=50)
    min_face_px: int = _opt(40, min=8)


@dataclass(frozen=True)
class ModelsConfig:
    dir: str = "/var/lib/edge-agent/models"


@dataclass(frozen=True)
class MqttConfig:
    host: str = "127.0.0.1"
    port: int = _opt(1883, min=1, max=65535)
    topic_prefix: str = "edge-agent"
    client_id: str = ""
    protocol: str = _opt("3.1.1", choices=("3.1.1", "5"))
    keepalive_s: int = _opt(30, min=5, max=65535)  # MQTT's Keep Alive is a 16-bit field
    username: str | None = None
    password_file: str | None = None
    password_credential: str = "mqtt-password"
    tls: bool = False
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    tls_insecure: bool = False
    discovery: bool = True
    discovery_prefix: str = "homeassistant"
    state_interval_s: float = _opt(10.0, min=0.5)
    drain_timeout_s: float = _opt(10.0, min=0.0)
    max_inflight: int = _opt(20, min=1, max=1000)
    reconnect_min_s: float = _opt(0.5, min=0.1)
    reconnect_max_s: float = _opt(30.0, min=0.1)


@dataclass(frozen=True)
class SpoolConfig:
    path: str = "/var/lib/edge-agent/spool.db"
    max_events: int = _opt(100_000, min=10)
    max_age_s: float = _opt(7 * 86400.0, min=60.0)


@dataclass(frozen=True)
class MemoryConfig:
    ceiling_mb: float = _opt(200.0, min=32.0)
    soft_fraction: float = _opt(0.85, min=0.1, max=1.0)
    check_interval_s: float = _opt(1.0, min=0.05)


@dataclass(frozen=True)
class LineConfig:
    """A counting line; `a` and `b` are fractions of the frame's width and height (0..1)."""

    name: str = _opt("", pattern=r"[a-z0-9_-]+")
    a: tuple[float, float] = _opt((0.0, 0.0), min=0.0, max=1.0)
    b: tuple[float, float] = _opt((0.0, 0.0), min=0.0, max=1.0)


@dataclass(frozen=True)
class CountConfig:
    """Counting lines (reloaded live: counting carries on with the new lines)."""

    lines: tuple[LineConfig, ...] = ()


@dataclass(frozen=True)
class MetricsConfig:
    """`textfile`: a node_exporter textfile (`*.prom`) rewritten with the `T/state` figures
    every `mqtt.state_interval_s`; null = none. Takes effect at the next start."""
    textfile: str | None = None


@dataclass(frozen=True)
class Config:
    device_id: str = ""
    camera: str = "default"
    log_level: str = _opt("info", choices=("debug", "info", "warning", "error"))
    threads: int = _opt(1, min=1, max=64)
    source: SourceConfig = field(default_factory=SourceConfig)
    detect: DetectConfig = field(default_factory=DetectConfig)
    track: TrackConfig = field(default_factory=TrackConfig)
    classify: ClassifyConfig = field(default_factory=ClassifyConfig)
    models: ModelsConfig = field(default_factory=ModelsConfig)
    mqtt: MqttConfig = field(default_factory=MqttConfig)
    spool: SpoolConfig = field(default_factory=SpoolConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    count: CountConfig = field(default_factory=CountConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)


_TOPIC_LEVEL_FORBIDDEN = set("#+/\0")
MAX_CONFIG_BYTES = 1 << 20  # a configuration is a few KB; more is a mistake or an attack
MAX_NAME_BYTES = 128  # device_id, camera: they end up in topics, client ids, track ids
MAX_PREFIX_BYTES = 512  # topic prefixes; any topic then stays far below MQTT's 65535 bytes
MAX_SHOWN = 80  # characters of an offending value quoted in an error message


def load(path: str | os.PathLike[str]) -> Config:
    """Read and validate a YAML file; relative paths in it resolve against the file's folder.
    Whatever the file holds, the only exception is ConfigError (naming the key or the file)."""
    p = Path(path)
    try:
        with p.open("rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{p}: cannot read: {getattr(e, 'strerror', None) or e}") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{p}: larger than {MAX_CONFIG_BYTES} bytes; not a configuration")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: not UTF-8 text (byte {e.start})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {_clip(str(e))}") from None
    except (RecursionError, MemoryError, ValueError, TypeError, OverflowError) as e:
        raise ConfigError(f"{p}: not valid YAML: {type(e).__name__}") from None
    if isinstance(data, dict) and isinstance(data.get("source"), dict):
        redact.remember_uri(data["source"].get("uri"))
    try:
        return from_dict(data if data is not None else {}, base_dir=p.resolve().parent)
    except ConfigError:
        raise
    except (RecursionError, ValueError, TypeError, OverflowError, OSError) as e:
        raise ConfigError(f"{p}: unusable content: {_clip(str(e))}") from None


def from_dict(data: Any, base_dir: Path | None = None) -> Config:
    if not isinstance(data, dict):
        raise ConfigError(f"(top level): expected a mapping, got {_show(data)}")
    cfg = _build(Config, data, "")
    cfg = _apply_env(cfg)
    _check_semantics(cfg)
    return _resolve_paths(cfg, base_dir) if base_dir else cfg


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            known = ", ".join(sorted(fields))
            plain = isinstance(key, str) and key and key.strip() == key and ":" not in key
            name = key if plain else repr(key)  # the message reads "KEY: ..."
            raise ConfigError(f"{prefix}{_clip(name)}: unknown key (known here: {known})")
    values: dict[str, Any] = {}
    for name, f in fields.items():
        if name not in data:
            continue
        path = f"{prefix}{name}"
        hint = hints[name]
        raw = data[name]
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            if raw is None:
                raw = {}
            if not isinstance(raw, dict):
                raise ConfigError(f"{path}: expected a mapping, got {_show(raw)}")
            values[name] = _build(hint, raw, path + ".")
        elif typing.get_origin(hint) is tuple:
            values[name] = _build_tuple(hint, raw, path, f.metadata)
        else:
            values[name] = _convert(hint, raw, path, f.metadata)
    return cls(**values)


def _build_tuple(hint: Any, raw: Any, path: str, meta: typing.Mapping[str, Any]) -> Any:
    """A list of mappings (`tuple[Dataclass, ...]`) or a fixed-length point (`tuple[float,
    float]`); items are named `path[i]`."""
    args = typing.get_args(hint)
    if not isinstance(raw, list):
        raise ConfigError(f"{path}: expected a list, got {_show(raw)}")
    if len(args) == 2 and args[1] is Ellipsis:
        out = []
        for i, item in enumerate(raw):
            if not isinstance(item, dict):
                raise ConfigError(f"{path}[{i}]: expected a mapping, got {_show(item)}")
            out.append(_build(args[0], item, f"{path}[{i}]."))
        return tuple(out)
    if len(raw) != len(args):
        raise ConfigError(f"{path}: expected a list of {len(args)} numbers, got {raw!r}")
    return tuple(_convert(a, v, f"{path}[{i}]", meta)
                 for i, (a, v) in enumerate(zip(args, raw, strict=True)))


def _convert(hint: Any, raw: Any, path: str, meta: typing.Mapping[str, Any]) -> Any:
    args = typing.get_args(hint)
    optional = isinstance(hint, types.UnionType) and type(None) in args
    base = next((a for a in args if a is not type(None)), hint) if optional else hint
    if raw is None:
        if optional:
            return None
        raise ConfigError(f"{path}: expected {_describe(base, meta)}, got null")
    ok = (
        (base is bool and isinstance(raw, bool))
        or (base is int and isinstance(raw, int) and not isinstance(raw, bool))
        or (base is float and isinstance(raw, int | float) and not isinstance(raw, bool))
        or (base is str and isinstance(raw, str))
    )
    value: Any = raw
    try:
        value = float(raw) if ok and base is float else raw
    except OverflowError:  # an integer with hundreds of digits
        ok, value = False, raw
    if ok and base is str and ("\0" in value or not _utf8(value)):
        ok = False
    if ok and base is float and not math.isfinite(value):
        ok = False
    if ok and "min" in meta and value < meta["min"]:
        ok = False
    if ok and "max" in meta and value > meta["max"]:
        ok = False
    if ok and "choices" in meta and value not in meta["choices"]:
        ok = False
    if ok and "length" in meta and len(cast(Sized, value)) != meta["length"]:
        ok = False
    if ok and "pattern" in meta and not re.fullmatch(meta["pattern"], str(value)):
        ok = False
    if not ok:
        raise ConfigError(f"{path}: expected {_describe(base, meta)}, got {_show(raw)}")
    return value


def _describe(base: Any, meta: typing.Mapping[str, Any]) -> str:
    if "choices" in meta:
        return "one of " + ", ".join(repr(c) for c in meta["choices"])
    word = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}[base]
    if "length" in meta:
        word += f" of {meta['length']} characters"
    if "pattern" in meta:
        word += f" matching {meta['pattern']}"
    lo, hi = meta.get("min"), meta.get("max")
    if lo is not None and hi is not None:
        word += f" from {lo} to {hi}"
    elif lo is not None:
        word += f" >= {lo}"
    elif hi is not None:
        word += f" <= {hi}"
    return word


def _show(raw: Any) -> str:
    if isinstance(raw, dict):
        return "a mapping"
    if isinstance(raw, list):
        return "a list"
    if isinstance(raw, int) and not isinstance(raw, bool) and abs(raw) > 10**30:
        return f"an integer of about {int(raw.bit_length() * math.log10(2)) + 1} digits"
    return _clip(repr(raw))


def _clip(text: str) -> str:
    return text if len(text) <= MAX_SHOWN else text[:MAX_SHOWN] + f"... ({len(text)} characters)"


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates, which YAML's escapes can make
        return False
    return True


def _apply_env(cfg: Config) -> Config:
    """Let the environment override what fleets set per host or keep secret."""
    mqtt = cfg.mqtt
    env = os.environ
    if env.get("EDGE_AGENT_MQTT_HOST"):
        mqtt = dataclasses.replace(mqtt, host=env["EDGE_AGENT_MQTT_HOST"])
    if env.get("EDGE_AGENT_MQTT_PORT"):
        port = _convert(int, _int_or_str(env["EDGE_AGENT_MQTT_PORT"]), "EDGE_AGENT_MQTT_PORT",
                        {"min": 1, "max": 65535})
        mqtt = dataclasses.replace(mqtt, port=port)
    if env.get("EDGE_AGENT_MQTT_USERNAME"):
        mqtt = dataclasses.replace(mqtt, username=env["EDGE_AGENT_MQTT_USERNAME"])
    device_id = env.get("EDGE_AGENT_DEVICE_ID") or cfg.device_id or socket.gethostname()
    return dataclasses.replace(cfg, mqtt=mqtt, device_id=device_id)


def _int_or_str(s: str) -> int | str:
    try:
        return int(s)
    except ValueError:
        return s


def _check_semantics(cfg: Config) -> None:
    if not cfg.source.uri:
        raise ConfigError("source.uri: expected a device, stream URL or file path, got nothing")
    if (not cfg.device_id or _TOPIC_LEVEL_FORBIDDEN & set(cfg.device_id)
            or not _utf8(cfg.device_id)):
        raise ConfigError(f"device_id: expected a non-empty name without '#', '+', '/', "
                          f"got {_show(cfg.device_id)}")
    _check_lengths(cfg)
    prefix = cfg.mqtt.topic_prefix
    if not prefix or prefix.startswith("/") or prefix.endswith("/") or set("#+\0") & set(prefix):
        raise ConfigError(f"mqtt.topic_prefix: expected topic levels without '#', '+' or a "
                          f"leading or trailing '/', got {_show(prefix)}")
    _check_mqtt(cfg.mqtt)
    if not cfg.camera:
        raise ConfigError("camera: expected a non-empty label, got ''")
    for section in ("source", "mqtt"):
        lo, hi = getattr(cfg, section).reconnect_min_s, getattr(cfg, section).reconnect_max_s
        if hi < lo:
            raise ConfigError(f"{section}.reconnect_max_s: expected a number >= "
                              f"{section}.reconnect_min_s ({lo}), got {hi}")
    _check_lines(cfg.count)
    if cfg.classify.window < cfg.classify.samples:
        raise ConfigError(
            f"classify.window: expected an integer >= classify.samples ({cfg.classify.samples}), "
            f"got {cfg.classify.window}"
        )
    textfile = cfg.metrics.textfile
    if textfile is not None and not textfile.endswith(".prom"):
        raise ConfigError(f"metrics.textfile: expected a path ending in .prom (node_exporter "
                          f"reads only those), got {textfile!r}")


def _check_lines(c: CountConfig) -> None:
    seen: set[str] = set()
    for i, line in enumerate(c.lines):
        key = f"count.lines[{i}]"
        if not line.name:
            raise ConfigError(f"{key}.name: expected a name matching [a-z0-9_-]+, got nothing")
        if line.name in seen:
            raise ConfigError(f"{key}.name: expected a unique name, got {line.name!r} again")
        seen.add(line.name)
        if line.a == line.b:
            raise ConfigError(f"{key}.b: expected a point other than a (a zero-length line), "
                              f"got {list(line.b)}")


def _check_lengths(cfg: Config) -> None:
    """What MQTT and the topics allow: a 70,000-character device_id passed every other check and
    then killed paho's network thread at the first publish."""
    for key, value, limit in (("device_id", cfg.device_id, MAX_NAME_BYTES),
                              ("camera", cfg.camera, MAX_NAME_BYTES),
                              ("mqtt.client_id", cfg.mqtt.client_id, MAX_NAME_BYTES * 2),
                              ("mqtt.topic_prefix", cfg.mqtt.topic_prefix, MAX_PREFIX_BYTES),
                              ("mqtt.discovery_prefix", cfg.mqtt.discovery_prefix,
                               MAX_PREFIX_BYTES),
                              ("mqtt.host", cfg.mqtt.host, 253),
                              ("mqtt.username", cfg.mqtt.username or "", 1024)):
        size = len(value.encode("utf-8", "replace"))
        if size > limit:
            raise ConfigError(f"{key}: expected at most {limit} bytes, got {size}")


def _check_mqtt(m: MqttConfig) -> None:
    """Combinations the per-key checks cannot see."""
    if not m.host or m.host != m.host.strip() or set(m.host) & set(" /\t\n\r"):
        raise ConfigError(f"mqtt.host: expected a host name or address, got {_show(m.host)}")
    p = m.discovery_prefix
    if not p or p.startswith("/") or p.endswith("/") or set("#+\0") & set(p):
        raise ConfigError(f"mqtt.discovery_prefix: expected topic levels without '#', '+' or a "
                          f"leading or trailing '/', got {_show(p)}")
    if m.password_credential in ("", ".", "..") or "/" in m.password_credential:
        raise ConfigError(f"mqtt.password_credential: expected a credential (file) name, "
                          f"got {m.password_credential!r}")
    if bool(m.cert_file) != bool(m.key_file):
        have, missing = ("cert_file", "key_file") if m.cert_file else ("key_file", "cert_file")
        raise ConfigError(f"mqtt.{missing}: expected a file to go with mqtt.{have} "
                          f"(a client certificate needs its key), got nothing")
    if not m.tls:
        for key in ("ca_file", "cert_file", "key_file", "tls_insecure"):
            if getattr(m, key):
                raise ConfigError(f"mqtt.tls: expected true when mqtt.{key} is set, got false")


def _resolve_paths(cfg: Config, base: Path) -> Config:
    def rel(p: str | None) -> str | None:
        return p if p is None or os.path.isabs(p) else str(base / p)

    src = cfg.source
    uri = src.uri
    if "://" not in uri and not uri.startswith("/dev/"):
        uri = rel(uri) or uri
    return dataclasses.replace(
        cfg,
        source=dataclasses.replace(src, uri=uri),
        models=dataclasses.replace(cfg.models, dir=rel(cfg.models.dir) or cfg.models.dir),
        spool=dataclasses.replace(cfg.spool, path=rel(cfg.spool.path) or cfg.spool.path),
        mqtt=dataclasses.replace(cfg.mqtt, password_file=rel(cfg.mqtt.password_file),
                                 ca_file=rel(cfg.mqtt.ca_file), cert_file=rel(cfg.mqtt.cert_file),
                                 key_file=rel(cfg.mqtt.key_file)),
        metrics=dataclasses.replace(cfg.metrics, textfile=rel(cfg.metrics.textfile)),
    )


def topic_base(cfg: Config) -> str:
    return f"{cfg.mqtt.topic_prefix}/{cfg.device_id}"


@dataclass(frozen=True)
class MotionConfig:
    """`detect.motion`: while no face is tracked, run the detector only when something moves
    (edge_agent/motion.py). Reload rebuilds the pipeline."""
    enabled: bool = True
    width: int = _opt(160, min=32, max=640)  # grey copy compared with the background, px
    threshold: float = _opt(20.0, min=1.0, max=255.0)  # grey levels a pixel must change by
    min_area: float = _opt(0.002, min=0.0, max=1.0)  # fraction of the picture that must change
    crop: bool = True  # detect around tracked faces and what moves (tracked: full every 5th)
