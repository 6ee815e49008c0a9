"""deploy/k8s: a quarantined or not-ready engine pod stays reachable by the trainer's control
calls (issue 20). A service whose weights are not one known version answers /readyz 503
until a weight push fixes it; if readiness removed it from the Service the trainer pushes
through, that push could never arrive. Checked on every overlay as kustomize renders it:
each Service the run config's push.services name selects exactly the pod whose readiness
probe is /readyz on that port, and publishes it while not ready."""

from __future__ import annotations

from urllib.parse import urlsplit

import pytest
import yaml
from support.deploy import OVERLAYS, k8s_tree, kustomize_binary, pod_template, render

ENGINE_STAGES = ("rollout", "teacher")


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> dict[str, list[dict]]:
    if kustomize_binary() is None:
        pytest.skip("neither kustomize nor kubectl is installed")
    tree = k8s_tree(tmp_path_factory.mktemp("k8s"))
    return {name: render(kustomize_binary(), tree / "overlays" / name) for name in OVERLAYS}


def _push_services(docs: list[dict]) -> list[dict]:
    (cm,) = [d for d in docs if d["kind"] == "ConfigMap" and "run.yaml" in d.get("data", {})]
    return yaml.safe_load(cm["data"]["run.yaml"])["trainer"]["push"]["services"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_a_not_ready_engine_pod_stays_reachable_by_the_trainer(rendered, overlay):
    docs = rendered[overlay]
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    pushed = _push_services(docs)
    assert {s["name"] for s in pushed} == set(ENGINE_STAGES)
    for target in pushed:
        url = urlsplit(target["url"])
        svc = services[url.hostname]
        assert svc["spec"].get("publishNotReadyAddresses") is True, (
            f"{overlay}: Service {url.hostname} drops a not-ready (quarantined) pod, so the "
            "trainer's corrective push cannot reach it")
        (port,) = [p for p in svc["spec"]["ports"] if p["port"] == url.port]
        selector = svc["spec"]["selector"].items()
        pods = [d for d in docs if (t := pod_template(d)) and selector <= t["metadata"]["labels"].items()]
        assert len(pods) == 1, f"{overlay}: {url.hostname} selects {len(pods)} workloads"
        (c,) = pod_template(pods[0])["spec"]["containers"]
        # the readiness that would have removed it: /readyz on the port the trainer calls
        probe = c["readinessProbe"]["httpGet"]
        assert probe["path"] == "/readyz"
        named = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert named[probe["port"]] == named[port["targetPort"]] == url.port
