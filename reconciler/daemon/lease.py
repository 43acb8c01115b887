"""This process's side of the store's publisher lease (reconciler.core.lease).

:class:`PublisherLease` reads and writes the lease records: a pass acquires (or renews)
the lease before it writes anything, a thread of its own renews it while held and, on
a standby, watches for the holder's record to lapse and wakes the daemon then.
:class:`FencedStore` wraps the store the pass writes through: every write and delete
first checks that this process still holds the lease (its own deadline, and that no
newer term exists in the store), so a holder that was paused (SIGSTOP, a frozen VM, a
long GC) and resumes after a takeover writes nothing more.

What remains without fencing by the store itself: a write whose check passed is sent
whatever happens next. A process paused between the check and the write (or a request
delayed in the network) longer than its lease's remaining margin can still land that
one write after another daemon took over: at most one object per writing thread (a
pass writes from ``jobs`` build threads and its own), only the key that write was for,
and only until the new holder writes that key again. Such a write is one the old holder
had checked in full (a ``latest.json`` whose release is whole and signed, a TUF file it
signed), so readers may be sent back to an older release or refuse a mismatched pair,
never offered anything unsigned. Neither a directory nor S3 can refuse a write because a
*different* object (the lease) changed; a store with such fencing tokens would close it.
"""

from __future__ import annotations

import builtins
import logging
import threading
from collections.abc import Callable
from pathlib import Path

from reconciler import log
from reconciler.config import LeaseConfig
from reconciler.core.layout import LEASE_PREFIX, LeaseKey, lease_path, parse_key
from reconciler.core.lease import (
    RECORD_LIMIT,
    Acquire,
    Held,
    Holder,
    How,
    LeaseRecord,
    LeaseStatus,
    Lost,
    Renew,
    Role,
    Seen,
    Standby,
    decide,
    observe,
    obsolete,
    parse_record,
    valid_until,
)
from reconciler.errors import (
    LeaseHeldError,
    LeaseLostError,
    ObjectTooLargeError,
    StoreError,
    VerificationError,
    internal_error,
)
from reconciler.ports import Clock, Store

# The shortest a keeper thread sleeps between looks (seconds): a lapse computed as due
# now is not polled in a busy loop.
MIN_TICK = 0.05


def terms_in(store: Store) -> list[int]:
    """Every term with a record in ``store``, ascending."""
    keys = (parse_key(key) for key in store.list(LEASE_PREFIX))
    return sorted(k.term for k in keys if isinstance(k, LeaseKey))


def read_record(store: Store, term: int) -> LeaseRecord | None:
    """``term``'s record in ``store``, None if there is none; VerificationError naming
    the key if it is not one, malformed or larger than any record a daemon writes."""
    key = lease_path(term)
    try:
        data = store.get_bytes(key, RECORD_LIMIT)
    except ObjectTooLargeError as exc:
        raise VerificationError(str(exc)) from None
    return None if data is None else parse_record(data, term, key)


class PublisherLease:
    """``holder``'s side of the lease on ``store``, with ``settings`` (lease: in the
    config). ``background``: renew and watch in a thread of its own once the first
    pass asked for the lease (tests drive :meth:`tick` themselves)."""

    def __init__(
        self,
        store: Store,
        settings: LeaseConfig,
        holder: Holder,
        clock: Clock,
        background: bool = True,
    ) -> None:
        self.store = store
        self.settings = settings
        self.holder = holder
        self.clock = clock
        self._background = background
        self._lock = threading.RLock()
        self._held: Held | None = None
        self._seen: Seen | None = None
        self._standby_logged: tuple[int, str | None] | None = None
        self._handover: LeaseRecord | None = None
        self._handover_pending = False
        self._lapsed_noted: Seen | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # Called (from the keeper thread) when a pass should run now: the holder's
        # record lapsed or was released, or this process lost the lease.
        self.on_wake: Callable[[], None] = lambda: None

    # -- what others ask --------------------------------------------------------

    @property
    def held(self) -> bool:
        """Whether this process holds the lease and its deadline has not passed. Without
        the lock (one read of an attribute): /readyz and /metrics must not wait for a
        renewal stuck on a slow store."""
        held = self._held
        return held is not None and self.clock.monotonic() < held.valid_until

    def status(self) -> LeaseStatus:
        """As :attr:`held`, without the lock."""
        held, seen = self._held, self._seen
        if held is not None and self.clock.monotonic() < held.valid_until:
            return LeaseStatus(Role.ACTIVE, held.term, self.holder.name)
        if seen is None:
            return LeaseStatus(Role.STANDBY, None, None)
        record = seen.record
        lapses_in = None
        if record is not None and not record.released:
            lapses_in = max(0.0, seen.since + record.duration - self.clock.monotonic())
        name = record.name if record is not None else "an unreadable record"
        return LeaseStatus(Role.STANDBY, seen.term, name, lapses_in)

    def take_handover(self) -> tuple[bool, LeaseRecord | None]:
        """Once after a term was won from another holder (or from no record at all):
        (True, the previous holder's record or None); (False, None) otherwise. The
        pass then catches up with what the store holds that its ledger does not."""
        with self._lock:
            pending, previous = self._handover_pending, self._handover
            self._handover_pending, self._handover = False, None
            return pending, previous

    # -- acquiring --------------------------------------------------------------

    def acquire(self, wait: bool = False) -> bool:
        """Hold the lease for a pass: renew it, or win a new term if the newest has
        lapsed, was released or is this holder's own. False: another daemon holds it
        (a standby). ``wait`` (a one-shot command): wait up to the newest record's
        duration for it to lapse, and raise LeaseHeldError once its holder renews it."""
        with self._lock:
            self._start_keeper()
            first: Seen | None = None
            while True:
                self._look()
                now = self.clock.monotonic()
                d = decide(self.holder.id, self._held, self._seen, now, self.settings.duration)
                if isinstance(d, Lost):
                    self._lose(d)
                    continue
                if isinstance(d, Renew):
                    self._renew(d)
                    if self._held is not None:
                        return True
                    continue
                if isinstance(d, Acquire):
                    if self._create(d):
                        return True
                    continue
                self._note_standby(d)
                if not wait:
                    return False
                if first is None:
                    first = d.seen
                elif d.seen != first:
                    raise LeaseHeldError(self._held_by(d))
                self.clock.sleep(max(MIN_TICK, min(self.settings.renew, d.lapses_at - now)))

    def _held_by(self, d: Standby) -> str:
        record = d.seen.record
        who = record.name if record is not None else "another daemon"
        return (
            f"the store's publisher lease is held by {who} (term {d.seen.term}), which renews it: "
            "another daemon publishes to this store; run this there, or stop that daemon first"
        )

    def _start_keeper(self) -> None:
        if self._background and self._thread is None:
            self._thread = threading.Thread(target=self._keep, name="lease", daemon=True)
            self._thread.start()

    def _read(self) -> tuple[int | None, LeaseRecord | None, list[int]]:
        """The newest term in the store, its record (None if unreadable) and every term."""
        terms = terms_in(self.store)
        if not terms:
            return None, None, terms
        record = None
        try:
            record = read_record(self.store, terms[-1])
        except VerificationError as exc:
            # It lapses after the longest duration, and is taken over.
            log.event("lease_unreadable", logging.WARNING, error=str(exc))
        return terms[-1], record, terms

    def _look(self) -> list[int]:
        """Read the newest record and note it. A record new to this process counts as
        seen when the read has ended, never earlier: a slow read that returns a renewal
        must not start the wait for its lapse before the renewal was written."""
        term, record, terms = self._read()
        self._seen = observe(self._seen, term, record, self.clock.monotonic())
        return terms

    def _record(self, term: int, renewal: int, released: bool = False) -> LeaseRecord:
        return LeaseRecord(
            term=term,
            holder=self.holder.id,
            name=self.holder.name,
            renewal=renewal,
            duration=self.settings.duration,
            renewed=self.clock.now(),
            released=released,
        )

    def _create(self, d: Acquire) -> bool:
        started = self.clock.monotonic()
        if not self.store.create(lease_path(d.term), self._record(d.term, 0).to_json()):
            log.event("lease_contended", term=d.term)
            return False
        # A daemon that read an older listing may have created a number long deleted;
        # only the newest term is the lease.
        terms = self._look()
        if terms[-1] != d.term:
            log.event("lease_superseded", logging.WARNING, term=d.term, newest=terms[-1])
            return False
        self._held = Held(d.term, 0, self.settings.duration, valid_until(started, self.settings.duration))
        self._standby_logged = None
        self._lapsed_noted = None
        previous = d.previous
        # Another daemon (or, with no record, anyone) may have published since this
        # one's ledger was written: the pass catches up with the store first.
        if previous is None or previous.holder != self.holder.id:
            self._handover_pending, self._handover = True, previous
        fields: dict[str, object] = {
            "term": d.term,
            "holder": self.holder.name,
            "how": d.how,
            "previous": previous.name if previous is not None else "",
        }
        if d.how is How.LAPSED:
            log.event("lease_takeover", logging.WARNING, **fields)
        else:
            log.event("lease_acquired", logging.INFO, **fields)
        for term in obsolete(terms, d.term):
            try:
                self.store.delete(lease_path(term))
            except StoreError as exc:
                log.event("lease_cleanup_failed", logging.WARNING, term=term, error=str(exc))
        return True

    def _renew(self, d: Renew) -> None:
        assert self._held is not None
        started = self.clock.monotonic()
        self.store.put_bytes(lease_path(d.term), self._record(d.term, d.renewal).to_json())
        self._held = Held(
            d.term, d.renewal, self.settings.duration, valid_until(started, self.settings.duration)
        )
        # A daemon that judged the term lapsed just before this write may have taken
        # the next one meanwhile: the newest term decides.
        terms = self._look()
        if terms and terms[-1] > d.term:
            self._lose(Lost(d.term, f"term {terms[-1]} was taken while renewing"))

    def _lose(self, d: Lost) -> None:
        if self._held is None:
            return
        self._held = None
        seen = self._seen
        if (
            seen is not None
            and seen.term > d.term
            and seen.record is not None
            and seen.record.holder == self.holder.id
        ):
            # A command of this same state directory (`reconciler gc`, `reconcile`)
            # took the next term; it releases it when done and this daemon takes it back.
            log.event("lease_passed", term=d.term, to_term=seen.term)
        else:
            log.event("lease_lost", logging.ERROR, term=d.term, reason=d.reason)
        self.on_wake()

    def _note_standby(self, d: Standby) -> None:
        record = d.seen.record
        key = (d.seen.term, record.holder if record is not None else None)
        if self._standby_logged != key:
            self._standby_logged = key
            log.event(
                "lease_standby",
                term=d.seen.term,
                holder=record.name if record is not None else "",
                lapses_in=round(max(0.0, d.lapses_at - self.clock.monotonic()), 1),
            )

    # -- checking before a write -------------------------------------------------

    def check(self) -> None:
        """Raise LeaseLostError unless this process may write to the store now: its
        deadline has not passed, and the store holds no term newer than its own."""
        with self._lock:
            held = self._held
            if held is None:
                raise LeaseLostError("this process does not hold the store's publisher lease")
            if self.clock.monotonic() >= held.valid_until:
                self._lose(Lost(held.term, "not renewed in time"))
                raise LeaseLostError(f"the publisher lease (term {held.term}) was not renewed in time")
            # Only the listing: a term is created whole, so a newer one is a newer holder.
            terms = terms_in(self.store)
            if not terms or terms[-1] != held.term:
                if terms and terms[-1] > held.term:
                    reason = f"term {terms[-1]} was taken by another daemon"
                else:
                    reason = "the lease record was removed from the store"
                self._lose(Lost(held.term, reason))
                raise LeaseLostError(f"the publisher lease (term {held.term}) is lost: {reason}")

    # -- the keeper --------------------------------------------------------------

    def tick(self) -> float:
        """One look of the keeper: renew while held; on a standby, wake the daemon
        when the holder's record has lapsed or was released. Seconds to the next."""
        with self._lock:
            now = self.clock.monotonic()
            held = self._held
            if held is not None and now >= held.valid_until:
                self._lose(Lost(held.term, "not renewed in time"))
                held = None
            try:
                self._look()
            except StoreError as exc:
                log.event("lease_read_failed", logging.WARNING, error=str(exc))
                return self.settings.renew
            now = self.clock.monotonic()
            d = decide(self.holder.id, self._held, self._seen, now, self.settings.duration)
            if isinstance(d, Renew):
                try:
                    self._renew(d)
                except StoreError as exc:
                    log.event("lease_renew_failed", logging.WARNING, term=d.term, error=str(exc))
                return self.settings.renew
            if isinstance(d, Lost):
                self._lose(d)
                return self.settings.renew
            if isinstance(d, Acquire):
                # Taken by the pass, under the pass lock; once per observation.
                if self._lapsed_noted != self._seen:
                    self._lapsed_noted = self._seen
                    self.on_wake()
                return self.settings.renew
            self._note_standby(d)
            return max(MIN_TICK, min(self.settings.renew, d.lapses_at - now))

    def _keep(self) -> None:
        wait = self.settings.renew
        while not self._stop.wait(wait):
            try:
                wait = self.tick()
            except Exception as exc:  # a bug must not end renewals silently
                log.event("lease_keeper_crashed", logging.ERROR, error=internal_error(exc))
                wait = self.settings.renew

    # -- stopping -----------------------------------------------------------------

    def release(self) -> None:
        """Give the lease up (a clean stop): the next daemon takes over at once."""
        with self._lock:
            held = self._held
            if held is None or self.clock.monotonic() >= held.valid_until:
                self._held = None
                return
            self._held = None
            try:
                terms = self._look()
                if terms and terms[-1] == held.term:
                    self.store.put_bytes(
                        lease_path(held.term),
                        self._record(held.term, held.renewal + 1, released=True).to_json(),
                    )
                    log.event("lease_released", term=held.term)
            except StoreError as exc:
                log.event("lease_release_failed", logging.WARNING, term=held.term, error=str(exc))

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.release()


class FencedStore:
    """``store`` whose writes and deletes each first check ``lease`` (PublisherLease.check)."""

    def __init__(self, store: Store, lease: PublisherLease) -> None:
        self.inner = store
        self.lease = lease

    def put_file(self, key: str, path: Path) -> None:
        self.lease.check()
        self.inner.put_file(key, path)

    def put_bytes(self, key: str, data: bytes) -> None:
        self.lease.check()
        self.inner.put_bytes(key, data)

    def copy(self, src: str, dst: str) -> None:
        self.lease.check()
        self.inner.copy(src, dst)

    def create(self, key: str, data: bytes) -> bool:
        self.lease.check()
        return self.inner.create(key, data)

    def delete(self, key: str) -> None:
        self.lease.check()
        self.inner.delete(key)

    def sweep(self) -> builtins.list[str]:
        self.lease.check()
        return self.inner.sweep()

    def get_bytes(self, key: str, limit: int) -> bytes | None:
        return self.inner.get_bytes(key, limit)

    def exists(self, key: str) -> bool:
        return self.inner.exists(key)

    def size(self, key: str) -> int | None:
        return self.inner.size(key)

    def url(self, key: str) -> str:
        return self.inner.url(key)

    def list(self, prefix: str = "") -> builtins.list[str]:
        return self.inner.list(prefix)
