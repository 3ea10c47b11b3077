# Identities and grants. Principle: each grant on the narrowest resource that can carry it, with
# custom roles holding exactly the permissions the code calls for (the adapters in
# shared/meshjoin/adapters/ name each permission in their error messages). Only non-authoritative
# *_iam_member resources are used, so applying this never removes anybody else's access.

locals {
  functions_member = "serviceAccount:${google_service_account.functions.email}"
  # Custom role ids allow letters, digits, underscores and dots only.
  role_prefix = replace(var.name, "-", "_")
  # Google-managed identity that delivers pushes and forwards dead letters. Taken from
  # google_project_service_identity, which creates it if it does not exist yet: on a first apply
  # right after the API is enabled the agent may not exist, and granting it would fail.
  pubsub_agent = "serviceAccount:${google_project_service_identity.pubsub.email}"
}

resource "google_project_service_identity" "pubsub" {
  provider = google-beta

  project = var.project_id
  service = "pubsub.googleapis.com"

  depends_on = [google_project_service.apis]
}

# What the functions run as. No key is ever created for it.
resource "google_service_account" "functions" {
  account_id   = "${var.name}-functions"
  display_name = "meshjoin functions"
  description  = "Reconciles labelled VMs into the Istio mesh: reads VMs and their agents' CSRs, writes their metadata and certificates, writes WorkloadEntries."
  depends_on   = [google_project_service.apis]
}

# What Pub/Sub signs push requests as; it may do nothing but invoke the two functions.
resource "google_service_account" "push" {
  account_id   = "${var.name}-push"
  display_name = "meshjoin Pub/Sub push"
  description  = "Identity of meshjoin's push subscriptions: invokes the meshjoin functions, nothing else."
  depends_on   = [google_project_service.apis]
}

# --- Compute Engine --------------------------------------------------------------------------

# No predefined role fits: compute.viewer reads far more than instances, and the only predefined
# roles with setMetadata (instanceAdmin) can also create, stop and delete VMs. Note what
# setMetadata means: the functions write `startup-script`, i.e. run code on the VMs they join.
# That is the product's job, and why this identity must stay this narrow.
resource "google_project_iam_custom_role" "compute" {
  role_id     = "${local.role_prefix}.compute"
  title       = "meshjoin: read VMs, write their metadata"
  description = "Read VMs (get, aggregatedList, their agents' guest attributes) and write the bootstrap and status metadata meshjoin owns."
  permissions = [
    "compute.instances.get",
    "compute.instances.getGuestAttributes", # the VM agent's report: confirmed before it is `joined`
    "compute.instances.list",               # instances.aggregatedList in the sweep
    "compute.instances.setMetadata",        # bootstrap items + meshjoin-status
    "compute.projects.get",                 # common instance metadata: the project's own startup-script
    "compute.zoneOperations.get",           # waiting for the setMetadata operation
  ]
}

resource "google_project_iam_member" "functions_compute" {
  project = var.project_id
  role    = google_project_iam_custom_role.compute.id
  member  = local.functions_member
}

# Compute Engine lets a caller change the metadata of a VM that runs as a service account only if
# the caller may act as that account (iam.serviceAccounts.actAs): otherwise a startup-script would
# borrow the VM's identity. meshjoin acts for exactly the bound accounts (var.identity_bindings), one
# grant per account on the account itself, never project-wide (that would include the default compute
# account and any other powerful identity in the project). The product denies a VM on any other
# account before it writes anything (shared/meshjoin/policy.py), so it never needs more.
locals {
  bound_service_accounts = distinct([for b in var.identity_bindings : b.gsa])
}

resource "google_service_account_iam_member" "act_as_vm" {
  for_each = toset(local.bound_service_accounts)

  # "-" lets IAM infer the project from the email: a VM account from another project works too.
  service_account_id = "projects/-/serviceAccounts/${each.value}"
  role               = "roles/iam.serviceAccountUser"
  member             = local.functions_member
}

# --- Secret Manager --------------------------------------------------------------------------

resource "google_secret_manager_secret" "ca" {
  for_each = var.create_ca_secrets ? local.ca_secrets : {}

  secret_id = each.value
  # Deliberately NOT managed-by=meshjoin: that label marks per-VM secrets, which the sweep prunes.
  labels = { "meshjoin-role" = "plugin-ca" }

  # Automatic replication unless secret_locations names regions (organisations with a
  # gcp.resourceLocations policy reject automatic); CMEK keys from secret_kms_keys.
  replication {
    dynamic "auto" {
      for_each = length(var.secret_locations) == 0 ? [1] : []
      content {
        dynamic "customer_managed_encryption" {
          for_each = contains(keys(var.secret_kms_keys), "global") ? [var.secret_kms_keys["global"]] : []
          content {
            kms_key_name = customer_managed_encryption.value
          }
        }
      }
    }
    dynamic "user_managed" {
      for_each = length(var.secret_locations) > 0 ? [1] : []
      content {
        dynamic "replicas" {
          for_each = var.secret_locations
          content {
            location = replicas.value
            dynamic "customer_managed_encryption" {
              for_each = contains(keys(var.secret_kms_keys), replicas.value) ? [var.secret_kms_keys[replicas.value]] : []
              content {
                kms_key_name = customer_managed_encryption.value
              }
            }
          }
        }
      }
    }
  }

  depends_on = [google_project_service.apis]

  lifecycle {
    # The CA: `terraform destroy` (or a rename) must not delete it. To remove meshjoin but keep
    # the CA, `terraform state rm google_secret_manager_secret.ca` first (deploy/README.md).
    prevent_destroy = true
    precondition {
      condition = length(var.secret_locations) == 0 ? alltrue([for k in keys(var.secret_kms_keys) : k == "global"]) : alltrue([
        for k in keys(var.secret_kms_keys) : contains(var.secret_locations, k)
      ])
      error_message = "secret_kms_keys: with automatic replication give one key under \"global\"; with secret_locations one key per listed location."
    }
  }
}

# The CA: read-only, on the four secrets themselves. Reading the latest version is not enough:
# the trusted roots are every ENABLED version of the root secret (a root rotation adds one), so
# the functions list versions too. roles/secretmanager.secretAccessor lacks versions.list and
# roles/secretmanager.viewer would add IAM-policy reads, hence a two-permission role.
resource "google_project_iam_custom_role" "ca_reader" {
  role_id     = "${local.role_prefix}.caReader"
  title       = "meshjoin: read the plug-in CA"
  description = "Read the CA secrets' versions and list which are enabled."
  permissions = [
    "secretmanager.versions.access",
    "secretmanager.versions.list",
  ]
}

resource "google_secret_manager_secret_iam_member" "ca_reader" {
  for_each = local.ca_secrets

  project   = var.project_id
  secret_id = var.create_ca_secrets ? google_secret_manager_secret.ca[each.key].secret_id : each.value
  role      = google_project_iam_custom_role.ca_reader.id
  member    = local.functions_member
}

# Keys stay on the VMs (each VM's agent makes its own key and hands meshjoin only a CSR, through
# guest attributes): Secret Manager holds the plug-in CA and nothing else meshjoin writes. A join, a
# renewal or a key rotation makes no Secret Manager call beyond reading the (cached) CA. What remains
# is pruning the per-VM secrets an earlier version of meshjoin made (VMs that joined before keys
# stayed on the VM): the sweep lists them by label, and a VM's secret is deleted once its new agent
# confirmed a certificate for its own key, or when the VM is gone or unlabelled. Nothing here can
# create a secret, add or read a version, or change who may read a secret; VM service accounts are
# granted nothing in Secret Manager.
#
# 1. Listing is authorized against the project (the parent), where a condition on the secret's name
#    cannot apply. It reveals names and labels only (the sweep's inventory by label), no payload.
resource "google_project_iam_custom_role" "secret_inventory" {
  role_id     = "${local.role_prefix}.secretInventory"
  title       = "meshjoin: list secrets"
  description = "List secrets by label (the sweep's inventory of legacy per-VM secrets). Grants no access to any payload."
  permissions = [
    "secretmanager.secrets.list",
  ]
}

resource "google_project_iam_member" "functions_secret_inventory" {
  project = var.project_id
  role    = google_project_iam_custom_role.secret_inventory.id
  member  = local.functions_member
}

# 2. Reading a legacy secret's metadata (its labels: is it meshjoin's, for which VM) and deleting it,
#    only on secrets whose name starts with the per-VM prefix (an IAM condition on resource.name,
#    which Secret Manager supports). No versions.* permission at all: the functions never read,
#    add, disable or destroy a version. A precondition keeps the CA secrets outside the prefix, so
#    this can never delete them.
resource "google_project_iam_custom_role" "vm_secrets" {
  role_id     = "${local.role_prefix}.vmSecrets"
  title       = "meshjoin: prune legacy per-VM secrets"
  description = "Delete per-VM secrets made by earlier versions of meshjoin. No payload access."
  permissions = [
    "secretmanager.secrets.delete", # the VM migrated to an on-VM key, left, or is gone (its labels come from the listing)
  ]
}

resource "google_project_iam_member" "functions_vm_secrets" {
  project = var.project_id
  role    = google_project_iam_custom_role.vm_secrets.id
  member  = local.functions_member

  condition {
    title       = "meshjoin per-VM secrets only"
    description = "Secrets whose id starts with ${var.secret_prefix}-"
    # Secret Manager names resources by project number in IAM checks; the project-id form is
    # kept as well so the grant holds whichever form a request carries.
    expression = "resource.name.startsWith(\"projects/${data.google_project.this.number}/secrets/${var.secret_prefix}-\") || resource.name.startsWith(\"projects/${var.project_id}/secrets/${var.secret_prefix}-\")"
  }

  lifecycle {
    precondition {
      condition     = alltrue([for id in values(local.ca_secrets) : !startswith(id, "${var.secret_prefix}-")])
      error_message = "A CA secret id starts with \"${var.secret_prefix}-\": the per-VM grant (delete) would cover the CA. Choose another secret_prefix."
    }
  }
}

# --- the VMs' nudge --------------------------------------------------------------------------

locals {
  # VM identities that may publish to the events topic. One list, so that a later, richer source
  # of VM identities (per-identity bindings) replaces this line alone.
  vm_publishers = toset(local.bound_service_accounts)
}

# After its agent confirmed (guest attributes), a VM publishes {"project","zone","instance"} to the
# events topic so that meshjoin marks it joined at once rather than at the next sweep. The message
# only names a VM; meshjoin then reads that VM's truth, so a VM can nudge nothing but a re-check.
resource "google_pubsub_topic_iam_member" "vm_nudge" {
  for_each = local.vm_publishers

  topic  = google_pubsub_topic.events.id
  role   = "roles/pubsub.publisher"
  member = "serviceAccount:${each.value}"
}

# The sweep plans and publishes each VM's work (join, renew, re-issue, prune) to the events topic, where
# the events function's instances do it (shared/meshjoin/adapters/pubsub.py; README, "Maintenance").
# On the events topic only: the functions never publish ticks or dead letters.
resource "google_pubsub_topic_iam_member" "functions_publish_work" {
  topic  = google_pubsub_topic.events.id
  role   = "roles/pubsub.publisher"
  member = local.functions_member
}

# --- GKE -------------------------------------------------------------------------------------

# container.clusters.get: the functions read the cluster's endpoint and CA, and GKE admits a
# Google identity to the Kubernetes API only with it. Everything inside the cluster is then
# decided by RBAC (kubernetes.tf), which names the account by email: GKE maps a token to the email
# only if it carries the userinfo.email scope (shared/meshjoin/runtime.py asks for it). clusterViewer
# is the narrowest predefined role with clusters.get (it adds clusters.list and nothing in-cluster).
# Granted in the cluster's project, which may differ.
resource "google_project_iam_member" "functions_cluster_viewer" {
  project = local.cluster_project
  role    = "roles/container.clusterViewer"
  member  = local.functions_member
}

# --- Pub/Sub plumbing ------------------------------------------------------------------------

# The sink's own writer identity may publish to the events topic, and nowhere else.
resource "google_pubsub_topic_iam_member" "sink_publisher" {
  topic  = google_pubsub_topic.events.id
  role   = "roles/pubsub.publisher"
  member = google_logging_project_sink.vm_events.writer_identity
}

# Dead-lettering: Pub/Sub's service agent publishes the failed message to the dead-letter topic
# and must be able to ack it on the source subscription.
resource "google_pubsub_topic_iam_member" "dead_letter_publisher" {
  topic  = google_pubsub_topic.dead_letter.id
  role   = "roles/pubsub.publisher"
  member = local.pubsub_agent
}

resource "google_pubsub_subscription_iam_member" "dead_letter_subscriber" {
  for_each = local.functions

  subscription = google_pubsub_subscription.push[each.key].id
  role         = "roles/pubsub.subscriber"
  member       = local.pubsub_agent
}

# Pub/Sub signs the push OIDC tokens as the push identity. Projects created before April 2021
# need this grant explicitly; newer ones have it implicitly, so it is harmless there.
resource "google_service_account_iam_member" "push_token_creator" {
  service_account_id = google_service_account.push.name
  role               = "roles/iam.serviceAccountTokenCreator"
  member             = local.pubsub_agent
}
