"""Build the kustomizations of k8s/ into their resources, offline.

With the real tool when the machine has it (`kustomize build`, or `kubectl kustomize`, which
embeds it: Debian's machines here carry kubectl). Without either, `build_minimal` does what
k8s/ uses of kustomize and nothing more, and refuses anything else rather than guess:

* `resources`: files (several documents each) and directories with a kustomization.yaml;
* `patches` given by `path`, each document a partial resource found by kind and name and merged
  into it (maps merge key by key, `null` deletes a key; lists are refused, since strategic merge
  would merge built-in kinds' lists by key and this does not);
* `images`: `name` replaced by `newName:newTag` in every pod template's containers;
* `namespace`: set on every namespaced resource.

`test_minimal_build_agrees_with_kustomize` holds the two to the same output where both exist.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

Resource = dict[str, Any]

SUPPORTED_FIELDS = {"apiVersion", "kind", "namespace", "resources", "patches", "images"}
CLUSTER_SCOPED = {
    "Namespace",
    "ClusterRole",
    "ClusterRoleBinding",
    "CustomResourceDefinition",
    "PersistentVolume",
    "StorageClass",
    "PriorityClass",
    "IngressClass",
}


def kustomize_command() -> list[str] | None:
    """The command line that builds a kustomization with the real tool, if there is one."""
    if found := shutil.which("kustomize"):
        return [found, "build"]
    if found := shutil.which("kubectl"):
        return [found, "kustomize"]
    return None


def build(directory: Path) -> list[Resource]:
    """The resources `kustomize build directory` produces."""
    command = kustomize_command()
    if command is None:
        return build_minimal(directory)
    return build_with(command, directory)


def build_with(command: list[str], directory: Path) -> list[Resource]:
    """The resources the real tool builds."""
    output = subprocess.run(
        [*command, str(directory)], check=True, capture_output=True, text=True, timeout=120
    ).stdout
    return [document for document in yaml.safe_load_all(output) if document]


def load_documents(path: Path) -> list[Resource]:
    """Every non-empty YAML document of a file."""
    return [document for document in yaml.safe_load_all(path.read_text()) if document]


def build_minimal(directory: Path) -> list[Resource]:
    """The subset of kustomize described in this module's docstring."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unsupported = set(kustomization) - SUPPORTED_FIELDS
    if unsupported:
        raise NotImplementedError(f"{directory}: kustomization fields {sorted(unsupported)}")
    resources: list[Resource] = []
    for entry in kustomization.get("resources", []):
        path = directory / entry
        resources += build_minimal(path) if path.is_dir() else load_documents(path)
    for patch in kustomization.get("patches", []):
        if set(patch) != {"path"}:
            raise NotImplementedError(f"{directory}: patch {patch} (only `path` is supported)")
        for document in load_documents(directory / patch["path"]):
            target = _find(resources, document["kind"], document["metadata"]["name"])
            _merge(target, document, where=f"{document['kind']}/{document['metadata']['name']}")
    for image in kustomization.get("images", []):
        for resource in resources:
            for container in _containers(resource):
                if _image_name(container["image"]) == image["name"]:
                    name = image.get("newName", image["name"])
                    container["image"] = f"{name}:{image['newTag']}" if "newTag" in image else name
    if namespace := kustomization.get("namespace"):
        for resource in resources:
            if resource["kind"] not in CLUSTER_SCOPED:
                resource["metadata"]["namespace"] = namespace
    return resources


def _find(resources: list[Resource], kind: str, name: str) -> Resource:
    for resource in resources:
        if resource["kind"] == kind and resource["metadata"]["name"] == name:
            return resource
    raise LookupError(f"no {kind}/{name} to patch")


def _merge(target: dict[str, Any], patch: dict[str, Any], *, where: str) -> None:
    for key, value in patch.items():
        if value is None:
            target.pop(key, None)
        elif isinstance(value, dict) and isinstance(target.get(key), dict):
            _merge(target[key], value, where=f"{where}.{key}")
        elif isinstance(value, list):
            raise NotImplementedError(f"{where}.{key}: patching lists is not supported")
        else:
            target[key] = value


def _containers(resource: Resource) -> list[dict[str, Any]]:
    spec = resource.get("spec", {})
    if resource["kind"] == "CronJob":
        spec = spec.get("jobTemplate", {}).get("spec", {})
    pod = spec.get("template", {}).get("spec", {})
    return [*pod.get("initContainers", []), *pod.get("containers", [])]


def _image_name(image: str) -> str:
    without_digest = image.split("@", 1)[0]
    last = without_digest.rsplit("/", 1)[-1]
    if ":" in last:
        return without_digest[: -(len(last) - last.index(":"))]
    return without_digest
