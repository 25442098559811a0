"""Command line: `edge-agent run|check-config|models|demo|bench`; exit codes: docs/contract.md."""

from __future__ import annotations

import argparse
import faulthandler
import importlib
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from edge_agent import __version__, config, models, openssl, redact

EXIT_OK, EXIT_CONFIG, EXIT_MODEL = 0, 2, 3


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return int(args.func(args))
    except config.ConfigError as e:
        print(f"edge-agent: invalid configuration: {redact.redact(str(e))}", file=sys.stderr)
        return EXIT_CONFIG
    except models.ModelError as e:
        print(f"edge-agent: {e}", file=sys.stderr)
        return EXIT_MODEL
    except _NoDevtools as e:
        print(f"edge-agent: {e}", file=sys.stderr)
        return EXIT_CONFIG


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edge-agent", description=__doc__)
    p.add_argument("--version", action="version", version=f"edge-agent {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run the agent")
    run.add_argument("-c", "--config", required=True, help="YAML configuration file")
    run.set_defaults(func=_run)

    check = sub.add_parser("check-config", help="validate a configuration and print it")
    check.add_argument("-c", "--config", required=True)
    check.set_defaults(func=_check_config)

    m = sub.add_parser("models", help="fetch, verify or list the model files")
    m.add_argument("action", choices=("fetch", "verify", "list"))
    m.add_argument("--dir", help="models directory (default: models.dir from --config)")
    m.add_argument("-c", "--config", help="take the directory and the needed models from here")
    m.add_argument("--from", dest="mirror", help="a directory or URL holding the model files")
    m.add_argument("--all", action="store_true", help="every model in the manifest")
    m.set_defaults(func=_models)

    demo = sub.add_parser("demo", help="run on the sample clip and print the events")
    demo.add_argument("--source", help="a camera, stream or file instead of the sample clip")
    demo.add_argument("--scene", action="store_true",
                      help="a generated multi-person scene scored against its ground truth "
                           "(needs the research face data: --shared or EDGE_AGENT_SHARED)")
    demo.add_argument("--shared", default=None,
                      help="research data folder with data/faces/ (default: $EDGE_AGENT_SHARED)")
    demo.add_argument("--people", type=int, default=6, help="people in the --scene")
    demo.set_defaults(func=_demo)

    bench = sub.add_parser("bench", help="measure CPU per frame, fps and peak RSS")
    bench.add_argument("--shared", default=None,
                       help="research data folder with data/faces/ (default: $EDGE_AGENT_SHARED)")
    bench.add_argument("--clip", help="a video file instead of the generated scene")
    bench.add_argument("--people", type=int, default=30)
    bench.add_argument("--seed", type=int, default=11, help="which generated scene")
    bench.add_argument("--modes", default="decode,agent,naive")
    bench.add_argument("--every-n", type=int, default=None)
    bench.add_argument("--scene", choices=("busy", "quiet"), default="busy",
                       help="generated scene: busy (30 people) or quiet door (mostly empty)")
    bench.add_argument("--size", default=None,
                       help="WxH: the busy scene scaled to this size, e.g. 1920x1080")
    bench.add_argument("--no-b-frames", dest="b_frames", action="store_false",
                       help="with --size: encode I and P frames only, as IP cameras usually do")
    bench.add_argument("--rounds", type=int, default=1,
                       help="run the modes this many times in turn and compare their median CPU "
                            "(single runs of the same mode can differ by 10-30 %%)")
    bench.set_defaults(func=_bench)
    return p


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _run(args: argparse.Namespace) -> int:
    """SIGTERM/SIGINT stop cleanly, SIGHUP reloads the file; a watchdog's SIGABRT dumps every
    thread's stack (faulthandler) into the log, which shows where the loop hung."""
    cfg = config.load(args.config)
    if not cfg.mqtt.tls:
        openssl.keep_out()
    from edge_agent import agent, service

    service.setup_logging(cfg.log_level, {"DEVICE": cfg.device_id, "CAMERA": cfg.camera})
    redact.install()
    faulthandler.enable()
    stop, reload = threading.Event(), threading.Event()
    with SignalRelay(stop, reload):
        return agent.run(cfg, stop, reload, args.config)


class SignalRelay:
    """Signals in, Events out, with nothing but async-signal-safe work in between.

    A handler that calls ``Event.set()`` takes the Event's lock; a signal arriving while the
    main thread holds that lock (in ``clear()`` or ``wait()``) deadlocked the agent under a SIGHUP
    storm. Here the C-level handler writes the signal number to a non-blocking pipe
    (``signal.set_wakeup_fd``), the Python-level handler only sets a flag, and a thread reads the
    pipe and sets the Events. A full pipe can drop bytes, never the flags: SIGTERM is not lost.
    """

    def __init__(self, stop: threading.Event, reload: threading.Event) -> None:
        self._stop, self._reload = stop, reload
        self._term = self._hup = False
        self._r, self._w = os.pipe()
        os.set_blocking(self._w, False)
        self._closed = False
        self._old_fd = -1
        self._thread = threading.Thread(target=self._relay, name="signals", daemon=True)

    def _on_term(self, signum: int, frame: Any) -> None:
        self._term = True

    def _on_hup(self, signum: int, frame: Any) -> None:
        self._hup = True

    def __enter__(self) -> SignalRelay:
        self._old_fd = signal.set_wakeup_fd(self._w, warn_on_full_buffer=False)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_term)
        signal.signal(signal.SIGHUP, self._on_hup)
        self._thread.start()
        return self

    def _relay(self) -> None:
        while True:
            try:
                data = os.read(self._r, 512)
            except OSError:
                return
            if self._closed or not data:
                return
            signums = set(data)
            if self._term or signal.SIGTERM in signums or signal.SIGINT in signums:
                self._stop.set()
            if self._hup or signal.SIGHUP in signums:
                self._hup = False
                self._reload.set()

    def __exit__(self, *exc: object) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)  # stopping already: a late one must not kill it
        signal.set_wakeup_fd(self._old_fd)
        self._closed = True
        os.close(self._w)  # the relay thread reads EOF and ends
        self._thread.join(1.0)
        os.close(self._r)


def _check_config(args: argparse.Namespace) -> int:
    from edge_agent import mqtt

    cfg = config.load(args.config)
    mqtt.password(cfg.mqtt)  # local files only: a missing or world-readable one is an error now
    if cfg.mqtt.tls:
        mqtt.tls_context(cfg.mqtt)
    print(redact.redact(f"{args.config}: ok (device {cfg.device_id}, camera {cfg.camera}, "
                        f"source {cfg.source.uri}, broker {cfg.mqtt.host}:{cfg.mqtt.port}, "
                        f"topics {config.topic_base(cfg)}/...)"))
    return EXIT_OK


def _models(args: argparse.Namespace) -> int:
    """Without -c, the default pipeline's models (or every model with --all)."""
    mdir = args.dir
    names = None if args.all else models.required_models(config.DetectConfig().backend, True)
    if args.config:
        cfg = config.load(args.config)
        mdir = mdir or cfg.models.dir
        if not args.all:
            names = models.required_models(cfg.detect.backend, cfg.classify.enabled)
    if not mdir:
        print("edge-agent models: give --dir DIR or -c FILE", file=sys.stderr)
        return EXIT_CONFIG
    if args.action == "list":
        for entry, state in models.status(mdir):
            print(f"{entry.name:36} {entry.size:>10} {state:8} {entry.license}")
        return EXIT_OK
    if args.action == "fetch":
        for name in models.fetch(mdir, names, args.mirror, say=print):
            print(f"fetched {Path(mdir) / name}")
    models.verify(mdir, names)
    print(f"{mdir}: models ok")
    return EXIT_OK


class _NoDevtools(Exception):
    """The development package is not installed (a wheel on a Pi)."""


def _devtool(name: str) -> Any:
    """`demo` and `bench` live in the development package beside a checkout, not in the wheel."""
    try:
        return importlib.import_module(f"devtools.{name}")
    except ModuleNotFoundError as e:
        if e.name not in ("devtools", f"devtools.{name}"):
            raise
        raise _NoDevtools(f"`edge-agent {name}` needs the development package `devtools`, which "
                          "comes with a checkout of the repository, not with the wheel; run it "
                          "from a checkout (make demo / make bench)") from None


def _demo(args: argparse.Namespace) -> int:
    demo = _devtool("demo")
    _setup_logging("warning")
    return int(demo.main(args.source, args.shared, args.people, args.scene))


def _bench(args: argparse.Namespace) -> int:
    bench = _devtool("bench")
    return bench.main(args.shared, args.clip, args.people, args.seed, args.modes.split(","),
                      args.every_n, args.scene, args.size, args.b_frames, args.rounds)
