terraform {
  # 1.5: `check` blocks and preconditions on data sources.
  required_version = ">= 1.5"

  required_providers {
    google = {
      source  = "hashicorp/google"
      version = "~> 6.0"
    }
    archive = {
      source  = "hashicorp/archive"
      version = "~> 2.4"
    }
    kubernetes = {
      source  = "hashicorp/kubernetes"
      version = "~> 2.30"
    }
  }

  # State lives in a GCS bucket the deployer owns. The bucket is given at init time
  # (`terraform init -backend-config=bucket=...`, as `make deploy` and cloudbuild.yaml do),
  # so the same configuration serves every project.
  backend "gcs" {}
}

provider "google" {
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
}

provider "kubernetes" {
  host                   = "https://${data.google_container_cluster.mesh.endpoint}"
  token                  = data.google_client_config.deployer.access_token
  cluster_ca_certificate = base64decode(data.google_container_cluster.mesh.master_auth[0].cluster_ca_certificate)
}
