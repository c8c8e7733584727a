"""A small evaluator of Kubernetes NetworkPolicies, for the tests of deploy/ and the pod driver.

It follows the NetworkPolicy API's semantics: a pod selected by no policy of a direction is open
in that direction; a selected pod allows only what one of its policies' rules allows; a
connection needs the source's egress and, for a pod destination, the destination's ingress.
Peers: podSelector (in the policy's namespace), namespaceSelector (optionally with a
podSelector), ipBlock (cidr minus except) — matched against pod IPs too, as a CNI does. Ports:
number or the destination container's port name, with a protocol (TCP by default).

What a CNI adds (Services translated to pod IPs before policies apply, host-network pods) is
outside it; tests use pod and external addresses directly.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Endpoint:
    """A pod (namespace, labels, named ports) or an address outside the cluster (namespace "")."""

    name: str
    ip: str
    namespace: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)
    # (port name, number, protocol) of its containers.
    ports: tuple[tuple[str, int, str], ...] = ()

    @property
    def is_pod(self) -> bool:
        return bool(self.namespace)


def pod_endpoint(
    name: str, ip: str, namespace: str, pod_spec: Mapping[str, Any], labels: Mapping[str, str]
) -> Endpoint:
    """An endpoint for a pod template's spec and labels."""
    ports = tuple(
        (str(p.get("name", "")), int(p["containerPort"]), str(p.get("protocol", "TCP")))
        for c in pod_spec.get("containers", [])
        for p in c.get("ports", [])
    )
    return Endpoint(name, ip, namespace, dict(labels), ports)


def _selector_matches(selector: Mapping[str, Any] | None, labels: Mapping[str, str]) -> bool:
    if selector is None:
        return True
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and labels.get(key) in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


class Cluster:
    """Namespaces (with labels), policies and the question: may `src` connect to `dst` on a port?"""

    def __init__(
        self, policies: Iterable[Mapping[str, Any]], namespace_labels: Mapping[str, Mapping[str, str]]
    ):
        self.policies = [p for p in policies if p.get("kind") == "NetworkPolicy"]
        self.namespaces = {
            name: {"kubernetes.io/metadata.name": name, **labels} for name, labels in namespace_labels.items()
        }

    def _ns_labels(self, namespace: str) -> Mapping[str, str]:
        return self.namespaces.get(namespace, {"kubernetes.io/metadata.name": namespace})

    def _policies(self, pod: Endpoint, direction: str) -> list[Mapping[str, Any]]:
        return [
            p
            for p in self.policies
            if p["metadata"].get("namespace") == pod.namespace
            and direction in p["spec"].get("policyTypes", ["Ingress"])
            and _selector_matches(p["spec"].get("podSelector") or {}, pod.labels)
        ]

    def _peer_matches(self, peer: Mapping[str, Any], policy_ns: str, other: Endpoint) -> bool:
        if "ipBlock" in peer:
            block = peer["ipBlock"]
            ip = ipaddress.ip_address(other.ip)
            if ip not in ipaddress.ip_network(block["cidr"]):
                return False
            return not any(ip in ipaddress.ip_network(e) for e in block.get("except") or [])
        if not other.is_pod:
            return False
        if "namespaceSelector" in peer:
            if not _selector_matches(peer["namespaceSelector"], self._ns_labels(other.namespace)):
                return False
        elif other.namespace != policy_ns:
            return False
        return _selector_matches(peer.get("podSelector"), other.labels)

    @staticmethod
    def _port_matches(
        rule_ports: list[Mapping[str, Any]] | None, dst: Endpoint, port: int, protocol: str
    ) -> bool:
        if not rule_ports:
            return True
        for p in rule_ports:
            if p.get("protocol", "TCP") != protocol:
                continue
            value = p.get("port")
            if value is None:
                return True
            if isinstance(value, int):
                end = p.get("endPort", value)
                if value <= port <= end:
                    return True
            elif any(
                name == value and number == port and proto == protocol for name, number, proto in dst.ports
            ):
                return True
        return False

    def _allowed(
        self, pod: Endpoint, other: Endpoint, dst: Endpoint, port: int, protocol: str, direction: str
    ) -> bool:
        policies = self._policies(pod, direction)
        if not policies:
            return True
        key, peers_key = ("egress", "to") if direction == "Egress" else ("ingress", "from")
        for policy in policies:
            for rule in policy["spec"].get(key) or []:
                peers = rule.get(peers_key)
                if peers and not any(self._peer_matches(peer, pod.namespace, other) for peer in peers):
                    continue
                if self._port_matches(rule.get("ports"), dst, port, protocol):
                    return True
        return False

    def allows(self, src: Endpoint, dst: Endpoint, port: int, protocol: str = "TCP") -> bool:
        """Whether a connection from `src` to `dst`:`port` gets through every policy on its way."""
        if src.is_pod and not self._allowed(src, dst, dst, port, protocol, "Egress"):
            return False
        return not dst.is_pod or self._allowed(dst, src, dst, port, protocol, "Ingress")
