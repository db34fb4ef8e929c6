"""Kubernetes manifests (deploy/k8s): valid against the schemas of a pinned Kubernetes version (kubernetes-validate,
offline, strict: unknown fields are errors), and the overlays rendered by a real kustomize into objects that fit
the Cohort configs they carry (ports, probes, mounts, TLS Secret, state on a volume, the network policy)."""

from __future__ import annotations

import base64
import shutil
import subprocess
from pathlib import Path, PurePosixPath
from typing import Any

import kubernetes_validate
import pytest
import yaml
from support import Pki

from common import config as loader
from common.certs import TlsFiles
from common.settings import parse_address
from coordinator.config import CoordinatorConfig
from participant.config import ParticipantConfig

K8S_VERSION = "1.33.0"  # the Kubernetes version whose API schemas the manifests must satisfy
ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
Obj = dict[str, Any]


def manifests() -> list[Path]:
    """Every Kubernetes object file (not kustomizations, not the Cohort configs they package)."""
    out = []
    for path in sorted(K8S.rglob("*.yaml")):
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
        if docs and all("apiVersion" in d for d in docs) and path.name != "kustomization.yaml":
            out.append(path)
    return out


def validate(obj: Obj) -> None:
    kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


@pytest.mark.parametrize("path", manifests(), ids=lambda p: str(p.relative_to(K8S)))
def test_manifest_is_valid_kubernetes(path: Path) -> None:
    for doc in yaml.safe_load_all(path.read_text()):
        validate(doc)


def test_the_validator_refuses_an_unknown_field() -> None:
    """Strict mode, so a misspelt field cannot pass silently (and the schemas really are there, offline)."""
    (path,) = [p for p in manifests() if p.name == "statefulset.yaml"]
    obj = yaml.safe_load(path.read_text())
    obj["spec"]["template"]["spec"]["containers"][0]["readinessprobe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(obj)


# --- rendered overlays ---------------------------------------------------------------------------------------


def renderer() -> list[str]:
    """A real kustomize: the standalone binary, or the one built into kubectl."""
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        probe = subprocess.run(["kubectl", "kustomize", "--help"], capture_output=True, timeout=60, check=False)
        if probe.returncode == 0:
            return ["kubectl", "kustomize"]
    pytest.skip("no kustomize renderer: install kustomize or kubectl (`kubectl kustomize`) to render the overlays")


def render(tmp: Path, overlay: str, identity: TlsFiles) -> dict[tuple[str, str], Obj]:
    """The overlay rendered, with ``identity`` as its TLS files (the operator puts the kit's there)."""
    tree = tmp / "k8s"
    if not tree.exists():
        shutil.copytree(K8S, tree)
    tls = tree / "overlays" / overlay / "tls"
    tls.mkdir(exist_ok=True)
    for name, source in (("ca.crt", identity.ca), ("tls.crt", identity.cert), ("tls.key", identity.key)):
        shutil.copyfile(source, tls / name)
    proc = subprocess.run(
        [*renderer(), str(tree / "overlays" / overlay)], capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stderr
    objects: dict[tuple[str, str], Obj] = {}
    for obj in yaml.safe_load_all(proc.stdout):
        validate(obj)  # what is applied, not only the parts, must be valid
        objects[(obj["kind"], obj["metadata"]["name"])] = obj
    return objects


def one(objects: dict[tuple[str, str], Obj], kind: str, prefix: str = "") -> Obj:
    found = [o for (k, name), o in objects.items() if k == kind and name.startswith(prefix)]
    assert len(found) == 1, f"expected one {kind} {prefix}*, found {[o['metadata']['name'] for o in found]}"
    return found[0]


def load_config(cls: type[Any], text: str, tmp: Path) -> Any:
    path = tmp / "config.yaml"
    path.write_text(text)
    return loader.load(cls, path)


def mount_of(pod: Obj, container: Obj, path: PurePosixPath) -> tuple[Obj, Obj]:
    """(volumeMount, volume) whose mountPath holds ``path`` (the deepest one)."""
    mounts = [m for m in container["volumeMounts"] if PurePosixPath(m["mountPath"]) in (path, *path.parents)]
    assert mounts, f"{path} is on no volume"
    mount = max(mounts, key=lambda m: len(m["mountPath"]))
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    return mount, volumes.get(mount["name"], {})


def port(container: Obj, name: str) -> int:
    (number,) = [p["containerPort"] for p in container["ports"] if p["name"] == name]
    return int(number)


def check_pod(pod: Obj, container: Obj, http_listen: str) -> None:
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001  # the image's user; fsGroup lets it read the Secret
    assert pod["automountServiceAccountToken"] is False
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    health = port(container, "health")
    assert parse_address(http_listen, "http.listen") == ("0.0.0.0", health), "the kubelet probes the pod's IP"
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "health"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}


def check_private_state(pod: Obj, mount: Obj, state: PurePosixPath) -> None:
    """fsGroup makes a volume's root group-writable (and, by default, chmods everything in it on every mount), but the
    daemons refuse state that group or others may write (common/files.py): the state lives in a folder below the
    root, and the kubelet leaves what is inside alone once the root is right."""
    assert state != PurePosixPath(mount["mountPath"]), (
        f"{state} is the volume's root, which fsGroup makes group-writable"
    )
    assert pod["securityContext"]["fsGroupChangePolicy"] == "OnRootMismatch"


def test_coordinator_overlay(tmp_path: Path, pki: Pki) -> None:
    objects = render(tmp_path, "coordinator", pki.coordinator)
    assert {o["metadata"].get("namespace") for k, o in objects.items() if k[0] != "Namespace"} == {"cohort"}
    sts = one(objects, "StatefulSet")
    assert sts["spec"]["replicas"] == 1  # SQLite: one writer
    pod = sts["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    configmap = one(objects, "ConfigMap", "cohort-coordinator-config-")
    config: CoordinatorConfig = load_config(CoordinatorConfig, configmap["data"]["coordinator.yaml"], tmp_path)
    check_pod(pod, container, config.http.listen)
    assert container["args"] == ["coordinator", "--config", "/etc/cohort/coordinator.yaml"]
    assert pod["terminationGracePeriodSeconds"] > config.server.shutdown_grace_s

    # The config's files are where the pod mounts them: itself from the ConfigMap, TLS from the Secret with the
    # coordinator's real files, the state directory on the PersistentVolumeClaim.
    mount, volume = mount_of(pod, container, PurePosixPath("/etc/cohort/coordinator.yaml"))
    assert volume["configMap"]["name"] == configmap["metadata"]["name"]
    assert config.federation.deny_list is not None
    assert config.federation.deny_list.name in configmap["data"]
    assert mount_of(pod, container, PurePosixPath(config.federation.deny_list))[0] is mount
    secret = one(objects, "Secret", "cohort-coordinator-tls-")
    assert config.server.tls is not None
    for path, source in (
        (config.server.tls.ca, pki.coordinator.ca),
        (config.server.tls.cert, pki.coordinator.cert),
        (config.server.tls.key, pki.coordinator.key),
    ):
        mount, volume = mount_of(pod, container, PurePosixPath(path))
        assert volume["secret"]["secretName"] == secret["metadata"]["name"]
        assert base64.b64decode(secret["data"][path.name]) == source.read_bytes()
    mount, volume = mount_of(pod, container, PurePosixPath(config.state_dir))
    assert not volume, "the state directory must be on the PersistentVolumeClaim, not a pod volume"
    check_private_state(pod, mount, PurePosixPath(config.state_dir))
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == mount["name"]
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]

    # The Service carries the gRPC and bulk data ports the config listens on, and nothing else.
    grpc_port = parse_address(config.server.listen, "server.listen")[1]
    assert config.server.data_address is not None
    data_port = parse_address(config.server.data_address, "server.data_listen")[1]
    assert port(container, "grpc") == grpc_port
    assert port(container, "data") == data_port
    service = objects[("Service", "cohort-coordinator")]
    headless = objects[("Service", sts["spec"]["serviceName"])]
    assert headless["spec"]["clusterIP"] == "None"
    assert service["spec"]["type"] == "LoadBalancer"
    assert [(p["port"], p["targetPort"]) for p in service["spec"]["ports"]] == [
        (grpc_port, "grpc"),
        (data_port, "data"),
    ]
    assert service["spec"]["selector"].items() <= pod_labels(sts).items()

    # The NetworkPolicy: in, the gRPC and data ports from anywhere and the health port from the nodes only; out,
    # nothing.
    policy = one(objects, "NetworkPolicy")
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= pod_labels(sts).items()
    assert sorted(policy["spec"]["policyTypes"]) == ["Egress", "Ingress"]
    assert policy["spec"]["egress"] == []
    rules = {r["ports"][0]["port"]: r for r in policy["spec"]["ingress"]}
    assert set(rules) == {grpc_port, port(container, "health")}
    assert "from" not in rules[grpc_port]
    assert {p["port"] for p in rules[grpc_port]["ports"]} == {grpc_port, data_port}
    assert [list(f) for f in rules[port(container, "health")]["from"]] == [["ipBlock"]]


def pod_labels(workload: Obj) -> dict[str, str]:
    labels: dict[str, str] = workload["spec"]["template"]["metadata"]["labels"]
    return labels


def test_site_overlay(tmp_path: Path, pki: Pki) -> None:
    site = pki.site("site-a")
    objects = render(tmp_path, "site", site)
    assert not [k for k in objects if k[0] == "Service"], "a participant is reached by nobody"
    deployment = one(objects, "Deployment")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"]["type"] == "Recreate"  # never two daemons on one privacy ledger
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    configmap = one(objects, "ConfigMap", "cohort-participant-config-")
    config: ParticipantConfig = load_config(ParticipantConfig, configmap["data"]["participant.yaml"], tmp_path)
    check_pod(pod, container, config.http.listen)
    assert [p["name"] for p in container["ports"]] == ["health"]
    secret = one(objects, "Secret", "cohort-participant-tls-")
    for path, source in ((config.tls.ca, site.ca), (config.tls.cert, site.cert), (config.tls.key, site.key)):
        _, volume = mount_of(pod, container, PurePosixPath(path))
        assert volume["secret"]["secretName"] == secret["metadata"]["name"]
        assert base64.b64decode(secret["data"][path.name]) == source.read_bytes()
    mount, volume = mount_of(pod, container, PurePosixPath(config.data_dir))
    assert mount["readOnly"] is True
    assert volume["persistentVolumeClaim"]["readOnly"] is True
    # The privacy ledger on its own claim: a new pod continues the site's budget.
    assert config.privacy.enabled
    mount, volume = mount_of(pod, container, PurePosixPath(config.privacy.state_file))
    assert "readOnly" not in mount
    check_private_state(pod, mount, PurePosixPath(config.privacy.state_file).parent)
    claim = volume["persistentVolumeClaim"]["claimName"]
    assert one(objects, "PersistentVolumeClaim", claim)["spec"]["accessModes"] == ["ReadWriteOnce"]
    policy = one(objects, "NetworkPolicy")
    assert policy["spec"]["ingress"] == []
    egress_ports = {(p["protocol"], p["port"]) for rule in policy["spec"]["egress"] for p in rule["ports"]}
    coordinator_port = parse_address(config.coordinator.address, "coordinator.address")[1]
    # The coordinator's data port is the one after gRPC's unless its server.data_listen names another (sites learn it
    # at Join; the policy must admit it beforehand).
    assert egress_ports == {("UDP", 53), ("TCP", 53), ("TCP", coordinator_port), ("TCP", coordinator_port + 1)}
