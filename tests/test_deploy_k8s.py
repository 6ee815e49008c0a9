"""deploy/k8s: every overlay rendered by kustomize (kubectl's built-in kustomize v5 here, or a
`kustomize` binary) and every manifest validated against the Kubernetes OpenAPI schemas
shipped by kubernetes-validate (strict: unknown fields fail), for the oldest and newest
versions we support. Then the properties the manifests promise. What the containers run
(commands, env, ports against the code) is checked in test_deploy_drift.py."""

from __future__ import annotations

import shutil

import kubernetes_validate
import pytest
from support.deploy import OVERLAYS, k8s_tree, kustomize_binary, pod_template, render

from protocol.topology import SERVICES

K8S_VERSIONS = ("1.30.0", "1.37.0")
GPU_WORKLOADS = {("Deployment", "rollout"), ("Deployment", "teacher"), ("Job", "trainer")}


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    if kustomize_binary() is None:
        pytest.skip("neither kustomize nor kubectl is installed")
    return k8s_tree(tmp_path_factory.mktemp("k8s"))


@pytest.fixture(scope="module")
def rendered(tree) -> dict[str, list[dict]]:
    out = {name: render(kustomize_binary(), tree / "overlays" / name) for name in OVERLAYS}
    # The external-Redis component on top of the single-node overlay.
    variant = tree / "overlays" / "external-redis-test"
    variant.mkdir()
    (variant / "kustomization.yaml").write_text(
        "resources: [../single-node]\ncomponents: [../../components/external-redis]\n")
    out["external-redis"] = render(kustomize_binary(), variant)
    return out


def test_overlays_present():
    assert set(OVERLAYS) == {"single-node", "multi-node"}


def test_render_refuses_without_the_secret_file(tree, tmp_path):
    """No token, no deployment: the secret's env file is git-ignored and must be created."""
    copy = shutil.copytree(tree, tmp_path / "k8s")
    (copy / "base" / "rlrt.env").unlink()
    with pytest.raises(AssertionError, match="rlrt.env"):
        render(kustomize_binary(), copy / "overlays" / "single-node")


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_manifest_validates(rendered, version):
    failures = []
    for overlay, docs in rendered.items():
        for doc in docs:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                failures.append(f"{overlay} {doc['kind']}/{doc['metadata']['name']}: {e}")
    assert not failures, "\n".join(failures)


def test_validation_is_strict(rendered):
    doc = next(d for d in rendered["single-node"] if d["kind"] == "Deployment")
    bad = {**doc, "spec": {**doc["spec"], "replicaz": 1}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSIONS[-1], strict=True)


def _objs(docs, kind):
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_workloads(rendered, overlay):
    docs = rendered[overlay]
    assert set(_objs(docs, "Deployment")) == set(SERVICES)
    assert set(_objs(docs, "StatefulSet")) == {"redis"}
    assert set(_objs(docs, "Job")) == {"trainer"}
    assert all(d["metadata"].get("namespace") == "rlrt" for d in docs if d["kind"] != "Namespace")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_service_probes_and_resources(rendered, overlay):
    for name, dep in _objs(rendered[overlay], "Deployment").items():
        spec = dep["spec"]["template"]["spec"]
        (c,) = spec["containers"]
        assert c["readinessProbe"]["httpGet"]["path"] == "/readyz", name
        assert c["livenessProbe"]["httpGet"]["path"] == "/healthz", name
        for key in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(c["resources"][key]), f"{name} {key}"
        gpu = ("Deployment", name) in GPU_WORKLOADS
        assert ("nvidia.com/gpu" in c["resources"]["limits"]) == gpu, name
        if gpu:
            assert c["resources"]["requests"]["nvidia.com/gpu"] == c["resources"]["limits"]["nvidia.com/gpu"]
            assert dep["spec"]["replicas"] == 1, f"{name}: the trainer pushes to one pod per Service"
            assert dep["spec"]["strategy"]["type"] == "Recreate", name


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_run_as_non_root_without_api_token(rendered, overlay):
    for d in rendered[overlay]:
        tpl = pod_template(d)
        if tpl is None:
            continue
        spec = tpl["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True, d["metadata"]["name"]
        assert spec["automountServiceAccountToken"] is False, d["metadata"]["name"]
        for c in spec["containers"]:
            assert c["securityContext"]["allowPrivilegeEscalation"] is False
            assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_redis_is_persistent(rendered, overlay):
    redis = _objs(rendered[overlay], "StatefulSet")["redis"]
    (c,) = redis["spec"]["template"]["spec"]["containers"]
    assert c["command"] == ["sh", "-c"]
    args = c["args"][0].split()  # redis-server's flags; the password comes on stdin
    assert args[args.index("--appendonly") + 1] == "yes"
    (claim,) = redis["spec"]["volumeClaimTemplates"]
    assert {"name": "data", "mountPath": "/data"} in c["volumeMounts"]
    assert claim["metadata"]["name"] == "data"
    svc = _objs(rendered[overlay], "Service")[redis["spec"]["serviceName"]]
    assert svc["spec"]["clusterIP"] == "None"


def test_external_redis_component_removes_redis(rendered):
    docs = rendered["external-redis"]
    assert "redis" not in _objs(docs, "StatefulSet") and "redis" not in _objs(docs, "Service")
    # the rest is the single-node overlay, unchanged
    assert set(_objs(docs, "Deployment")) == set(_objs(rendered["single-node"], "Deployment"))


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_trainer_is_an_indexed_job_with_rendezvous(rendered, overlay):
    docs = rendered[overlay]
    job = _objs(docs, "Job")["trainer"]
    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    assert spec["completionMode"] == "Indexed"
    (c,) = pod["containers"]
    env = {e["name"]: e for e in c["env"]}
    nnodes = int(env["NNODES"]["value"])
    assert spec["completions"] == spec["parallelism"] == nnodes
    assert int(env["GPUS_PER_NODE"]["value"]) == c["resources"]["limits"]["nvidia.com/gpu"]
    assert "job-completion-index" in env["NODE_RANK"]["valueFrom"]["fieldRef"]["fieldPath"]
    headless = _objs(docs, "Service")[pod["subdomain"]]
    assert headless["spec"]["clusterIP"] == "None" and headless["spec"]["publishNotReadyAddresses"]
    assert headless["spec"]["selector"].items() <= job["spec"]["template"]["metadata"]["labels"].items()
    master = next(a for a in c["args"] if a.startswith("--master-addr=")).split("=", 1)[1]
    assert master == f"{job['metadata']['name']}-0.{pod['subdomain']}"
    assert env["RLRT_TRAINER__PUSH__MASTER_ADDRESS"]["value"] == master
    for var in ("NCCL_SOCKET_IFNAME", "NCCL_DEBUG"):
        assert var in env
    if nnodes > 1:
        anti = pod["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
        assert anti[0]["topologyKey"] == "kubernetes.io/hostname"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_secret_and_config_are_wired(rendered, overlay):
    docs = rendered[overlay]
    secrets, maps = _objs(docs, "Secret"), _objs(docs, "ConfigMap")
    (secret,) = [s for n, s in secrets.items() if n.startswith("rlrt-secrets-")]
    assert {"RLRT_VERIFIER__TOKEN", "RLRT_ROLLOUT__TOKEN", "RLRT_TEACHER__TOKEN",
            "RLRT_TRAINER__PUSH__CONTROL_TOKEN"} <= set(secret["data"])
    (config,) = [m for n, m in maps.items() if n.startswith("rlrt-config-")]
    assert "run.yaml" in config["data"]
    for d in docs:
        tpl = pod_template(d)
        if tpl is None or d["metadata"]["name"] == "redis":
            continue
        (c,) = tpl["spec"]["containers"]
        refs = [next(iter(s.values()))["name"] for s in c["envFrom"]]
        assert secret["metadata"]["name"] in refs and refs[-1] == secret["metadata"]["name"]
        vols = {v["name"]: v for v in tpl["spec"]["volumes"]}
        assert vols["config"]["configMap"]["name"] == config["metadata"]["name"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_metrics_are_scrapable(rendered, overlay):
    for d in rendered[overlay]:
        tpl = pod_template(d)
        if tpl is None or d["metadata"]["name"] == "redis":
            continue
        ann = tpl["metadata"]["annotations"]
        assert ann["prometheus.io/scrape"] == "true" and ann["prometheus.io/path"] == "/metrics"
        ports = [p["containerPort"] for c in tpl["spec"]["containers"] for p in c["ports"]]
        assert int(ann["prometheus.io/port"]) in ports, d["metadata"]["name"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_disruption_budgets_select_pods(rendered, overlay):
    docs = rendered[overlay]
    pdbs = _objs(docs, "PodDisruptionBudget")
    assert {"verifier", "trainer"} <= set(pdbs)
    assert pdbs["trainer"]["spec"]["maxUnavailable"] == 0
    for name, pdb in pdbs.items():
        sel = pdb["spec"]["selector"]["matchLabels"].items()
        assert any(pod_template(d) and sel <= pod_template(d)["metadata"]["labels"].items() for d in docs), name


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policies(rendered, overlay):
    pols = _objs(rendered[overlay], "NetworkPolicy")
    deny = pols["default-deny-ingress"]["spec"]
    assert deny["policyTypes"] == ["Ingress"] and "ingress" not in deny
    internal = pols["rlrt-internal"]["spec"]
    assert internal["ingress"][0]["from"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/part-of"] == "rlrt"
    assert "ports" not in internal["ingress"][0], "NCCL needs every port between rlrt pods"


def test_single_node_colocates_gpu_pods_on_rwo_storage(rendered):
    docs = rendered["single-node"]
    assert _objs(docs, "PersistentVolumeClaim")["rlrt-shared"]["spec"]["accessModes"] == ["ReadWriteOnce"]
    for kind, name in GPU_WORKLOADS:
        tpl = _objs(docs, kind)[name]["spec"]["template"]
        term = tpl["spec"]["affinity"]["podAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][0]
        assert term["labelSelector"]["matchLabels"].items() <= tpl["metadata"]["labels"].items()
        assert term["topologyKey"] == "kubernetes.io/hostname"


def test_multi_node_shares_storage_across_nodes(rendered):
    pvc = _objs(rendered["multi-node"], "PersistentVolumeClaim")["rlrt-shared"]
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gpu_split_fits_whole_nodes(rendered, overlay):
    """Total GPUs asked for: whole 8-GPU nodes (one node single, three multi)."""
    total = 0
    for kind, name in GPU_WORKLOADS:
        obj = _objs(rendered[overlay], kind)[name]
        (c,) = obj["spec"]["template"]["spec"]["containers"]
        pods = obj["spec"].get("parallelism", obj["spec"].get("replicas", 1))
        total += pods * c["resources"]["limits"]["nvidia.com/gpu"]
    assert total == {"single-node": 8, "multi-node": 24}[overlay]
