"""Store-and-forward queue for events: SQLite, one file, survives crashes and power cuts.

Every event is written here before it is sent, and deleted only when the broker has
acknowledged it, so a broker outage or a restart loses nothing (up to the bounds).

Durability: WAL, ``synchronous=FULL`` for appends and ``NORMAL`` for acks. An append assigns
``seq``; under NORMAL a power cut can undo the last commits after their events reached the
broker, and the next start would hand out those ``seq`` again, which consumers then drop as
repeats. FULL syncs the WAL on each commit, so a ``seq`` once returned is never reused. A lost
ack only causes a resend (delivery is at least once anyway), so acks skip the sync, and a
draining backlog commits them in batches. Measured per call on the dev host (ext4, virtio
disk): append 0.2-0.3 ms with FULL vs 0.04 ms with NORMAL; ack 0.02 ms with NORMAL vs
0.15-0.25 ms with FULL.
A Pi's SD card pays more per sync (roughly 1-10 ms), still small next to face events, which
come a few per second at most.

Age bound and clock steps: a Pi has no real-time clock. It boots in 1970 (or, with
fake-hwclock, at its last shutdown time) and NTP later steps the clock by years or weeks. Ages
measured by ``time.time()`` would then make the whole backlog look ancient at once and drop it.
So ages are measured on the spool's own clock, stored in ``created``: it advances with
``time.monotonic()`` while the agent runs (immune to steps) and is saved with every append,
ack and clean stop. Across a restart it also advances by the wall-clock downtime, but only when
the clock readings at the last write and at the new start are both plausible (after 2020) and
in order; otherwise downtime counts as zero. A wrong clock can thus only keep events longer
(the count bound still holds), never drop them early. An event is dropped by age once it has
waited ``max_age_s`` on this clock.

Faults (docs/operations.md): one process per spool (``flock`` on ``PATH.lock``; a second one
gets SpoolError, exit 2). A file that is not a database is renamed aside
(``PATH.corrupt-YYYYmmddTHHMMSS``, never deleted) and a new spool started. A disk that is full,
read-only or failing, at start or later, switches appends to a bounded in-memory queue; every
few seconds the spool tries the disk again and goes back to it when it can write. Events in
memory carry a ``spool_id`` of their own (the memory is a spool too), so ``(device, spool_id,
seq)`` stays unique whatever happens to them. A spool file deleted or replaced under the running
agent is noticed (its identity is compared now and then): its unacknowledged events are copied
into a new spool, with a new ``spool_id``. Refused events (the broker said no: MQTT 5 reason
codes) move to a bounded ``refused`` table, counted, and go back to the queue at the next connect.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import secrets
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from edge_agent.config import ConfigError, SpoolConfig

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY, created REAL NOT NULL, payload TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS refused (
    seq INTEGER PRIMARY KEY, created REAL NOT NULL, payload TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS ident (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
INSERT OR IGNORE INTO meta VALUES ('last_seq', 0), ('dropped', 0), ('runs', 0);
"""
PLAUSIBLE_WALL = 1_577_836_800.0  # 2020-01-01: a wall clock earlier than this was never set
MEMORY_EVENTS = 2000  # the in-memory fallback queue's bound (~1 MB of events)
MAX_REFUSED = 1000  # refused events kept for a retry; beyond, the oldest are dropped (counted)
RETRY_DISK_S = 5.0  # while on the memory queue, try the disk this often
IDENTITY_CHECK_S = 10.0  # compare the spool file's identity this often
MAX_VALUES = 16  # small values kept with the spool (the day's counts)
WAL_PAGES = 64  # checkpoint the WAL at ~256 KB, and truncate it back to that
_MEMORY_KEY = 1 << 60  # keys of events in memory sort after every key on disk
_DISK_FAULTS = {errno.ENOSPC, errno.EROFS, errno.EIO, errno.EDQUOT}


class SpoolError(ConfigError):
    """The spool file cannot be used; a ConfigError so the CLI reports ``spool.path``."""


def _disk_fault(e: BaseException) -> bool:
    """Full, read-only or failing: a fault a later write may not have, not a wrong path."""
    if isinstance(e, OSError):
        return e.errno in _DISK_FAULTS
    text = str(e).lower()
    return any(w in text for w in ("disk", "readonly", "read-only", "full", "i/o"))


def _corrupt(e: BaseException) -> bool:
    text = str(e).lower()
    return isinstance(e, sqlite3.DatabaseError) and ("not a database" in text
                                                      or "malformed" in text)


class Spool:
    """Durable FIFO of compact JSON events keyed by ``seq``; safe to share between threads."""

    def __init__(self, cfg: SpoolConfig, wall: Callable[[], float] = time.time,
                 mono: Callable[[], float] = time.monotonic) -> None:
        self._cfg = cfg
        self._wall = wall
        self._mono = mono
        self._lock = threading.Lock()
        self._warned_full = False
        self._path = Path(cfg.path)
        self._db: sqlite3.Connection | None = None
        self._identity: tuple[int, int] | None = None
        self._depth = 0
        self._last_seq = 0
        self._spool_id = ""
        self._memory: deque[tuple[int, str]] = deque()  # (key, payload), oldest first
        self._memory_id = ""  # spool_id of the events in memory
        self._memory_seq = 0
        self._memory_key = _MEMORY_KEY
        self._memory_dropped = 0
        self._values: dict[str, str] = {}  # get_value/put_value, also while the disk fails
        self._unapplied_acks: set[int] = set()  # acked, not yet deleted from a failing disk
        self._fault = ""  # why appends go to memory; "" while on disk
        self._next_retry = 0.0
        self._next_identity = 0.0
        self.generation = 0  # bumped when keys may have moved: senders start over
        self._clock0, self._mono0 = wall(), mono()
        self._lockfile = self._take_lock()
        try:
            self._open()
        except SpoolError:
            os.close(self._lockfile)
            raise

    # --- opening --------------------------------------------------------------------------

    def _take_lock(self) -> int:
        """One process per spool: two agents on one file stole each other's client id."""
        lock = Path(f"{self._path}.lock")
        try:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as e:
            if _disk_fault(e):
                log.error("spool %s: cannot create its lock file (%s); running without it",
                          self._path, e)
                return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
            raise SpoolError(f"spool.path: cannot open {self._path}: {e}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise SpoolError(f"spool.path: {self._path} is in use by another edge-agent "
                             f"process (pid {holder}); give each agent its own spool") from None
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError:
            pass  # a full disk: the lock holds without the pid in it
        return fd

    def _open(self) -> None:
        """Open (or create) the file; corrupt: aside and anew; disk fault: memory for now."""
        try:
            self._connect()
        except sqlite3.DatabaseError as e:
            if not _corrupt(e):
                self._open_failed(e)
                return
            aside = self._put_aside(e)
            try:
                self._connect()
            except (OSError, sqlite3.Error) as e2:
                self._open_failed(e2)
                return
            log.error("spool %s was corrupt (%s): moved to %s and started a new spool %s",
                      self._path, e, aside, self._spool_id)
        except OSError as e:
            self._open_failed(e)

    def _open_failed(self, e: BaseException) -> None:
        if not _disk_fault(e) and not self._folder_faulty():
            raise SpoolError(f"spool.path: cannot use {self._path}: {e}") from None
        self._enter_memory(f"cannot open: {e}")

    def _folder_faulty(self) -> bool:
        """SQLite says only "unable to open database file": ask the file system why."""
        probe = self._path.with_name(f".{self._path.name}.probe")
        try:
            os.close(os.open(probe, os.O_WRONLY | os.O_CREAT, 0o600))
            probe.unlink()
        except OSError as e:
            return e.errno in _DISK_FAULTS
        return False

    def _connect(self) -> None:
        db = sqlite3.connect(self._path, timeout=5.0, isolation_level=None,
                             check_same_thread=False)
        try:
            mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode != "wal":
                log.warning("spool %s: journal_mode is %s, not wal", self._path, mode)
            db.execute("PRAGMA synchronous=FULL")
            db.execute(f"PRAGMA wal_autocheckpoint={WAL_PAGES}")
            db.execute(f"PRAGMA journal_size_limit={WAL_PAGES * 4096}")
            db.executescript(_SCHEMA)
            db.execute("INSERT OR IGNORE INTO ident VALUES ('spool_id', ?)",
                       (secrets.token_hex(8),))
            self._spool_id = db.execute(
                "SELECT value FROM ident WHERE key='spool_id'").fetchone()[0]
            self._depth = db.execute("SELECT count(*) FROM events").fetchone()[0]
            self._last_seq = db.execute(
                "SELECT value FROM meta WHERE key='last_seq'").fetchone()[0]
            self._db = db
            self._start_clock()
            st = os.stat(self._path)
            self._identity = (st.st_dev, st.st_ino)
        except BaseException:
            self._db = None
            db.close()
            raise

    def _put_aside(self, e: BaseException) -> Path:
        stamp = time.strftime("%Y%m%dT%H%M%S", time.localtime(self._wall()))
        aside = self._path.with_name(f"{self._path.name}.corrupt-{stamp}")
        for suffix in ("", "-wal", "-shm"):
            src = Path(f"{self._path}{suffix}")
            if src.exists():
                os.replace(src, f"{aside}{suffix}")
        return aside

    # --- the age clock --------------------------------------------------------------------

    def _start_clock(self) -> None:
        """Resume the age clock (module docstring) and drop what aged while the agent was off."""
        wall = self._wall()
        with self._tx() as db:
            db.execute("INSERT OR IGNORE INTO meta SELECT 'clock', coalesce(max(created), ?) "
                       "FROM events", (wall,))
            db.execute("INSERT OR IGNORE INTO meta VALUES ('wall', ?)", (wall,))
            clock, last_wall = (float(db.execute("SELECT value FROM meta WHERE key=?",
                                                 (k,)).fetchone()[0]) for k in ("clock", "wall"))
            down = wall - last_wall
            plausible = min(wall, last_wall) >= PLAUSIBLE_WALL and down >= 0
            self._clock0, self._mono0 = clock + (down if plausible else 0.0), self._mono()
            self._save_clock(db, self._clock0, wall)
            self._depth -= self._trim(db, self._clock0, self._depth)

    def clock(self) -> float:
        """Now on the age clock: seconds, never stepped, never going back."""
        return self._clock0 + (self._mono() - self._mono0)

    @staticmethod
    def _save_clock(db: sqlite3.Connection, clock: float, wall: float) -> None:
        db.executemany("UPDATE meta SET value=? WHERE key=?", ((clock, "clock"), (wall, "wall")))

    @contextmanager
    def _tx(self, sync: str = "FULL") -> Iterator[sqlite3.Connection]:
        """Callers hold ``self._lock``, or run before the spool is shared."""
        db = self._db
        assert db is not None
        db.execute(f"PRAGMA synchronous={sync}")
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                with suppress(sqlite3.Error):
                    db.execute("ROLLBACK")
            raise

    # --- events ---------------------------------------------------------------------------

    @property
    def spool_id(self) -> str:
        """The random id of this spool (or of the in-memory queue while the disk fails)."""
        return self._memory_id if self._fault else self._spool_id

    def append(self, event: dict[str, Any]) -> int:
        """Store `event` with the next ``seq`` and ``spool_id`` (inserted into it) and return
        that ``seq``. A failing disk sends it to the memory queue instead.

        Raises ValueError for NaN/infinite numbers: they are not JSON and would break consumers.
        """
        with self._lock:
            if not self._fault:
                try:
                    return self._append_disk(event)
                except (OSError, sqlite3.Error) as e:
                    if not _disk_fault(e) and not isinstance(e, sqlite3.OperationalError):
                        raise
                    self._enter_memory(f"cannot write: {e}")
            return self._append_memory(event)

    def _append_disk(self, event: dict[str, Any]) -> int:
        with self._tx() as db:
            seq = self._last_seq + 1
            payload = json.dumps({**event, "spool_id": self._spool_id, "seq": seq},
                                 separators=(",", ":"), allow_nan=False)
            now = self.clock()
            db.execute("INSERT INTO events VALUES (?, ?, ?)", (seq, now, payload))
            db.execute("UPDATE meta SET value=? WHERE key='last_seq'", (seq,))
            self._save_clock(db, now, self._wall())
            dropped = self._trim(db, now, self._depth + 1)
        self._last_seq = seq
        self._depth += 1 - dropped
        return seq

    def _append_memory(self, event: dict[str, Any]) -> int:
        seq = self._memory_seq + 1
        payload = json.dumps({**event, "spool_id": self._memory_id, "seq": seq},
                             separators=(",", ":"), allow_nan=False)
        self._memory_seq = seq
        self._memory_key += 1
        self._memory.append((self._memory_key, payload))
        if len(self._memory) > MEMORY_EVENTS:
            self._memory.popleft()
            self._memory_dropped += 1
            if self._memory_dropped in (1, 100) or self._memory_dropped % 10000 == 0:
                log.error("spool memory queue full (%d events): %d oldest dropped so far",
                          MEMORY_EVENTS, self._memory_dropped)
        return seq

    def _enter_memory(self, why: str) -> None:
        """From now on events go to memory, under an id of their own; seq carries on from the
        disk's so that the numbers stay readable, the id keeps them apart."""
        if not self._fault:
            self._memory_id = f"{self._spool_id or secrets.token_hex(8)}-m{secrets.token_hex(3)}"
            self._memory_seq = max(self._memory_seq, self._last_seq)
        self._fault = why
        self._next_retry = self._mono() + RETRY_DISK_S
        log.error("spool %s: %s; keeping events in memory (at most %d) until it can write "
                  "again", self._path, why, MEMORY_EVENTS, extra={"ERROR_KIND": "spool"})

    def new_run(self) -> int:
        """A number no earlier start of the agent on this spool had: track ids stay unique
        across restarts even on a Pi whose clock starts in 1970."""
        with self._lock:
            if not self._fault:
                try:
                    with self._tx() as db:
                        db.execute("UPDATE meta SET value=value+1 WHERE key='runs'")
                        return int(db.execute(
                            "SELECT value FROM meta WHERE key='runs'").fetchone()[0])
                except (OSError, sqlite3.Error) as e:
                    self._enter_memory(f"cannot write: {e}")
            return 1000 + secrets.randbelow(10**9)  # no disk: a random run keeps ids apart

    def _trim(self, db: sqlite3.Connection, now: float, depth: int) -> int:
        """Drop what is over the age or count bound, oldest first; return how many.
        `now` is on the age clock, so ``created`` grows with ``seq`` and age drops the oldest."""
        dropped = 0
        cutoff = now - self._cfg.max_age_s
        oldest = db.execute("SELECT created FROM events ORDER BY seq LIMIT 1").fetchone()
        if oldest and oldest[0] < cutoff:
            dropped += db.execute("DELETE FROM events WHERE created < ?", (cutoff,)).rowcount
        over = depth - dropped - self._cfg.max_events
        if over > 0:
            dropped += db.execute(
                "DELETE FROM events WHERE seq IN (SELECT seq FROM events ORDER BY seq LIMIT ?)",
                (over,)).rowcount
        if dropped:
            db.execute("UPDATE meta SET value=value+? WHERE key='dropped'", (dropped,))
            if not self._warned_full:
                self._warned_full = True
                log.warning("spool %s over its bounds: dropping the oldest events", self._cfg.path)
        return dropped

    def pending(self, after_seq: int, limit: int) -> list[tuple[int, str]]:
        """Up to `limit` queued events with a key (``seq`` on disk) above `after_seq`, oldest
        first: those on disk, then those in memory."""
        with self._lock:
            rows: list[tuple[int, str]] = []
            if self._db is not None and after_seq < _MEMORY_KEY:
                try:
                    rows = self._db.execute(
                        "SELECT seq, payload FROM events WHERE seq > ? ORDER BY seq LIMIT ?",
                        (after_seq, limit + len(self._unapplied_acks))).fetchall()
                except sqlite3.Error as e:
                    log.error("spool %s: cannot read: %s", self._path, e)
                rows = [r for r in rows if r[0] not in self._unapplied_acks][:limit]
            if len(rows) < limit:
                rows += [m for m in self._memory if m[0] > after_seq][:limit - len(rows)]
            return rows

    def ack(self, seq: int) -> None:
        """Forget a delivered event; unknown or already acked ``seq`` is a no-op."""
        self.ack_many((seq,))

    def ack_many(self, seqs: Iterable[int]) -> None:
        """`ack` for a batch in one transaction: draining a backlog commits once per batch."""
        with self._lock:
            keys = set(seqs)
            mem = {k for k in keys if k >= _MEMORY_KEY}
            if mem:
                self._memory = deque(m for m in self._memory if m[0] not in mem)
            disk = (keys - mem) | self._unapplied_acks
            if disk and self._db is not None:
                self._delete(disk)

    def _delete(self, keys: set[int]) -> None:
        try:
            with self._tx("NORMAL") as db:
                before = db.total_changes
                db.executemany("DELETE FROM events WHERE seq=?", ((q,) for q in keys))
                removed = db.total_changes - before
                self._save_clock(db, self.clock(), self._wall())
            self._depth -= removed  # only once committed: a full disk can refuse the commit
            self._unapplied_acks.clear()
        except sqlite3.Error as e:
            # a full disk can refuse even a delete; remember it, resend nothing meanwhile
            new = keys - self._unapplied_acks
            self._unapplied_acks |= keys
            if new and not self._fault:
                self._enter_memory(f"cannot write: {e}")

    def refuse_many(self, seqs: Iterable[int]) -> None:
        """The broker refused these (not authorized, quota): keep them aside, counted, bounded,
        for `requeue_refused` after the next connect or reload."""
        with self._lock:
            keys = set(seqs)
            mem = [m for m in self._memory if m[0] in keys]
            self._memory = deque(m for m in self._memory if m[0] not in keys)
            if self._db is None:
                self._memory.extend(mem)  # nowhere else to keep them
                return
            try:
                with self._tx("NORMAL") as db:
                    before = db.total_changes
                    for q in keys - {m[0] for m in mem}:
                        db.execute("INSERT OR IGNORE INTO refused SELECT * FROM events "
                                   "WHERE seq=?", (q,))
                        db.execute("DELETE FROM events WHERE seq=?", (q,))
                    moved = (db.total_changes - before) // 2
                    for _, payload in mem:
                        db.execute("INSERT INTO refused (created, payload) VALUES (?, ?)",
                                   (self.clock(), payload))
                    over = db.execute("SELECT count(*) FROM refused").fetchone()[0] - MAX_REFUSED
                    if over > 0:
                        db.execute("DELETE FROM refused WHERE seq IN (SELECT seq FROM refused "
                                   "ORDER BY seq LIMIT ?)", (over,))
                        db.execute("UPDATE meta SET value=value+? WHERE key='dropped'", (over,))
                        log.error("spool: more than %d refused events; dropped the %d oldest",
                                  MAX_REFUSED, over)
            except sqlite3.Error as e:
                self._memory.extendleft(reversed(mem))
                log.error("spool %s: cannot keep refused events aside: %s", self._path, e)
                return
            self._depth -= moved

    def requeue_refused(self) -> int:
        """Put refused events back in the queue (after a connect: the broker may allow them
        now); returns how many. Their old ``seq`` on disk are free, so they keep them."""
        with self._lock:
            if self._db is None or self._fault:
                return 0
            try:
                with self._tx("NORMAL") as db:
                    n = db.execute("SELECT count(*) FROM refused").fetchone()[0]
                    if not n:
                        return 0
                    db.execute("INSERT INTO events SELECT * FROM refused "
                               "WHERE seq NOT IN (SELECT seq FROM events)")
                    db.execute("INSERT INTO events (created, payload) SELECT created, payload "
                               "FROM refused WHERE seq NOT IN (SELECT seq FROM events)")
                    db.execute("DELETE FROM refused")
                    db.execute("UPDATE meta SET value=max(value, (SELECT max(seq) FROM events))"
                               " WHERE key='last_seq'")
                    self._last_seq = db.execute(
                        "SELECT value FROM meta WHERE key='last_seq'").fetchone()[0]
            except sqlite3.Error as e:
                log.error("spool %s: cannot requeue refused events: %s", self._path, e)
                return 0
            self._depth += n
            return int(n)

    def refused(self) -> int:
        """Events the broker refused, waiting for a retry."""
        with self._lock:
            if self._db is None:
                return 0
            try:
                return int(self._db.execute("SELECT count(*) FROM refused").fetchone()[0])
            except sqlite3.Error:
                return 0

    # --- health ---------------------------------------------------------------------------

    @property
    def fault(self) -> str:
        """Why events go to memory now; "" while the disk takes them."""
        return self._fault

    def in_memory(self) -> int:
        return len(self._memory)

    def maintain(self) -> None:
        """Called by the frame loop: back to the disk when it takes writes again; notice a
        spool file deleted or replaced under us. Cheap when there is nothing to do."""
        now = self._mono()
        with self._lock:
            if self._fault and now >= self._next_retry:
                self._retry_disk(now)
            elif not self._fault and self._db is not None and now >= self._next_identity:
                self._next_identity = now + IDENTITY_CHECK_S
                self._check_identity()

    def _retry_disk(self, now: float) -> None:
        self._next_retry = now + RETRY_DISK_S
        try:
            if self._db is None:
                self._connect()
            with self._tx() as db:
                self._save_clock(db, self.clock(), self._wall())
                before = db.total_changes
                db.executemany("DELETE FROM events WHERE seq=?",
                               ((q,) for q in self._unapplied_acks))
                removed = db.total_changes - before
            self._depth -= removed
        except (OSError, sqlite3.Error) as e:
            if self._db is None and _corrupt(e):
                self._put_aside(e)
            return
        self._unapplied_acks.clear()
        log.warning("spool %s writable again: new events go to disk (%d still in memory "
                    "under spool_id %s)", self._path, len(self._memory), self._memory_id)
        self._fault = ""
        self.generation += 1

    def _check_identity(self) -> None:
        try:
            st = os.stat(self._path)
            same = (st.st_dev, st.st_ino) == self._identity
        except FileNotFoundError:
            same = False
        except OSError:
            return
        if same:
            return
        old = self._db
        assert old is not None
        rows = old.execute("SELECT seq, created, payload FROM events ORDER BY seq").fetchall()
        old_id, last = self._spool_id, self._last_seq
        self._db = None
        old.close()
        try:
            self._connect()
            with self._tx() as db:  # same keys: what a sender has in flight stays valid
                db.executemany("INSERT OR IGNORE INTO events VALUES (?, ?, ?)", rows)
                db.execute("UPDATE meta SET value=? WHERE key='last_seq'", (last,))
            self._depth, self._last_seq = len(rows), last
        except (OSError, sqlite3.Error) as e:
            self._enter_memory(f"spool file gone and cannot start a new one: {e}")
            self._memory.extend((_MEMORY_KEY - len(rows) + i, p)
                                for i, (_, _, p) in enumerate(rows))
            self._depth = 0
            self.generation += 1
            return
        log.error("spool %s was deleted or replaced while running: started a new spool %s "
                  "(was %s) with the %d events not yet delivered", self._path, self._spool_id,
                  old_id, len(rows), extra={"ERROR_KIND": "spool"})

    def depth(self) -> int:
        """Events queued for the broker: on disk (acknowledged ones not counted) and in memory."""
        return self._depth - len(self._unapplied_acks) + len(self._memory)

    def dropped(self) -> int:
        """Events dropped over the bounds since the spool was created (and from memory)."""
        with self._lock:
            on_disk = 0
            if self._db is not None:
                with suppress(sqlite3.Error):
                    on_disk = self._db.execute(
                        "SELECT value FROM meta WHERE key='dropped'").fetchone()[0]
            return int(on_disk) + self._memory_dropped

    def last_seq(self) -> int:
        with self._lock:
            return self._memory_seq if self._fault else self._last_seq

    def close(self) -> int:
        """Saves the clocks too: a wall clock that NTP set since the last event must not count
        as downtime at the next start. Events still in memory go to disk if it takes them now;
        returns how many could not (and are lost with the process)."""
        with self._lock:
            if self._fault:
                self._retry_disk(self._mono())
            lost = len(self._memory)
            if self._db is not None:
                try:
                    with self._tx("NORMAL") as db:
                        self._save_clock(db, self.clock(), self._wall())
                        if not self._fault and self._memory:
                            db.executemany(
                                "INSERT INTO events (created, payload) VALUES (?, ?)",
                                ((self.clock(), p) for _, p in self._memory))
                            db.execute("UPDATE meta SET value=(SELECT max(seq) FROM events) "
                                       "WHERE key='last_seq'")
                            lost = 0
                except sqlite3.Error as e:
                    log.error("spool %s: cannot save on close: %s", self._path, e)
                self._db.close()
                self._db = None
            os.close(self._lockfile)
            return lost

    def get_value(self, key: str) -> str | None:
        """A small value kept with the spool (e.g. the day's counts), or None."""
        with self._lock:
            if key in self._values:
                return self._values[key]
            if self._db is not None and not self._fault:
                with suppress(sqlite3.Error):
                    row = self._db.execute("SELECT value FROM kv WHERE key=?", (key,)).fetchone()
                    return None if row is None else str(row[0])
            return None

    def put_value(self, key: str, value: str) -> None:
        """Kept in memory too, so a failing disk loses it only with the process; on disk a power
        cut loses at most the last change (no sync), never corrupts it."""
        with self._lock:
            if key not in self._values and len(self._values) >= MAX_VALUES:
                raise ValueError(f"spool: more than {MAX_VALUES} kept values")
            self._values[key] = value
            if self._db is None or self._fault:
                return
            try:
                with self._tx("NORMAL") as db:
                    db.execute("INSERT OR REPLACE INTO kv VALUES (?, ?)", (key, value))
            except sqlite3.Error as e:
                log.warning("spool %s: cannot keep %s: %s", self._path, key, e)
