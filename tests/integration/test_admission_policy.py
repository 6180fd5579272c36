"""The chart's ValidatingAdmissionPolicy: rendered by the real helm, its CEL evaluated by the same CEL library the
validator uses (common-expression-language, as in operator/validate.py `cel_errors`).

What is emulated, and only that: the API server's admission steps (matchConditions, then `variables`, then each
validation and its messageExpression, as the Kubernetes docs order them) and the Kubernetes CEL `authorizer`
library. `EmulatedAuthorizer` is a thin test double: its methods are registered as CEL functions, so the policy's own
method chain `authorizer.group(..).resource(..).namespace(..).name(..).check(verb).allowed()` runs unchanged, and
`check` answers from a table of what the requesting user may do (as RBAC would)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import cel
import pytest

from tests.integration.test_chart import render

pytestmark = pytest.mark.integration
NS = "data"
USER = "alice@example.com"
Permission = tuple[str, str, str, str]  # (verb, group/resource, namespace, name or "")


def policy_and_binding(*extra: str) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    docs = render(None, *extra)
    policy = next((d for d in docs if d["kind"] == "ValidatingAdmissionPolicy"), None)
    binding = next((d for d in docs if d["kind"] == "ValidatingAdmissionPolicyBinding"), None)
    return policy, binding


@pytest.fixture(scope="module")
def policy() -> dict[str, Any]:
    found = policy_and_binding()[0]
    assert found is not None
    return found


@dataclass
class EmulatedAuthorizer:
    """A test double of the Kubernetes CEL authorizer library, answering from `grants` (what USER may do)."""

    grants: set[Permission]
    asked: list[Permission] = field(default_factory=list)

    def functions(self) -> dict[str, Any]:
        def group(_: Any, g: str) -> dict[str, str]:
            return {"group": g}

        def resource(r: dict[str, str], res: str) -> dict[str, str]:
            return {**r, "resource": res}

        def namespace(r: dict[str, str], ns: str) -> dict[str, str]:
            return {**r, "namespace": ns}

        def name(r: dict[str, str], n: str) -> dict[str, str]:
            return {**r, "name": n}

        def check(r: dict[str, str], verb: str) -> dict[str, bool]:
            asked = (verb, f"{r['group']}/{r['resource']}", r.get("namespace", ""), r.get("name", ""))
            self.asked.append(asked)
            return {"allowed": asked in self.grants}

        def allowed(decision: dict[str, bool]) -> bool:
            return decision["allowed"]

        return {"group": group, "resource": resource, "namespace": namespace, "name": name, "check": check,
                "allowed": allowed}  # fmt: skip


def admit(policy: dict[str, Any], obj: dict[str, Any], grants: Iterable[Permission], old: dict[str, Any] | None = None,
          ) -> tuple[bool, list[str], list[Permission]]:  # fmt: skip
    """(whether the policy applied, the denial messages, the authorizer's questions) for USER's create or update."""
    authz = EmulatedAuthorizer(set(grants))
    request = {"operation": "UPDATE" if old is not None else "CREATE", "namespace": NS,
               "userInfo": {"username": USER, "groups": ["system:authenticated"]}}  # fmt: skip
    ctx: dict[str, Any] = {"object": obj, "oldObject": old, "request": request, "authorizer": {}, "variables": {}}

    def run(expression: str) -> Any:
        return cel.evaluate(expression, cel.Context(variables=ctx, functions=authz.functions()))

    spec = policy["spec"]
    if not all(run(m["expression"]) is True for m in spec.get("matchConditions", [])):
        return False, [], authz.asked
    for var in spec.get("variables", []):
        ctx["variables"] = {**ctx["variables"], var["name"]: run(var["expression"])}
    denials = []
    for v in spec["validations"]:
        if run(v["expression"]) is not True:
            message = run(v["messageExpression"]) if "messageExpression" in v else v["message"]
            assert isinstance(message, str) and message
            denials.append(message)
    return True, denials, authz.asked


def run_object(**spec: Any) -> dict[str, Any]:
    base = {"model": {"name": "Qwen/Qwen2.5-0.5B"}, "target": {"uniqueExamples": 100}, "output": {"path": "/data/o"}}
    return {"apiVersion": "genrun.io/v1alpha1", "kind": "GenerationRun",
            "metadata": {"name": "sft", "namespace": NS}, "spec": {**base, **spec}}  # fmt: skip


S3_RUN = run_object(output={"path": "s3://b/p", "s3": {"endpoint": "http://minio.storage.svc:9000",
                                                        "credentialsSecret": "prod-backup-s3"}})  # fmt: skip
ENDPOINT_RUN = run_object(
    model={"name": "m", "endpoint": {"url": "http://vllm.inference.svc:8000/v1", "apiKeySecret": "llm-key"}}
)
JOBS: Permission = ("create", "batch/jobs", NS, "")
S3_SECRET: Permission = ("get", "/secrets", NS, "prod-backup-s3")
KEY_SECRET: Permission = ("get", "/secrets", NS, "llm-key")


def test_a_run_naming_a_secret_its_creator_cannot_read_is_refused(policy: dict[str, Any]) -> None:
    applied, denials, asked = admit(policy, S3_RUN, {JOBS})
    assert applied and asked == [JOBS, S3_SECRET]
    (msg,) = denials
    assert msg.startswith("spec.output.s3.credentialsSecret: ")
    assert f"user {USER} may not get Secret prod-backup-s3 in namespace {NS}" in msg

    applied, denials, _ = admit(policy, ENDPOINT_RUN, {JOBS})
    assert applied
    (msg,) = denials
    assert msg.startswith("spec.model.endpoint.apiKeySecret: ") and "may not get Secret llm-key in namespace" in msg


def test_a_run_whose_creator_can_read_its_secrets_and_create_jobs_is_admitted(policy: dict[str, Any]) -> None:
    both = run_object(output=S3_RUN["spec"]["output"], model=ENDPOINT_RUN["spec"]["model"])
    applied, denials, asked = admit(policy, both, {JOBS, S3_SECRET, KEY_SECRET})
    assert applied and denials == [] and asked == [JOBS, S3_SECRET, KEY_SECRET]
    # Get on one Secret is not get on the other.
    assert len(admit(policy, both, {JOBS, S3_SECRET})[1]) == 1
    # Get on a Secret of the same name in another namespace is not get here.
    assert len(admit(policy, S3_RUN, {JOBS, ("get", "/secrets", "other", "prod-backup-s3")})[1]) == 1


def test_a_creator_who_may_not_create_jobs_is_refused(policy: dict[str, Any]) -> None:
    applied, denials, _ = admit(policy, run_object(), set())
    assert applied
    (msg,) = denials
    assert msg.startswith("spec: ") and f"user {USER} may not create Jobs in namespace {NS}" in msg


@pytest.mark.parametrize(
    "spec",
    [
        {},  # a local output, no endpoint: no Secret named
        {"output": {"path": "s3://b/p"}},  # no s3 section (the operator's ambient credentials, if allowed)
        {"output": {"path": "s3://b/p", "s3": {"endpoint": "http://minio.storage.svc:9000"}}},
        {"output": {"path": "s3://b/p", "s3": {"credentialsSecret": ""}}},
        {"model": {"name": "m", "endpoint": {"url": "http://vllm.inference.svc:8000/v1"}}},  # no key
    ],
    ids=["local", "no-s3", "no-credentials-secret", "empty-credentials-secret", "endpoint-without-key"],
)
def test_absent_optional_secrets_pass_and_ask_only_for_jobs(policy: dict[str, Any], spec: dict[str, Any]) -> None:
    assert admit(policy, run_object(**spec), {JOBS}) == (True, [], [JOBS])


def test_updates_are_checked_when_the_spec_changes_and_only_then(policy: dict[str, Any]) -> None:
    """The operator's own metadata patches (finalizer, progress annotations) must not need the user's rights; a
    spec change (here: pointing a readable run at another Secret) is checked like a create."""
    annotated = {**S3_RUN, "metadata": {**S3_RUN["metadata"], "annotations": {"genrun.io/last-handled": "x"}}}
    assert admit(policy, annotated, set(), old=S3_RUN) == (False, [], [])
    readable = run_object(output={"path": "s3://b/p", "s3": {"credentialsSecret": "mine"}})
    applied, denials, _ = admit(policy, S3_RUN, {JOBS, ("get", "/secrets", NS, "mine")}, old=readable)
    assert applied and len(denials) == 1 and "prod-backup-s3" in denials[0]


def test_the_policy_names_every_secret_field_of_the_crd(policy: dict[str, Any]) -> None:
    """A Secret field added to the CRD must be added to the policy too: every `...Secret` property is checked."""
    from genrun.operator.validate import crd_schema

    def secret_fields(node: Any, path: str) -> Iterable[str]:
        for key, sub in (node.get("properties") or {}).items():
            if key.endswith("Secret"):
                yield f"{path}.{key}"
            yield from secret_fields(sub, f"{path}.{key}")

    found = set(secret_fields(crd_schema(), "object"))
    assert found == {"object.spec.output.s3.credentialsSecret", "object.spec.model.endpoint.apiKeySecret"}
    expressions = " ".join(v["expression"] for v in policy["spec"]["variables"])
    assert all(f"? {f} :" in expressions for f in found)


def test_policy_and_binding_render_by_default_and_go_when_disabled() -> None:
    policy, binding = policy_and_binding()
    assert policy is not None and binding is not None
    assert binding["spec"]["policyName"] == policy["metadata"]["name"]
    assert binding["spec"]["validationActions"] == ["Deny"] and policy["spec"]["failurePolicy"] == "Fail"
    rules = policy["spec"]["matchConstraints"]["resourceRules"]
    assert rules == [{"apiGroups": ["genrun.io"], "apiVersions": ["*"], "operations": ["CREATE", "UPDATE"],
                      "resources": ["generationruns"]}]  # fmt: skip
    # Namespaced install: the binding covers the watched namespace; cluster-wide: every namespace.
    assert binding["spec"]["matchResources"]["namespaceSelector"]["matchLabels"] == {
        "kubernetes.io/metadata.name": "ops"
    }
    wide = policy_and_binding("--set", "rbac.clusterWide=true")[1]
    assert wide is not None and "matchResources" not in wide["spec"]
    assert policy_and_binding("--set", "admissionPolicy.enabled=false") == (None, None)
    warn = policy_and_binding("--set-json", 'admissionPolicy.validationActions=["Warn","Audit"]')[1]
    assert warn is not None and warn["spec"]["validationActions"] == ["Warn", "Audit"]
