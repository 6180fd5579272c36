"""genrun operator: the API, the planner, manifests, Kopf handlers, metrics and the local runner."""

__version__ = "0.1.0"
