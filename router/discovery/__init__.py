"""Where the replicas are: a static list, DNS of a headless Service, or Kubernetes EndpointSlices."""

from router.discovery.base import Discovery, ReplicaKind, ReplicaSpec

__all__ = ["Discovery", "ReplicaKind", "ReplicaSpec"]
