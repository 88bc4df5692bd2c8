"""The built Kubernetes manifests (k8s/), and what a container gets from them."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from tests.deploy.kustomize import build, load_documents
from tests.deploy.processes import ROOT

K8S = ROOT / "k8s"
SECRET_TEMPLATES = K8S / "secrets" / "meterai-secrets.template.yaml"
NAMESPACE = "meterai"

Resource = dict[str, Any]


@dataclass
class Build:
    """One kustomization, built into its resources."""

    name: str
    resources: list[Resource]

    def of_kind(self, kind: str) -> list[Resource]:
        return [r for r in self.resources if r["kind"] == kind]

    def get(self, kind: str, name: str) -> Resource:
        found = [r for r in self.of_kind(kind) if r["metadata"]["name"] == name]
        assert len(found) == 1, f"{self.name}: expected one {kind}/{name}, found {len(found)}"
        return found[0]

    def workloads(self) -> Iterator[tuple[Resource, dict[str, Any]]]:
        """(Deployment or Job, its pod template)."""
        for resource in self.resources:
            if resource["kind"] in ("Deployment", "Job"):
                yield resource, resource["spec"]["template"]


_BUILT: dict[str, Build] = {}


def built(name: str) -> Build:
    """k8s/<name> built, once per test session."""
    if name not in _BUILT:
        _BUILT[name] = Build(name, build(K8S / name))
    return _BUILT[name]


def secret_templates() -> dict[str, dict[str, str]]:
    """The template Secrets: name → key → value."""
    return {
        doc["metadata"]["name"]: dict(doc.get("stringData", {}), **doc.get("data", {}))
        for doc in load_documents(SECRET_TEMPLATES)
    }


def process_of(container: dict[str, Any]) -> str:
    """The image process a container runs (`args`, as the Deployments give it)."""
    assert "command" not in container, f"{container['name']}: keep the image's entrypoint"
    return str(container["args"][0])


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


def container_env(k8s: Build, container: dict[str, Any]) -> dict[str, str]:
    """The environment a container gets, secrets taken from the templates with their
    placeholders replaced by strong values (as operators must)."""
    templates = secret_templates()
    sources: list[tuple[str, str, str]] = []  # (name, value, where from)
    for source in container.get("envFrom", []):
        assert set(source) == {"configMapRef"}, f"{container['name']}: {source}"
        config_map = k8s.get("ConfigMap", source["configMapRef"]["name"])
        sources += [
            (name, value, config_map["metadata"]["name"])
            for name, value in config_map["data"].items()
        ]
    for item in container.get("env", []):
        if "value" in item:
            sources.append((item["name"], item["value"], "env"))
            continue
        ref = item["valueFrom"]["secretKeyRef"]
        assert ref["name"] in templates, f"Secret {ref['name']} is not in the templates"
        assert ref["key"] in templates[ref["name"]], f"Secret {ref['name']} has no {ref['key']}"
        placeholder = templates[ref["name"]][ref["key"]]
        sources.append(
            (item["name"], placeholder.replace("change-me", secrets.token_hex(24)), ref["name"])
        )
    names = [name for name, _, _ in sources]
    assert len(names) == len(set(names)), f"{container['name']}: a variable is set twice"
    return {name: value for name, value, _ in sources}


def quantity(value: str | int) -> float:
    """A Kubernetes quantity (`500m`, `1`, `512Mi`, `5Ti`) as a number."""
    text = str(value)
    units = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    for suffix, factor in units.items():
        if text.endswith(suffix):
            return float(text.removesuffix(suffix)) * factor
    return float(text)
