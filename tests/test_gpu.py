"""GPU node pools and GPU scheduling, as the prod stack declares them under the mock engine."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ml_serving import image
from ml_serving.specs import gpu
from tests import schemas
from tests.conftest import plan_stack


def pod(plan, model, variant):
    (sdep,) = plan.find("SeldonDeployment", model)
    (predictor,) = [p for p in sdep["spec"]["predictors"] if p["name"] == variant]
    return predictor["componentSpecs"][0]["spec"]


@pytest.mark.skipif(not schemas.CRD_DIR.is_dir(), reason=f"upstream CRDs not found at {schemas.CRD_DIR}")
def test_node_pool_and_node_class_validate_against_karpenter_crds(prod):
    (pool,) = prod.find("NodePool")
    (node_class,) = prod.find("EC2NodeClass")
    schemas.validate(pool)
    schemas.validate(node_class)


def test_gpu_pool_is_tainted_limited_and_protected_from_drains(prod):
    (pool,) = prod.find("NodePool", "gpu-inference")
    template = pool["spec"]["template"]
    assert template["spec"]["taints"] == [{"key": "nvidia.com/gpu", "value": "true", "effect": "NoSchedule"}]
    requirements = {r["key"]: r for r in template["spec"]["requirements"]}
    assert requirements["karpenter.k8s.aws/instance-gpu-name"]["values"] == ["a10g", "l4"]
    assert requirements["karpenter.k8s.aws/instance-family"]["values"] == ["g5", "g6"]
    assert requirements["karpenter.sh/capacity-type"]["values"] == ["on-demand"]
    assert requirements["karpenter.k8s.aws/instance-gpu-memory"] == {
        "key": "karpenter.k8s.aws/instance-gpu-memory",
        "operator": "Gt",
        "values": ["15999"],
    }
    assert pool["spec"]["limits"] == {"nvidia.com/gpu": "8", "cpu": "256", "memory": "1024Gi"}
    assert pool["spec"]["disruption"]["budgets"][0] == {"nodes": "0", "schedule": "0 8 * * mon-fri", "duration": "10h"}
    assert template["metadata"]["labels"]["nvidia.com/device-plugin.config"] == "gpu-inference"
    assert template["spec"]["nodeClassRef"] == {
        "group": "karpenter.k8s.aws",
        "kind": "EC2NodeClass",
        "name": "gpu-inference",
    }


def test_node_class_has_gpu_ami_selectors_and_an_encrypted_root_volume(prod):
    (node_class,) = prod.find("EC2NodeClass", "gpu-inference")
    spec = node_class["spec"]
    assert spec["amiSelectorTerms"] == [{"alias": "al2023@v20240807"}], (
        "prod pins the AMI: @latest replaces every node on each release"
    )
    assert spec["subnetSelectorTerms"] == [{"tags": {"karpenter.sh/discovery": "ml-prod"}}]
    (volume,) = spec["blockDeviceMappings"]
    assert volume["ebs"]["encrypted"] is True and volume["ebs"]["volumeSize"] == "200Gi"


def test_gpu_variant_gets_limits_toleration_and_affinity(prod):
    spec = pod(prod, "embeddings", "champion")
    (container,) = spec["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert spec["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    terms = spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert terms == [
        {
            "matchExpressions": [
                {"key": "karpenter.sh/nodepool", "operator": "In", "values": ["gpu-inference"]},
                {"key": "karpenter.k8s.aws/instance-gpu-name", "operator": "In", "values": ["a10g"]},
            ]
        }
    ]


def test_cpu_variants_never_tolerate_the_gpu_taint(prod):
    for model, variant in (("churn", "champion"), ("churn", "challenger"), ("churn", "mirror"), ("fraud", "champion")):
        spec = pod(prod, model, variant)
        assert "tolerations" not in spec and "affinity" not in spec
        assert "nvidia.com/gpu" not in spec["containers"][0]["resources"]["limits"]


def test_nvidia_device_plugin_with_time_slicing_and_dcgm_exporter(prod):
    releases = {r["name"]: r for r in prod.releases}
    plugin = releases["nvidia-device-plugin"]
    assert plugin["chart"] == "nvidia-device-plugin"
    config = plugin["values"]["config"]["map"]["gpu-inference"]
    assert "replicas: 2" in config and "name: nvidia.com/gpu" in config
    assert releases["dcgm-exporter"]["values"]["tolerations"][0]["key"] == "nvidia.com/gpu"


def test_gpu_variants_get_the_cuda_build_of_the_image(prod):
    environment = image.ModelEnvironment("mlflow==3.17.2\n", "3.11.14")
    cpu, cuda = image.build_context(environment), image.build_context(environment, gpu=True)
    assert b"nvidia/cuda:" in cuda.files["Dockerfile"] and b"nvidia/cuda" not in cpu.files["Dockerfile"]
    assert cpu.tag != cuda.tag
    (embeddings,) = [ref for ref in prod.image_refs if "/embeddings@sha256:" in ref]
    assert pod(prod, "embeddings", "champion")["containers"][0]["image"] == embeddings


def test_hadolint_reports_nothing_on_the_gpu_dockerfile():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    run = subprocess.run([hadolint, str(image.SERVING_IMAGE_DIR / "Dockerfile.gpu")], capture_output=True, text=True)
    assert run.returncode == 0 and run.stdout == "", run.stdout


def test_dev_has_no_gpu_pool(registry):
    dev = plan_stack("dev", registry=registry)
    assert not dev.find("NodePool") and not dev.find("EC2NodeClass")
    assert not any(r["name"] == "nvidia-device-plugin" for r in dev.releases)


def test_placements_name_the_pool_of_each_variant():
    from ml_serving.stackfile import load_settings
    from tests.conftest import PROJECT_DIR

    placed = {(p.model, p.variant): p.pool for p in gpu.placements(load_settings(PROJECT_DIR, "prod"))}
    assert placed[("embeddings", "champion")] == "gpu-inference"
    assert placed[("churn", "champion")] is None
