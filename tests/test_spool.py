"""The spool: seq rules from docs/contract.md, bounds, durability across reopen, threads."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from edge_agent import spool as spool_mod
from edge_agent.config import ConfigError, SpoolConfig
from edge_agent.spool import Spool, SpoolError


def open_spool(tmp_path: Path, **kw: object) -> Spool:
    return Spool(SpoolConfig(path=str(tmp_path / "sub" / "spool.db"), **kw))  # type: ignore[arg-type]


def test_seq_starts_at_1_without_gaps_and_is_stored_compact(tmp_path: Path) -> None:
    s = open_spool(tmp_path)
    assert [s.append({"type": "new", "n": i}) for i in range(5)] == [1, 2, 3, 4, 5]
    rows = s.pending(0, 10)
    assert [seq for seq, _ in rows] == [1, 2, 3, 4, 5]
    assert rows[0][1] == f'{{"type":"new","n":0,"spool_id":"{s.spool_id}","seq":1}}'
    assert len(s.spool_id) == 16
    assert s.pending(3, 10) == rows[3:] and s.pending(0, 2) == rows[:2]
    assert s.depth() == 5 and s.dropped() == 0
    s.close()


def test_seq_survives_reopen_even_when_emptied(tmp_path: Path) -> None:
    s = open_spool(tmp_path)
    for _ in range(3):
        s.append({"x": 1})
    s.ack(2)
    s.ack(2)
    s.ack(99)
    s.close()
    s = open_spool(tmp_path)
    assert s.depth() == 2 and [q for q, _ in s.pending(0, 10)] == [1, 3]
    s.ack(1)
    s.ack(3)
    assert s.depth() == 0
    s.close()
    s = open_spool(tmp_path)
    assert s.depth() == 0 and s.append({"x": 2}) == 4
    s.close()


def test_failed_append_uses_no_seq(tmp_path: Path) -> None:
    s = open_spool(tmp_path)
    assert s.append({"a": 1}) == 1
    with pytest.raises(ValueError):
        s.append({"a": float("nan")})
    with pytest.raises(TypeError):
        s.append({"a": object()})
    assert s.append({"a": 2}) == 2 and s.depth() == 2
    s.close()


def test_count_bound_drops_oldest_and_counts_durably(tmp_path: Path) -> None:
    s = open_spool(tmp_path, max_events=10)
    for i in range(15):
        s.append({"i": i})
    assert s.depth() == 10 and s.dropped() == 5
    assert [q for q, _ in s.pending(0, 100)] == list(range(6, 16))
    s.close()
    s = open_spool(tmp_path, max_events=10)
    assert s.dropped() == 5 and s.depth() == 10 and s.append({}) == 16
    assert s.dropped() == 6
    s.close()


class Clocks:
    """A settable wall clock and monotonic clock, as a Pi sees them."""

    def __init__(self, wall: float, mono: float = 1000.0) -> None:
        self.wall, self.mono = wall, mono

    def advance(self, s: float) -> None:
        self.wall += s
        self.mono += s

    def spool(self, tmp_path: Path, **kw: object) -> Spool:
        return Spool(SpoolConfig(path=str(tmp_path / "spool.db"), **kw),  # type: ignore[arg-type]
                     wall=lambda: self.wall, mono=lambda: self.mono)


SYNCED = 1_750_000_000.0  # a wall clock NTP has set


def seqs(s: Spool) -> list[int]:
    return [q for q, _ in s.pending(0, 1000)]


def test_age_bound_drops_old_events(tmp_path: Path) -> None:
    c = Clocks(SYNCED)
    s = c.spool(tmp_path, max_age_s=60.0)
    s.append({"i": 1})
    s.append({"i": 2})
    c.advance(30)
    s.append({"i": 3})
    c.advance(31)
    s.append({"i": 4})
    assert seqs(s) == [3, 4] and s.dropped() == 2 and s.depth() == 2
    s.close()


def test_clock_step_from_1970_drops_nothing(tmp_path: Path) -> None:
    """No RTC: the Pi boots at 1970 + uptime; NTP then steps the clock by 55 years."""
    c = Clocks(wall=40.0)
    s = c.spool(tmp_path, max_age_s=3600.0)
    for _ in range(3):
        c.advance(10)
        s.append({})
    c.wall = SYNCED
    c.advance(10)
    s.append({})
    assert seqs(s) == [1, 2, 3, 4] and s.dropped() == 0
    s.close()
    c.mono = 5.0  # rebooted, 1970 again, with the spool written partly before and after the step
    c.wall = 30.0
    s = c.spool(tmp_path, max_age_s=3600.0)
    s.append({})
    c.wall = SYNCED + 86400.0  # stepped during this run
    s.append({})
    assert seqs(s) == [1, 2, 3, 4, 5, 6] and s.dropped() == 0
    c.advance(3595.0)  # run time counts: 1-3 have now waited 3605-3625 s, 4 only 3595 s
    s.append({})
    assert seqs(s) == [4, 5, 6, 7] and s.dropped() == 3
    s.close()


def test_a_step_after_the_last_event_is_not_downtime(tmp_path: Path) -> None:
    """fake-hwclock: the Pi boots at its last shutdown time (plausible, but stale); NTP steps it
    10 days forward after the last event; the agent then stops and starts again at once."""
    c = Clocks(wall=SYNCED)
    s = c.spool(tmp_path, max_age_s=86400.0)
    s.append({})
    c.wall = SYNCED + 10 * 86400.0
    c.advance(5)
    s.close()
    c.mono = 1.0
    s = c.spool(tmp_path, max_age_s=86400.0)
    assert seqs(s) == [1] and s.dropped() == 0
    s.close()


def test_clock_step_backwards_drops_nothing_and_keeps_order(tmp_path: Path) -> None:
    c = Clocks(SYNCED + 10 * 86400.0)  # an RTC that ran fast, corrected by NTP
    s = c.spool(tmp_path, max_age_s=120.0)
    s.append({})
    c.wall -= 10 * 86400.0
    c.advance(60)
    s.append({})
    s.close()
    c.advance(30)  # a restart with the wall clock now behind the spool's last write
    s = c.spool(tmp_path, max_age_s=120.0)
    s.append({})
    assert seqs(s) == [1, 2, 3] and s.dropped() == 0
    c.advance(40)
    s.append({})
    assert seqs(s) == [2, 3, 4] and s.dropped() == 1
    s.close()


def test_downtime_counts_when_the_clock_is_plausible(tmp_path: Path) -> None:
    c = Clocks(SYNCED)
    s = c.spool(tmp_path, max_age_s=3600.0)
    s.append({})
    s.append({})
    s.close()
    c.wall += 7200.0  # off for two hours, with an RTC: the backlog aged meanwhile
    c.mono = 3.0
    s = c.spool(tmp_path, max_age_s=3600.0)
    assert s.depth() == 0 and s.dropped() == 2 and s.append({}) == 3
    s.close()


def test_ack_many_in_one_transaction(tmp_path: Path) -> None:
    s = open_spool(tmp_path)
    for _ in range(10):
        s.append({})
    s.ack_many([1, 2, 3, 3, 42])
    s.ack_many(iter([]))
    assert s.depth() == 7 and seqs(s) == list(range(4, 11))
    s.close()


def test_threads_append_and_ack_concurrently(tmp_path: Path) -> None:
    s = open_spool(tmp_path)
    seqs: list[int] = []
    done = threading.Event()

    def producer() -> None:
        for _ in range(150):
            seqs.append(s.append({"t": 1}))

    def acker() -> None:
        while not done.is_set():
            for q, _ in s.pending(0, 20):
                s.ack(q)

    threads = [threading.Thread(target=producer) for _ in range(4)]
    ack_thread = threading.Thread(target=acker)
    ack_thread.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done.set()
    ack_thread.join()
    assert sorted(seqs) == list(range(1, 601))
    left = [q for q, _ in s.pending(0, 1000)]
    assert s.depth() == len(left)
    assert all(json.loads(p)["seq"] == q for q, p in s.pending(0, 1000))
    s.close()


def test_unusable_path_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(SpoolError, match=r"^spool\.path: cannot open .*file/spool\.db"):
        Spool(SpoolConfig(path=str(tmp_path / "file" / "spool.db")))
    assert issubclass(SpoolError, ConfigError)


# --- faults: a second process, corruption, deletion, refusals ------------------------------


def test_a_second_process_on_one_spool_is_refused(tmp_path: Path) -> None:
    """Two real processes: the first holds the spool, the second gets a clear SpoolError."""
    path = tmp_path / "spool.db"
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time\nfrom edge_agent.config import SpoolConfig\n"
         "from edge_agent.spool import Spool\n"
         f"s = Spool(SpoolConfig(path={str(path)!r}))\nprint('open', flush=True)\n"
         "sys.stdin.read()\ns.close()\n"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "open\n"
        with pytest.raises(SpoolError, match=rf"in use by another edge-agent process "
                                             rf"\(pid {holder.pid}\)"):
            Spool(SpoolConfig(path=str(path)))
    finally:
        holder.communicate("", timeout=10)
    Spool(SpoolConfig(path=str(path))).close()  # free again once the holder is gone


def test_corrupt_spool_is_put_aside_and_a_new_one_started(tmp_path: Path,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "spool.db"
    junk = os.urandom(8192)
    path.write_bytes(junk)
    s = Spool(SpoolConfig(path=str(path)))
    assert s.append({"a": 1}) == 1 and s.depth() == 1
    aside = list(tmp_path.glob("spool.db.corrupt-*"))
    assert len(aside) == 1 and aside[0].read_bytes() == junk
    assert "was corrupt" in caplog.text and s.spool_id in caplog.text
    s.close()


def test_deleted_spool_is_noticed_and_a_new_spool_id_carries_the_backlog(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(spool_mod, "IDENTITY_CHECK_S", 0.0)
    path = tmp_path / "spool.db"
    s = Spool(SpoolConfig(path=str(path)))
    for i in range(3):
        s.append({"i": i})
    s.ack(1)
    old_id = s.spool_id
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    s.maintain()
    assert s.spool_id != old_id and path.exists()
    assert [q for q, _ in s.pending(0, 10)] == [2, 3] and s.depth() == 2
    assert s.append({"i": 3}) == 4
    assert json.loads(s.pending(3, 1)[0][1])["spool_id"] == s.spool_id
    s.close()
    s = Spool(SpoolConfig(path=str(path)))
    assert s.depth() == 3 and s.append({}) == 5
    s.close()


def test_refused_events_are_kept_counted_and_requeued(tmp_path: Path) -> None:
    s = open_spool(tmp_path)
    for i in range(5):
        s.append({"i": i})
    s.refuse_many([2, 4])
    s.ack_many([1])
    assert s.refused() == 2 and s.depth() == 2 and seqs(s) == [3, 5]
    assert s.requeue_refused() == 2
    assert s.refused() == 0 and s.depth() == 4 and seqs(s) == [2, 3, 4, 5]
    assert s.append({}) == 6
    s.close()


def test_full_disk_goes_to_memory_then_back(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A spool whose writes fail (here: the file made read-only under the open connection is
    not enough for SQLite, so the connection is swapped for one that cannot write)."""
    monkeypatch.setattr(spool_mod, "RETRY_DISK_S", 0.0)
    s = open_spool(tmp_path)
    s.append({"i": 0})
    good = s._db
    ro = sqlite3.connect(f"file:{tmp_path / 'sub' / 'spool.db'}?mode=ro", uri=True,
                         isolation_level=None, check_same_thread=False)
    s._db = ro
    disk_id = s.spool_id
    assert s.append({"i": 1}) == 2 and s.fault and s.spool_id != disk_id
    assert s.depth() == 2 and s.in_memory() == 1
    rows = s.pending(0, 10)
    assert [json.loads(p)["spool_id"] for _, p in rows] == [disk_id, s.spool_id]
    s.ack_many([rows[0][0]])  # the delete cannot be written: remembered, not resent
    assert s.depth() == 1 and [k for k, _ in s.pending(0, 10)] == [rows[1][0]]
    s.maintain()
    assert s.fault  # still read-only
    s._db = good
    ro.close()
    s.maintain()
    assert not s.fault and s.spool_id == disk_id and s.depth() == 1
    assert s.append({"i": 2}) == 2  # memory's seq had its own spool_id: no clash
    assert s.close() == 0
    s = open_spool(tmp_path)
    assert s.depth() == 2  # what memory still held went to disk at close


def test_spool_id_is_kept_with_the_spool_and_new_with_a_new_one(tmp_path: Path) -> None:
    s = open_spool(tmp_path)
    first = s.spool_id
    assert len(first) == 16
    s.close()
    s = open_spool(tmp_path)
    assert s.spool_id == first
    s.close()
    other = Spool(SpoolConfig(path=str(tmp_path / "other.db")))
    assert other.spool_id != first
    other.close()


def test_values_survive_a_restart(tmp_path: Path) -> None:
    s = open_spool(tmp_path)
    assert s.get_value("counts") is None
    s.put_value("counts", '{"people":1}')
    s.put_value("counts", '{"people":2}')
    s.close()
    s = open_spool(tmp_path)
    assert s.get_value("counts") == '{"people":2}'
    s.close()
