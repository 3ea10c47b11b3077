terraform {
  # 1.5: `check` blocks and preconditions on data sources. The builds run hashicorp/terraform
  # 1.11.4 (cloudbuild-release.yaml); the tests evaluate this configuration with the same version.
  required_version = ">= 1.5"

  # Exact versions, each the one tests/deploy/test_provider_schemas.py checks every resource and
  # data source against (offline, from the schemas the providers publish). Moving a provider
  # means moving its schema package there too, then `terraform providers lock` (README).
  # The hashes of these exact builds live in .terraform.lock.hcl, written by one online
  # `terraform providers lock` (deploy/README.md, "Reproducible builds"); with the file present
  # the release build runs `terraform init -lockfile=readonly`.
  required_providers {
    google = {
      source  = "hashicorp/google"
      version = "6.50.0"
    }
    google-beta = {
      source  = "hashicorp/google-beta"
      version = "6.50.0"
    }
    archive = {
      source  = "hashicorp/archive"
      version = "2.7.1"
    }
    kubernetes = {
      source  = "hashicorp/kubernetes"
      version = "2.38.0"
    }
  }

  # State lives in a GCS bucket the deployer owns. The bucket is given at init time
  # (`terraform init -backend-config=bucket=...`, as `make deploy` and the release build do),
  # so the same configuration serves every project.
  backend "gcs" {}
}

provider "google" {
  project = var.project_id
  region  = var.region
}

# Only for google_project_service_identity (iam.tf), which the GA provider does not have.
provider "google-beta" {
  project = var.project_id
  region  = var.region
}

# The RBAC objects go to the mesh's cluster with the deployer's own Google token: whoever runs
# `terraform apply` needs permission to create ClusterRoles there (see README, prerequisites).
data "google_client_config" "deployer" {}

data "google_container_cluster" "mesh" {
  project  = local.cluster_project
  location = local.cluster_location
  name     = local.cluster_name

  lifecycle {
    # Fail the plan, not the first event, when the chosen endpoint cannot be used.
    postcondition {
      condition     = var.cluster_endpoint != "dns" || try(self.control_plane_endpoints_config[0].dns_endpoint_config[0].endpoint, "") != ""
      error_message = "cluster_endpoint = \"dns\" but the cluster has no DNS-based endpoint: gcloud container clusters update CLUSTER --location LOCATION --enable-dns-access"
    }
    postcondition {
      # Without VPC egress the functions (and a default-pool build) come from outside the VPC.
      condition     = var.cluster_endpoint != "dns" || var.vpc_connector != null || try(self.control_plane_endpoints_config[0].dns_endpoint_config[0].allow_external_traffic, false)
      error_message = "The cluster's DNS endpoint refuses traffic from outside its VPC: enable it (--enable-dns-access) or give the functions a vpc_connector."
    }
  }
}

locals {
  # cluster_endpoint = "dns": GKE's DNS-based control-plane endpoint (gke-<hash>.<region>.gke.goog),
  # reachable from anywhere Google's front end is, private clusters included, with IAM and RBAC
  # still deciding. It presents a publicly trusted certificate (Google Trust Services), so no
  # cluster CA is passed: the cluster's own CA would make TLS verification fail.
  cluster_dns_endpoint = try(data.google_container_cluster.mesh.control_plane_endpoints_config[0].dns_endpoint_config[0].endpoint, "")
  kube_host            = var.cluster_endpoint == "dns" ? local.cluster_dns_endpoint : data.google_container_cluster.mesh.endpoint
}

provider "kubernetes" {
  host                   = "https://${local.kube_host}"
  token                  = data.google_client_config.deployer.access_token
  cluster_ca_certificate = var.cluster_endpoint == "dns" ? null : base64decode(data.google_container_cluster.mesh.master_auth[0].cluster_ca_certificate)
}
