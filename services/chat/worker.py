"""Chat workers of one replica: claim pending chats, renew leases, sweep expired ones.

A chat becoming PENDING wakes the claim loop at once through a Postgres notification; a
periodic poll is the fallback. Claims use ``FOR UPDATE SKIP LOCKED``; one statement renews
every lease of this worker; a renewal that no longer lists a chat (or lists it with another
generation) means the chat was taken away, and its run is cancelled at once. Interrupts
arrive as notifications (or through the renewal) and set the run's interrupt signal.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from services.chat.domain import Claim, LeaseLost
from services.chat.loop import LoopConfig, Model, Prompts, RunContext, Tools, run_chat
from services.chat.notify import Notifier
from services.chat.settings import ChatSettings
from services.chat.store import INTERRUPT_CHANNEL, PENDING_CHANNEL, ChatStore
from services.common import logs

log = logging.getLogger(__name__)


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

    async def start(self) -> None:
        """Start the claim, renewal and sweep loops."""
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
            try:
                free = self._settings.max_concurrent_chats - len(self.runs)
                while free > 0 and not self._stopping:
                    self._claiming, self._interrupt_while_claiming = True, False
                    try:
                        claims = await self._store.claim(self.worker_id, free, self._settings.lease_seconds)
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
            except LeaseLost:
                log.info("chat taken away; run stopped", extra={"chat_id": ctx.chat_id})
            except asyncio.CancelledError:
                if not self._stopping:
                    log.info("run cancelled: lease lost", extra={"chat_id": ctx.chat_id})
            except Exception as exc:
                log.exception("run failed", extra={"chat_id": ctx.chat_id})
                with contextlib.suppress(Exception):
                    await self._store.fail_run(
                        ctx.chat_id, ctx.fence, "INTERNAL", f"the agent loop failed unexpectedly: {exc}"
                    )
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
                log.exception("renewing leases failed")

    async def renew_once(self) -> None:
        """Renew every lease in one statement; stop runs we lost; signal interrupts."""
        began = time.monotonic()
        result = await self._store.renew(self.worker_id, self._settings.lease_seconds)
        for chat_id, run in list(self.runs.items()):
            if run.claimed_at >= began:
                continue  # claimed after the renewal read the table: it says nothing about this run
            fence = result.held.get(chat_id)
            if fence is None or fence != run.ctx.fence:
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
                    log.info("returned chats with expired leases", extra={"chats": len(swept)})
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
