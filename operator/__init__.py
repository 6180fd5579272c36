"""genrun operator: the API, the planner, manifests, Kopf handlers, metrics and the local runner."""
