# meshjoin in one project: a Log Router sink and Cloud Scheduler feed two Pub/Sub topics, push
# subscriptions (retry with backoff, dead-letter after 5 attempts) deliver to two Cloud Functions
# (gen2), which run as one least-privileged service account. Files: pubsub.tf (topics, sink,
# scheduler, subscriptions), functions.tf (source upload, functions), iam.tf (identities and
# grants), kubernetes.tf (RBAC in the mesh's cluster), outputs.tf.

data "google_project" "this" {
  project_id = var.project_id
}

locals {
  # projects/P/locations/L/clusters/C, exactly as MESHJOIN_CLUSTER takes it.
  cluster_parts    = split("/", var.cluster)
  cluster_project  = local.cluster_parts[1]
  cluster_location = local.cluster_parts[3]
  cluster_name     = local.cluster_parts[5]

  build_dir = var.build_dir != "" ? var.build_dir : "${path.module}/../../build/functions"

  # The two functions. Both receive raw Pub/Sub pushes; functions-framework turns them into the
  # CloudEvents their @functions_framework.cloud_event handlers take.
  functions = {
    events = {
      description = "meshjoin: reconcile the VM named by an audit-log event or an operator message"
      entry_point = "on_vm_event"
      topic       = google_pubsub_topic.events.id
      # One VM per event; a setMetadata operation can take a minute or two.
      timeout_seconds = 300
      max_instances   = var.events_max_instances
      # Older events are dropped by MESHJOIN_MAX_EVENT_AGE anyway; the sweep covers them.
      message_retention = "86400s"
    }
    maintenance = {
      description = "meshjoin: scheduled sweep (renewals, CA rotation, pruning, missed joins)"
      entry_point = "on_schedule"
      topic       = google_pubsub_topic.schedule.id
      # Above the sweep's own time budget (MESHJOIN_SWEEP_SECONDS, capped at 8m by variables.tf),
      # so a sweep ends on its own terms and logs its summary rather than being killed.
      timeout_seconds = 540
      # Sweeps must not overlap: two would race on the same VMs and double the API load.
      max_instances = 1
      # A tick nobody took within 10 minutes is superseded by the next one.
      message_retention = "600s"
    }
  }

  ca_secrets = {
    cert  = var.ca_cert_secret
    key   = var.ca_key_secret
    chain = var.ca_chain_secret
    root  = var.ca_root_secret
  }

  # The functions' settings (shared/meshjoin/settings.py reads them; README, "Settings").
  # The endpoint overrides (MESHJOIN_*_ENDPOINT) are for the sandbox and never deployed.
  function_settings = {
    MESHJOIN_PROJECT           = var.project_id
    MESHJOIN_CLUSTER           = var.cluster
    MESHJOIN_IDENTITY_BINDINGS = jsonencode(var.identity_bindings)
    MESHJOIN_CA_CERT_SECRET    = var.ca_cert_secret
    MESHJOIN_CA_KEY_SECRET     = var.ca_key_secret
    MESHJOIN_CA_CHAIN_SECRET   = var.ca_chain_secret
    MESHJOIN_CA_ROOT_SECRET    = var.ca_root_secret
    MESHJOIN_CA_CACHE          = var.ca_cache
    MESHJOIN_SECRET_PREFIX     = var.secret_prefix
    MESHJOIN_TRUST_DOMAIN      = var.trust_domain
    MESHJOIN_CERT_TTL          = var.cert_ttl
    MESHJOIN_RENEW_FRACTION    = var.renew_fraction == null ? null : tostring(var.renew_fraction)
    MESHJOIN_RENEW_JITTER      = var.renew_jitter == null ? null : tostring(var.renew_jitter)
    MESHJOIN_KEY_ALGORITHM     = var.key_algorithm
    MESHJOIN_ISTIOD_ADDRESS    = var.istiod_address
    MESHJOIN_ISTIOD_IP         = var.istiod_ip
    MESHJOIN_MESH_ID           = var.mesh_id
    MESHJOIN_CLUSTER_ID        = var.cluster_id
    MESHJOIN_NETWORK           = var.network
    MESHJOIN_SIDECAR_URL       = var.sidecar_url
    MESHJOIN_SIDECAR_SHA256    = var.sidecar_sha256
    MESHJOIN_MAX_EVENT_AGE     = var.max_event_age
    MESHJOIN_API_ATTEMPTS      = var.api_attempts == null ? null : tostring(var.api_attempts)
    MESHJOIN_API_TIMEOUT       = var.api_timeout
    MESHJOIN_PRUNE_CAP         = var.prune_cap == null ? null : tostring(var.prune_cap)
    MESHJOIN_SWEEP_RENEWALS    = var.sweep_renewals == null ? null : tostring(var.sweep_renewals)
    MESHJOIN_SWEEP_SECONDS     = var.sweep_time_budget
    MESHJOIN_SWEEP_WORKERS     = var.sweep_workers == null ? null : tostring(var.sweep_workers)
  }
  # Unset rather than empty, so the product's own defaults apply.
  function_env = merge(
    { for name, value in local.function_settings : name => value if value != null && value != "" },
    var.extra_settings,
  )
}

# APIs the deployment uses. Never disabled on destroy: other workloads in the project may need them.
resource "google_project_service" "apis" {
  for_each = toset([
    "artifactregistry.googleapis.com", # function images
    "cloudbuild.googleapis.com",       # function builds
    "cloudfunctions.googleapis.com",
    "cloudscheduler.googleapis.com",
    "compute.googleapis.com",
    "container.googleapis.com",
    "iam.googleapis.com",
    "logging.googleapis.com",
    "pubsub.googleapis.com",
    "run.googleapis.com", # gen2 functions are Cloud Run services
    "secretmanager.googleapis.com",
    "storage.googleapis.com",
  ])
  project            = var.project_id
  service            = each.value
  disable_on_destroy = false
}
