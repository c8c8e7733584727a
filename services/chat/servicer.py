"""The gRPC servicer: thin glue from ChatService RPCs to the domain API."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc.aio
from agentplane.chat.v1 import chat_service_pb2, chat_service_pb2_grpc

from services.chat.service import ChatAPI


class ChatServicer(chat_service_pb2_grpc.ChatServiceServicer):
    """Every RPC delegates to `ChatAPI`; domain errors are mapped by the kit's interceptor."""

    def __init__(self, api: ChatAPI) -> None:
        self._api = api

    async def CreateChat(
        self, request: chat_service_pb2.CreateChatRequest, context: grpc.aio.ServicerContext
    ) -> chat_service_pb2.CreateChatResponse:
        return await self._api.create_chat(request)

    async def GetChat(
        self, request: chat_service_pb2.GetChatRequest, context: grpc.aio.ServicerContext
    ) -> chat_service_pb2.GetChatResponse:
        return await self._api.get_chat(request)

    async def ListChats(
        self, request: chat_service_pb2.ListChatsRequest, context: grpc.aio.ServicerContext
    ) -> chat_service_pb2.ListChatsResponse:
        return await self._api.list_chats(request)

    async def UpdateChat(
        self, request: chat_service_pb2.UpdateChatRequest, context: grpc.aio.ServicerContext
    ) -> chat_service_pb2.UpdateChatResponse:
        return await self._api.update_chat(request)

    async def DeleteChat(
        self, request: chat_service_pb2.DeleteChatRequest, context: grpc.aio.ServicerContext
    ) -> chat_service_pb2.DeleteChatResponse:
        return await self._api.delete_chat(request)

    async def SendMessage(
        self, request: chat_service_pb2.SendMessageRequest, context: grpc.aio.ServicerContext
    ) -> chat_service_pb2.SendMessageResponse:
        return await self._api.send_message(request)

    async def EditMessage(
        self, request: chat_service_pb2.EditMessageRequest, context: grpc.aio.ServicerContext
    ) -> chat_service_pb2.EditMessageResponse:
        return await self._api.edit_message(request)

    async def ListMessages(
        self, request: chat_service_pb2.ListMessagesRequest, context: grpc.aio.ServicerContext
    ) -> chat_service_pb2.ListMessagesResponse:
        return await self._api.list_messages(request)

    async def ListQueuedMessages(
        self, request: chat_service_pb2.ListQueuedMessagesRequest, context: grpc.aio.ServicerContext
    ) -> chat_service_pb2.ListQueuedMessagesResponse:
        return await self._api.list_queued_messages(request)

    async def DeleteQueuedMessage(
        self, request: chat_service_pb2.DeleteQueuedMessageRequest, context: grpc.aio.ServicerContext
    ) -> chat_service_pb2.DeleteQueuedMessageResponse:
        return await self._api.delete_queued_message(request)

    async def PromoteQueuedMessage(
        self, request: chat_service_pb2.PromoteQueuedMessageRequest, context: grpc.aio.ServicerContext
    ) -> chat_service_pb2.PromoteQueuedMessageResponse:
        return await self._api.promote_queued_message(request)

    async def InterruptChat(
        self, request: chat_service_pb2.InterruptChatRequest, context: grpc.aio.ServicerContext
    ) -> chat_service_pb2.InterruptChatResponse:
        return await self._api.interrupt_chat(request)

    async def ForkChat(
        self, request: chat_service_pb2.ForkChatRequest, context: grpc.aio.ServicerContext
    ) -> chat_service_pb2.ForkChatResponse:
        return await self._api.fork_chat(request)

    async def CompactChat(
        self, request: chat_service_pb2.CompactChatRequest, context: grpc.aio.ServicerContext
    ) -> chat_service_pb2.CompactChatResponse:
        return await self._api.compact_chat(request)

    async def StreamChat(
        self, request: chat_service_pb2.StreamChatRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[chat_service_pb2.StreamChatResponse]:
        async for event in self._api.stream_chat(request):
            yield chat_service_pb2.StreamChatResponse(event=event)

    async def WatchChats(
        self, request: chat_service_pb2.WatchChatsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[chat_service_pb2.WatchChatsResponse]:
        async for change in self._api.watch_chats(request):
            yield change

    async def GetUsage(
        self, request: chat_service_pb2.GetUsageRequest, context: grpc.aio.ServicerContext
    ) -> chat_service_pb2.GetUsageResponse:
        return await self._api.get_usage(request)
