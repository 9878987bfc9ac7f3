"""deploy/kubernetes/ is checked without a cluster: every manifest validates
against the schemas of a pinned Kubernetes version (kubernetes-validate,
strict: an unknown field is an error, as `kubectl apply` makes it), the
CloudNativePG Cluster against the operator's own CRD schema (vendored), and
the pieces are wired to each other, to service/config.py, to the CLI and to
the role and settings documents the way the README in that folder says."""

from __future__ import annotations

import copy
import re
import shlex
from functools import cache
from typing import Any
from urllib.parse import parse_qs, urlsplit

import jsonschema
import kubernetes_validate
import pytest
import yaml

from deploy_reference import (DEPLOY, READ_REPLICA_VARIABLE, config_variables, documented_provisioning,
                              sql_statements, undocumented_settings)
from service.cli.main import parser
from service.store.migrations import APP_ROLE

KUBERNETES = DEPLOY / "kubernetes"
# The oldest Kubernetes that CloudNativePG 1.30 supports: the manifests use nothing newer.
KUBERNETES_VERSION = "1.34.0"
CLUSTER_CRD = KUBERNETES / "vendor" / "postgresql.cnpg.io_clusters.yaml"
SERVICE_PORT = 8080
OWNER, SERVICE_LOGIN = "consent_ledger_owner", "consent_ledger_service"

Manifest = dict[str, Any]
# libyaml reads the 460 KB CRD in a tenth of the pure-Python loader's second.
LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _load_all(path) -> list[Manifest]:
    return [doc for doc in yaml.load_all(path.read_text(), Loader=LOADER) if doc]


def _kustomization(folder) -> tuple[dict, list[Manifest]]:
    kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
    return kustomization, [doc for name in kustomization["resources"] for doc in _load_all(folder / name)]


@pytest.fixture(scope="module")
def manifests() -> list[Manifest]:
    return _kustomization(KUBERNETES)[1]


def one(manifests: list[Manifest], kind: str, name: str | None = None) -> Manifest:
    found = [m for m in manifests if m["kind"] == kind and (name is None or m["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


@cache
def cluster_validator() -> tuple[str, jsonschema.protocols.Validator]:
    """The Cluster CRD's served schema, made strict: Kubernetes (with
    kubectl's default field validation) refuses a field the schema does not
    declare, so every object without an explicit ``additionalProperties`` or
    ``x-kubernetes-preserve-unknown-fields`` gets ``additionalProperties: false``."""
    crd = yaml.load(CLUSTER_CRD.read_text(), Loader=LOADER)
    (version,) = [v for v in crd["spec"]["versions"] if v["served"] and v["storage"]]

    def strict(node: Any) -> None:
        if isinstance(node, dict):
            if ("properties" in node and "additionalProperties" not in node
                    and not node.get("x-kubernetes-preserve-unknown-fields")):
                node["additionalProperties"] = False
            for value in node.values():
                strict(value)
        elif isinstance(node, list):
            for value in node:
                strict(value)

    schema = version["schema"]["openAPIV3Schema"]
    strict(schema)
    return f"{crd['spec']['group']}/{version['name']}", jsonschema.Draft202012Validator(schema)


def validate(manifest: Manifest) -> None:
    """Raise jsonschema.ValidationError (or kubernetes-validate's
    SchemaNotFoundError for an unknown kind or API version)."""
    if manifest["kind"] == "Cluster":
        api_version, validator = cluster_validator()
        assert manifest["apiVersion"] == api_version
        validator.validate(manifest)
    else:
        kubernetes_validate.validate(manifest, KUBERNETES_VERSION, strict=True)


def test_every_file_here_is_in_the_kustomization():
    kustomization, _ = _kustomization(KUBERNETES)
    assert kustomization["namespace"] == "consent-ledger"
    listed = set(kustomization["resources"])
    on_disk = {p.name for p in KUBERNETES.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk
    component, extra = _kustomization(KUBERNETES / "jwks-url")
    assert component["kind"] == "Component"
    assert set(component["resources"]) == {p.name for p in (KUBERNETES / "jwks-url").glob("*.yaml")} - {
        "kustomization.yaml"}


def test_every_manifest_validates(manifests: list[Manifest]):
    _, component = _kustomization(KUBERNETES / "jwks-url")
    kinds = []
    for manifest in manifests + component:
        validate(manifest)
        kinds.append(manifest["kind"])
    assert {"Cluster", "Job", "Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler",
            "NetworkPolicy", "ConfigMap", "Namespace"} <= set(kinds)


@pytest.mark.parametrize(("kind", "path", "typo"), [
    ("Deployment", "spec.template.spec.containers.0.readinessProbe", "readinesProbe"),
    ("Deployment", "spec.template.spec.containers.0.securityContext.readOnlyRootFilesystem",
     "readOnlyRootFileSystem"),
    ("Job", "spec.backoffLimit", "backofLimit"),
    ("NetworkPolicy", "spec.policyTypes", "policyType"),
    ("HorizontalPodAutoscaler", "spec.minReplicas", "minReplica"),
    ("PodDisruptionBudget", "spec.minAvailable", "minAvailible"),
    ("Cluster", "spec.instances", "instance"),
    ("Cluster", "spec.managed.roles.1.inherit", "inherits"),
    ("Cluster", "spec.postgresql.synchronous.dataDurability", "dataDurablity"),
    ("Cluster", "spec.bootstrap.initdb.postInitApplicationSQL", "postInitAppSQL"),
])
def test_a_typo_in_a_field_name_fails_validation(manifests: list[Manifest], kind: str, path: str, typo: str):
    broken = copy.deepcopy(next(m for m in manifests if m["kind"] == kind))
    *parents, key = path.split(".")
    node = broken
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    node[typo] = node.pop(key)
    with pytest.raises(jsonschema.ValidationError):
        validate(broken)


def test_a_wrong_value_fails_validation(manifests: list[Manifest]):
    broken = copy.deepcopy(one(manifests, "Cluster"))
    broken["spec"]["postgresql"]["synchronous"]["dataDurability"] = "mostly"
    with pytest.raises(jsonschema.ValidationError):
        validate(broken)


# --- wiring -----------------------------------------------------------------------------------------------

def _pod(manifest: Manifest) -> Manifest:
    return manifest["spec"]["template"]["spec"]


def _env(container: Manifest) -> dict[str, Manifest]:
    return {e["name"]: e for e in container.get("env", [])}


def _expanded_env(container: Manifest, config: Manifest) -> dict[str, str]:
    """The container's environment as the kubelet builds it: the ConfigMap's
    keys, then ``env`` (which wins), with ``$(NAME)`` expanded from variables
    defined before; a Secret's value stands as ``secret.NAME.KEY``."""
    values: dict[str, str] = {}
    for source in container.get("envFrom", []):
        assert source["configMapRef"]["name"] == config["metadata"]["name"]
        values.update(config["data"])
    for entry in container.get("env", []):
        if "valueFrom" in entry:
            ref = entry["valueFrom"]["secretKeyRef"]
            values[entry["name"]] = f"secret.{ref['name']}.{ref['key']}"
            continue

        def expand(match: re.Match[str]) -> str:
            assert match[1] in values, f"{entry['name']} uses $({match[1]}) before it is defined"
            return values[match[1]]

        values[entry["name"]] = re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", expand, entry["value"])
    return values


def _database_url(url: str) -> tuple[str, str, str, str]:
    """(user, password, host, database), checking TLS is verified against the cluster's CA."""
    parts = urlsplit(url)
    query = parse_qs(parts.query)
    assert parts.scheme == "postgresql" and parts.port == 5432
    assert query["sslmode"] == ["verify-full"], url
    assert query["sslrootcert"] == ["/run/secrets/consent-ledger/db-ca/ca.crt"], url
    return parts.username, parts.password, parts.hostname, parts.path.lstrip("/")


@pytest.fixture(scope="module")
def cluster(manifests: list[Manifest]) -> Manifest:
    return one(manifests, "Cluster")


def test_the_database_is_a_primary_with_two_streaming_replicas_one_synchronous(cluster: Manifest):
    spec = cluster["spec"]
    assert spec["instances"] == 3
    assert spec["postgresql"]["synchronous"] == {"method": "any", "number": 1, "dataDurability": "required"}
    assert spec["affinity"]["enablePodAntiAffinity"] is True
    assert spec["affinity"]["podAntiAffinityType"] == "required"
    assert spec["enableSuperuserAccess"] is False
    assert spec["bootstrap"]["initdb"]["dataChecksums"] is True


def test_the_database_is_durable_and_its_settings_documented(cluster: Manifest):
    parameters = cluster["spec"]["postgresql"]["parameters"]
    assert all(isinstance(v, str) for v in parameters.values()), "CRD parameters are strings"
    assert parameters["fsync"] == parameters["synchronous_commit"] == parameters["full_page_writes"] == "on"
    assert not undocumented_settings(list(parameters)), "explain every setting in deploy/POSTGRES.md"


def test_the_database_roles_are_the_documented_ones(cluster: Manifest):
    """CloudNativePG creates the owner and its database; the rest of
    POSTGRES-ROLES.md's provisioning runs after initdb, statement for
    statement, and the managed roles keep the service login as documented."""
    initdb = cluster["spec"]["bootstrap"]["initdb"]
    database = initdb["database"]
    without_passwords = [re.sub(r" PASSWORD :'\w+'", "", s) for s in documented_provisioning()]
    made_by_the_operator = [f"CREATE ROLE {initdb['owner']} LOGIN", f"CREATE DATABASE {database} OWNER {OWNER}"]
    assert initdb["owner"] == OWNER and database == "consent_ledger"
    assert all(s in without_passwords for s in made_by_the_operator)
    expected = [s for s in without_passwords if s not in made_by_the_operator]
    assert sql_statements(";".join(initdb["postInitApplicationSQL"])) == expected

    roles = {r["name"]: r for r in cluster["spec"]["managed"]["roles"]}
    assert set(roles) == {APP_ROLE, SERVICE_LOGIN}
    assert roles[APP_ROLE]["login"] is False
    service = roles[SERVICE_LOGIN]
    assert service["login"] is True and service["inherit"] is False and service["inRoles"] == [APP_ROLE]
    assert not any(r.get(flag) for r in roles.values() for flag in ("superuser", "createdb", "createrole",
                                                                    "replication", "bypassrls"))


def test_the_service_writes_through_the_primary_and_reads_from_the_replicas(manifests: list[Manifest],
                                                                          cluster: Manifest):
    name = cluster["metadata"]["name"]
    roles = {r["name"]: r for r in cluster["spec"]["managed"]["roles"]}
    owner_secret = cluster["spec"]["bootstrap"]["initdb"]["secret"]["name"]
    service_secret = roles[SERVICE_LOGIN]["passwordSecret"]["name"]
    config = one(manifests, "ConfigMap")
    (container,) = _pod(one(manifests, "Deployment"))["containers"]
    env = _expanded_env(container, config)
    assert _database_url(env["DATABASE_URL"]) == (
        OWNER, f"secret.{owner_secret}.password", f"{name}-rw", "consent_ledger")
    assert _database_url(env["CONSENT_LEDGER_SERVICE_DATABASE_URL"]) == (
        SERVICE_LOGIN, f"secret.{service_secret}.password", f"{name}-rw", "consent_ledger")
    assert _database_url(env[READ_REPLICA_VARIABLE]) == (
        SERVICE_LOGIN, f"secret.{service_secret}.password", f"{name}-ro", "consent_ledger")

    (migrate,) = _pod(one(manifests, "Job"))["containers"]
    job_env = _expanded_env(migrate, config)
    assert job_env["DATABASE_URL"] == env["DATABASE_URL"]
    assert "CONSENT_LEDGER_SERVICE_DATABASE_URL" not in job_env and READ_REPLICA_VARIABLE not in job_env


def test_every_variable_set_is_one_the_service_reads(manifests: list[Manifest]):
    """A misspelt variable would be ignored silently; the only others allowed
    are part B's read-replica URL and secrets substituted into a URL."""
    known = config_variables() | {READ_REPLICA_VARIABLE}
    config = one(manifests, "ConfigMap")
    assert set(config["data"]) <= known, set(config["data"]) - known
    for workload in (one(manifests, "Deployment"), one(manifests, "Job")):
        for container in _pod(workload)["containers"]:
            env = _env(container)
            substituted = {n for e in env.values() for n in re.findall(r"\$\((\w+)\)", e.get("value", ""))}
            assert set(env) - known <= substituted, set(env) - known - substituted
            assert all("valueFrom" in env[n] for n in substituted - known), "only secrets are substituted"
    assert config["data"]["CONSENT_LEDGER_ENV"] == "production"


def test_files_the_settings_name_are_mounted_from_secrets(manifests: list[Manifest]):
    pod = _pod(one(manifests, "Deployment"))
    (container,) = pod["containers"]
    env = _expanded_env(container, one(manifests, "ConfigMap"))
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounted = {}
    for mount in container["volumeMounts"]:
        volume = volumes[mount["name"]]
        if "secret" in volume:
            assert mount["readOnly"] is True
            for item in volume["secret"]["items"]:
                mounted[f"{mount['mountPath']}/{item['path']}"] = (volume["secret"]["secretName"], item["key"])
    assert mounted[env["CONSENT_LEDGER_LOG_KEY"]] == ("consent-ledger-log-key", "log.key")
    assert mounted[env["CONSENT_LEDGER_JWKS"]] == ("consent-ledger-jwks", "jwks.json")
    ca = parse_qs(urlsplit(env["DATABASE_URL"]).query)["sslrootcert"][0]
    assert mounted[ca] == (f"{one(manifests, 'Cluster')['metadata']['name']}-ca", "ca.crt")
    assert volumes["log-key"]["secret"]["defaultMode"] == 0o440 and pod["securityContext"]["fsGroup"] == 10001


def test_every_secret_is_created_by_the_readme_and_none_is_committed(manifests: list[Manifest],
                                                                    cluster: Manifest):
    assert not [m for m in manifests if m["kind"] == "Secret"]
    text = (KUBERNETES / "README.md").read_text()
    created: dict[str, tuple[str | None, set[str], dict[str, str]]] = {}
    for block in re.findall(r"```sh\n(.*?)```", text, re.S):
        for line in block.splitlines():
            args = shlex.split(line)
            if args[:1] == ["kubectl"] and "secret" in args and "create" in args:
                name = args[args.index("generic") + 1]
                options = [a.split("=", 1) for a in args if a.startswith("--")]
                keys = {v.split("=")[0] for o, v in options if o in ("--from-literal", "--from-file")}
                literals = dict(v.split("=", 1) for o, v in options if o == "--from-literal")
                created[name] = (dict(options).get("--type"), keys, literals)

    # The operator makes the CA Secret; everything else is the README's.
    used: dict[str, set[str]] = {}
    for workload in (one(manifests, "Deployment"), one(manifests, "Job")):
        pod = _pod(workload)
        for volume in pod["volumes"]:
            if "secret" in volume:
                used.setdefault(volume["secret"]["secretName"], set()).update(
                    i["key"] for i in volume["secret"]["items"])
        for entry in pod["containers"][0]["env"]:
            if "valueFrom" in entry:
                ref = entry["valueFrom"]["secretKeyRef"]
                used.setdefault(ref["name"], set()).add(ref["key"])
    assert used.pop(f"{cluster['metadata']['name']}-ca") == {"ca.crt"}
    for name, keys in used.items():
        assert name in created and keys <= created[name][1], name
    # CloudNativePG takes the owner's and the service login's passwords from basic-auth Secrets.
    logins = {cluster["spec"]["bootstrap"]["initdb"]["secret"]["name"]: OWNER}
    logins |= {r["passwordSecret"]["name"]: r["name"] for r in cluster["spec"]["managed"]["roles"]
               if "passwordSecret" in r}
    for name, login in logins.items():
        kind, keys, literals = created[name]
        assert kind == "kubernetes.io/basic-auth" and keys == {"username", "password"}
        assert literals["username"] == login


def test_the_service_runs_the_cli_non_root_on_a_read_only_root(manifests: list[Manifest]):
    for workload, command in ((one(manifests, "Deployment"), "serve"), (one(manifests, "Job"), "migrate")):
        pod = _pod(workload)
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert pod["automountServiceAccountToken"] is False
        for container in pod["containers"]:
            security = container["securityContext"]
            assert security["allowPrivilegeEscalation"] is False
            assert security["readOnlyRootFilesystem"] is True
            assert security["capabilities"]["drop"] == ["ALL"]
            resources = container["resources"]
            assert {"cpu", "memory"} <= set(resources["requests"]) and "memory" in resources["limits"]
            assert container["image"] == "consent-ledger"
            args = parser().parse_args(container["command"][1:])  # exits (fails) on an unknown command or option
            assert container["command"][0] == "consent-ledger" and args.command == command
    kustomization, _ = _kustomization(KUBERNETES)
    assert [i["name"] for i in kustomization["images"]] == ["consent-ledger"]


def test_probes_health_and_scaling_point_at_the_service(manifests: list[Manifest]):
    deployment = one(manifests, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert "replicas" not in deployment["spec"], "the HorizontalPodAutoscaler owns the replica count"
    (container,) = _pod(deployment)["containers"]
    args = parser().parse_args(container["command"][1:])
    assert args.port == SERVICE_PORT and args.host == "0.0.0.0"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": SERVICE_PORT}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert container["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}

    service = one(manifests, "Service")
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert [p["targetPort"] for p in service["spec"]["ports"]] == ["http"]
    assert one(manifests, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    hpa = one(manifests, "HorizontalPodAutoscaler")["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                     "name": deployment["metadata"]["name"]}
    assert 2 <= hpa["minReplicas"] < hpa["maxReplicas"]
    job_labels = one(manifests, "Job")["spec"]["template"]["metadata"]["labels"]
    assert not service["spec"]["selector"].items() <= job_labels.items(), "the Service must not route to the Job"


def test_network_policies_let_through_only_what_the_service_needs(manifests: list[Manifest], cluster: Manifest):
    policies = {m["metadata"]["name"]: m["spec"] for m in manifests if m["kind"] == "NetworkPolicy"}
    app = policies["consent-ledger"]
    selected = app["podSelector"]["matchLabels"].items()
    for workload in (one(manifests, "Deployment"), one(manifests, "Job")):
        assert selected <= workload["spec"]["template"]["metadata"]["labels"].items()
    assert app["policyTypes"] == ["Ingress", "Egress"]
    assert [rule["ports"] for rule in app["ingress"]] == [[{"port": "http", "protocol": "TCP"}]]
    db_pods = {"cnpg.io/cluster": cluster["metadata"]["name"]}
    egress = [(rule["to"], sorted((p["port"], p["protocol"]) for p in rule["ports"])) for rule in app["egress"]]
    assert egress == [
        ([{"podSelector": {"matchLabels": db_pods}}], [(5432, "TCP")]),
        ([{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
           "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}}}], [(53, "TCP"), (53, "UDP")]),
    ]

    db = policies["consent-ledger-db"]
    assert db["podSelector"]["matchLabels"] == db_pods and db["policyTypes"] == ["Ingress"]
    sources = [rule["from"] for rule in db["ingress"]]
    assert [{"podSelector": {"matchLabels": dict(selected)}}] in sources
    assert [{"podSelector": {"matchLabels": db_pods}}] in sources  # replication between instances
    assert all(rule.get("from") for rule in db["ingress"]), "no rule may admit every source"


def test_the_jwks_url_component_switches_the_setting_and_opens_https_egress(manifests: list[Manifest]):
    component, resources = _kustomization(KUBERNETES / "jwks-url")
    (patch,) = component["patches"]
    target = one(manifests, patch["target"]["kind"], patch["target"]["name"])
    (operation,) = yaml.safe_load(patch["patch"])
    assert operation["op"] == "replace" and operation["path"] == "/data/CONSENT_LEDGER_JWKS"
    assert "CONSENT_LEDGER_JWKS" in target["data"] and operation["value"].startswith("https://")
    (policy,) = resources
    assert policy["spec"]["policyTypes"] == ["Egress"]
    assert [p["port"] for rule in policy["spec"]["egress"] for p in rule["ports"]] == [443]
    pod_labels = one(manifests, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= pod_labels.items()
    jwks_volume = next(v for v in _pod(one(manifests, "Deployment"))["volumes"] if v["name"] == "jwks")
    assert jwks_volume["secret"]["optional"] is True, "with a URL there is no JWKS Secret to mount"


def test_the_vendored_crd_says_where_it_comes_from():
    header = CLUSTER_CRD.read_text()[:2000]
    assert "v1.30.0" in header and "SPDX-License-Identifier: Apache-2.0" in header
    assert (KUBERNETES / "vendor" / "LICENSE.cloudnative-pg").read_text().lstrip().startswith("Apache License")
