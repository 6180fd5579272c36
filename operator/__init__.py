"""genrun operator: the API, the planner, manifests, Kopf handlers, metrics and the local runner."""

from genrun.contract import __version__

__all__ = ["__version__"]
