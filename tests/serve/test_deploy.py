"""deploy/: the balancer configuration and the Kubernetes manifests, checked offline.

The HAProxy config is checked by HAProxy itself (`haproxy -c`), with the settings the code
depends on (the stream header the client sets, the model whose readiness is the health check)
read from the code, not repeated here; the manifests by kubernetes-validate's offline schemas."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from services import need

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
NODES = {"FASTSAM2_LISTEN": "127.0.0.1:9001", **{f"FASTSAM2_NODE{i}": f"127.0.0.1:91{i}1" for i in (1, 2, 3)},
         **{f"FASTSAM2_NODE{i}_HTTP": f"91{i}2" for i in (1, 2, 3)}}


def haproxy_check(cfg: Path) -> subprocess.CompletedProcess:
    return subprocess.run([need("haproxy"), "-c", "-f", str(cfg)], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **NODES})


def balancer_configs(tmp_path) -> list:
    """deploy/haproxy/haproxy.cfg and the copy inside the Kubernetes ConfigMap."""
    docs = list(yaml.safe_load_all((DEPLOY / "kubernetes" / "balancer.yaml").read_text()))
    cm = next(d for d in docs if d["kind"] == "ConfigMap")
    (tmp_path / "k8s.cfg").write_text(cm["data"]["haproxy.cfg"])
    return [DEPLOY / "haproxy" / "haproxy.cfg", tmp_path / "k8s.cfg"]


def test_haproxy_accepts_both_balancer_configs(tmp_path):
    for cfg in balancer_configs(tmp_path):
        r = haproxy_check(cfg)
        assert r.returncode == 0, f"{cfg.name}: {r.stdout}{r.stderr}"


def test_balancer_hashes_the_header_the_client_sets_and_checks_the_tracker(tmp_path):
    from fastsam2.serve import protocol

    for cfg in balancer_configs(tmp_path):
        text = cfg.read_text()
        assert re.search(rf"balance hdr\({re.escape(protocol.STREAM_HEADER)}\)", text), cfg
        assert "hash-type consistent" in text
        assert f"uri /v2/models/{protocol.MODEL}/ready" in text
        assert re.search(r"default-server proto h2 check", text)


def test_a_broken_balancer_config_is_caught(tmp_path):
    """The check bites: a config with the hash on an unknown fetch fails haproxy -c."""
    bad = tmp_path / "bad.cfg"
    bad.write_text((DEPLOY / "haproxy" / "haproxy.cfg").read_text().replace("balance hdr(", "balance hdrx("))
    assert haproxy_check(bad).returncode != 0


def test_kubernetes_manifests_validate_offline():
    import kubernetes_validate

    files = sorted((DEPLOY / "kubernetes").glob("*.yaml"))
    kinds = []
    for f in files:
        for doc in yaml.safe_load_all(f.read_text()):
            kubernetes_validate.validate(doc, "1.30", strict=True)
            kinds.append((doc["kind"], doc["metadata"]["name"]))
    assert {("Deployment", "fastsam2-node"), ("Deployment", "fastsam2-balancer"), ("Deployment", "fastsam2-redis"),
            ("Service", "fastsam2-node"), ("Service", "fastsam2-redis"), ("Service", "fastsam2"),
            ("ConfigMap", "fastsam2-haproxy"), ("PersistentVolumeClaim", "fastsam2-bundle")} <= set(kinds)


def test_nodes_mount_the_bundle_read_only_and_use_the_state_store():
    docs = list(yaml.safe_load_all((DEPLOY / "kubernetes" / "nodes.yaml").read_text()))
    spec = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]
    c = spec["containers"][0]
    assert {"name": "bundle", "mountPath": "/bundle", "readOnly": True} in c["volumeMounts"]
    assert next(v for v in spec["volumes"] if v["name"] == "bundle")["persistentVolumeClaim"]["readOnly"] is True
    assert any(a.startswith("--state-store=redis://fastsam2-redis:") for a in c["args"])
    assert c["readinessProbe"]["httpGet"]["path"] == "/v2/models/fastsam2_tracker/ready"


def test_an_invalid_manifest_is_caught():
    import kubernetes_validate

    doc = next(yaml.safe_load_all((DEPLOY / "kubernetes" / "redis.yaml").read_text()))
    doc["spec"]["replicas"] = "three"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, "1.30", strict=True)
