"""Test-only entry point for the systemd watchdog test, copied into the container: the normal
`edge-agent` command line, except that the frame source's read() blocks for good after
STALL_AFTER_S (the first argument) seconds, as a camera call stuck on the loop's thread would.

    python systemd_stall.py 4 run -c /etc/edge-agent/edge-agent.yaml
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from typing import Any

from edge_agent import agent, cli


def stall_after(after_s: float, open_source: Any) -> Any:
    def opened(*args: Any, **kwargs: Any) -> Any:
        source = open_source(*args, **kwargs)
        read, at = source.read, time.monotonic() + after_s

        def read_or_stall(timeout: float, image: bool = True) -> Any:
            if time.monotonic() >= at:
                logging.getLogger("edge_agent.test").warning("stalling the frame loop now")
                threading.Event().wait()
            return read(timeout, image)

        source.read = read_or_stall
        return source

    return opened


if __name__ == "__main__":
    after = float(sys.argv.pop(1))
    agent._open_source = stall_after(after, agent._open_source)
    sys.exit(cli.main())
