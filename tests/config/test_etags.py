"""Etags on providers, model configs, templates and prompts; deletes that succeed when repeated."""

from __future__ import annotations

import uuid

import grpc
from agentplane.config.v1 import config_pb2
from agentplane.config.v1 import config_service_pb2 as pb
from agentplane.config.v1.config_service_pb2_grpc import ConfigServiceStub

from tests.config.rpc import create_model, create_provider, expect_error, mask

ABORTED = grpc.StatusCode.ABORTED


async def _template(admin: ConfigServiceStub, name: str = "t") -> config_pb2.WorkspaceTemplate:
    source = config_pb2.TemplateSource(directory=config_pb2.DirectorySource(path="/srv/templates/py"))
    created = await admin.CreateWorkspaceTemplate(
        pb.CreateWorkspaceTemplateRequest(
            workspace_template=config_pb2.WorkspaceTemplate(
                name=name, description="d", enabled=True, source=source
            )
        )
    )
    return created.workspace_template


async def test_provider_update_and_delete_check_the_etag(admin: ConfigServiceStub) -> None:
    provider = await create_provider(admin)
    assert provider.etag
    got = (await admin.GetProvider(pb.GetProviderRequest(provider_id=provider.id))).provider
    assert got.etag == provider.etag

    def rename(name: str, etag: str) -> pb.UpdateProviderRequest:
        return pb.UpdateProviderRequest(
            provider=config_pb2.Provider(id=provider.id, display_name=name, etag=etag),
            update_mask=mask("display_name"),
        )

    first = (await admin.UpdateProvider(rename("first", provider.etag))).provider
    assert first.display_name == "first" and first.etag != provider.etag
    # A writer that read the provider before that change is refused, and nothing changes.
    message, reason, metadata = await expect_error(
        admin.UpdateProvider(rename("stale", provider.etag)), ABORTED
    )
    assert reason == "ETAG_MISMATCH" and "read it again" in message
    assert metadata == {"provider_id": provider.id, "etag": first.etag}
    now = (await admin.GetProvider(pb.GetProviderRequest(provider_id=provider.id))).provider
    assert now.display_name == "first" and now.etag == first.etag
    # No etag: the update applies whatever happened meanwhile (as before etags).
    assert (await admin.UpdateProvider(rename("blind", ""))).provider.display_name == "blind"

    _, reason, _ = await expect_error(
        admin.DeleteProvider(pb.DeleteProviderRequest(provider_id=provider.id, etag=first.etag)), ABORTED
    )
    assert reason == "ETAG_MISMATCH"
    current = (await admin.GetProvider(pb.GetProviderRequest(provider_id=provider.id))).provider
    await admin.DeleteProvider(pb.DeleteProviderRequest(provider_id=provider.id, etag=current.etag))
    await expect_error(
        admin.GetProvider(pb.GetProviderRequest(provider_id=provider.id)), grpc.StatusCode.NOT_FOUND
    )
    # Deleting it again, with or without its last etag, succeeds: it is gone either way.
    await admin.DeleteProvider(pb.DeleteProviderRequest(provider_id=provider.id))
    await admin.DeleteProvider(pb.DeleteProviderRequest(provider_id=provider.id, etag=current.etag))
    # An update of what is gone is still NOT_FOUND, with or without an etag.
    _, reason, _ = await expect_error(
        admin.UpdateProvider(rename("x", current.etag)), grpc.StatusCode.NOT_FOUND
    )
    assert reason == "PROVIDER_NOT_FOUND"


async def test_model_config_etag_follows_set_default(admin: ConfigServiceStub) -> None:
    provider = await create_provider(admin)
    first = await create_model(admin, provider.id, name="a")
    second = await create_model(admin, provider.id, name="b")
    # SetDefault changes is_default of both: both etags move.
    await admin.SetDefaultModelConfig(pb.SetDefaultModelConfigRequest(model_config_id=second.id))
    listed = {m.id: m for m in (await admin.ListModelConfigs(pb.ListModelConfigsRequest())).model_configs}
    assert listed[first.id].etag != first.etag and listed[second.id].etag != second.etag
    # Setting the default it already is changes nothing, so neither etag moves.
    again = await admin.SetDefaultModelConfig(pb.SetDefaultModelConfigRequest(model_config_id=second.id))
    assert again.model_config.etag == listed[second.id].etag

    stale = pb.UpdateModelConfigRequest(
        model_config=config_pb2.ModelConfig(id=first.id, display_name="renamed", etag=first.etag),
        update_mask=mask("display_name"),
    )
    _, reason, metadata = await expect_error(admin.UpdateModelConfig(stale), ABORTED)
    assert reason == "ETAG_MISMATCH" and metadata["model_config_id"] == first.id
    stale.model_config.etag = listed[first.id].etag
    renamed = (await admin.UpdateModelConfig(stale)).model_config
    assert renamed.display_name == "renamed"

    await expect_error(
        admin.DeleteModelConfig(pb.DeleteModelConfigRequest(model_config_id=first.id, etag=first.etag)),
        ABORTED,
    )
    await admin.DeleteModelConfig(pb.DeleteModelConfigRequest(model_config_id=first.id, etag=renamed.etag))
    await admin.DeleteModelConfig(pb.DeleteModelConfigRequest(model_config_id=first.id))
    await admin.DeleteModelConfig(pb.DeleteModelConfigRequest(model_config_id=str(uuid.uuid4())))
    # The default still cannot be deleted, etag or not.
    _, reason, _ = await expect_error(
        admin.DeleteModelConfig(
            pb.DeleteModelConfigRequest(model_config_id=second.id, etag=again.model_config.etag)
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    assert reason == "MODEL_IS_DEFAULT"


async def test_template_etag_and_idempotent_delete(admin: ConfigServiceStub) -> None:
    template = await _template(admin)
    update = pb.UpdateWorkspaceTemplateRequest(
        workspace_template=config_pb2.WorkspaceTemplate(
            id=template.id, description="new", etag=template.etag
        ),
        update_mask=mask("description"),
    )
    updated = (await admin.UpdateWorkspaceTemplate(update)).workspace_template
    _, reason, metadata = await expect_error(admin.UpdateWorkspaceTemplate(update), ABORTED)
    assert reason == "ETAG_MISMATCH" and metadata == {
        "workspace_template_id": template.id,
        "etag": updated.etag,
    }
    await expect_error(
        admin.DeleteWorkspaceTemplate(
            pb.DeleteWorkspaceTemplateRequest(workspace_template_id=template.id, etag=template.etag)
        ),
        ABORTED,
    )
    delete = pb.DeleteWorkspaceTemplateRequest(workspace_template_id=template.id, etag=updated.etag)
    await admin.DeleteWorkspaceTemplate(delete)
    await admin.DeleteWorkspaceTemplate(delete)
    await expect_error(
        admin.GetWorkspaceTemplate(pb.GetWorkspaceTemplateRequest(workspace_template_id=template.id)),
        grpc.StatusCode.NOT_FOUND,
    )


async def test_prompt_etags_survive_clearing(admin: ConfigServiceStub, alice: ConfigServiceStub) -> None:
    default = (await admin.GetSystemPrompt(pb.GetSystemPromptRequest())).system_prompt
    assert default.is_default and default.etag
    set_a = (
        await admin.UpdateSystemPrompt(pb.UpdateSystemPromptRequest(text="A", etag=default.etag))
    ).system_prompt
    assert set_a.text == "A" and set_a.etag != default.etag
    # The etag of the never-set prompt is stale once it is set.
    _, reason, _ = await expect_error(
        admin.UpdateSystemPrompt(pb.UpdateSystemPromptRequest(text="B", etag=default.etag)), ABORTED
    )
    assert reason == "ETAG_MISMATCH"
    cleared = (
        await admin.UpdateSystemPrompt(pb.UpdateSystemPromptRequest(text="", etag=set_a.etag))
    ).system_prompt
    assert cleared.is_default and cleared.etag not in (default.etag, set_a.etag)
    # Set again after the clear: an etag read before the clear still never matches.
    again = (await admin.UpdateSystemPrompt(pb.UpdateSystemPromptRequest(text="A"))).system_prompt
    await expect_error(
        admin.UpdateSystemPrompt(pb.UpdateSystemPromptRequest(text="C", etag=set_a.etag)), ABORTED
    )
    assert (await alice.GetSystemPrompt(pb.GetSystemPromptRequest())).system_prompt.etag == again.etag

    mine = (await alice.GetUserPrompt(pb.GetUserPromptRequest())).user_prompt
    vim = (await alice.UpdateUserPrompt(pb.UpdateUserPromptRequest(text="vim", etag=mine.etag))).user_prompt
    assert vim.text == "vim" and vim.HasField("update_time")
    _, reason, _ = await expect_error(
        alice.UpdateUserPrompt(pb.UpdateUserPromptRequest(text="emacs", etag=mine.etag)), ABORTED
    )
    assert reason == "ETAG_MISMATCH"
    cleared_mine = (
        await alice.UpdateUserPrompt(pb.UpdateUserPromptRequest(text="", etag=vim.etag))
    ).user_prompt
    assert cleared_mine.text == "" and not cleared_mine.HasField("update_time")
    assert (await alice.GetUserPrompt(pb.GetUserPromptRequest())).user_prompt == cleared_mine


async def test_etags_are_bounded(admin: ConfigServiceStub) -> None:
    provider = await create_provider(admin)
    _, _, metadata = await expect_error(
        admin.DeleteProvider(pb.DeleteProviderRequest(provider_id=provider.id, etag="x" * 65)),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert metadata["field"] == "etag"
    # Any other string the service did not issue is just not the current etag.
    await expect_error(
        admin.DeleteProvider(pb.DeleteProviderRequest(provider_id=provider.id, etag="W/x")), ABORTED
    )
