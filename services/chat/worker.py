"""Chat workers of one replica: claim pending chats, renew leases, sweep those of dead owners.

A chat becoming PENDING wakes the claim loop at once through a Postgres notification; a
periodic poll is the fallback. Claims use ``FOR UPDATE SKIP LOCKED``. One statement renews the
leases of the runs this worker holds in memory and hands back any other chat the database says
it owns; a renewal that no longer lists a run's chat (or lists it with another generation) means
the chat was taken away, and its run is cancelled at once. Interrupts arrive as notifications
(or through the renewal) and set the run's interrupt signal.

A chat is never left RUNNING without a live run: a run the database failed hands its chat back
(PENDING) and one that failed otherwise ends it in ERROR, each retried with backoff while the
run keeps its lease. The worker claims only while it holds its liveness lock (`liveness.py`);
losing that lock, or going a lease without a renewal, stops its runs, since other replicas may
then take their chats.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from services.chat.domain import Claim, LeaseLost
from services.chat.liveness import LivenessLock
from services.chat.loop import LoopConfig, Model, Prompts, RunContext, Tools, run_chat
from services.chat.metrics import UNEXPORTED, ChatMetrics
from services.chat.notify import Notifier
from services.chat.settings import ChatSettings
from services.chat.store import INTERRUPT_CHANNEL, PENDING_CHANNEL, ChatStore
from services.common import db, logs

log = logging.getLogger(__name__)

# A run the database failed is handed back this many times in a row by one worker; the next
# failure ends the chat in ERROR (a statement that always fails must not loop forever).
MAX_DATABASE_HANDBACKS = 3
# Backoff of a hand-back or ERROR that the database refused (first delay, cap), in seconds.
SETTLE_DELAYS = (0.2, 5.0)


@dataclass
class _Run:
    ctx: RunContext
    task: asyncio.Task[None]
    claimed_at: float


class Worker:
    """Runs up to `settings.max_concurrent_chats` chats of this replica."""

    def __init__(
        self,
        store: ChatStore,
        settings: ChatSettings,
        notifier: Notifier,
        *,
        model: Model,
        tools: Tools,
        prompts: Prompts,
        on_step: Callable[[float], None] | None = None,
        metrics: ChatMetrics = UNEXPORTED,
        database_url: str | None = None,
    ) -> None:
        self._store = store
        self._settings = settings
        self._notifier = notifier
        self._model = model
        self._tools = tools
        self._prompts = prompts
        self._on_step = on_step
        self.worker_id = settings.worker_id
        self.runs: dict[str, _Run] = {}
        self._wake = asyncio.Event()
        self._renew_now = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._unsubscribe: list[Callable[[], None]] = []
        self._stopping = False
        # While a claim statement is in flight its chats are not in `runs` yet; an interrupt
        # notified meanwhile is honoured by one more renewal once they are.
        self._claiming = False
        self._interrupt_while_claiming = False
        # Held by a claim (statement and registration) and by a renewal: a renewal must know every
        # run that holds a chat, or it would hand back a chat just claimed.
        self._lease_lock = asyncio.Lock()
        # When the last successful renewal began (a run's lease runs from then or its claim).
        self._renewed_at = time.monotonic()
        self._database_failures: dict[str, int] = {}
        # Other replicas see this worker alive through it (None: leases alone, e.g. in store tests).
        self._liveness = (
            LivenessLock(database_url, self.worker_id, on_held=self._on_lock_held, on_lost=self._on_lock_lost)
            if database_url
            else None
        )
        self._metrics = metrics
        metrics.runs.set_function(lambda: len(self.runs))
        metrics.run_capacity.set(settings.max_concurrent_chats)

    async def start(self) -> None:
        """Take the liveness lock, then start the claim, renewal and sweep loops."""
        if self._liveness is not None:
            await self._liveness.start()
        self._unsubscribe.append(self._notifier.add(PENDING_CHANNEL, lambda _p: self._wake.set()))
        self._unsubscribe.append(self._notifier.add(INTERRUPT_CHANNEL, self._on_interrupt))
        self._tasks = [
            asyncio.create_task(self._claim_loop()),
            asyncio.create_task(self._renew_loop()),
            asyncio.create_task(self._sweep_loop()),
        ]

    def _on_interrupt(self, chat_id: str) -> None:
        if chat_id in self.runs:
            self._renew_now.set()
        elif self._claiming:
            self._interrupt_while_claiming = True

    async def _claim_loop(self) -> None:
        while not self._stopping:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._settings.poll_interval_seconds)
            self._wake.clear()
            if self._liveness is not None and not self._liveness.held:
                # Other replicas would hand back what it claims at once; `_on_lock_held` wakes us.
                continue
            try:
                free = self._settings.max_concurrent_chats - len(self.runs)
                while free > 0 and not self._stopping:
                    async with self._lease_lock:
                        self._claiming, self._interrupt_while_claiming = True, False
                        try:
                            claims = await self._store.claim(
                                self.worker_id, free, self._settings.lease_seconds
                            )
                        finally:
                            self._claiming = False
                        for claim in claims:
                            self._start_run(claim)
                    if self._interrupt_while_claiming:
                        # A renewal from now on reads the interrupt flag and sees the new runs.
                        self._renew_now.set()
                    if len(claims) < free:
                        break
                    free = self._settings.max_concurrent_chats - len(self.runs)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("claiming chats failed")

    def _start_run(self, claim: Claim) -> None:
        ctx = RunContext(
            chat_id=claim.chat_id,
            fence=claim.fence,
            store=self._store,
            model=self._model,
            tools=self._tools,
            prompts=self._prompts,
            config=LoopConfig(
                step_limit=self._settings.step_limit, delta_flush_ms=self._settings.delta_flush_ms
            ),
            started=claim.info,
            metrics=self._metrics,
        )
        claimed_at = time.monotonic()
        if claim.info is not None:
            # The claim's statement started the turn (and cleared the interrupt flag): from its
            # commit on, which is before now, a renewal's view of the flag is about this turn.
            ctx.turn_started = claimed_at
        task = asyncio.create_task(self._run(ctx))
        self.runs[claim.chat_id] = _Run(ctx, task, claimed_at)

    async def _run(self, ctx: RunContext) -> None:
        with logs.request_id_scope():
            try:
                await run_chat(ctx)
                self._database_failures.pop(ctx.chat_id, None)
            except LeaseLost:
                self._metrics.turn_outcome["lost"].inc()
                log.info("chat taken away; run stopped", extra={"chat_id": ctx.chat_id})
            except asyncio.CancelledError:
                if not self._stopping:
                    self._metrics.turn_outcome["lost"].inc()
                    log.info("run cancelled: lease lost", extra={"chat_id": ctx.chat_id})
            except Exception as exc:
                # Until this settles, the run stays in `runs`: renewals keep its lease (or cancel
                # this when the chat is taken away), so the chat is never left owned by nobody.
                await self._run_failed(ctx, exc)
            finally:
                # Only a full replica may have left pending chats unclaimed; otherwise the
                # notification (or the poll) already woke the claim loop for them.
                was_full = len(self.runs) >= self._settings.max_concurrent_chats
                run = self.runs.get(ctx.chat_id)
                if run is not None and run.ctx is ctx:
                    del self.runs[ctx.chat_id]
                if self._on_step is not None:
                    for s in ctx.step_seconds:
                        self._on_step(s)
                if was_full:
                    self._wake.set()

    async def _run_failed(self, ctx: RunContext, exc: Exception) -> None:
        """A run raised: hand its chat back when the database failed it, else end it in ERROR."""
        chat_id = ctx.chat_id
        failure = db.database_error(exc)
        if failure is not None:
            failures = self._database_failures.pop(chat_id, 0) + 1
            self._database_failures[chat_id] = failures  # newest last: the oldest go first
            while len(self._database_failures) > 1000:
                del self._database_failures[next(iter(self._database_failures))]
            if failures <= MAX_DATABASE_HANDBACKS:
                # The database restarted or was away: any worker can continue from the history.
                log.warning(
                    "run stopped by a database failure; handing the chat back",
                    extra={"chat_id": chat_id, "error": f"{type(exc).__name__}: {exc}"},
                )
                await self._settle(ctx, lambda: self._store.release(chat_id, ctx.fence), "hand back")
                return
            reason = failure.reason
            message = (
                f"the database failed this chat's run {failures} times in a row ({failure.reason});"
                " send a message to retry, and tell an operator if it happens again"
            )
            log.error("run failed by the database again; ending it in ERROR", extra={"chat_id": chat_id})
        else:
            reason = "INTERNAL"
            # Shown to the user: what broke stays in the log (database details, values).
            message = (
                f"the agent loop failed unexpectedly ({type(exc).__name__}, request id "
                f"{logs.current_request_id()}); send a message to retry, and tell an operator "
                "if it happens again"
            )
            log.error("run failed", extra={"chat_id": chat_id}, exc_info=exc)
        self._metrics.turn_outcome["error" if failure is None else "failed"].inc()
        self._metrics.turn_errors.labels(reason).inc()
        await self._settle(
            ctx, lambda: self._store.fail_run(chat_id, ctx.fence, reason, message), "end in ERROR"
        )

    async def _settle(self, ctx: RunContext, action: Callable[[], Awaitable[object]], what: str) -> None:
        """Run `action` (a hand-back or an ERROR) until it took effect or the chat is not ours.

        A database failure is retried with a bounded backoff, never dropped. Anything else is a
        bug that a retry would repeat: it is logged, and the chat, still ours in the database but
        no longer in `runs`, is handed back by the next renewal.
        """
        delay, cap = SETTLE_DELAYS
        logged = False
        while True:
            try:
                await action()
                return
            except LeaseLost:
                return  # swept, edited or deleted meanwhile: no longer this worker's to settle
            except Exception as exc:
                if db.database_error(exc) is None:
                    log.error(f"could not {what} a chat", extra={"chat_id": ctx.chat_id}, exc_info=exc)
                    return
                if not logged:  # once per chat, not once per retry while the database is away
                    logged = True
                    log.warning(
                        f"could not {what} a chat; retrying until the database answers",
                        extra={"chat_id": ctx.chat_id, "error": f"{type(exc).__name__}: {exc}"},
                    )
            await asyncio.sleep(delay)
            delay = min(delay * 2, cap)

    def _on_lock_held(self) -> None:
        # The first renewal hands back what runs stopped while the lock was away left owned.
        self._renew_now.set()
        self._wake.set()

    def _on_lock_lost(self) -> None:
        if self._stopping:
            return
        if self.runs:
            log.warning(
                "lost the liveness lock; stopping this worker's runs (other replicas may take their chats)",
                extra={"runs": len(self.runs)},
            )
        for run in self.runs.values():
            run.task.cancel()

    def _stop_runs_past_their_lease(self) -> None:
        """Cancel runs whose lease ran out without a renewal: another replica's sweep may take
        their chats (the liveness lock cannot say so when the database cannot see us: a partition)."""
        now = time.monotonic()
        for chat_id, run in self.runs.items():
            if now - max(self._renewed_at, run.claimed_at) >= self._settings.lease_seconds:
                if not run.task.done():
                    log.warning("lease ran out without a renewal; stopping run", extra={"chat_id": chat_id})
                    run.task.cancel()

    async def _renew_loop(self) -> None:
        while not self._stopping:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._renew_now.wait(), self._settings.renew_interval_seconds)
            self._renew_now.clear()
            try:
                await self.renew_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                self._metrics.lease_renewals.labels("error").inc()
                log.exception("renewing leases failed")
                self._stop_runs_past_their_lease()

    async def renew_once(self) -> None:
        """Renew the leases of the runs in memory in one statement, handing back any other chat the
        database says this worker owns; stop runs we lost; signal interrupts."""
        async with self._lease_lock:
            began = time.monotonic()
            held = {chat_id: run.ctx.fence.generation for chat_id, run in self.runs.items()}
            result = await self._store.renew(self.worker_id, held, self._settings.lease_seconds)
        self._renewed_at = began
        self._metrics.lease_renewals.labels("ok").inc()
        if result.handed_back:
            log.warning(
                "handed back chats this worker owned without running them",
                extra={"chats": len(result.handed_back)},
            )
        for chat_id, run in list(self.runs.items()):
            if chat_id not in held:
                continue  # registered after the renewal: its answer says nothing about this run
            fence = result.held.get(chat_id)
            if fence is None or fence != run.ctx.fence:
                self._metrics.leases_lost.inc()
                log.warning("lease lost; stopping run", extra={"chat_id": chat_id})
                run.task.cancel()
            elif chat_id in result.interrupted:
                run.ctx.interrupt(seen_at=began)

    async def _sweep_loop(self) -> None:
        while not self._stopping:
            await asyncio.sleep(self._settings.sweep_interval_seconds)
            try:
                swept = await self._store.sweep()
                if swept:
                    self._metrics.leases_swept.inc(len(swept))
                    log.info("handed back chats whose owner is gone", extra={"chats": len(swept)})
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("sweeping leases failed")

    async def stop(self) -> None:
        """Stop claiming; cancel running chats and give them back as PENDING for other replicas."""
        self._stopping = True
        for unsub in self._unsubscribe:
            unsub()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        runs = list(self.runs.values())
        for run in runs:
            run.task.cancel()
        for run in runs:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await run.task
            with contextlib.suppress(Exception):
                await self._store.release(run.ctx.chat_id, run.ctx.fence)
        # Last: while it was held, other replicas left the chats being released alone. One whose
        # release failed is handed back by their sweeps as soon as the session closes.
        if self._liveness is not None:
            await self._liveness.stop()
