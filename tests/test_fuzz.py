"""Property tests: whatever a configuration file holds, `load` gives a Config or a ConfigError
naming the key or the file (the CLI: exit 2, no traceback); whatever arrives on the Home
Assistant status topic is either `online`/`offline` or ignored and counted."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import tempfile
import typing
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_agent import cli, config
from edge_agent.config import Config, ConfigError, MqttConfig, SpoolConfig
from edge_agent.mqtt import Publisher
from edge_agent.spool import Spool

FAST = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
VALID = {"device_id": "pi", "source": {"uri": "/dev/video0"}}


def _load_bytes(data: bytes) -> Config | ConfigError:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "edge-agent.yaml"
        path.write_bytes(data)
        try:
            return config.load(path)
        except ConfigError as e:
            return e


def _cli(data: bytes) -> tuple[int, str]:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "edge-agent.yaml"
        path.write_bytes(data)
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = cli.main(["check-config", "-c", str(path)])
        return code, err.getvalue()


@FAST
@given(st.binary(max_size=2000))
def test_any_bytes_load_or_fail_with_config_error(data: bytes) -> None:
    _load_bytes(data)  # anything but ConfigError escapes and fails the test


@FAST
@given(st.binary(max_size=300))
def test_any_bytes_through_the_cli_exit_0_or_2(data: bytes) -> None:
    code, err = _cli(data)
    assert code in (0, 2), err
    assert "Traceback" not in err


yaml_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30)
    | st.integers(min_value=10**300, max_value=10**400),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.text(max_size=12) | st.sampled_from(["source", "mqtt", "detect", "spool", "uri",
                                                "host", "port", "device_id", "memory"]),
        inner, max_size=4),
    max_leaves=25)


@FAST
@given(yaml_values)
def test_any_yaml_document_loads_or_names_a_key(doc: Any) -> None:
    result = _load_bytes(yaml.safe_dump(doc, allow_unicode=True).encode())
    if isinstance(result, ConfigError):
        assert str(result).split(":", 1)[0], result


def _leaves(cls: type, prefix: str = "") -> list[tuple[str, Any]]:
    hints = typing.get_type_hints(cls)
    out: list[tuple[str, Any]] = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out += _leaves(hints[f.name], f"{prefix}{f.name}.")
        else:
            out.append((f"{prefix}{f.name}", hints[f.name]))
    return out


LEAVES = _leaves(Config)
WRONG = {
    bool: st.integers() | st.text(max_size=5) | st.floats() | st.lists(st.booleans(), max_size=2),
    int: st.text(max_size=5) | st.floats() | st.booleans() | st.dictionaries(
        st.text(max_size=3), st.integers(), max_size=2),
    float: st.text(max_size=5) | st.booleans() | st.lists(st.floats(), min_size=1, max_size=2),
    str: st.integers() | st.floats() | st.booleans() | st.lists(st.text(max_size=3), max_size=2),
}


def _wrong_for(hint: Any) -> st.SearchStrategy[Any]:
    if typing.get_origin(hint) is tuple:  # a list in YAML, e.g. count.lines
        return st.integers() | st.text(max_size=5) | st.floats() | st.booleans()
    base = next((a for a in typing.get_args(hint) if a is not type(None)), hint)
    return WRONG[base]


@pytest.mark.parametrize(("key", "hint"), LEAVES, ids=[k for k, _ in LEAVES])
@settings(max_examples=15, deadline=None)
@given(data=st.data())
def test_a_wrong_type_in_every_key_is_named(key: str, hint: Any, data: st.DataObject) -> None:
    value = data.draw(_wrong_for(hint))
    doc: dict[str, Any] = {k: dict(v) if isinstance(v, dict) else v for k, v in VALID.items()}
    *parents, leaf = key.split(".")
    node = doc
    for p in parents:
        node = node.setdefault(p, {})
    node[leaf] = value
    result = _load_bytes(yaml.safe_dump(doc).encode())
    assert isinstance(result, ConfigError), (key, value)
    assert str(result).startswith(f"{key}: "), (key, value, str(result))


@pytest.mark.parametrize("data", [
    # the billion laughs: shared references, never expanded
    b"a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
    b"c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]\n"
    b"source: {uri: *d}\n",
    b"source: &s {uri: x, realtime: *s}\n",  # a cycle
    b"[" * 50_000,  # deeper than the parser's recursion
    b"device_id: " + b"x" * (2 << 20),  # larger than any configuration
    b"\xef\xbb\xbfdevice_id: pi\nsource: {uri: x}\n\xff",
    b"source: {uri: !!python/object/apply:os.system [true]}\n",
    b"%YAML 9.9\n---\na: 1\n",
    b"mqtt: {port: 1e400}\nsource: {uri: x}\n",
    b"source: {uri: x}\nmemory: {ceiling_mb: " + b"9" * 5000 + b"}\n",
])
def test_hostile_files_give_exit_2_naming_key_or_file(data: bytes) -> None:
    code, err = _cli(data)
    assert code == 2 and "Traceback" not in err, err
    assert "edge-agent: invalid configuration: " in err and len(err) < 2000, err


@pytest.fixture(scope="module")
def publisher(tmp_path_factory: pytest.TempPathFactory) -> typing.Iterator[Publisher]:
    spool = Spool(SpoolConfig(path=str(tmp_path_factory.mktemp("fuzz") / "spool.db")))
    yield Publisher(MqttConfig(), "edge-agent/pi", spool, start=False)
    spool.close()


@FAST
@given(payload=st.binary(max_size=5000), retain=st.booleans())
def test_anything_on_ha_status_but_online_offline_is_ignored_and_counted(
        publisher: Publisher, payload: bytes, retain: bool) -> None:
    msg = paho.MQTTMessage(topic=b"homeassistant/status")
    msg.payload, msg.retain = payload, retain
    ignored, asked = publisher.ignored, publisher._discovery_asked
    publisher._on_message(publisher._client, None, msg)
    expected = payload not in (b"online", b"offline")
    assert publisher.ignored == ignored + expected
    assert publisher._discovery_asked == asked + (payload == b"online" and not retain)
