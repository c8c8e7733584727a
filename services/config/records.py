"""Conversions between database rows (dicts) and the config protos."""

from __future__ import annotations

import datetime as dt
from typing import Any

from agentplane.config.v1 import config_pb2
from google.protobuf import json_format, timestamp_pb2


def timestamp(value: dt.datetime | None) -> timestamp_pb2.Timestamp | None:
    """A protobuf Timestamp for a timezone-aware datetime (None stays None)."""
    if value is None:
        return None
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(value)
    return ts


def to_json(message: Any) -> dict[str, Any]:
    """A proto message as a JSON-ready dict with proto field names (stored in jsonb columns)."""
    result: dict[str, Any] = json_format.MessageToDict(message, preserving_proto_field_name=True)
    return result


def provider_from_row(row: dict[str, Any]) -> config_pb2.Provider:
    """A Provider (never with its key) from a ``config_providers`` row."""
    type_name = row["type"]
    type_value = (
        config_pb2.ProviderType.Value(type_name)
        if type_name in config_pb2.ProviderType.keys()
        else config_pb2.PROVIDER_TYPE_UNSPECIFIED
    )
    return config_pb2.Provider(
        id=str(row["id"]),
        type=type_value,  # type: ignore[arg-type]
        display_name=row["display_name"],
        base_url=row["base_url"],
        api_key_set=row["api_key_ciphertext"] is not None,
        enabled=row["enabled"],
        create_time=timestamp(row["create_time"]),
        update_time=timestamp(row["update_time"]),
        etag=etag(row),
    )


def etag(row: dict[str, Any]) -> str:
    """A resource's etag: its row's version (opaque to clients; see migration 0004_versions)."""
    return str(row["version"])


def model_from_row(row: dict[str, Any]) -> config_pb2.ModelConfig:
    """A ModelConfig from a ``config_model_configs`` row."""
    model = config_pb2.ModelConfig(
        id=str(row["id"]),
        provider_id=str(row["provider_id"]),
        model_name=row["model_name"],
        display_name=row["display_name"],
        enabled=row["enabled"],
        is_default=row["is_default"],
        context_limit=row["context_limit"],
        compaction_threshold_percent=row["compaction_threshold_percent"],
        max_output_tokens=row["max_output_tokens"],
        create_time=timestamp(row["create_time"]),
        update_time=timestamp(row["update_time"]),
        etag=etag(row),
    )
    if row["pricing"] is not None:
        json_format.ParseDict(row["pricing"], model.pricing)
    json_format.ParseDict(row["options"] or {}, model.options)
    return model


def template_from_row(row: dict[str, Any]) -> config_pb2.WorkspaceTemplate:
    """A WorkspaceTemplate from a ``config_workspace_templates`` row."""
    template = config_pb2.WorkspaceTemplate(
        id=str(row["id"]),
        name=row["name"],
        description=row["description"],
        enabled=row["enabled"],
        network_access=row["network_access"],
        create_time=timestamp(row["create_time"]),
        update_time=timestamp(row["update_time"]),
        etag=etag(row),
    )
    for param in row["parameters"] or []:
        json_format.ParseDict(param, template.parameters.add())
    json_format.ParseDict(row["source"] or {}, template.source)
    if row.get("pod") is not None:
        json_format.ParseDict(row["pod"], template.pod)
    return template
