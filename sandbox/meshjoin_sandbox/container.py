"""GKE ClusterManager v1 emulator: the one regional cluster of the world, read-only.

The product only reads the cluster (endpoint, CA, workload pool) to build its Kubernetes client,
so this answers clusters.get and clusters.list in both the `locations` and the legacy `zones`
URL forms the `container_v1` REST client may use, and 404s anything that is not the world's cluster.
"""

from __future__ import annotations

import base64
import hashlib
from datetime import datetime, timezone

from werkzeug.wrappers import Request

from .iam import check_scopes
from .web import ApiError, RoutedApp, json_response, route

MASTER_VERSION = "1.33.5-gke.1162000"
RUNNING = ("RUNNING", 2)  # Cluster.Status, as name and as number for `$alt=json;enum-encoding=int`
REGULAR = ("REGULAR", 2)  # ReleaseChannel.Channel
PROJECT = "/v1/projects/<project>"


class ContainerEmulator:
    def __init__(self, world):
        self.world = world
        # Fixed at start, like a real cluster's creation time.
        self.create_time = datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")
        self.app = RoutedApp(self, before=self._before, strict_slashes=False)
        world.emulators["container"] = self

    def _before(self, request: Request, endpoint: str) -> None:
        """Authenticate (401), scopes, then container.clusters.get|list on the cluster or location."""
        principal = self.world.authenticate(request)
        check_scopes(principal, "container", f"google.container.v1.ClusterManager.{endpoint.capitalize()}Cluster"
                     + ("s" if endpoint == "list" else ""), read_only=True)
        args = getattr(request, "url_args", {})
        resource = f"projects/{args.get('project')}/locations/{args.get('location')}"
        if endpoint == "get":
            resource += f"/clusters/{args.get('cluster')}"
        self.world.iam.check(principal, f"container.clusters.{endpoint}", resource)

    def _check_project(self, project: str) -> None:
        if project not in (self.world.project, self.world.project_number):
            raise ApiError(404, f"Not found: projects/{project}.", "NOT_FOUND")

    @route("GET", (PROJECT + "/locations/<location>/clusters/<cluster>",
                   PROJECT + "/zones/<location>/clusters/<cluster>"), "get")
    def _get(self, request: Request, project: str, location: str, cluster: str):
        self._check_project(project)
        if location != self.world.region or cluster != self.world.cluster_name:
            raise ApiError(404, f"Not found: projects/{project}/locations/{location}/clusters/{cluster}.",
                           "NOT_FOUND")
        return json_response(self.cluster_json(request))

    @route("GET", (PROJECT + "/locations/<location>/clusters", PROJECT + "/zones/<location>/clusters"), "list")
    def _list(self, request: Request, project: str, location: str):
        """`-` means every location, as in the real API; other locations simply hold no cluster."""
        self._check_project(project)
        if location in ("-", self.world.region):
            return json_response({"clusters": [self.cluster_json(request)]})
        return json_response({})

    def cluster_json(self, request: Request | None = None) -> dict:
        """The world's cluster as protobuf JSON; enums numeric when the client asks for that."""
        world = self.world
        numeric = request is not None and "enum-encoding=int" in request.args.get("$alt", "")
        path = f"projects/{world.project}/locations/{world.region}/clusters/{world.cluster_name}"
        return {
            "name": world.cluster_name,
            "id": hashlib.sha256(path.encode()).hexdigest(),
            "location": world.region,
            "zone": world.region,
            "locations": [world.zone],
            "selfLink": f"https://container.googleapis.com/v1/{path}",
            "endpoint": world.kube_endpoint,
            "masterAuth": {"clusterCaCertificate": base64.b64encode(world.kube_ca_pem.encode()).decode()},
            "status": RUNNING[numeric],
            "createTime": self.create_time,
            "initialClusterVersion": MASTER_VERSION,
            "currentMasterVersion": MASTER_VERSION,
            "currentNodeVersion": MASTER_VERSION,
            "releaseChannel": {"channel": REGULAR[numeric]},
            "network": "default",
            "subnetwork": "default",
            "clusterIpv4Cidr": "10.8.0.0/14",
            "servicesIpv4Cidr": "10.12.0.0/20",
            "ipAllocationPolicy": {
                "useIpAliases": True,
                "clusterIpv4CidrBlock": "10.8.0.0/14",
                "servicesIpv4CidrBlock": "10.12.0.0/20",
            },
            "resourceLabels": {"mesh_id": f"proj-{world.project_number}"},
            "workloadIdentityConfig": {"workloadPool": f"{world.project}.svc.id.goog"},
            "meshCertificates": {"enableCertificates": True},
        }
