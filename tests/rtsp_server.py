"""A tiny RTSP server for tests: an H.264 mp4 file or a live test pattern on 127.0.0.1.

Run it with Debian's python3 (the one that has `gi`):

    /usr/bin/python3 tests/rtsp_server.py --port 8554 --mount /cam [--file clip.mp4]

It prints ``READY rtsp://127.0.0.1:PORT/MOUNT`` once it listens and exits 0 on SIGTERM or SIGINT.
Every client gets its own session, so a file plays from its start on each connection.
"""

from __future__ import annotations

import argparse
import signal
import sys

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import GLib, Gst, GstRtspServer  # noqa: E402


def launch_line(args: argparse.Namespace) -> str:
    pay = "rtph264pay name=pay0 pt=96 config-interval=1"
    if args.file:
        location = args.file.replace("\\", "\\\\").replace('"', '\\"')
        return f'( filesrc location="{location}" ! qtdemux ! h264parse ! {pay} )'
    caps = f"video/x-raw,width={args.width},height={args.height},framerate={args.fps}/1"
    return (
        f"( videotestsrc is-live=true ! {caps} ! x264enc tune=zerolatency "
        f"speed-preset=ultrafast key-int-max={args.fps} ! {pay} )"
    )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--mount", default="/stream", help="path of the stream, e.g. /cam")
    p.add_argument("--file", help="an mp4 with H.264 video; default: a live videotestsrc")
    p.add_argument("--width", type=int, default=320)
    p.add_argument("--height", type=int, default=240)
    p.add_argument("--fps", type=int, default=15)
    args = p.parse_args()

    Gst.init(None)
    server = GstRtspServer.RTSPServer()
    server.set_address("127.0.0.1")
    server.set_service(str(args.port))
    factory = GstRtspServer.RTSPMediaFactory()
    factory.set_launch(launch_line(args))
    factory.set_shared(False)
    mount = "/" + args.mount.lstrip("/")
    server.get_mount_points().add_factory(mount, factory)
    if not server.attach(None):
        print(f"cannot listen on 127.0.0.1:{args.port}", file=sys.stderr)
        return 1

    loop = GLib.MainLoop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        GLib.unix_signal_add(GLib.PRIORITY_DEFAULT, sig, loop.quit)
    print(f"READY rtsp://127.0.0.1:{args.port}{mount}", flush=True)
    loop.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
