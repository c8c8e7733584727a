"""Generate: resolve the model, call the provider with our retry loop, coalesce, normalize.

This is the domain code behind the Generate RPC. It yields `GenerateResponse` messages (the
normalized event model of inference.proto) and raises the kit's domain errors; it does not
import grpc, so it is tested without a server.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from agentplane.config.v1 import config_pb2
from agentplane.inference.v1 import inference_pb2, inference_service_pb2

from services.common import tracing
from services.common.errors import AgentplaneError, FailedPrecondition, NotFound
from services.common.logs import register_secret
from services.inference import classify
from services.inference.adapters import anthropic_messages, openai_chat, openai_responses
from services.inference.clients import ProviderClients
from services.inference.coalesce import REASONING, TEXT, Coalescer
from services.inference.events import Finished, ReasoningChunk, TextChunk, ToolCall, UsageReport
from services.inference.metrics import InferenceMetrics
from services.inference.resolver import ModelResolver
from services.inference.retry import RetryPolicy
from services.inference.settings import InferenceSettings
from services.inference.usage import cost_micros

log = logging.getLogger(__name__)

GenerateResponse = inference_service_pb2.GenerateResponse
FINISH = {
    "stop": inference_pb2.FINISH_REASON_STOP,
    "tool_calls": inference_pb2.FINISH_REASON_TOOL_CALLS,
    "length": inference_pb2.FINISH_REASON_LENGTH,
    "content_filter": inference_pb2.FINISH_REASON_CONTENT_FILTER,
}
PROVIDER_LABELS = {
    config_pb2.PROVIDER_TYPE_OPENAI: "openai",
    config_pb2.PROVIDER_TYPE_ANTHROPIC: "anthropic",
    config_pb2.PROVIDER_TYPE_OPENAI_COMPATIBLE: "openai_compatible",
}


@dataclass(frozen=True)
class Target:
    """A resolved model with its provider and key."""

    model: config_pb2.ModelConfig
    provider: config_pb2.Provider
    api_key: str

    @property
    def provider_label(self) -> str:
        """The provider type's short name (metrics label)."""
        return PROVIDER_LABELS.get(self.provider.type, "unknown")

    @property
    def description(self) -> str:
        """`<type> provider "<name>"` for error messages."""
        name = self.provider.display_name or self.provider.id
        return f'{self.provider_label} provider "{name}"'


class Generator:
    """Runs generations; one instance per server, shared by all calls."""

    def __init__(
        self,
        resolver: ModelResolver,
        settings: InferenceSettings | None = None,
        *,
        clients: ProviderClients | None = None,
        metrics: InferenceMetrics | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings or InferenceSettings()
        self.resolver = resolver
        self.clients = clients or ProviderClients(
            connect_timeout_s=self.settings.connect_timeout_s, read_timeout_s=self.settings.read_timeout_s
        )
        self.metrics = metrics or InferenceMetrics.for_registry()
        self.retry = RetryPolicy(
            max_attempts=self.settings.max_attempts,
            base_delay_s=self.settings.retry_base_ms / 1000,
            max_delay_s=self.settings.retry_max_delay_ms / 1000,
            budget_s=self.settings.retry_budget_s,
        )
        self.clock = clock

    async def resolve(self, model_config_id: str) -> Target:
        """The model config, its provider and key; refuses disabled providers."""
        resolved = await self.resolver.resolve_model(model_config_id)
        provider = resolved.provider
        if not provider.enabled:
            raise FailedPrecondition(
                f"provider {provider.display_name or provider.id} of model "
                f"{resolved.model_config.model_name} is disabled",
                reason=classify.MODEL_NOT_AVAILABLE,
                metadata={"provider_id": provider.id, "model_config_id": resolved.model_config.id},
            )
        creds = await self.resolver.get_provider_credentials(provider.id)
        if creds.api_key:
            register_secret(creds.api_key)
        return Target(
            resolved.model_config, creds.provider if creds.HasField("provider") else provider, creds.api_key
        )

    def open_stream(
        self, target: Target, request: inference_service_pb2.GenerateRequest
    ) -> AsyncIterator[Any]:
        """The adapter stream for one attempt."""
        client = self.clients.get(target.provider, target.api_key)
        ptype = target.provider.type
        if ptype == config_pb2.PROVIDER_TYPE_ANTHROPIC:
            params = anthropic_messages.build_params(request, target.model, self.settings.default_max_tokens)
            return anthropic_messages.stream(client, params)
        if ptype == config_pb2.PROVIDER_TYPE_OPENAI and target.model.options.use_responses_api:
            return openai_responses.stream(client, openai_responses.build_params(request, target.model))
        return openai_chat.stream(client, openai_chat.build_params(request, target.model, ptype))

    async def generate(
        self, request: inference_service_pb2.GenerateRequest
    ) -> AsyncIterator[GenerateResponse]:
        """Stream one generation (request already validated). Raises domain errors."""
        started = self.clock()
        try:
            target = await self.resolve(request.model_config_id)
        except NotFound as exc:
            raise NotFound(str(exc), reason=classify.MODEL_NOT_AVAILABLE, metadata=exc.metadata) from None
        labels = (target.provider_label, target.model.model_name)
        attempt = 0
        output_started = False
        while True:
            attempt += 1
            # The provider's HTTP stream, as a span of its own (not current: this generator yields
            # inside it, and the SDK's HTTP client is not instrumented).
            span = tracing.start_span(
                f"chat {target.model.model_name}",
                attributes={
                    "gen_ai.operation.name": "chat",
                    "gen_ai.system": target.provider_label,
                    "gen_ai.request.model": target.model.model_name,
                    "agentplane.attempt": attempt,
                },
            )
            run = _Run(self, target, started, labels, span)
            try:
                async for event in run.events(self.open_stream(target, request)):
                    yield event
                self.metrics.requests.labels(*labels, "ok").inc()
                self.metrics.provider_requests.labels(*labels, "ok").inc()
                _end(span)
                return
            except AgentplaneError as exc:
                _end(span, exc.reason)
                raise
            except (asyncio.CancelledError, GeneratorExit):
                self.metrics.requests.labels(*labels, "cancelled").inc()
                self.metrics.provider_requests.labels(*labels, "cancelled").inc()
                _end(span)
                raise
            except Exception as exc:
                failure = classify.classify(exc, base_url=target.provider.base_url)
                output_started = run.output_started
                if failure.reason == classify.PROVIDER_AUTH_FAILED:
                    # The key may have been rotated: fetch credentials afresh next time.
                    self.clients.forget(target.provider.id)
                delay = None
                if failure.retryable and not output_started:
                    delay = self.retry.delay(attempt, failure.retry_after_s, self.clock() - started)
                if delay is None:
                    error = classify.to_domain_error(
                        failure,
                        provider=target.description,
                        model=target.model.model_name,
                        attempts=attempt,
                        output_started=output_started,
                        secret=target.api_key,
                    )
                    self.metrics.errors.labels(*labels, error.reason).inc()
                    self.metrics.requests.labels(*labels, "error").inc()
                    self.metrics.provider_requests.labels(*labels, "error").inc()
                    _end(span, error.reason)
                    log.warning(
                        "generation failed",
                        extra={"reason": error.reason, "attempts": attempt, "detail": failure.detail[:500]},
                    )
                    raise error from None
                self.metrics.retries.labels(*labels, failure.reason).inc()
                self.metrics.provider_requests.labels(*labels, "retried").inc()
                _end(span, failure.reason)
                # A provider may quote the key it was sent (an echoing proxy, a verbose error).
                detail = classify.redact(failure.detail, target.api_key)
                yield GenerateResponse(
                    retry=inference_pb2.RetryNotice(
                        attempt=attempt + 1,
                        max_attempts=self.retry.max_attempts,
                        delay_ms=round(delay * 1000),
                        reason=failure.reason,
                        message=f"{target.description} (model {target.model.model_name}): {detail}"[:1000],
                    )
                )
                await asyncio.sleep(delay)


def _end(span: Any, error_reason: str = "") -> None:
    """End a provider span (None: tracing is off), as failed with `error_reason` when given."""
    if span is None:
        return
    if error_reason:
        from opentelemetry.trace import Status, StatusCode

        span.set_attribute("error.type", error_reason)
        span.set_status(Status(StatusCode.ERROR, error_reason))
    span.end()


class _Run:
    """One attempt: reads the adapter stream, coalesces deltas, emits normalized events."""

    def __init__(
        self, gen: Generator, target: Target, started: float, labels: tuple[str, str], span: Any = None
    ) -> None:
        self.gen = gen
        self.target = target
        self.started = started
        self.labels = labels
        self.span = span
        self.output_started = False
        self.first_output_at = 0.0

    def _mark_output(self) -> None:
        if not self.output_started:
            self.output_started = True
            self.first_output_at = self.gen.clock()
            self.gen.metrics.ttft.labels(*self.labels).observe(self.first_output_at - self.started)

    def _delta(self, kind: int, text: str) -> GenerateResponse:
        self._mark_output()
        if kind == TEXT:
            return GenerateResponse(text_delta=inference_pb2.TextDelta(text=text))
        return GenerateResponse(reasoning_delta=inference_pb2.ReasoningDelta(text=text))

    async def events(self, source: AsyncIterator[Any]) -> AsyncIterator[GenerateResponse]:
        clock = self.gen.clock
        coalescer = Coalescer(self.gen.settings.coalesce_ms / 1000)
        usage: UsageReport | None = None
        pipe = _Pipe(source)
        items = pipe.items
        try:
            while True:
                if not items:
                    if pipe.done:
                        if pipe.error is not None:
                            raise pipe.error
                        break
                    if coalescer.pending:
                        # Something is buffered: wait for the next event only until the buffer is due.
                        wait = coalescer.due_in(clock())
                        if wait > 0:
                            await pipe.wait(wait)
                        if not items and not pipe.done:
                            yield self._delta(*coalescer.take())
                            coalescer.mark_flushed(clock())
                    else:
                        await pipe.wait(None)
                    continue
                event = items.popleft()
                if type(event) is TextChunk:
                    if event.text:
                        for kind, text in coalescer.add(TEXT, event.text, clock()):
                            yield self._delta(kind, text)
                elif type(event) is ReasoningChunk:
                    if event.text:
                        for kind, text in coalescer.add(REASONING, event.text, clock()):
                            yield self._delta(kind, text)
                    if event.signature or event.redacted:
                        if coalescer.pending:
                            yield self._delta(*coalescer.take())
                        self._mark_output()
                        yield GenerateResponse(
                            reasoning_delta=inference_pb2.ReasoningDelta(
                                signature=event.signature, redacted_data=event.redacted
                            )
                        )
                elif type(event) is ToolCall:
                    if coalescer.pending:
                        yield self._delta(*coalescer.take())
                        coalescer.mark_flushed(clock())
                    self._mark_output()
                    yield GenerateResponse(
                        tool_call=inference_pb2.ToolCallPart(
                            id=event.id, name=event.name, arguments_json=event.arguments
                        )
                    )
                elif type(event) is UsageReport:
                    usage = event
                elif type(event) is Finished:
                    if coalescer.pending:
                        yield self._delta(*coalescer.take())
                    yield self._usage_event(usage or UsageReport())
                    self._observe_speed(usage)
                    yield GenerateResponse(
                        finish=inference_pb2.Finish(
                            reason=FINISH.get(event.reason, inference_pb2.FINISH_REASON_STOP),
                            model=event.model,
                            provider_response_id=event.response_id,
                        )
                    )
                    return
        finally:
            # Stopping the reader closes the SDK stream: the provider connection goes at once.
            await pipe.close()

    def _usage_event(self, usage: UsageReport) -> GenerateResponse:
        message = inference_pb2.Usage(
            input_tokens=usage.input_tokens,
            output_tokens=usage.output_tokens,
            reasoning_tokens=usage.reasoning_tokens,
            cache_read_tokens=usage.cache_read_tokens,
            cache_write_tokens=usage.cache_write_tokens,
        )
        cost = cost_micros(usage, self.target.model)
        if cost is not None:
            message.cost_micros = cost
        self._count(usage, cost)
        return GenerateResponse(usage=message)

    def _count(self, usage: UsageReport, cost: int | None) -> None:
        tokens = self.gen.metrics.tokens
        for kind, n in (
            ("input", usage.input_tokens),
            ("output", usage.output_tokens),
            ("reasoning", usage.reasoning_tokens),
            ("cache_read", usage.cache_read_tokens),
            ("cache_write", usage.cache_write_tokens),
        ):
            if n:
                tokens.labels(*self.labels, kind).inc(n)
        if cost:
            self.gen.metrics.cost.labels(*self.labels).inc(cost / 1_000_000)
        if self.span is not None:
            self.span.set_attribute("gen_ai.usage.input_tokens", usage.input_tokens)
            self.span.set_attribute("gen_ai.usage.output_tokens", usage.output_tokens)

    def _observe_speed(self, usage: UsageReport | None) -> None:
        if usage is None or not self.output_started or usage.output_tokens <= 1:
            return
        elapsed = self.gen.clock() - self.first_output_at
        if elapsed > 0:
            self.gen.metrics.tokens_per_second.labels(*self.labels).observe(usage.output_tokens / elapsed)


class _Pipe:
    """Reads an adapter stream in its own task into a deque the generation loop drains.

    Draining without an await per event keeps the hot path cheap, and the loop can wait for
    "next event or coalescing deadline" with one future and one timer instead of a task per read.
    """

    def __init__(self, source: AsyncIterator[Any]) -> None:
        self.items: deque[Any] = deque()
        self.done = False
        self.error: BaseException | None = None
        self._source = source
        self._waiter: asyncio.Future[None] | None = None
        self._task = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        source = self._source
        try:
            async for event in source:
                self.items.append(event)
                if self._wake():
                    # The loop was waiting (say, for the first token): let it send now instead of
                    # after the rest of an already-buffered burst has been parsed.
                    await asyncio.sleep(0)
        except Exception as exc:
            self.error = exc
        finally:
            self.done = True
            self._wake()
            aclose = getattr(source, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(Exception):
                    await aclose()

    def _wake(self) -> bool:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
            return True
        return False

    async def wait(self, within: float | None) -> None:
        """Until an event arrives, the stream ends, or `within` seconds pass."""
        if self.items or self.done:
            return
        loop = asyncio.get_running_loop()
        waiter = self._waiter = loop.create_future()
        timer = loop.call_later(within, self._wake) if within is not None else None
        try:
            await waiter
        finally:
            if timer is not None:
                timer.cancel()
            self._waiter = None

    async def close(self) -> None:
        """Stop reading (cancelling the provider read) and wait until the stream is closed."""
        if not self._task.done():
            self._task.cancel()
        # The reader's own finally closes the SDK stream; wait for it so nothing leaks.
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
