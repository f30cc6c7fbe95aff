"""Every manifest in deploy/ validates offline, and what it runs exists and parses.

* Core Kubernetes kinds: ``kubernetes-validate`` (strict: unknown fields fail) for Kubernetes 1.32.
* KubeRay kinds: the CRD schemas of KubeRay v1.7.0 in ``../shared/schemas/kuberay-v1.7.0/`` with
  ``jsonschema``, made strict the way the API server prunes (an object with ``properties`` accepts no
  other field unless the CRD says ``x-kubernetes-preserve-unknown-fields``).
* Ray cluster-launcher configs: Ray's own ``ray-schema.json``; search spaces: the platform's loader;
  the compose file: structure, pinned images, loopback ports, credentials only from the environment.
* Every job command line (RayJob, RayCronJob, CronJob, systemd, cron) names an existing
  ``jobs/*.py`` and its arguments parse with that job's own parser.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import json
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import ray
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
SCHEMAS = ROOT.parent / "shared" / "schemas" / "kuberay-v1.7.0"
KUBERNETES_VERSION = "1.32.0"
KUBERAY_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml",
                 "RayCronJob": "ray.io_raycronjobs.yaml", "RayService": "ray.io_rayservices.yaml"}  # fmt: skip
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY|KEY_ID")
JOB_SCRIPTS = {"search_losses.py", "cross_validate.py", "pretrain_mae.py", "transfer_study.py", "batch_predict.py"}


def _yaml_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml"))


def _documents(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _kube_documents() -> Iterator[tuple[Path, dict]]:
    for path in _yaml_files():
        for doc in _documents(path):
            if isinstance(doc, dict) and "apiVersion" in doc and "kind" in doc:
                yield path, doc


def _kind(kind: str) -> list[tuple[Path, dict]]:
    return [(p, d) for p, d in _kube_documents() if d["kind"] == kind]


# -- schemas ---------------------------------------------------------------------------------------


def _strict(schema: object) -> object:
    """Close every object schema that lists its properties, as the API server's pruning does."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items()}
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


@functools.cache
def _kuberay_schema(kind: str, version: str) -> dict:
    crd = yaml.safe_load((SCHEMAS / KUBERAY_FILES[kind]).read_text())
    for entry in crd["spec"]["versions"]:
        if entry["name"] == version:
            return _strict(entry["schema"]["openAPIV3Schema"])
    raise AssertionError(f"KubeRay v1.7.0 has no {kind} {version}")


def _errors(validator: jsonschema.Draft7Validator, doc: dict) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


def test_every_yaml_in_deploy_is_known_and_validated():
    """Each file is checked by one of the tests below (a new kind of file needs a check)."""
    kube = {p for p, _ in _kube_documents()}
    others = {DEPLOY / "mlflow" / "compose.yaml", *(DEPLOY / "cluster-launcher").glob("*.yaml"),
              *(DEPLOY / "spaces").glob("*.yaml")}  # fmt: skip
    assert set(_yaml_files()) == kube | others
    assert not kube & others


@pytest.mark.skipif(not SCHEMAS.is_dir(), reason=f"KubeRay CRD schemas not found at {SCHEMAS}")
def test_kuberay_kinds_validate_against_the_crd_schemas():
    checked = 0
    for path, doc in _kube_documents():
        group, _, version = doc["apiVersion"].partition("/")
        if group != "ray.io":
            continue
        validator = jsonschema.Draft7Validator(_kuberay_schema(doc["kind"], version))
        assert not _errors(validator, doc), f"{path.relative_to(ROOT)}: {_errors(validator, doc)}"
        checked += 1
    assert checked >= 7  # the RayCluster, five RayJobs and the RayCronJob


@pytest.mark.skipif(not SCHEMAS.is_dir(), reason=f"KubeRay CRD schemas not found at {SCHEMAS}")
def test_strict_schema_catches_a_misspelt_field():
    """The strict CRD schema is not a pass-everything: a typo in a pod template is reported."""
    _, cluster = _kind("RayCluster")[0]
    broken = copy.deepcopy(cluster)
    broken["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["imagePullPolice"] = "Always"
    broken["spec"]["workerGroupSpecs"][0]["maxReplicas"] = "8"
    errors = _errors(jsonschema.Draft7Validator(_kuberay_schema("RayCluster", "v1")), broken)
    assert any("imagePullPolice" in e for e in errors) and any("maxReplicas" in e for e in errors), errors


def test_core_kinds_validate_with_kubernetes_validate():
    checked = 0
    for path, doc in _kube_documents():
        if doc["apiVersion"].startswith("ray.io/"):
            continue
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{path.relative_to(ROOT)} {doc['kind']} {doc['metadata']['name']}: {exc.message}")
        checked += 1
    kinds = {d["kind"] for p, d in _kube_documents() if not d["apiVersion"].startswith("ray.io/")}
    assert {"PersistentVolumeClaim", "CronJob", "Deployment", "Service", "StatefulSet", "Job"} <= kinds
    assert checked >= 10


def test_cluster_launcher_configs_validate_against_rays_schema():
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    configs = sorted((DEPLOY / "cluster-launcher").glob("*.yaml"))
    assert configs
    for path in configs:
        config = yaml.safe_load(path.read_text())
        errors = _errors(jsonschema.Draft7Validator(schema), config)
        assert not errors, f"{path.relative_to(ROOT)}: {errors}"
        commands = " ".join(config["head_start_ray_commands"])
        assert "--dashboard-host=127.0.0.1" in commands  # reached through `ray dashboard` (SSH)
        assert "/mnt/bratstune" in " ".join(config["docker"]["run_options"])


def test_search_spaces_load():
    from bratstune.search.space import load_search_space

    for path in sorted((DEPLOY / "spaces").glob("*.yaml")):
        spec = load_search_space(path)
        assert spec.resources.gpu > 0, f"{path.name}: a cluster space asks for GPUs"
        assert spec.smoke_variant().num_samples >= 1


# -- what the cluster looks like -------------------------------------------------------------------


def _cluster_specs() -> list[tuple[str, dict]]:
    specs = [(f"RayCluster {d['metadata']['name']}", d["spec"]) for _, d in _kind("RayCluster")]
    specs += [(f"RayJob {d['metadata']['name']}", d["spec"]["rayClusterSpec"]) for _, d in _kind("RayJob")]
    specs += [(f"RayCronJob {d['metadata']['name']}", d["spec"]["jobTemplate"]["rayClusterSpec"])
              for _, d in _kind("RayCronJob")]  # fmt: skip
    return specs


def test_clusters_have_head_cpu_and_gpu_groups_on_the_shared_volume():
    for where, spec in _cluster_specs():
        groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
        assert {"cpu", "gpu"} <= set(groups), where
        assert spec["enableInTreeAutoscaling"] is True, where
        for group in groups.values():
            assert 0 <= group["minReplicas"] < group["maxReplicas"], f"{where}: autoscaling bounds"
        gpu = groups["gpu"]["template"]["spec"]["containers"][0]["resources"]
        assert gpu["limits"]["nvidia.com/gpu"] == "1", where
        templates = [spec["headGroupSpec"]["template"]] + [g["template"] for g in groups.values()]
        for template in templates:
            claims = {
                v["name"]: v.get("persistentVolumeClaim", {}).get("claimName") for v in template["spec"]["volumes"]
            }
            container = template["spec"]["containers"][0]
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            assert claims[mounts["/mnt/bratstune"]] == "bratstune-shared", where
            env = {e["name"]: e for e in container["env"]}
            assert env["BRATSTUNE_HOME"]["value"] == "/mnt/bratstune", where
            # "0" keeps Ray on loopback (one machine only): worker nodes would refuse to join
            assert env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"]["value"] == "1", where
            assert env["MLFLOW_TRACKING_URI"]["value"].startswith("http"), where
    claims = [d for _, d in _kind("PersistentVolumeClaim") if d["metadata"]["name"] == "bratstune-shared"]
    assert claims and claims[0]["spec"]["accessModes"] == ["ReadWriteMany"]


def test_one_rayjob_per_job_each_on_its_own_cluster_deleted_after():
    jobs = _kind("RayJob")
    scripts = set()
    for path, doc in jobs:
        spec = doc["spec"]
        assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0, path.name
        scripts.add(Path(shlex.split(spec["entrypoint"])[1]).name)
    assert scripts == JOB_SCRIPTS
    cron = _kind("RayCronJob")
    assert len(cron) == 1 and "batch_predict.py" in cron[0][1]["spec"]["jobTemplate"]["entrypoint"]
    assert cron[0][1]["spec"]["jobTemplate"]["shutdownAfterJobFinishes"] is True
    assert any("batch_predict.py" in " ".join(d["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["command"])
               for _, d in _kind("CronJob"))  # fmt: skip


def test_generated_manifests_match_the_cluster_definition():
    spec = importlib.util.spec_from_file_location("bratstune_deploy_render", DEPLOY / "kuberay" / "render.py")
    render = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = render  # its dataclass looks its module up there
    spec.loader.exec_module(render)
    for name, text in render.render_all().items():
        assert (DEPLOY / "kuberay" / name).read_text() == text, f"{name} is stale: python deploy/kuberay/render.py"


# -- credentials -----------------------------------------------------------------------------------


def _containers(doc: object) -> Iterator[dict]:
    """Every container (and init container) anywhere in a manifest."""
    if isinstance(doc, dict):
        for key, value in doc.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                yield from value
            else:
                yield from _containers(value)
    elif isinstance(doc, list):
        for item in doc:
            yield from _containers(item)


def test_credentials_come_only_from_secrets_or_the_environment():
    assert not [p for p, d in _kube_documents() if d["kind"] == "Secret"], "no Secret manifests with values"
    for path, doc in _kube_documents():
        for container in _containers(doc):
            for entry in container.get("env", []):
                if SECRET_NAME.search(entry["name"]):
                    assert "secretKeyRef" in entry.get("valueFrom", {}), f"{path.name}: {entry['name']} is literal"
    compose = yaml.safe_load((DEPLOY / "mlflow" / "compose.yaml").read_text())
    for name, service in compose["services"].items():
        for key, value in (service.get("environment") or {}).items():
            if SECRET_NAME.search(key) or key == "MINIO_ROOT_USER":  # the MinIO user is the S3 access key id
                assert re.fullmatch(r"\$\{\w+:\?[^}]*\}", str(value)), f"compose {name}: {key} must be ${{VAR:?...}}"


# -- the MLflow server ------------------------------------------------------------------------------


def test_mlflow_server_uses_postgres_minio_and_basic_auth():
    serve = (DEPLOY / "mlflow" / "serve.sh").read_text()
    assert "--app-name basic-auth" in serve
    assert "/usr/local/bin/bratstune-mlflow-serve" in (DEPLOY / "mlflow" / "Dockerfile").read_text()
    compose = yaml.safe_load((DEPLOY / "mlflow" / "compose.yaml").read_text())
    services = compose["services"]
    assert {"postgres", "minio", "create-bucket", "mlflow"} <= set(services)
    env = services["mlflow"]["environment"]
    assert env["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql://")
    assert env["MLFLOW_ARTIFACTS_DESTINATION"].startswith("s3://") and env["MLFLOW_S3_ENDPOINT_URL"]
    for name, service in services.items():
        image = service["image"]
        assert ":" in image and not image.endswith(":latest"), f"{name}: pin the image ({image})"
        for port in service.get("ports", []):
            assert str(port).startswith(("127.0.0.1:", "${MLFLOW_PUBLISH:-127.0.0.1}:")), f"{name}: {port}"
    deployment = next(d for _, d in _kind("Deployment") if d["metadata"]["name"] == "mlflow")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    values = {e["name"]: e.get("value") for e in container["env"]}
    assert values["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql://")
    assert values["MLFLOW_ARTIFACTS_DESTINATION"].startswith("s3://")
    assert "mlflow:*" in values["MLFLOW_ALLOWED_HOSTS"]  # clients in the cluster send Host: mlflow:5000


# -- job command lines ------------------------------------------------------------------------------


def _command_lines() -> list[tuple[str, list[str]]]:
    """``(where, argv)`` of every job command line in deploy/."""
    lines = []
    for path, doc in _kube_documents():
        where = f"{path.relative_to(ROOT)} {doc['kind']}"
        if doc["kind"] == "RayJob":
            lines.append((where, shlex.split(doc["spec"]["entrypoint"])))
        elif doc["kind"] == "RayCronJob":
            lines.append((where, shlex.split(doc["spec"]["jobTemplate"]["entrypoint"])))
        for container in _containers(doc):
            command = [*container.get("command", []), *container.get("args", [])]
            if command[:3] == ["ray", "job", "submit"]:
                lines.append((where, command[command.index("--") + 1 :]))
    for path in (DEPLOY / "systemd").glob("*.service"):
        for line in path.read_text().splitlines():
            if line.startswith("ExecStart="):
                lines.append((str(path.relative_to(ROOT)), shlex.split(line[len("ExecStart=") :])))
    for path in (DEPLOY / "cron").glob("*.crontab"):
        for line in path.read_text().splitlines():
            if "jobs/" in line and not line.startswith("#"):
                command = shlex.split(line.split("&&", 1)[1].split(">>")[0])
                lines.append((str(path.relative_to(ROOT)), command))
    return lines


def _script_and_args(argv: list[str]) -> tuple[str, list[str]]:
    index = next(i for i, a in enumerate(argv) if a.startswith("jobs/") and a.endswith(".py"))
    return argv[index], argv[index + 1 :]


def test_every_job_command_names_an_existing_job_whose_arguments_parse():
    lines = _command_lines()
    assert len(lines) >= 9
    requests = []
    for where, argv in lines:
        script, args = _script_and_args(argv)
        assert (ROOT / script).is_file(), f"{where}: {script} does not exist"
        for arg in args:  # files of the repository that the job reads
            if arg.startswith(("deploy/", "search_spaces/", "jobs/")):
                assert (ROOT / arg).is_file(), f"{where}: {arg} does not exist"
        if "ray.io" in where or "CronJob" in where:
            # on a cluster RAY_ADDRESS is set: a job must not start or size a Ray of its own
            assert "--num-cpus" not in args and "--address" not in args, f"{where}: {args}"
        requests.append((script, args))
    done = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("_parse_job_args.py"))],
        input=json.dumps(requests), capture_output=True, text=True, cwd=ROOT, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    results = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(results) == len(requests), done.stdout[-2000:] + done.stderr[-2000:]
    failures = [f"{where}: {r['error']}" for (where, _), r in zip(lines, results) if "error" in r]
    assert not failures, "\n".join(failures)


def test_parse_check_reports_a_bad_flag():
    """The harness is not a pass-everything: an unknown flag and a bad value are errors."""
    requests = [["jobs/cross_validate.py", ["--preset", "unet", "--foldz", "5"]],
                ["jobs/cross_validate.py", ["--preset", "unet", "--folds", "five"]]]  # fmt: skip
    done = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("_parse_job_args.py"))],
        input=json.dumps(requests), capture_output=True, text=True, cwd=ROOT, timeout=300, check=False,
    )  # fmt: skip
    results = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert [("error" in r) for r in results] == [True, True], done.stdout + done.stderr
    assert "--foldz" in results[0]["error"] and "five" in results[1]["error"]
