"""The cluster files, checked offline (no cloud, no cluster, a few seconds):

- every Ray cluster-launcher YAML in the repository passes the validator `ray up` runs
  (`prepare_config` merges the provider's defaults, `validate_config` applies Ray's JSON schema),
  and that validator really rejects an unknown key or a wrong type;
- the AWS node configs are valid EC2 RunInstances parameters (botocore's own service model);
- the launcher configs keep the security rules: token auth on every node, dashboard on the head's
  loopback only, no inbound rule but SSH, no credentials anywhere;
- every KubeRay manifest parses and has what KubeRay requires, with no misspelled field;
- the Grafana dashboard queries only metrics bertray exports;
- job uploads leave out runs, data, virtualenvs and secrets but keep the code and samples.
"""

from __future__ import annotations

import copy
import itertools
import json
import pathlib
import re
import zipfile

import pytest
import yaml

REPO = pathlib.Path(__file__).resolve().parents[2]
CLUSTERS = REPO / "clusters"


def _yaml_files() -> list[pathlib.Path]:
    return sorted([*REPO.glob("*.yaml"), *REPO.glob("*.yml"), *CLUSTERS.rglob("*.yaml"), *CLUSTERS.rglob("*.yml")])


def _docs(path: pathlib.Path) -> list:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


LAUNCHER_FILES = [p for p in _yaml_files()
                  if any(isinstance(d, dict) and "provider" in d and "cluster_name" in d for d in _docs(p))]
KUBERAY_FILES = [p for p in _yaml_files()
                 if any(isinstance(d, dict) and str(d.get("apiVersion", "")).startswith("ray.io/") for d in _docs(p))]


def _id(path: pathlib.Path) -> str:
    return str(path.relative_to(REPO))


def load(path: pathlib.Path) -> dict:
    return yaml.safe_load(path.read_text())


def prepare_and_validate(config: dict) -> dict:
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def test_the_expected_cluster_files_exist():
    assert {_id(p) for p in LAUNCHER_FILES} >= {"ray_cluster.yaml", "clusters/gcp.yaml", "clusters/onprem.yaml"}
    assert {_id(p) for p in KUBERAY_FILES} >= {"clusters/kuberay/raycluster.yaml", "clusters/kuberay/rayjob.yaml"}
    assert (CLUSTERS / "README.md").is_file() and (CLUSTERS / "grafana" / "bertray-pretraining.json").is_file()


# --------------------------------------------------------------------------------------------
# Ray cluster launcher


@pytest.mark.parametrize("path", LAUNCHER_FILES, ids=_id)
def test_launcher_config_passes_rays_validator(path):
    prepared = prepare_and_validate(load(path))
    assert prepared["head_node_type"] in prepared["available_node_types"]


BAD_CONFIGS = [
    (lambda c: c.update(max_worker=4), "unknown top-level key"),
    (lambda c: c["available_node_types"]["gpu_trainer"].update(min_worker=1), "unknown node-type key"),
    (lambda c: c["docker"].update(imgae="rayproject/ray:latest"), "unknown docker key"),
    (lambda c: c.update(max_workers="six"), "max_workers as a string"),
    (lambda c: c["available_node_types"]["head"]["resources"].update(CPU="0"), "a resource as a string"),
    (lambda c: c.update(idle_timeout_minutes="ten"), "a number as a string"),
]


@pytest.mark.parametrize("mutate, error", BAD_CONFIGS, ids=[e for _, e in BAD_CONFIGS])
def test_validator_rejects_bad_aws_config(mutate, error):
    import jsonschema

    config = load(REPO / "ray_cluster.yaml")
    prepare_and_validate(config)                     # the file itself is good ...
    mutate(config)
    with pytest.raises(jsonschema.ValidationError):  # ... and the validator is not a rubber stamp
        prepare_and_validate(config)


def test_validator_rejects_unknown_head_type():
    config = load(REPO / "ray_cluster.yaml")
    config["head_node_type"] = "head-typo"
    with pytest.raises(ValueError, match="head_node_type"):
        prepare_and_validate(config)


def test_aws_cluster_shape():
    """A head that schedules nothing, a GPU type for the trainers and a CPU type for the data
    stages, autoscaled separately, with instance profiles instead of keys."""
    import ray

    config = load(REPO / "ray_cluster.yaml")
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"] == {"CPU": 0, "GPU": 0}
    gpu = [t for n, t in types.items() if re.match(r"^(p\d+\w*|g\d+\w*)\.", t["node_config"]["InstanceType"])]
    cpu = [t for n, t in types.items() if n != config["head_node_type"] and t not in gpu]
    assert gpu and cpu
    assert all(t["max_workers"] >= 1 and t.get("min_workers", 0) == 0 for t in gpu + cpu)
    assert sum(t["max_workers"] for t in gpu + cpu) >= config["max_workers"]
    for t in types.values():
        assert set(t["node_config"]["IamInstanceProfile"]) & {"Name", "Arn"}
    assert config["provider"]["region"] and config["provider"]["type"] == "aws"
    # The images carry the Ray version this repository is tested with.
    images = [config["docker"]["image"], config["docker"]["head_image"],
              *[t["docker"]["worker_image"] for t in types.values() if "docker" in t]]
    assert all(img.startswith(f"rayproject/ray:{ray.__version__}-") for img in images), images


def test_aws_node_configs_are_valid_ec2_parameters():
    """Ray passes node_config to EC2 RunInstances unchecked; botocore's service model checks it."""
    botocore_session = pytest.importorskip("botocore.session")
    from botocore.validate import ParamValidator

    shape = botocore_session.get_session().get_service_model("ec2").operation_model("RunInstances").input_shape
    config = load(REPO / "ray_cluster.yaml")
    for name, node_type in config["available_node_types"].items():
        report = ParamValidator().validate({"MinCount": 1, "MaxCount": 1, "ImageId": "ami-00000000",
                                            **node_type["node_config"]}, shape)
        assert not report.has_errors(), f"{name}: {report.generate_report()}"
    bad = ParamValidator().validate({"MinCount": 1, "MaxCount": 1, "InstanceTyp": "m6i.large"}, shape)
    assert bad.has_errors()


@pytest.mark.parametrize("path", LAUNCHER_FILES, ids=_id)
def test_launcher_security(path):
    config = prepare_and_validate(load(path))
    head_start = " ".join(config["head_start_ray_commands"])
    worker_start = " ".join(config["worker_start_ray_commands"])
    # token authentication on every node, the token shipped to every node
    assert "RAY_AUTH_MODE=token ray start --head" in head_start
    assert "RAY_AUTH_MODE=token ray start --address" in worker_start
    assert config["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token"
    # the dashboard/job API listens on the head's loopback only: reach it with `ray dashboard`
    assert "--dashboard-host=127.0.0.1" in head_start and "0.0.0.0" not in head_start
    assert "--metrics-export-port=" in head_start and "--metrics-export-port=" in worker_start
    # no extra inbound rules (Ray adds SSH and intra-cluster traffic only)
    rules = config["provider"].get("security_group", {}).get("IpPermissions", [])
    assert all(r.get("FromPort") == 22 and r.get("ToPort") == 22 for r in rules), rules
    # the code goes with `ray up`, filtered like job uploads
    assert config["file_mounts"].get("~/bertray") == "."
    assert ".rayignore" in config["rsync_filter"]
    assert any("pip install" in c and "$HOME/bertray" in c for c in config["head_setup_commands"])


SECRET_PATTERNS = [
    r"\b(AKIA|ASIA)[0-9A-Z]{16}\b",                       # AWS access key ids
    r"aws_secret_access_key\s*[:=]",                       # AWS secret keys
    r"-----BEGIN [A-Z ]*PRIVATE KEY-----",                 # SSH/TLS private keys
    r"\"private_key\"\s*:",                                # GCP service-account key files
    r"\b[0-9a-f]{64}\b",                                   # a Ray auth token (64 hex digits)
    r"(?m)^\s*[\w.-]*(password|passwd|secret|api_key|token)\s*[:=]\s*[\"']?[A-Za-z0-9+/=_-]{16,}",
    r"\bghp_[A-Za-z0-9]{20,}", r"\bxox[bp]-[A-Za-z0-9-]+",
]


def test_no_credentials_in_cluster_files():
    files = [*LAUNCHER_FILES, *KUBERAY_FILES, *CLUSTERS.rglob("*.md"), *CLUSTERS.rglob("Dockerfile*"),
             CLUSTERS / "runtime_env.yaml", REPO / "docs" / "operations.md"]
    for path in files:
        text = path.read_text()
        for pattern in SECRET_PATTERNS:
            assert not re.search(pattern, text, re.IGNORECASE), f"{_id(path)} matches {pattern}"


# --------------------------------------------------------------------------------------------
# KubeRay

K8S_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
QUANTITY = re.compile(r"^\d+(\.\d+)?(m|k|Ki|Mi|Gi|Ti|M|G|T)?$")
# Fields of the ray.io/v1 types (KubeRay 1.5-1.7 API reference): a misspelled field is an error.
CLUSTER_SPEC_FIELDS = {"suspend", "managedBy", "autoscalerOptions", "headServiceAnnotations", "enableInTreeAutoscaling",
                       "gcsFaultToleranceOptions", "headGroupSpec", "rayVersion", "workerGroupSpecs", "authOptions",
                       "upgradeStrategy"}
HEAD_FIELDS = {"template", "headService", "enableIngress", "rayStartParams", "serviceType", "resources", "labels"}
WORKER_FIELDS = {"suspend", "groupName", "replicas", "minReplicas", "maxReplicas", "idleTimeoutSeconds",
                 "rayStartParams", "template", "scaleStrategy", "numOfHosts", "resources", "labels"}
AUTOSCALER_FIELDS = {"resources", "image", "imagePullPolicy", "securityContext", "idleTimeoutSeconds", "upscalingMode",
                     "env", "envFrom", "volumeMounts", "version"}
JOB_SPEC_FIELDS = {"activeDeadlineSeconds", "backoffLimit", "rayClusterSpec", "submitterPodTemplate", "metadata",
                   "clusterSelector", "submitterConfig", "managedBy", "deletionPolicy", "deletionStrategy", "entrypoint",
                   "runtimeEnvYAML", "jobId", "submissionMode", "entrypointResources", "entrypointNumCpus",
                   "entrypointNumGpus", "entrypointMemory", "ttlSecondsAfterFinished", "shutdownAfterJobFinishes",
                   "suspend"}


def kuberay_objects() -> list[tuple[pathlib.Path, dict]]:
    return [(p, d) for p in KUBERAY_FILES for d in _docs(p) if isinstance(d, dict)]


def check_pod_template(template: dict, where: str) -> list[dict]:
    containers = template["spec"]["containers"]
    assert containers, f"{where}: no containers"
    for c in containers:
        assert c.get("name") and c.get("image"), f"{where}: container without name/image"
        for kind in ("requests", "limits"):
            res = c["resources"][kind]
            assert {"cpu", "memory"} <= set(res), f"{where}: {kind} must set cpu and memory"
            for key, value in res.items():
                assert QUANTITY.match(str(value)), f"{where}: {key}={value!r} is not a Kubernetes quantity"
    return containers


def check_cluster_spec(spec: dict, where: str) -> None:
    import ray

    assert set(spec) <= CLUSTER_SPEC_FIELDS, f"{where}: unknown fields {set(spec) - CLUSTER_SPEC_FIELDS}"
    assert spec["rayVersion"] == ray.__version__
    assert spec.get("authOptions", {}).get("mode") == "token", f"{where}: token authentication must be on"
    assert set(spec.get("autoscalerOptions", {})) <= AUTOSCALER_FIELDS
    head = spec["headGroupSpec"]
    assert set(head) <= HEAD_FIELDS, f"{where}: unknown head fields {set(head) - HEAD_FIELDS}"
    assert head.get("serviceType", "ClusterIP") == "ClusterIP" and not head.get("enableIngress"), \
        f"{where}: the head Service must not be exposed outside the cluster"
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in head["rayStartParams"].items()), \
        f"{where}: rayStartParams values must be strings"
    assert head["rayStartParams"].get("num-cpus") == "0", f"{where}: the head must not schedule work"
    check_pod_template(head["template"], f"{where} head")
    groups = spec["workerGroupSpecs"]
    names = [g["groupName"] for g in groups]
    assert len(set(names)) == len(names)
    gpu_groups = 0
    for g in groups:
        assert set(g) <= WORKER_FIELDS, f"{where}: unknown worker fields {set(g) - WORKER_FIELDS}"
        assert K8S_NAME.match(g["groupName"])
        assert 0 <= g["minReplicas"] <= g.get("replicas", 0) <= g["maxReplicas"], f"{where}: {g['groupName']} replicas"
        assert all(isinstance(v, str) for v in g["rayStartParams"].values())
        containers = check_pod_template(g["template"], f"{where} {g['groupName']}")
        gpus = int(containers[0]["resources"]["limits"].get("nvidia.com/gpu", 0))
        gpu_groups += gpus > 0
    assert gpu_groups >= 1 and len(groups) - gpu_groups >= 1, f"{where}: needs a GPU group and a CPU-only group"


@pytest.mark.parametrize("path", KUBERAY_FILES, ids=_id)
def test_kuberay_manifest(path):
    objects = [d for p, d in kuberay_objects() if p == path]
    assert objects
    for obj in objects:
        assert obj["apiVersion"] == "ray.io/v1"
        assert obj["kind"] in {"RayCluster", "RayJob"}
        assert K8S_NAME.match(obj["metadata"]["name"])
        where = f"{_id(path)} {obj['kind']}"
        if obj["kind"] == "RayCluster":
            check_cluster_spec(obj["spec"], where)
        else:
            spec = obj["spec"]
            assert set(spec) <= JOB_SPEC_FIELDS, f"{where}: unknown fields {set(spec) - JOB_SPEC_FIELDS}"
            assert "flows/pretrain.py" in spec["entrypoint"]
            assert spec["submissionMode"] in {"K8sJobMode", "HTTPMode", "SidecarMode", "InteractiveMode"}
            runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
            assert runtime_env["working_dir"] and runtime_env["env_vars"]["RAY_TRAIN_ENABLE_STATE_TRACKING"] == "1"
            assert spec["shutdownAfterJobFinishes"] is True
            check_cluster_spec(spec["rayClusterSpec"], where)


def test_rayjob_runs_the_raycluster_spec_with_valid_flags():
    """The RayJob's embedded cluster is the RayCluster manifest's spec, and its entrypoint parses
    with flows/pretrain.py's own argument parser and names a config that exists."""
    import importlib.util
    import shlex

    cluster = load(CLUSTERS / "kuberay" / "raycluster.yaml")
    job = load(CLUSTERS / "kuberay" / "rayjob.yaml")
    assert job["spec"]["rayClusterSpec"] == cluster["spec"]
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:2] == ["python", "flows/pretrain.py"]
    spec = importlib.util.spec_from_file_location("bertray_flow_pretrain", REPO / "flows" / "pretrain.py")
    flow = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(flow)
    args = flow.build_parser().parse_args(argv[2:])
    assert (REPO / args.config).is_file()
    assert args.output.startswith("s3://") and args.name


# --------------------------------------------------------------------------------------------
# Grafana, runtime env, uploads, docs


def test_grafana_dashboard_queries_bertray_metrics():
    from bertray.train.metrics import GAUGES

    dash = json.loads((CLUSTERS / "grafana" / "bertray-pretraining.json").read_text())
    assert dash["title"] and dash["uid"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"] for v in dash["templating"]["list"]}
    assert {"datasource", "run"} <= variables
    used = set()
    for panel in dash["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}" and panel["targets"], panel["title"]
        assert {"h", "w", "x", "y"} <= set(panel["gridPos"])
        for target in panel["targets"]:
            names = re.findall(r"\b(ray_\w+)", target["expr"])
            assert names, target["expr"]
            for name in names:
                assert name.startswith("ray_bertray_") and name[len("ray_bertray_"):] in GAUGES, name
            used |= {n[len("ray_bertray_"):] for n in names}
    assert {"loss", "mlm_accuracy", "nsp_accuracy", "tokens_per_s", "data_wait_share", "learning_rate"} <= used


def test_job_runtime_env_file():
    from ray.dashboard.modules.dashboard_sdk import parse_runtime_env_args
    from ray.runtime_env import RuntimeEnv

    path = CLUSTERS / "runtime_env.yaml"
    env = parse_runtime_env_args(runtime_env=str(path), working_dir=".")   # what `ray job submit` does
    assert env["working_dir"] == "."
    assert env["env_vars"]["RAY_TRAIN_ENABLE_STATE_TRACKING"] == "1"
    assert all(isinstance(v, str) for v in env["env_vars"].values())
    RuntimeEnv(**env)                                                       # Ray's own field validation


def _upload(directory: pathlib.Path, tmp_path: pathlib.Path) -> set[str]:
    """The files `ray job submit --working-dir <directory>` would upload, packaged by Ray's own code."""
    from ray._private import ray_constants
    from ray._private.runtime_env.packaging import create_package

    target = tmp_path / f"{directory.name}-pkg.zip"
    create_package(str(directory), target, include_parent_dir=False,
                   excludes=ray_constants.get_runtime_env_default_excludes(), include_gitignore=True)
    return {n for n in zipfile.ZipFile(target).namelist() if not n.endswith("/")}


def test_job_upload_leaves_out_runs_data_envs_and_secrets(tmp_path):
    tree = tmp_path / "checkout"
    keep = ["bertray/data/pipeline.py", "bertray/train/pretrain.py", "flows/pretrain.py", "flows/configs/embedded.yaml",
            "samples/corpus/wikitext-2/wiki.test.raw", "clusters/runtime_env.yaml", "tests/data/test_nsp.py"]
    drop = ["runs/pretrain/checkpoint_00000010/model.safetensors", "data/corpus/wiki.txt", "datasets/glue/x.tsv",
            ".venv/lib/site.py", "venv/bin/python", "env/bin/python", "bertray/__pycache__/x.cpython-311.pyc",
            "outputs/log.txt", "checkpoints/a.ckpt", "dist/bertray-0.1.0.whl", "bertray.egg-info/PKG-INFO",
            ".env", "keys/cluster.pem", ".aws/credentials", "corpus.tar.gz", "train.log", ".git/HEAD",
            "benchmarks/results/x.json"]
    for rel in keep + drop:
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        (tree / rel).write_text("x")
    for name in (".rayignore", ".gitignore"):
        (tree / name).write_text((REPO / name).read_text())
    uploaded = _upload(tree, tmp_path)
    assert set(keep) <= uploaded, set(keep) - uploaded
    assert not uploaded & set(drop), uploaded & set(drop)


def test_repository_upload_is_small_and_complete(tmp_path):
    uploaded = _upload(REPO, tmp_path)
    assert {"flows/pretrain.py", "bertray/train/pretrain.py", "bertray/data/pipeline.py", "clusters/runtime_env.yaml",
            "samples/corpus/wikitext-2/wiki.test.raw"} <= uploaded
    assert not [n for n in uploaded if n.split("/")[0] in {"runs", "data", ".venv", "venv", ".git"}]
    size = sum((REPO / n).stat().st_size for n in uploaded)
    assert size < 50 * 2**20, f"the job upload is {size / 2**20:.1f} MiB"


def test_docs_say_how_to_get_and_pass_the_token():
    for path in (CLUSTERS / "README.md", REPO / "docs" / "operations.md"):
        text = path.read_text()
        for needle in ("ray get-auth-token", "RAY_AUTH_MODE=token", "RAY_AUTH_TOKEN_PATH", "Authorization: Bearer",
                       "ray dashboard"):
            assert needle in text, f"{_id(path)} does not mention {needle!r}"


def _documented_flow_commands() -> list[tuple[str, str, list[str]]]:
    """(file, flow, argv) of every `python flows/<flow>.py ...` command in the guides' bash blocks,
    with backslash continuations joined and shell comments dropped."""
    import re
    import shlex

    found = []
    for path in (REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), CLUSTERS / "README.md"):
        for block in re.findall(r"```bash\n(.*?)```", path.read_text(), flags=re.S):
            for line in block.replace("\\\n", " ").splitlines():
                words = shlex.split(line, comments=True)
                for i, word in enumerate(words[:-1]):
                    if word == "python" and re.fullmatch(r"flows/\w+\.py", words[i + 1]):
                        argv = list(itertools.takewhile(lambda w: w not in ("&&", "||", "|", ";"), words[i + 2:]))
                        found.append((_id(path), words[i + 1][6:-3], argv))
    return found


def test_documented_flow_commands_are_valid():
    """Every command the guides tell a user to run parses, and its configuration validates (a smoke
    run with a step count below the config's warm-up, say, would stop with a ConfigError)."""
    import importlib.util

    from bertray.cli import config_from_args
    from bertray.config import load_config
    from bertray.train.config import PretrainConfig
    from bertray.tune.sweep_plan import FinetuneConfig

    commands = _documented_flow_commands()
    assert {"pretrain", "finetune", "inspect_data"} <= {flow for _, flow, _ in commands}
    for where, flow, argv in commands:
        spec = importlib.util.spec_from_file_location(f"doc_{flow}", REPO / "flows" / f"{flow}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        args = module.build_parser().parse_args(argv)
        if flow in ("pretrain", "inspect_data"):
            config_from_args(PretrainConfig, args, {"data.corpus": args.corpus,
                                                    "run.output": getattr(args, "output", None),
                                                    "run.name": getattr(args, "name", None)})
        elif flow == "finetune":
            overrides = module.overrides_from(args)
            default = "finetune-paper.yaml" if "data" in overrides else "finetune-embedded.yaml"
            load_config(FinetuneConfig, args.config or str(REPO / "flows" / "configs" / default), overrides)


def test_examples_never_train_on_their_evaluation_text():
    """Every `--corpus` in the cluster configs and the docs is a prefix that holds no held-out or
    evaluation text (caught: `--corpus s3://BUCKET/corpus/` listed `corpus/heldout/` recursively)."""
    import re

    files = [REPO / "ray_cluster.yaml", *sorted((REPO / "docs").glob("*.md")), REPO / "README.md",
             *sorted((REPO / "clusters").rglob("*.yaml")), *sorted((REPO / "clusters").rglob("*.md"))]
    text = {f: f.read_text() for f in files}
    corpora = {m for t in text.values() for m in re.findall(r"--corpus\s+'?([a-z0-9]+://[^\s'\\]+)", t)}
    held_out = {m for t in text.values() for m in re.findall(r"([a-z0-9]+://[^\s'\]\\]*heldout[^\s'\]\\]*)", t)}
    assert corpora and held_out
    for corpus in corpora:
        prefix = corpus.rstrip("*")
        assert not any(h.startswith(prefix) for h in held_out), (corpus, held_out)


# --------------------------------------------------------------------------------------------
# Exposure: nothing listens where it should not


def test_kuberay_pods_are_closed_by_a_network_policy():
    """Caught: the manifests exposed the dashboard on the pod network with no NetworkPolicy."""
    policies = [d for d in _docs(CLUSTERS / "kuberay" / "networkpolicy.yaml") if d.get("kind") == "NetworkPolicy"]
    assert len(policies) == 1
    spec = policies[0]["spec"]
    assert spec["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "bertray"}
    assert spec["policyTypes"] == ["Ingress"]
    for rule in spec["ingress"]:
        for peer in rule["from"]:
            assert "ipBlock" not in peer                                   # no address range, 0.0.0.0/0 least of all
            if "namespaceSelector" in peer:                                # other namespaces: the operator only
                assert peer["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "kuberay-operator"}
                assert [p["port"] for p in rule["ports"]] == [8265]
            else:
                assert peer["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "bertray"}
    for path, doc in _ray_objects():                                      # the policy selects every Ray pod
        for template in _pod_templates(doc):
            assert template["metadata"]["labels"]["app.kubernetes.io/name"] == "bertray", path


def _ray_objects() -> list[tuple[pathlib.Path, dict]]:
    return [(p, d) for p, d in kuberay_objects() if str(d.get("apiVersion", "")).startswith("ray.io/")]


def _pod_templates(doc: dict) -> list[dict]:
    spec = doc.get("spec", {})
    cluster = spec.get("rayClusterSpec", spec)
    groups = [cluster.get("headGroupSpec", {}), *cluster.get("workerGroupSpecs", [])]
    return [g["template"] for g in groups if "template" in g]


def test_no_client_port_and_no_public_service():
    """Caught: the head published the Ray client port 10001."""
    for path, doc in _ray_objects():
        spec = doc.get("spec", {})
        cluster = spec.get("rayClusterSpec", spec)
        if "headGroupSpec" not in cluster:
            continue
        assert cluster["headGroupSpec"].get("serviceType", "ClusterIP") == "ClusterIP", path
        for template in _pod_templates(doc):
            ports = [p["containerPort"] for c in template["spec"]["containers"] for p in c.get("ports", [])]
            assert 10001 not in ports, path


@pytest.mark.parametrize("path", LAUNCHER_FILES, ids=_id)
def test_launcher_heads_serve_the_dashboard_on_loopback(path):
    config = load(path)
    head = " ".join(config.get("head_start_ray_commands", []))
    assert "--dashboard-host=127.0.0.1" in head, path
    assert "0.0.0.0" not in head and "--ray-client-server-port" not in head, path


def test_monitoring_as_the_docs_start_it_listens_on_loopback_without_anonymous_access():
    """Caught: Grafana as the docs started it let anonymous viewers in on all interfaces, and
    Prometheus was started with its lifecycle (shutdown) API."""
    docs = (CLUSTERS / "README.md").read_text() + (REPO / "docs" / "operations.md").read_text()
    grafana = [line for line in docs.splitlines() if "grafana-server" in line]
    prometheus = [line for line in docs.splitlines() if re.search(r"`prometheus ", line)]
    assert grafana and prometheus
    for line in grafana:
        assert "GF_SERVER_HTTP_ADDR=127.0.0.1" in line and "GF_AUTH_ANONYMOUS_ENABLED=false" in line, line
    for line in prometheus:
        assert "--web.listen-address=127.0.0.1:" in line and "web.enable-lifecycle" not in line, line
    assert "launch-prometheus" not in docs                     # its Prometheus has the lifecycle API on


# --------------------------------------------------------------------------------------------
# Versions: every node runs what was tested


def _requirement(name: str) -> str:
    import tomllib

    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    return next(d for d in deps if re.match(rf"{name}(\[|[<>=~!])", d))


def test_ray_is_bounded_to_the_tested_release_and_pyarrow_to_what_ray_needs():
    """Caught: `ray>=2.60` with no upper bound although the pipeline uses 2.60 internals, and
    `pyarrow>=15`, below the pyarrow>=17 that ray[data] 2.60 requires."""
    import importlib.metadata

    from packaging.requirements import Requirement
    from packaging.version import Version

    ray_req = Requirement(_requirement("ray"))
    assert Version(importlib.metadata.version("ray")) in ray_req.specifier
    assert not ray_req.specifier.contains("2.61.0") and not ray_req.specifier.contains("3.0.0")
    ours = Requirement(_requirement("pyarrow")).specifier
    needed = [Requirement(r) for r in importlib.metadata.requires("ray") if r.startswith("pyarrow")]
    floor = max(Version(s.version) for r in needed for s in r.specifier if s.operator == ">=")
    assert not ours.contains(str(Version(f"{floor.major - 1}.0.0"))) and ours.contains(str(floor))


def test_every_node_installs_from_the_constraints_file():
    """Caught: nodes installed at boot without a lock, so a node added later could get other versions."""
    from packaging.requirements import Requirement

    pins = {}
    for line in (CLUSTERS / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            req = Requirement(line)
            assert [s.operator for s in req.specifier] == ["=="], line
            pins[req.name.lower()] = next(iter(req.specifier)).version
    assert Requirement(_requirement("ray")).specifier.contains(pins["ray"])
    for path in LAUNCHER_FILES:
        installs = [c for c in load(path)["setup_commands"] if "pip install" in c and "bertray" in c]
        assert installs and all("-c \"$HOME/bertray/clusters/constraints.txt\"" in c for c in installs), path
        assert all("zstd" in c for c in installs), path          # the docs recommend .zst shards
    docker = (CLUSTERS / "kuberay" / "Dockerfile").read_text()
    assert "-c clusters/constraints.txt" in docker and "zstd" in docker


def _cluster_run_config():
    from bertray.config import load_config
    from bertray.train.config import PretrainConfig

    return load_config(PretrainConfig, str(REPO / "flows/configs/bert-base.yaml"), {"data.corpus": ["s3://b/c/"]})


def _node_roles(path: pathlib.Path) -> list[tuple[str, dict, bool]]:
    """(name, Ray node labels, has GPUs) of every node type a cluster file starts."""
    roles = []
    for doc in _docs(path):
        if "available_node_types" in doc:                                         # launcher (AWS, GCP)
            for name, t in doc["available_node_types"].items():
                node = t.get("node_config", {})
                gpu = (bool(t.get("resources", {}).get("GPU")) or "guestAccelerators" in node
                       or bool(re.match(r"^(a\d|g\d)-\w*gpu", node.get("machineType", "")))      # GCP a3-highgpu-8g
                       or bool(re.match(r"^[pg]\d+\w*\.", node.get("InstanceType", ""))))          # AWS p4d, g5, ...
                roles.append((name, t.get("labels", {}), gpu))
        elif doc.get("provider", {}).get("type") == "local":                       # on-prem: labelled at `ray start`
            for key in ("head_start_ray_commands", "worker_start_ray_commands"):
                start = " ".join(doc[key])
                found = re.search(r"--labels=bertray-role=\$\(nvidia-smi -L >/dev/null 2>&1 && echo (\w+) \|\| echo (\w+)\)",
                                  start)
                assert found, f"{_id(path)} {key}: the host must label itself (--labels=bertray-role=...)"
                roles += [(f"{key} with GPU", {"bertray-role": found.group(1)}, True),
                          (f"{key} without GPU", {"bertray-role": found.group(2)}, False)]
        elif str(doc.get("apiVersion", "")).startswith("ray.io/"):                 # KubeRay
            spec = doc["spec"].get("rayClusterSpec", doc["spec"])
            roles.append(("head", spec["headGroupSpec"].get("labels", {}), False))
            for g in spec["workerGroupSpecs"]:
                limits = g["template"]["spec"]["containers"][0]["resources"]["limits"]
                roles.append((g["groupName"], g.get("labels", {}), int(limits.get("nvidia.com/gpu", 0)) > 0))
    return roles


@pytest.mark.parametrize("path", LAUNCHER_FILES + KUBERAY_FILES, ids=_id)
def test_cluster_files_label_their_nodes_as_the_cluster_config_places_by(path):
    """flows/configs/bert-base.yaml keeps Train workers on nodes labelled as trainers and the data
    stages on data nodes: every cluster file must start GPU nodes that match the first and only
    CPU nodes that match the second, or the run would be refused (or wait) on that cluster."""
    from bertray.labels import matches

    cfg = _cluster_run_config()
    assert cfg.scaling.node_labels and cfg.data.node_labels
    roles = _node_roles(path)
    assert roles, _id(path)
    for name, labels, gpu in roles:
        trains, feeds = matches(cfg.scaling.node_labels, labels), matches(cfg.data.node_labels, labels)
        assert not (trains and feeds), f"{_id(path)} {name}: {labels} is both a trainer and a data node"
        assert trains == gpu, f"{_id(path)} {name}: labels {labels}, GPUs {gpu}: only GPU nodes may train"
    assert any(matches(cfg.data.node_labels, labels) for _, labels, _ in roles), f"{_id(path)}: no data node type"
