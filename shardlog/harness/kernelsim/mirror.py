"""dm-raid1 and dm-region-hash over a :class:`UserspaceLog`, with a correctness oracle.

Theory of operation
-------------------
The mirror target decides *when* log requests are sent; this module reproduces those
decisions for one mirror (protocol.md §3.0), one kernel function per method:

- The **region hash** (dm-region-hash.c) holds the regions with something going on:
  ``state`` is CLEAN, DIRTY, NOSYNC or RECOVERING, ``pending`` counts writes in flight.
  A region not in the hash is asked about with IN_SYNC (``dm_rh_get_state``); putting it
  in the hash asks again (``__rh_alloc``), so a write to a quiet region costs two IN_SYNCs.
- **Writes** (:meth:`Mirror.write` = ``do_writes``): IS_REMOTE_RECOVERING (a region
  "recovering" elsewhere is requeued), the state, ``rh_inc`` (CLEAN → DIRTY queues a
  mark), one ``flush`` of the log (MARK + FLUSH, or integrated FLUSH), and only then the
  data writes: to both legs, to the default leg only for a NOSYNC region, or held until
  the region's recovery ends.  A write that completes (``dm_rh_dec``) leaves its region on
  the clean list.
- **The worker pass** (:meth:`Mirror.update_states` = ``dm_rh_update_states``): regions
  recovered since the last pass get ``clear_region`` and, at once, SET_REGION_SYNC; clean
  regions get ``clear_region``; then the log is flushed (so the CLEARs follow the
  SET_REGION_SYNC).
- **Recovery** (:meth:`Mirror.recover`, passes of ``do_recovery``): GET_RESYNC_WORK while no
  region is being recovered (``MAX_RECOVERY`` = 1), the copy once the region is quiet, and
  GET_SYNC_COUNT on every pass until it equals the region count.
- **Suspend, resume, reload, destroy** follow ``mirror_presuspend``/``postsuspend``/
  ``resume``/``dtr`` and the order dm uses for a table swap.

The kernel runs its worker by itself (after a resume, when writes complete, on timers);
here the caller runs it (:meth:`update_states`, :meth:`recover`), so a test decides
exactly which requests happen when.  Leg failures, failed recoveries, ``handle_errors``
and flush bios are not modelled.

The oracle
----------
Alongside, the mirror tracks which regions' legs *may differ*, from what the kernel itself
knows: regions with writes in flight; regions marked and acknowledged by a FLUSH whose
CLEAR has not been acknowledged (a crash there leaves the legs unequal); regions never
recovered or written to one leg only.  :meth:`Mirror.verify` asks the server about them
and fails if it calls one clean (IS_CLEAN) or one never recovered in sync (IN_SYNC): after
a crash the kernel would then skip its resync, or read stale data from the other leg.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from shardlog.harness.kernelsim.connector import Connector
from shardlog.harness.kernelsim.userlog import STATUS_BUFFER, UserspaceLog


class RegionState(enum.Enum):
    """``DM_RH_*``."""

    CLEAN = "clean"
    DIRTY = "dirty"
    NOSYNC = "nosync"
    RECOVERING = "recovering"


@dataclass
class _Region:
    """A ``struct dm_region``: one region in the hash."""

    state: RegionState
    pending: int = 0
    delayed_writes: int = 0  # writes held until its recovery ends (dm_rh_delay)


class Mirror:
    """One mirror target (``struct mirror_set``) with a userspace log.

    Build it with :meth:`create`, which also resumes it.  ``legs_differ`` seeds the
    oracle: the regions whose legs differ at the start (default: every region, unless the
    log arguments say ``nosync``)."""

    def __init__(self, log: UserspaceLog, *, legs_differ: Iterable[int] | None = None,
                 dirty: Iterable[int] = (), nr_legs: int = 2):
        self.log = log
        self.nr_regions = log.region_count
        self.nr_legs = nr_legs
        self.in_sync = False  # ms->in_sync: GET_SYNC_COUNT reached the region count
        self.suspended = True  # a new table is loaded but not resumed
        self.log_failure = False  # a flush failed (ms->log_failure)
        self.queued_writes: list[int] = []  # requeued or released writes, for the next pass
        self._hash: dict[int, _Region] = {}
        self._clean_regions: deque[int] = deque()
        self._quiesced: deque[int] = deque()
        self._recovered: deque[int] = deque()
        self._recovering: int | None = None  # the region holding the recovery slot
        self._recovery_stopped = True
        self._in_flight: list[int] = []  # one entry per write bio not yet completed
        if legs_differ is None:
            nosync = "nosync" in log.ctr_string.split()[2:]
            legs_differ = () if nosync else range(self.nr_regions)
        self._unsynced = set(legs_differ)  # legs differ until recovered
        self._dirty = set(dirty)  # marked + FLUSH acknowledged, CLEAR not acknowledged

    @classmethod
    def create(cls, conn: Connector, uuid: str, log_type: str, log_args: Sequence[str],
               target_sectors: int, *, integrated_flush: bool = False,
               legs_differ: Iterable[int] | None = None, flush_delay: float = 3.0) -> Mirror:
        """``mirror_ctr`` (its log's CTR + GET_REGION_SIZE), then ``mirror_resume``."""
        log = UserspaceLog.construct(conn, uuid, log_type, log_args, target_sectors,
                                     integrated_flush=integrated_flush,
                                     flush_delay=flush_delay)
        mirror = cls(log, legs_differ=legs_differ)
        mirror.resume()
        return mirror

    # --- the region hash -------------------------------------------------------------------

    def _get_state(self, region: int) -> RegionState:
        """``dm_rh_get_state(may_block=1)``: the hash, else IN_SYNC (exactly 1 = clean)."""
        reg = self._hash.get(region)
        if reg is not None:
            return reg.state
        return RegionState.CLEAN if self.log.in_sync(region) == 1 else RegionState.NOSYNC

    def _find(self, region: int) -> _Region:
        """``__rh_find`` → ``__rh_alloc``: a new entry asks IN_SYNC (any non-zero = clean)
        and a clean one goes on the clean list."""
        reg = self._hash.get(region)
        if reg is None:
            clean = bool(self.log.in_sync(region))
            reg = _Region(RegionState.CLEAN if clean else RegionState.NOSYNC)
            self._hash[region] = reg
            if clean:
                self._clean_regions.appendleft(region)
        return reg

    def _inc(self, region: int) -> None:
        """``rh_inc``: one more write; CLEAN → DIRTY queues the mark."""
        reg = self._find(region)
        reg.pending += 1
        if reg.state is RegionState.CLEAN:
            reg.state = RegionState.DIRTY
            self._clean_regions.remove(region)
            self.log.mark_region(region)

    def _dec(self, region: int) -> None:
        """``dm_rh_dec``: a write completed; a quiet region moves on."""
        reg = self._hash[region]
        reg.pending -= 1
        if reg.pending:
            return
        if reg.state is RegionState.RECOVERING:
            self._quiesced.append(region)
        elif reg.state is RegionState.DIRTY:
            reg.state = RegionState.CLEAN
            self._clean_regions.appendleft(region)

    # --- I/O ---------------------------------------------------------------------------------

    def write(self, regions: Iterable[int], complete: bool = True) -> list[int]:
        """``do_writes`` for one write bio per region (after any queued ones).

        Returns the regions whose writes were requeued because IS_REMOTE_RECOVERING said
        so; they stay in :attr:`queued_writes` for the next call.  With ``complete`` the
        writes finish at once, otherwise they stay in flight until :meth:`complete_writes`.
        """
        writes, self.queued_writes = [*self.queued_writes, *regions], []
        sync, nosync, recovering, requeue = [], [], [], []
        for region in writes:
            if self.log.is_remote_recovering(region):
                requeue.append(region)
                continue
            state = self._get_state(region)
            if state is RegionState.NOSYNC:
                nosync.append(region)
            elif state is RegionState.RECOVERING:
                recovering.append(region)
            else:
                sync.append(region)
        self.queued_writes = requeue
        for region in sync + nosync:
            self._inc(region)
        if self.log.flush():
            self.log_failure = True
        else:
            # Marked regions are now durable as dirty; those already dirty still are.
            self._dirty.update(sync)
        for region in recovering:
            self._hash[region].delayed_writes += 1
        # A NOSYNC region's write goes to the default leg only.
        self._unsynced.update(nosync)
        dispatched = sync + nosync
        if complete:
            for region in dispatched:
                self._dec(region)
        else:
            self._in_flight.extend(dispatched)
        return requeue

    def complete_writes(self) -> None:
        """Every write in flight completes (``dm_rh_dec`` for each)."""
        in_flight, self._in_flight = self._in_flight, []
        for region in in_flight:
            self._dec(region)

    def read(self, region: int) -> bool:
        """``do_reads``: whether the read may go to any leg (the region is in sync).
        ``mirror_map`` asks ``in_sync(can_block=0)``, which the userspace log never
        answers, so every read goes to the worker, which asks IN_SYNC unless hashed."""
        return self._get_state(region) in (RegionState.CLEAN, RegionState.DIRTY)

    # --- the worker pass ---------------------------------------------------------------------

    def update_states(self) -> int:
        """``dm_rh_update_states``; returns how many recoveries it completed."""
        recovered, self._recovered = list(self._recovered), deque()
        clean, self._clean_regions = list(self._clean_regions), deque()
        held = {region: self._hash[region].delayed_writes for region in recovered}
        for region in recovered + clean:
            del self._hash[region]
        for region in recovered:
            self.log.clear_region(region)
            self._complete_resync_work(region, held[region])
        for region in clean:
            self.log.clear_region(region)
        # dm_rh_update_states ignores the result; a failure is only a table event.
        if not self.log.flush():
            self._dirty.difference_update(recovered + clean)
        return len(recovered)

    def _complete_resync_work(self, region: int, held_writes: int) -> None:
        """``complete_resync_work``: SET_REGION_SYNC at once, held writes released to the
        next pass, the recovery slot freed."""
        self.log.set_region_sync(region, True)
        self.queued_writes.extend([region] * held_writes)
        self._recovering = None

    def _do_recovery(self) -> bool:
        """``do_recovery``: start a recovery if the slot is free, copy quiet regions, and
        ask GET_SYNC_COUNT until in sync.  Whether a region was started or copied."""
        progressed = False
        if not self._recovery_stopped and self._recovering is None:
            result, region = self.log.get_resync_work()
            if result > 0 and region is not None:
                reg = self._find(region)
                if region in self._clean_regions:
                    self._clean_regions.remove(region)
                reg.state = RegionState.RECOVERING
                self._recovering = region
                if not reg.pending:
                    self._quiesced.append(region)
                progressed = True
        while self._quiesced:
            region = self._quiesced.popleft()
            self._unsynced.discard(region)  # kcopyd copied the default leg to the others
            self._recovered.appendleft(region)
            progressed = True
        if not self.in_sync and self.log.get_sync_count() == self.nr_regions:
            self.in_sync = True
        return progressed

    def recover(self, max_regions: int | None = None) -> int:
        """Worker passes (update_states, then do_recovery) until the mirror is in sync,
        nothing more can be recovered, or ``max_regions`` recoveries were completed.
        Returns how many recoveries were completed (SET_REGION_SYNC sent)."""
        completed = 0
        while True:
            completed += self.update_states()
            if max_regions is not None and completed >= max_regions:
                return completed
            progressed = self._do_recovery()
            if self.in_sync or not progressed:
                return completed

    # --- lifecycle -----------------------------------------------------------------------

    def suspend(self) -> None:
        """``mirror_presuspend`` (stop recovery and finish the one in progress, PRESUSPEND),
        dm waiting for the writes in flight (their completion runs a worker pass: CLEARs and
        FLUSH after PRESUSPEND), then ``mirror_postsuspend`` (POSTSUSPEND)."""
        self._recovery_stopped = True
        while self._recovering is not None:
            # dm_rh_stop_recovery waits; in-flight writes to the region finish meanwhile.
            self._complete_writes_to(self._recovering)
            self._do_recovery()
            self.update_states()
        self.log.presuspend()
        self.complete_writes()
        self.update_states()
        self.log.postsuspend()
        self.suspended = True

    def _complete_writes_to(self, region: int) -> None:
        still = [r for r in self._in_flight if r != region]
        for _ in range(len(self._in_flight) - len(still)):
            self._dec(region)
        self._in_flight = still

    def resume(self) -> None:
        """``mirror_resume``: RESUME, then recovery may start (on the next worker pass)."""
        self.log.resume()
        self._recovery_stopped = False
        self.suspended = False

    def reload(self, log_type: str, log_args: Sequence[str], *,
               target_sectors: int | None = None, integrated_flush: bool | None = None,
               flush_delay: float = 3.0) -> Mirror:
        """A table reload with a new log: CTR of a new instance (same uuid, new luid) while
        this one is live, this one suspended, the new one resumed, this one's DTR.  The
        legs are the same devices, so the oracle carries over."""
        new_log = UserspaceLog.construct(
            self.log.conn, self.log.uuid, log_type, log_args,
            self.log.target_sectors if target_sectors is None else target_sectors,
            integrated_flush=(self.log.integrated_flush if integrated_flush is None
                              else integrated_flush),
            flush_delay=flush_delay)
        if not self.suspended:
            self.suspend()
        # What the legs are like once this one's I/O has drained at its suspend.
        grown = range(self.nr_regions, new_log.region_count)
        new = Mirror(new_log, legs_differ=self._unsynced.union(grown), dirty=self._dirty,
                     nr_legs=self.nr_legs)
        new.resume()
        self.log.dtr()
        return new

    def status(self) -> str:
        """``mirror_status(STATUSTYPE_INFO)``: GET_SYNC_COUNT, then the log's STATUS_INFO
        in what is left of the status buffer."""
        legs = " ".join(f"8:{16 * (leg + 1)}" for leg in range(self.nr_legs))
        head = (f"{self.nr_legs} {legs} {self.log.get_sync_count()}/{self.nr_regions} 1 "
                f"{'A' * self.nr_legs} ")
        return head + self.log.status_info(maxlen=STATUS_BUFFER - len(head))

    def destroy(self) -> None:
        """Device removal: dm suspends a live table first, then ``mirror_dtr`` → DTR."""
        if not self.suspended:
            self.suspend()
        self.log.dtr()

    # --- the oracle ----------------------------------------------------------------------------

    def regions_may_differ(self) -> set[int]:
        """Regions whose legs may differ after a crash now: none of them may be clean."""
        in_flight = {region for region, reg in self._hash.items() if reg.pending}
        return self._dirty | self._unsynced | in_flight

    def regions_unsynced(self) -> set[int]:
        """Regions never recovered (or written to one leg): none of them may be in sync."""
        return set(self._unsynced)

    def verify(self) -> None:
        """Ask the server (IS_CLEAN, IN_SYNC) about every region whose legs may differ;
        AssertionError naming each one it calls clean or in sync."""
        lies = [f"region {region} reported clean"
                for region in sorted(self.regions_may_differ())
                if self.log.is_clean(region) == 1]
        lies += [f"region {region} reported in sync, never recovered"
                 for region in sorted(self._unsynced) if self.log.in_sync(region) == 1]
        if lies:
            raise AssertionError(f"log {self.log.uuid} (luid {self.log.luid:#x}): the legs "
                                 f"may differ but: {'; '.join(lies)}")
