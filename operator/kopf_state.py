"""Where Kopf keeps its own state for genrun's objects, and how cheaply it builds it.

Kopf's progress and diff-base live in annotations under genrun.io; a finalizer holds a run until its daemon and
delete handler are done.
"""

from __future__ import annotations

from typing import Any, cast

import kopf
from genrun.contract.api import GROUP
from kopf._cogs.structs.dicts import parse_field  # the notation Kopf parses extra_fields with

STATELESS_KINDS = frozenset({"Job"})  # watched by the `jobs` index and an event handler only


class LeanDiffBase(kopf.AnnotationsDiffBaseStorage):
    """Kopf's own essence of an object (spec, labels, annotations), built without first deep-copying the parts it
    throws away. Kopf builds it on every event of every watched object, and these copies (each run's status, each
    Job's pod template) were the operator's largest CPU cost at 50 runs x 20 shards after the planner. Kinds watched
    only by index and event handlers (`stateless`: no update, delete or daemon handler reads their diff) get an empty
    essence; tests/unit/test_manifests.py checks that no such handler is registered for them."""

    KEPT_METADATA = ("name", "namespace", "labels", "annotations", "ownerReferences")  # what Kopf's build reads

    def __init__(self, *, stateless: frozenset[str] = frozenset(), **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.stateless = stateless

    def build(self, *, body: kopf.Body, extra_fields: Any = None) -> Any:
        fields = list(extra_fields or [])
        if body.get("kind") in self.stateless and not fields:
            return {}
        # Kopf passes the fields its handlers watch (`field="spec"` for the spec-changed handler): the lean body keeps
        # everything but status and system metadata, so only a handler watching those needs Kopf's own full copy.
        if any(parse_field(f)[:1] in (("status",), ("metadata",)) for f in fields):
            return super().build(body=body, extra_fields=fields)
        meta = body.get("metadata", {})
        lean = {k: v for k, v in body.items() if k not in ("status", "metadata")}
        lean["metadata"] = {k: meta[k] for k in self.KEPT_METADATA if k in meta}
        return super().build(body=kopf.Body(cast(kopf.RawBody, lean)), extra_fields=fields or None)


def persistence(settings: kopf.OperatorSettings) -> None:
    settings.persistence.finalizer = f"{GROUP}/finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = LeanDiffBase(
        stateless=STATELESS_KINDS, prefix=GROUP, key="last-handled-configuration"
    )
