"""ConfigService over a real server: behaviour, roles, validation, fallbacks and cache efficiency."""

from __future__ import annotations

from collections.abc import Callable

import grpc
import pytest
from agentplane.config.v1 import config_pb2
from agentplane.config.v1 import config_service_pb2 as pb
from agentplane.config.v1.config_service_pb2_grpc import ConfigServiceStub

from services.config.prompts import DEFAULT_SYSTEM_PROMPT
from services.config.server import ConfigServer
from tests.config.conftest import StubFactory
from tests.config.rpc import create_model, create_provider, expect_error, mask

DENIED = grpc.StatusCode.PERMISSION_DENIED
INVALID = grpc.StatusCode.INVALID_ARGUMENT


async def test_provider_crud_never_returns_the_key(admin: ConfigServiceStub) -> None:
    provider = await create_provider(admin, api_key="sk-secret-1")
    assert provider.api_key_set and provider.enabled and provider.id
    got = (await admin.GetProvider(pb.GetProviderRequest(provider_id=provider.id))).provider
    assert got == provider
    listed = (await admin.ListProviders(pb.ListProvidersRequest())).providers
    assert [p.id for p in listed] == [provider.id]
    updated = (
        await admin.UpdateProvider(
            pb.UpdateProviderRequest(
                provider=config_pb2.Provider(id=provider.id, display_name="renamed"),
                update_mask=mask("display_name", "api_key"),
                api_key="",
            )
        )
    ).provider
    assert updated.display_name == "renamed" and not updated.api_key_set
    await admin.DeleteProvider(pb.DeleteProviderRequest(provider_id=provider.id))
    _, reason, _ = await expect_error(
        admin.GetProvider(pb.GetProviderRequest(provider_id=provider.id)), grpc.StatusCode.NOT_FOUND
    )
    assert reason == "PROVIDER_NOT_FOUND"


async def test_create_is_idempotent_by_request_id(admin: ConfigServiceStub) -> None:
    request = pb.CreateProviderRequest(
        request_id="req-1",
        provider=config_pb2.Provider(
            type=config_pb2.PROVIDER_TYPE_ANTHROPIC, display_name="claude", enabled=True
        ),
        api_key="sk-ant",
    )
    first = (await admin.CreateProvider(request)).provider
    second = (await admin.CreateProvider(request)).provider
    assert first.id == second.id
    assert len((await admin.ListProviders(pb.ListProvidersRequest())).providers) == 1


async def test_delete_provider_in_use_names_the_models(admin: ConfigServiceStub) -> None:
    provider = await create_provider(admin)
    model = await create_model(admin, provider.id, name="gpt-x")
    message, reason, metadata = await expect_error(
        admin.DeleteProvider(pb.DeleteProviderRequest(provider_id=provider.id)),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    assert reason == "PROVIDER_IN_USE"
    assert model.id in message and "gpt-x" in message
    assert metadata["model_config_ids"] == model.id


async def test_first_model_is_default_and_set_default_moves_it(admin: ConfigServiceStub) -> None:
    provider = await create_provider(admin)
    first = await create_model(admin, provider.id, name="a")
    second = await create_model(admin, provider.id, name="b")
    assert first.is_default and not second.is_default
    new_default = await admin.SetDefaultModelConfig(
        pb.SetDefaultModelConfigRequest(model_config_id=second.id)
    )
    assert new_default.model_config.is_default
    models = (await admin.ListModelConfigs(pb.ListModelConfigsRequest())).model_configs
    assert [m.is_default for m in models] == [False, True]
    resolved = await admin.ResolveModel(pb.ResolveModelRequest())
    assert resolved.model_config.id == second.id
    _, reason, _ = await expect_error(
        admin.DeleteModelConfig(pb.DeleteModelConfigRequest(model_config_id=second.id)),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    assert reason == "MODEL_IS_DEFAULT"
    _, reason, _ = await expect_error(
        admin.UpdateModelConfig(
            pb.UpdateModelConfigRequest(
                model_config=config_pb2.ModelConfig(id=second.id), update_mask=mask("enabled")
            )
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    assert reason == "MODEL_IS_DEFAULT"


async def test_resolve_falls_back_for_disabled_and_deleted_models(
    admin: ConfigServiceStub, alice: ConfigServiceStub
) -> None:
    provider = await create_provider(admin)
    default = await create_model(admin, provider.id, name="default")
    other = await create_model(admin, provider.id, name="other")
    direct = await alice.ResolveModel(pb.ResolveModelRequest(model_config_id=other.id))
    assert direct.model_config.id == other.id and not direct.fell_back_to_default
    assert direct.provider.id == provider.id
    await admin.UpdateModelConfig(
        pb.UpdateModelConfigRequest(
            model_config=config_pb2.ModelConfig(id=other.id, enabled=False), update_mask=mask("enabled")
        )
    )
    disabled = await alice.ResolveModel(pb.ResolveModelRequest(model_config_id=other.id))
    assert disabled.fell_back_to_default and disabled.model_config.id == default.id
    assert (
        "not available" in disabled.fallback_reason
    )  # users are not told why (tests/config/test_least_privilege.py)
    disabled = await admin.ResolveModel(pb.ResolveModelRequest(model_config_id=other.id))
    assert disabled.fell_back_to_default and "disabled" in disabled.fallback_reason  # admins are
    await admin.DeleteModelConfig(pb.DeleteModelConfigRequest(model_config_id=other.id))
    deleted = await alice.ResolveModel(pb.ResolveModelRequest(model_config_id=other.id))
    assert deleted.fell_back_to_default and deleted.model_config.id == default.id
    assert "not available" in deleted.fallback_reason
    deleted = await admin.ResolveModel(pb.ResolveModelRequest(model_config_id=other.id))
    assert "does not exist" in deleted.fallback_reason
    # Users do not see disabled models; admins do when they ask.
    hidden = await create_model(admin, provider.id, name="hidden", enabled=False)
    user_list = (
        await alice.ListModelConfigs(pb.ListModelConfigsRequest(include_disabled=True))
    ).model_configs
    assert hidden.id not in [m.id for m in user_list]
    admin_list = (
        await admin.ListModelConfigs(pb.ListModelConfigsRequest(include_disabled=True))
    ).model_configs
    assert hidden.id in [m.id for m in admin_list]
    await expect_error(
        alice.GetModelConfig(pb.GetModelConfigRequest(model_config_id=hidden.id)), grpc.StatusCode.NOT_FOUND
    )


async def test_resolve_without_any_model_says_what_to_do(alice: ConfigServiceStub) -> None:
    message, reason, _ = await expect_error(
        alice.ResolveModel(pb.ResolveModelRequest()), grpc.StatusCode.FAILED_PRECONDITION
    )
    assert reason == "NO_DEFAULT_MODEL" and "admin" in message


async def test_prompts(
    admin: ConfigServiceStub,
    alice: ConfigServiceStub,
    stub_for: StubFactory,
    make_token: Callable[..., str],
    service_token: Callable[[str], str],
) -> None:
    default = (await alice.GetSystemPrompt(pb.GetSystemPromptRequest())).system_prompt
    assert default.is_default and default.text == DEFAULT_SYSTEM_PROMPT
    await admin.UpdateSystemPrompt(pb.UpdateSystemPromptRequest(text="Be terse."))
    current = (await alice.GetSystemPrompt(pb.GetSystemPromptRequest())).system_prompt
    assert current.text == "Be terse." and not current.is_default and current.HasField("update_time")
    await admin.UpdateSystemPrompt(pb.UpdateSystemPromptRequest(text=""))
    assert (await alice.GetSystemPrompt(pb.GetSystemPromptRequest())).system_prompt.is_default

    await alice.UpdateUserPrompt(pb.UpdateUserPromptRequest(text="I use vim"))
    mine = (await alice.GetUserPrompt(pb.GetUserPromptRequest())).user_prompt
    assert mine.user_id == "alice" and mine.text == "I use vim"
    chat = stub_for(service_token("chat"))
    seen = (await chat.GetUserPrompt(pb.GetUserPromptRequest(user_id="alice"))).user_prompt
    assert seen.text == "I use vim"
    acting = (
        await chat.UpdateUserPrompt(
            pb.UpdateUserPromptRequest(text="via chat"), metadata=[("x-agentplane-on-behalf-of", "bob")]
        )
    ).user_prompt
    assert acting.user_id == "bob"
    bob = stub_for(make_token("bob"))
    assert (await bob.GetUserPrompt(pb.GetUserPromptRequest())).user_prompt.text == "via chat"
    await expect_error(alice.GetUserPrompt(pb.GetUserPromptRequest(user_id="bob")), DENIED)
    message, _, _ = await expect_error(
        alice.UpdateUserPrompt(pb.UpdateUserPromptRequest(text="x" * (32 * 1024 + 1))), INVALID
    )
    assert message.startswith("text:")


async def test_templates(admin: ConfigServiceStub, alice: ConfigServiceStub) -> None:
    template = config_pb2.WorkspaceTemplate(
        name="go-service",
        description="A Go service with a Makefile",
        enabled=True,
        parameters=[config_pb2.TemplateParameter(name="module", default_value="example.com/x")],
        source=config_pb2.TemplateSource(git=config_pb2.GitSource(url="/srv/repos/{module}.git", ref="main")),
    )
    created = (
        await admin.CreateWorkspaceTemplate(pb.CreateWorkspaceTemplateRequest(workspace_template=template))
    ).workspace_template
    assert created.parameters[0].default_value == "example.com/x" and created.source.git.ref == "main"
    _, reason, _ = await expect_error(
        admin.CreateWorkspaceTemplate(pb.CreateWorkspaceTemplateRequest(workspace_template=template)),
        grpc.StatusCode.ALREADY_EXISTS,
    )
    assert reason == "WORKSPACE_TEMPLATE_NAME_TAKEN"
    by_name = await alice.GetWorkspaceTemplate(
        pb.GetWorkspaceTemplateRequest(workspace_template_id="go-service")
    )
    assert by_name.workspace_template.id == created.id
    await admin.UpdateWorkspaceTemplate(
        pb.UpdateWorkspaceTemplateRequest(
            workspace_template=config_pb2.WorkspaceTemplate(id=created.id, enabled=False),
            update_mask=mask("enabled"),
        )
    )
    await expect_error(
        alice.GetWorkspaceTemplate(pb.GetWorkspaceTemplateRequest(workspace_template_id=created.id)),
        grpc.StatusCode.NOT_FOUND,
    )
    assert not (await alice.ListWorkspaceTemplates(pb.ListWorkspaceTemplatesRequest())).workspace_templates
    await admin.DeleteWorkspaceTemplate(pb.DeleteWorkspaceTemplateRequest(workspace_template_id=created.id))
    assert not (
        await admin.ListWorkspaceTemplates(pb.ListWorkspaceTemplatesRequest(include_disabled=True))
    ).workspace_templates


async def test_template_network_access(admin: ConfigServiceStub, alice: ConfigServiceStub) -> None:
    source = config_pb2.TemplateSource(directory=config_pb2.DirectorySource(path="/srv/templates/py"))
    plain = (
        await admin.CreateWorkspaceTemplate(
            pb.CreateWorkspaceTemplateRequest(
                workspace_template=config_pb2.WorkspaceTemplate(
                    name="offline", description="No network", enabled=True, source=source
                )
            )
        )
    ).workspace_template
    assert not plain.network_access  # off by default
    created = (
        await admin.CreateWorkspaceTemplate(
            pb.CreateWorkspaceTemplateRequest(
                workspace_template=config_pb2.WorkspaceTemplate(
                    name="online", description="Installs packages", enabled=True, source=source,
                    network_access=True,
                )
            )
        )
    ).workspace_template  # fmt: skip
    assert created.network_access
    got = await alice.GetWorkspaceTemplate(pb.GetWorkspaceTemplateRequest(workspace_template_id="online"))
    assert got.workspace_template.network_access
    listed = (await alice.ListWorkspaceTemplates(pb.ListWorkspaceTemplatesRequest())).workspace_templates
    assert {t.name: t.network_access for t in listed} == {"offline": False, "online": True}

    # Only the masked field changes: a mask without network_access leaves it on.
    renamed = (
        await admin.UpdateWorkspaceTemplate(
            pb.UpdateWorkspaceTemplateRequest(
                workspace_template=config_pb2.WorkspaceTemplate(id=created.id, description="Still online"),
                update_mask=mask("description"),
            )
        )
    ).workspace_template
    assert renamed.network_access and renamed.description == "Still online"
    updated = (
        await admin.UpdateWorkspaceTemplate(
            pb.UpdateWorkspaceTemplateRequest(
                workspace_template=config_pb2.WorkspaceTemplate(id=created.id, network_access=False),
                update_mask=mask("network_access"),
            )
        )
    ).workspace_template
    assert not updated.network_access and updated.description == "Still online" and updated.enabled
    got = await alice.GetWorkspaceTemplate(pb.GetWorkspaceTemplateRequest(workspace_template_id=created.id))
    assert not got.workspace_template.network_access
    await admin.UpdateWorkspaceTemplate(
        pb.UpdateWorkspaceTemplateRequest(
            workspace_template=config_pb2.WorkspaceTemplate(id=plain.id, network_access=True),
            update_mask=mask("network_access"),
        )
    )
    got = await admin.GetWorkspaceTemplate(pb.GetWorkspaceTemplateRequest(workspace_template_id="offline"))
    assert got.workspace_template.network_access


def test_template_from_proto_carries_network_access() -> None:
    from services.toolexec.templates import template_from_proto

    message = config_pb2.WorkspaceTemplate(
        id="t1",
        name="online",
        enabled=True,
        network_access=True,
        source=config_pb2.TemplateSource(git=config_pb2.GitSource(url="/srv/repos/x.git")),
    )
    assert template_from_proto(message).network is True
    message.network_access = False
    assert template_from_proto(message).network is False
    assert template_from_proto(config_pb2.WorkspaceTemplate(name="bare")).network is False


async def test_list_pagination(admin: ConfigServiceStub) -> None:
    ids = [(await create_provider(admin, name=f"p{i}")).id for i in range(5)]
    seen: list[str] = []
    token = ""
    while True:
        page = await admin.ListProviders(pb.ListProvidersRequest(page_size=2, page_token=token))
        assert len(page.providers) <= 2
        seen += [p.id for p in page.providers]
        token = page.next_page_token
        if not token:
            break
    assert seen == ids
    _, _, meta = await expect_error(
        admin.ListProviders(pb.ListProvidersRequest(page_token="garbage")), INVALID
    )
    assert meta["field"] == "page_token"


async def test_wrong_roles_are_refused(
    admin: ConfigServiceStub,
    alice: ConfigServiceStub,
    stub_for: StubFactory,
    service_token: Callable[[str], str],
) -> None:
    provider = await create_provider(admin)
    model = await create_model(admin, provider.id)
    chat = stub_for(service_token("chat"))
    inference = stub_for(service_token("inference"))
    writes = [
        lambda s: s.CreateProvider(
            pb.CreateProviderRequest(
                provider=config_pb2.Provider(
                    type=config_pb2.PROVIDER_TYPE_OPENAI, display_name="x", enabled=True
                )
            )
        ),
        lambda s: s.UpdateProvider(
            pb.UpdateProviderRequest(
                provider=config_pb2.Provider(id=provider.id), update_mask=mask("enabled")
            )
        ),
        lambda s: s.DeleteProvider(pb.DeleteProviderRequest(provider_id=provider.id)),
        lambda s: s.CreateModelConfig(pb.CreateModelConfigRequest(model_config=model)),
        lambda s: s.UpdateModelConfig(
            pb.UpdateModelConfigRequest(model_config=model, update_mask=mask("enabled"))
        ),
        lambda s: s.DeleteModelConfig(pb.DeleteModelConfigRequest(model_config_id=model.id)),
        lambda s: s.SetDefaultModelConfig(pb.SetDefaultModelConfigRequest(model_config_id=model.id)),
        lambda s: s.CreateWorkspaceTemplate(pb.CreateWorkspaceTemplateRequest()),
        lambda s: s.UpdateWorkspaceTemplate(pb.UpdateWorkspaceTemplateRequest()),
        lambda s: s.DeleteWorkspaceTemplate(
            pb.DeleteWorkspaceTemplateRequest(workspace_template_id=model.id)
        ),
        lambda s: s.UpdateSystemPrompt(pb.UpdateSystemPromptRequest(text="x")),
    ]
    for caller in (alice, chat, inference):
        for write in writes:
            await expect_error(write(caller), DENIED)
    for caller in (alice,):
        await expect_error(caller.GetProvider(pb.GetProviderRequest(provider_id=provider.id)), DENIED)
        await expect_error(caller.ListProviders(pb.ListProvidersRequest()), DENIED)
    for caller in (alice, admin, chat):
        _, reason, _ = await expect_error(
            caller.GetProviderCredentials(pb.GetProviderCredentialsRequest(provider_id=provider.id)), DENIED
        )
        assert reason == "SERVICE_REQUIRED"
    creds = await inference.GetProviderCredentials(pb.GetProviderCredentialsRequest(provider_id=provider.id))
    assert creds.api_key == "sk-test-key"
    # A bare service has no user: it must act for one to write a user prompt.
    await expect_error(chat.UpdateUserPrompt(pb.UpdateUserPromptRequest(text="x")), DENIED)
    # Services read everything read-only.
    assert (await chat.ListProviders(pb.ListProvidersRequest())).providers
    # No token at all.
    no_token = stub_for("")
    await expect_error(no_token.ResolveModel(pb.ResolveModelRequest()), grpc.StatusCode.UNAUTHENTICATED)


P = config_pb2.Provider
NIL_ID = "00000000-0000-0000-0000-000000000000"
INVALID_REQUESTS = [
    (pb.CreateProviderRequest(), "provider"),
    (pb.CreateProviderRequest(provider=P(display_name="x")), "provider.type"),
    (pb.CreateProviderRequest(provider=P(type=config_pb2.PROVIDER_TYPE_OPENAI)), "provider.display_name"),
    (
        pb.CreateProviderRequest(
            provider=P(type=config_pb2.PROVIDER_TYPE_OPENAI, display_name="x", base_url="ftp://h")
        ),
        "provider.base_url",
    ),
    (
        pb.CreateProviderRequest(
            provider=P(type=config_pb2.PROVIDER_TYPE_OPENAI_COMPATIBLE, display_name="x")
        ),
        "provider.base_url",
    ),
    (
        pb.CreateProviderRequest(
            provider=P(type=config_pb2.PROVIDER_TYPE_OPENAI, display_name="x"), api_key="a b"
        ),
        "api_key",
    ),
    (pb.CreateModelConfigRequest(), "model_config"),
    (
        pb.CreateModelConfigRequest(model_config=config_pb2.ModelConfig(provider_id="nope")),
        "model_config.provider_id",
    ),
    (pb.GetModelConfigRequest(model_config_id=""), "model_config_id"),
    (pb.ResolveModelRequest(model_config_id="not-a-uuid"), "model_config_id"),
    (pb.UpdateProviderRequest(provider=P(id=NIL_ID)), "update_mask"),
    (
        pb.CreateWorkspaceTemplateRequest(workspace_template=config_pb2.WorkspaceTemplate(name="Bad Name")),
        "workspace_template.name",
    ),
    (
        pb.CreateWorkspaceTemplateRequest(
            workspace_template=config_pb2.WorkspaceTemplate(name="ok", description="d")
        ),
        "workspace_template.source",
    ),
    (pb.ListProvidersRequest(page_size=-1), "page_size"),
]


@pytest.mark.parametrize(("request_message", "field"), INVALID_REQUESTS)
async def test_invalid_requests_name_the_field(
    admin: ConfigServiceStub, request_message: object, field: str
) -> None:
    method = type(request_message).__name__.removesuffix("Request")
    message, _, metadata = await expect_error(getattr(admin, method)(request_message), INVALID)
    assert metadata["field"] == field, message
    assert message.startswith(f"{field}:")


async def test_model_field_validation(admin: ConfigServiceStub) -> None:
    provider = await create_provider(admin)
    base = config_pb2.ModelConfig(provider_id=provider.id, model_name="m", enabled=True, context_limit=10)
    cases: dict[str, dict[str, object]] = {
        "model_config.context_limit": dict(context_limit=0),
        "model_config.compaction_threshold_percent": dict(compaction_threshold_percent=101),
        "model_config.max_output_tokens": dict(max_output_tokens=-1),
        "model_config.model_name": dict(model_name=""),
    }
    for field, change in cases.items():
        model = config_pb2.ModelConfig()
        model.CopyFrom(base)
        for key, value in change.items():
            setattr(model, key, value)
        _, _, meta = await expect_error(
            admin.CreateModelConfig(pb.CreateModelConfigRequest(model_config=model)), INVALID
        )
        assert meta["field"] == field
    bad_options = config_pb2.ModelConfig()
    bad_options.CopyFrom(base)
    bad_options.options.temperature = 3.5
    _, _, meta = await expect_error(
        admin.CreateModelConfig(pb.CreateModelConfigRequest(model_config=bad_options)), INVALID
    )
    assert meta["field"] == "model_config.options.temperature"
    responses = config_pb2.ModelConfig()
    responses.CopyFrom(base)
    responses.options.use_responses_api = True  # the provider is OpenAI-compatible, not OpenAI
    _, _, meta = await expect_error(
        admin.CreateModelConfig(pb.CreateModelConfigRequest(model_config=responses)), INVALID
    )
    assert meta["field"] == "model_config.options.use_responses_api"
    negative_price = config_pb2.ModelConfig()
    negative_price.CopyFrom(base)
    negative_price.pricing.output_micros_per_million = -5
    _, _, meta = await expect_error(
        admin.CreateModelConfig(pb.CreateModelConfigRequest(model_config=negative_price)), INVALID
    )
    assert meta["field"] == "model_config.pricing.output_micros_per_million"


async def test_resolve_hits_make_no_database_queries(
    config: ConfigServer, admin: ConfigServiceStub, alice: ConfigServiceStub
) -> None:
    provider = await create_provider(admin)
    model = await create_model(admin, provider.id, name="m")
    await alice.ResolveModel(pb.ResolveModelRequest())
    await alice.ResolveModel(pb.ResolveModelRequest(model_config_id=model.id))
    before = config.metrics.db_query_count()
    for _ in range(200):
        await alice.ResolveModel(pb.ResolveModelRequest())
        await alice.ResolveModel(pb.ResolveModelRequest(model_config_id=model.id))
    assert config.metrics.db_query_count() == before
