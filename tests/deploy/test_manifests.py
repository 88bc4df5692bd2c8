"""The Kubernetes manifests (k8s/), checked offline: YAML lint, the kustomize builds, Kubernetes'
own schemas for built-in kinds, the KEDA and Strimzi resources' required structure, and agreement
with the code (settings, ports, probes, topics, consumer group, processes of the image).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from yamllint import linter
from yamllint.config import YamlLintConfig

from services.gateway.config import GatewaySettings
from services.stamping.config import StampingSettings
from tests.deploy.k8s import (
    K8S,
    NAMESPACE,
    SECRET_TEMPLATES,
    Build,
    built,
    container_env,
    process_of,
    quantity,
    secret_templates,
    selects,
)
from tests.deploy.kustomize import build_minimal, build_with, kustomize_command, load_documents
from tests.deploy.processes import (
    ROOT,
    env_names_of,
    image_processes,
    load_settings,
    required_env_names,
)

BUILDS = ("base", "overlays/deadline")
# The oldest Kubernetes the manifests are meant for (Strimzi 0.48 needs 1.27; HPA behavior,
# PDB policy/v1 and Job ttlSecondsAfterFinished are GA there) and the newest the schemas know.
KUBERNETES_VERSIONS = ("1.29.0", kubernetes_validate.utils.latest_version())
CRD_GROUPS = ("keda.sh/", "kafka.strimzi.io/")
# Autoscaled on CPU by a HorizontalPodAutoscaler, or on consumer lag by KEDA.
HPA_SCALED = {"gateway", "queue", "inventory"}
KEDA_SCALED = {"signing-worker"}

Resource = dict[str, Any]


@pytest.fixture(params=BUILDS)
def k8s(request: pytest.FixtureRequest) -> Build:
    return built(request.param)


# ---------------------------------------------------------------------------- YAML and builds


def yaml_files() -> list[Path]:
    skip = {".venv", ".git", ".meterai", "node_modules"}
    return sorted(
        path
        for pattern in ("*.yaml", "*.yml", ".yamllint")
        for path in ROOT.rglob(pattern)
        if not skip & set(path.relative_to(ROOT).parts)
    )


def test_every_yaml_file_passes_yamllint() -> None:
    config = YamlLintConfig(file=str(ROOT / ".yamllint"))
    files = yaml_files()
    assert {"docker-compose.yml", "kustomization.yaml"} <= {path.name for path in files}
    problems = [
        f"{path.relative_to(ROOT)}:{problem.line}:{problem.column} {problem.desc} ({problem.rule})"
        for path in files
        for problem in linter.run(path.read_text(), config, str(path))
    ]
    assert problems == []


def test_kustomizations_build_unique_resources_in_one_namespace(k8s: Build) -> None:
    keys = [(r["kind"], r["metadata"]["name"]) for r in k8s.resources]
    assert len(keys) == len(set(keys)), "a resource is defined twice"
    for resource in k8s.resources:
        if resource["kind"] != "Namespace":
            assert resource["metadata"].get("namespace") == NAMESPACE, resource["metadata"]
    assert {name for kind, name in keys if kind == "Deployment"} == {
        "gateway",
        "queue",
        "inventory",
        "stamping",
        "signing-worker",
    }


@pytest.mark.skipif(kustomize_command() is None, reason="neither kustomize nor kubectl here")
@pytest.mark.parametrize("name", BUILDS)
def test_minimal_build_agrees_with_kustomize(name: str) -> None:
    command = kustomize_command()
    assert command is not None

    def by_key(resources: list[Resource]) -> dict[tuple[str, str], Resource]:
        return {(r["kind"], r["metadata"]["name"]): r for r in resources}

    assert by_key(build_minimal(K8S / name)) == by_key(build_with(command, K8S / name))


# ------------------------------------------------------------------------------- built-in kinds


def test_built_in_kinds_are_valid_kubernetes(k8s: Build) -> None:
    checked = set()
    for resource in k8s.resources:
        if resource["apiVersion"].startswith(CRD_GROUPS):
            continue
        for version in KUBERNETES_VERSIONS:
            # Strict: an unknown or misspelt field fails, as `kubectl apply` would refuse it.
            kubernetes_validate.validate(resource, version, strict=True)
        checked.add(resource["kind"])
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"} <= checked
    assert {"Ingress", "Job", "ConfigMap", "PersistentVolumeClaim"} <= checked


def test_secret_templates_are_valid_and_hold_no_secret() -> None:
    for document in load_documents(SECRET_TEMPLATES):
        for version in KUBERNETES_VERSIONS:
            kubernetes_validate.validate(document, version, strict=True)
        for key, value in document["stringData"].items():
            assert "change-me" in value, f"{document['metadata']['name']}.{key} looks real"


def test_invalid_resources_are_refused_by_the_schemas() -> None:
    deployment = yaml.safe_load(yaml.safe_dump(built("base").get("Deployment", "gateway")))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["paht"] = (
        "/readyz"
    )
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[0], strict=True)


# --------------------------------------------------------------------------- settings and env


def test_every_variable_is_a_setting_the_process_reads(k8s: Build) -> None:
    for workload, template in k8s.workloads():
        for container in template["spec"]["containers"]:
            env = container_env(k8s, container)
            unknown = set(env) - env_names_of(process_of(container))
            assert unknown == set(), f"{workload['metadata']['name']} sets what it never reads"


def test_every_service_gets_what_a_working_stack_sets(k8s: Build, tmp_path: Path) -> None:
    for deployment in k8s.of_kind("Deployment"):
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        process = process_of(container)
        missing = required_env_names(process, tmp_path) - set(container_env(k8s, container))
        assert missing == set(), deployment["metadata"]["name"]


def test_the_settings_load_in_production_with_every_secret_given(k8s: Build) -> None:
    # Production refuses placeholder secrets: a process not given one of its secrets (or a
    # value its settings cannot parse) would not start.
    for workload, template in k8s.workloads():
        for container in template["spec"]["containers"]:
            env = container_env(k8s, container)
            assert env["METERAI_ENVIRONMENT"] == "production"
            loaded = load_settings(process_of(container), env)
            assert loaded, workload["metadata"]["name"]


def test_gateway_and_queue_agree_on_the_event_and_admission_secret(k8s: Build) -> None:
    def env_refs(name: str) -> tuple[set[str], set[str]]:
        container = k8s.get("Deployment", name)["spec"]["template"]["spec"]["containers"][0]
        maps = {source["configMapRef"]["name"] for source in container["envFrom"]}
        secret_refs = {
            f"{item['valueFrom']['secretKeyRef']['name']}/{item['valueFrom']['secretKeyRef']['key']}"
            for item in container["env"]
            if item["name"] == "METERAI_ADMISSION_SECRET"
        }
        return {m for m in maps if "METERAI_EVENT" in k8s.get("ConfigMap", m)["data"]}, secret_refs

    gateway, queue = env_refs("gateway"), env_refs("queue")
    assert gateway == queue and all(gateway), (gateway, queue)


# ---------------------------------------------------------------------- processes, ports, probes


def test_containers_run_processes_of_the_image_on_their_ports(k8s: Build) -> None:
    processes = image_processes()
    for deployment in k8s.of_kind("Deployment"):
        pod = deployment["spec"]["template"]
        container = pod["spec"]["containers"][0]
        process = processes[process_of(container)]
        assert process.port is not None
        ports = {port["name"]: port["containerPort"] for port in container["ports"]}
        assert ports == {"http": process.port}, deployment["metadata"]["name"]

        def port_of(probe: dict[str, Any], ports: dict[str, int] = ports) -> int:
            port = probe["httpGet"]["port"]
            return ports[port] if isinstance(port, str) else int(port)

        probes = {
            kind: (container[kind]["httpGet"]["path"], port_of(container[kind]))
            for kind in ("startupProbe", "livenessProbe", "readinessProbe")
        }
        assert probes == {
            "startupProbe": ("/livez", process.port),
            "livenessProbe": ("/livez", process.port),
            "readinessProbe": ("/readyz", process.port),
        }
        annotations = pod["metadata"]["annotations"]
        assert annotations["prometheus.io/port"] == str(process.port)
        assert annotations["prometheus.io/path"] == "/metrics"

        services = [
            s
            for s in k8s.of_kind("Service")
            if selects(s["spec"]["selector"], pod["metadata"]["labels"])
        ]
        assert len(services) == 1, deployment["metadata"]["name"]
        (service_port,) = services[0]["spec"]["ports"]
        assert ports[service_port["targetPort"]] == process.port
        assert service_port["port"] == process.port  # as in `meterai up` and the service URLs


def test_service_urls_point_at_services_and_ports(k8s: Build) -> None:
    ports = {s["metadata"]["name"]: s["spec"]["ports"][0]["port"] for s in k8s.of_kind("Service")}
    for config_map in k8s.of_kind("ConfigMap"):
        for name, value in config_map["data"].items():
            if name.endswith("_URL") and value.startswith("http://"):
                host, port = value.removeprefix("http://").split(":")
                assert ports.get(host) == int(port), f"{name}={value}"
    bootstrap = k8s.get("ConfigMap", "meterai-kafka")["data"]["METERAI_KAFKA_BOOTSTRAP_SERVERS"]
    kafka = k8s.of_kind("Kafka")[0]
    listener_ports = {listener["port"] for listener in kafka["spec"]["kafka"]["listeners"]}
    assert bootstrap in {f"{kafka['metadata']['name']}-kafka-bootstrap:{p}" for p in listener_ports}


def test_the_stamping_pods_find_their_documents_and_keys(k8s: Build) -> None:
    stamping = k8s.get("ConfigMap", "meterai-stamping")["data"]
    blob_path = stamping["METERAI_STAMPING_BLOB_STORE_URL"].removeprefix("file://")
    templates = secret_templates()
    needs = {
        # The API verifies stamps (trust roots: the signing chain); workers sign.
        "stamping": ["METERAI_STAMPING_SIGNING_CHAIN_PATHS"],
        "signing-worker": [
            "METERAI_STAMPING_SIGNING_KEY_PATH",
            "METERAI_STAMPING_SIGNING_CERT_PATH",
            "METERAI_STAMPING_SIGNING_CHAIN_PATHS",
        ],
    }
    for name, settings in needs.items():
        pod = k8s.get("Deployment", name)["spec"]["template"]["spec"]
        volumes = {volume["name"]: volume for volume in pod["volumes"]}
        files: dict[str, str] = {}  # path in the container → where it comes from
        for mount in pod["containers"][0]["volumeMounts"]:
            volume = volumes[mount["name"]]
            if "persistentVolumeClaim" in volume:
                k8s.get("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"])
                files[mount["mountPath"]] = "claim"
            if "secret" in volume:
                secret = volume["secret"]
                keys = [item["path"] for item in secret.get("items", [])] or list(
                    templates[secret["secretName"]]
                )
                for key in keys:
                    assert key in templates[secret["secretName"]]
                    files[f"{mount['mountPath']}/{key}"] = secret["secretName"]
        assert files.get(blob_path) == "claim", f"{name}: documents not on the shared claim"
        for setting in settings:
            value = stamping[setting]
            paths = yaml.safe_load(value) if value.startswith("[") else [value]
            for path in paths:
                assert path in files, f"{name}: {setting} {path} is not mounted"


def test_workers_finish_their_jobs_before_kubernetes_kills_them(k8s: Build) -> None:
    pod = k8s.get("Deployment", "signing-worker")["spec"]["template"]["spec"]
    env = container_env(k8s, pod["containers"][0])
    grace = float(
        env.get("METERAI_STAMPING_WORKER_GRACE_SECONDS", StampingSettings().worker_grace_seconds)
    )
    serve = image_processes()["signing-worker"].graceful_seconds
    assert pod["terminationGracePeriodSeconds"] > grace + serve


# ------------------------------------------------------------------ resources and availability


def test_every_pod_is_bounded_unprivileged_and_runs_the_one_image(k8s: Build) -> None:
    images = set()
    for workload, template in k8s.workloads():
        pod = template["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] == 10001  # deploy/Dockerfile's USER
        assert pod["automountServiceAccountToken"] is False
        for container in pod["containers"]:
            images.add(container["image"])
            resources = container["resources"]
            for kind in ("cpu", "memory"):
                request = quantity(resources["requests"][kind])
                limit = quantity(resources["limits"][kind])
                assert 0 < request <= limit, (workload["metadata"]["name"], kind)
            security = container["securityContext"]
            assert security["allowPrivilegeEscalation"] is False
            assert security["readOnlyRootFilesystem"] is True
            assert security["capabilities"]["drop"] == ["ALL"]
    assert len(images) == 1, images
    assert not images.pop().startswith("meterai:"), "the kustomization sets the registry"


def test_every_deployment_has_a_disruption_budget(k8s: Build) -> None:
    budgets = k8s.of_kind("PodDisruptionBudget")
    for deployment in k8s.of_kind("Deployment"):
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        matching = [b for b in budgets if selects(b["spec"]["selector"]["matchLabels"], labels)]
        assert len(matching) == 1, deployment["metadata"]["name"]
        assert matching[0]["spec"].get("maxUnavailable") == 1


def test_autoscalers_own_the_replicas_of_what_they_scale(k8s: Build) -> None:
    hpas = {h["spec"]["scaleTargetRef"]["name"]: h for h in k8s.of_kind("HorizontalPodAutoscaler")}
    scaled = {s["spec"]["scaleTargetRef"]["name"]: s for s in k8s.of_kind("ScaledObject")}
    assert set(hpas) == HPA_SCALED
    assert set(scaled) == KEDA_SCALED
    for hpa in hpas.values():
        assert hpa["spec"]["scaleTargetRef"]["kind"] == "Deployment"
        assert 2 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    for deployment in k8s.of_kind("Deployment"):
        name = deployment["metadata"]["name"]
        # `kubectl apply` would reset the autoscaler's choice to a fixed count.
        assert ("replicas" in deployment["spec"]) == (name not in hpas | scaled), name


def test_the_ingress_sends_everything_to_the_gateway(k8s: Build) -> None:
    (ingress,) = k8s.of_kind("Ingress")
    (rule,) = ingress["spec"]["rules"]
    (path,) = rule["http"]["paths"]
    assert (path["path"], path["pathType"]) == ("/", "Prefix")
    backend = path["backend"]["service"]
    service = k8s.get("Service", backend["name"])
    assert backend["port"]["name"] in {port["name"] for port in service["spec"]["ports"]}
    assert service["spec"]["selector"]["app.kubernetes.io/component"] == "gateway"
    public = k8s.get("ConfigMap", "meterai-common")["data"]["METERAI_PUBLIC_BASE_URL"]
    assert public == f"https://{rule['host']}"
    # Larger than what the gateway accepts: oversized uploads get its problem+json 413.
    body_limit = ingress["metadata"]["annotations"]["nginx.ingress.kubernetes.io/proxy-body-size"]
    gateway_limit = GatewaySettings().max_body_bytes
    assert gateway_limit > StampingSettings().max_upload_bytes
    assert quantity(body_limit.replace("m", "Mi")) > gateway_limit


def test_the_migration_job_runs_meterai_migrate_once(k8s: Build) -> None:
    job = k8s.get("Job", "migrate")
    pod = job["spec"]["template"]["spec"]
    assert [process_of(c) for c in pod["containers"]] == ["migrate"]
    assert image_processes()["migrate"].command == "meterai migrate"
    assert pod["restartPolicy"] == "Never"
    assert job["spec"]["backoffLimit"] >= 1


# ----------------------------------------------------------------------- KEDA, Strimzi, topics


def test_keda_scales_the_workers_on_their_consumer_lag(k8s: Build) -> None:
    settings = StampingSettings()
    (scaled,) = k8s.of_kind("ScaledObject")
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    spec = scaled["spec"]
    target = k8s.get("Deployment", spec["scaleTargetRef"]["name"])
    assert process_of(target["spec"]["template"]["spec"]["containers"][0]) == "signing-worker"
    assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "kafka"
    metadata = trigger["metadata"]
    assert all(isinstance(value, str) for value in metadata.values()), "KEDA wants strings"
    assert metadata["consumerGroup"] == settings.worker_group
    assert metadata["topic"] == settings.requests_topic
    assert int(metadata["lagThreshold"]) > 0
    assert metadata["offsetResetPolicy"] == "earliest"  # as services/platform/kafka.py
    kafka = k8s.of_kind("Kafka")[0]
    port = kafka["spec"]["kafka"]["listeners"][0]["port"]
    namespace = kafka["metadata"]["namespace"]
    assert metadata["bootstrapServers"] == (
        f"{kafka['metadata']['name']}-kafka-bootstrap.{namespace}.svc:{port}"
    )


def test_strimzi_runs_kafka_in_kraft_mode(k8s: Build) -> None:
    (kafka,) = k8s.of_kind("Kafka")
    assert kafka["apiVersion"] == "kafka.strimzi.io/v1beta2"
    spec = kafka["spec"]
    assert "zookeeper" not in spec
    assert spec["kafka"]["version"]
    assert spec["kafka"]["listeners"]
    for listener in spec["kafka"]["listeners"]:
        assert {"name", "port", "type", "tls"} <= set(listener)
    assert spec["kafka"]["config"]["auto.create.topics.enable"] is False
    pools = k8s.of_kind("KafkaNodePool")
    roles: set[str] = set()
    for pool in pools:
        assert pool["metadata"]["labels"]["strimzi.io/cluster"] == kafka["metadata"]["name"]
        assert pool["spec"]["replicas"] >= 1
        assert pool["spec"]["storage"]["type"] in ("jbod", "persistent-claim", "ephemeral")
        roles |= set(pool["spec"]["roles"])
    assert roles == {"controller", "broker"}


def brokers(k8s: Build) -> int:
    return sum(
        pool["spec"]["replicas"]
        for pool in k8s.of_kind("KafkaNodePool")
        if "broker" in pool["spec"]["roles"]
    )


def test_topics_are_the_ones_the_code_uses(k8s: Build) -> None:
    settings = StampingSettings()
    kafka_name = k8s.of_kind("Kafka")[0]["metadata"]["name"]
    topics = {}
    for topic in k8s.of_kind("KafkaTopic"):
        assert topic["metadata"]["labels"]["strimzi.io/cluster"] == kafka_name
        spec = topic["spec"]
        assert 1 <= spec["replicas"] <= brokers(k8s)
        assert int(spec["config"]["min.insync.replicas"]) < spec["replicas"]
        topics[spec.get("topicName", topic["metadata"]["name"])] = spec["partitions"]
    assert set(topics) == {settings.requests_topic, settings.results_topic}
    assert topics[settings.requests_topic] >= settings.requests_partitions
    assert topics[settings.results_topic] >= settings.results_partitions


def test_requests_have_a_partition_for_every_worker(k8s: Build) -> None:
    settings = StampingSettings()
    (topic,) = [
        t for t in k8s.of_kind("KafkaTopic") if t["spec"]["topicName"] == settings.requests_topic
    ]
    (scaled,) = k8s.of_kind("ScaledObject")
    assert topic["spec"]["partitions"] >= scaled["spec"]["maxReplicaCount"]


# --------------------------------------------------------------------------------- the overlay


def test_the_deadline_overlay_scales_up() -> None:
    base, deadline = built("base"), built("overlays/deadline")
    for hpa in base.of_kind("HorizontalPodAutoscaler"):
        more = deadline.get("HorizontalPodAutoscaler", hpa["metadata"]["name"])["spec"]
        assert more["minReplicas"] > hpa["spec"]["minReplicas"]
        assert more["maxReplicas"] > hpa["spec"]["maxReplicas"]
    for scaled in base.of_kind("ScaledObject"):
        more = deadline.get("ScaledObject", scaled["metadata"]["name"])["spec"]
        assert more["minReplicaCount"] > scaled["spec"]["minReplicaCount"]
        assert more["maxReplicaCount"] > scaled["spec"]["maxReplicaCount"]
    for deployment in base.of_kind("Deployment"):
        if "replicas" in deployment["spec"]:
            more = deadline.get("Deployment", deployment["metadata"]["name"])["spec"]
            assert more["replicas"] > deployment["spec"]["replicas"]
