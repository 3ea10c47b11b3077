# meshjoin in one project: a Log Router sink and Cloud Scheduler feed two Pub/Sub topics, push
# subscriptions (retry with backoff, events dead-lettered after events_max_delivery_attempts)
# deliver to two Cloud Functions (gen2), which run as one least-privileged service account.
# Files: pubsub.tf (topics, sink, scheduler, subscriptions), functions.tf (source upload,
# functions), iam.tf (identities and grants), kubernetes.tf (RBAC in the mesh's cluster),
# monitoring.tf (metrics, alerts, dashboard), outputs.tf.

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
      concurrency     = var.events_concurrency
      # Concurrency above 1 needs a whole vCPU (Cloud Run functions' rule).
      cpu = "1"
      # Parked after this many refused or failed deliveries (sized in events_sizing below).
      max_delivery_attempts = var.events_max_delivery_attempts
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
      # Sweeps must not overlap: two would race on the same VMs and double the API load. One
      # instance serving one request at a time: a tick arriving while a sweep runs is refused by
      # Cloud Run (429) and retried by Pub/Sub until it expires (message_retention below); the
      # schedule subscription has no dead-letter policy, so a refused tick is never a dead letter.
      max_instances         = 1
      concurrency           = 1
      cpu                   = null # the default for the memory size
      max_delivery_attempts = null # no dead-lettering: the next tick is the retry
      # A tick nobody took within 10 minutes (Pub/Sub's minimum retention) is superseded by the
      # next one, which sweep_interval_minutes (>= 10) schedules no earlier.
      message_retention = "600s"
    }
  }

  # --- sizing the events function against overload ---------------------------------------
  # In flight at most: instances x concurrency reconciles. A join takes roughly 20 s of reconcile
  # time over its passes (the event's, the pass that certifies the VM's CSR, the pass that sees
  # its confirmation: reads, three setMetadata operations, the WorkloadEntry); so the function drains
  #   throughput = in_flight * 60 / 20 joins a minute.
  # Budget: keys stay on the VMs, so a join makes no Secret Manager write; its writes are Compute
  # Engine mutations, about 3 (bootstrap + `waiting`, the certificate chain, `joined`), against the
  # project's Compute mutation quota (DESIGN: an older published default of 1,500 a minute):
  # at most 500 joins a minute before Compute answers 403 rateLimitExceeded, i.e.
  # in_flight <= 500 * 20 / 60 ~ 166, leaving room for the sweep's renewals and the operators' own
  # calls. The default 8 x 8 = 64 in flight stays well inside; rate-limit answers are retried
  # in-process (MESHJOIN_API_ATTEMPTS) and then by Pub/Sub, never lost.
  # Beyond in_flight, Cloud Run refuses requests with 429; Pub/Sub counts each refusal as a failed
  # delivery and retries after an exponential backoff from 10 s to 600 s (retry_policy), while
  # its push flow control slows the whole subscription down (https://cloud.google.com/pubsub/docs/push,
  # "push backoff"). Worst case, one message is refused every time: after n attempts it has waited
  #   retry_window(n) = sum(min(10 * 2^i, 600) for i in 0..n-2) seconds
  # (10+20+40+80 = 150 s for 5 attempts, 2430 s for 10). A burst of events_burst VMs drains in
  #   drain = events_burst / throughput minutes,
  # which must be shorter than the retry window, or the tail of the burst is dead-lettered.
  # Both conditions are preconditions of the events subscription (pubsub.tf).
  events_sizing = {
    in_flight        = var.events_max_instances * var.events_concurrency
    join_seconds     = 20
    writes_per_join  = 3    # Compute setMetadata calls; Secret Manager writes per join: 0
    write_quota_pm   = 1500 # Compute Engine mutations per project per minute
    joins_per_minute = var.events_max_instances * var.events_concurrency * 60 / 20
    drain_seconds    = ceil(var.events_burst / (var.events_max_instances * var.events_concurrency * 60 / 20) * 60)
    retry_window_seconds = sum([
      for i in range(var.events_max_delivery_attempts - 1) : min(10 * pow(2, i), 600)
    ])
  }

  # --- sweeps never overlap -----------------------------------------------------------------
  # The maintenance function is killed at timeout_seconds (540 s = 9 min); the sweep stops
  # starting work at MESHJOIN_SWEEP_SECONDS (< 8 min, variables.tf) to finish and log its summary
  # before that; Cloud Scheduler ticks every sweep_interval_minutes (>= 10 min). So a sweep has
  # ended before the next tick, and max_instances = 1 with concurrency 1 refuses the rare manual
  # tick that arrives mid-sweep (see local.functions.maintenance).
  sweep_spacing_ok = var.sweep_interval_minutes * 60 > 540

  # --- the quota share of each function instance (issue 16; shared/meshjoin/capacity.py) -----
  # Each instance paces itself to MESHJOIN_QUOTA_SHARE of every per-minute quota; the events
  # function's instances do the sweep's published work and the event traffic together, so at most
  # events_max_instances x share of a quota, which must leave quota_reserve to everyone else
  # (operators, consoles, other tools). Unset, the share is derived so the bound holds exactly
  # (default 8 instances, reserve 0.2: 0.1 each). The maintenance function (one instance) mostly
  # lists, a quota group of its own, so it keeps the product's default share.
  events_quota_share = var.quota_share != null ? var.quota_share : floor(100 * (1 - var.quota_reserve) / var.events_max_instances) / 100

  ca_secrets = {
    cert  = var.ca_cert_secret
    key   = var.ca_key_secret
    chain = var.ca_chain_secret
    root  = var.ca_root_secret
  }

  # The functions' settings (shared/meshjoin/settings.py reads them; README, "Settings").
  # The endpoint overrides (MESHJOIN_*_ENDPOINT) are for the sandbox and never deployed.
  function_settings = {
    MESHJOIN_PROJECT               = var.project_id
    MESHJOIN_VM_PROJECTS           = length(local.vm_projects) > 1 ? join(",", local.vm_projects) : null
    MESHJOIN_CLUSTER               = var.cluster
    MESHJOIN_IDENTITY_BINDINGS     = jsonencode(var.identity_bindings)
    MESHJOIN_CA_CERT_SECRET        = var.ca_cert_secret
    MESHJOIN_CA_KEY_SECRET         = var.ca_key_secret
    MESHJOIN_CA_CHAIN_SECRET       = var.ca_chain_secret
    MESHJOIN_CA_ROOT_SECRET        = var.ca_root_secret
    MESHJOIN_CA_CACHE              = var.ca_cache
    MESHJOIN_SECRET_PREFIX         = var.secret_prefix
    MESHJOIN_TRUST_DOMAIN          = var.trust_domain
    MESHJOIN_CERT_TTL              = var.cert_ttl
    MESHJOIN_RENEW_FRACTION        = var.renew_fraction == null ? null : tostring(var.renew_fraction)
    MESHJOIN_RENEW_JITTER          = var.renew_jitter == null ? null : tostring(var.renew_jitter)
    MESHJOIN_KEY_ALGORITHM         = var.key_algorithm
    MESHJOIN_KEY_ROTATION_RENEWALS = var.key_rotation_renewals == null ? null : tostring(var.key_rotation_renewals)
    MESHJOIN_ISTIOD_ADDRESS        = var.istiod_address
    MESHJOIN_ISTIOD_IP             = var.istiod_ip
    MESHJOIN_MESH_ID               = var.mesh_id
    MESHJOIN_CLUSTER_ID            = var.cluster_id
    MESHJOIN_NETWORK               = var.network
    MESHJOIN_SIDECAR_URL           = var.sidecar_url
    MESHJOIN_SIDECAR_SHA256        = var.sidecar_sha256
    MESHJOIN_MAX_EVENT_AGE         = var.max_event_age
    MESHJOIN_API_ATTEMPTS          = var.api_attempts == null ? null : tostring(var.api_attempts)
    MESHJOIN_API_TIMEOUT           = var.api_timeout
    MESHJOIN_PRUNE_CAP             = var.prune_cap == null ? null : tostring(var.prune_cap)
    MESHJOIN_SWEEP_RENEWALS        = var.sweep_renewals == null ? null : tostring(var.sweep_renewals)
    MESHJOIN_SWEEP_SECONDS         = var.sweep_time_budget
    MESHJOIN_SWEEP_WORKERS         = var.sweep_workers == null ? null : tostring(var.sweep_workers)
    # The VM agent nudges meshjoin through the events topic once it has confirmed.
    MESHJOIN_EVENTS_TOPIC                    = google_pubsub_topic.events.id
    MESHJOIN_CONFIRM_TIMEOUT                 = var.confirm_timeout
    MESHJOIN_QUOTA_SHARE                     = var.quota_share == null ? null : tostring(var.quota_share)
    MESHJOIN_QUOTA_RESERVE                   = tostring(var.quota_reserve)
    MESHJOIN_SWEEP_INTERVAL                  = "${var.sweep_interval_minutes}m" # sizes the sweep's work budget
    MESHJOIN_SWEEP_WORK_SHARE                = var.sweep_work_share == null ? null : tostring(var.sweep_work_share)
    MESHJOIN_SECRETMANAGER_READS_PER_MINUTE  = var.secretmanager_reads_per_minute == null ? null : tostring(var.secretmanager_reads_per_minute)
    MESHJOIN_SECRETMANAGER_WRITES_PER_MINUTE = var.secretmanager_writes_per_minute == null ? null : tostring(var.secretmanager_writes_per_minute)
    MESHJOIN_COMPUTE_READS_PER_MINUTE        = var.compute_reads_per_minute == null ? null : tostring(var.compute_reads_per_minute)
    MESHJOIN_COMPUTE_WRITES_PER_MINUTE       = var.compute_writes_per_minute == null ? null : tostring(var.compute_writes_per_minute)
    MESHJOIN_CLUSTER_ENDPOINT                = var.cluster_endpoint == "ip" ? null : var.cluster_endpoint
  }
  # Unset rather than empty, so the product's own defaults apply.
  function_env = merge(
    { for name, value in local.function_settings : name => value if value != null && value != "" },
    var.extra_settings,
  )
}

# APIs the deployment uses. Never disabled on destroy: other workloads in the project may need them.
# cloudresourcemanager and serviceusage must already be enabled for Terraform to read the project
# and enable the others (a prerequisite in README); listing them keeps them from being forgotten.
resource "google_project_service" "apis" {
  for_each = toset([
    "artifactregistry.googleapis.com", # function images
    "cloudbuild.googleapis.com",       # function builds
    "cloudfunctions.googleapis.com",
    "cloudresourcemanager.googleapis.com", # projects.get (data.google_project, IAM)
    "cloudscheduler.googleapis.com",
    "compute.googleapis.com",
    "container.googleapis.com",
    "iam.googleapis.com",
    "logging.googleapis.com",
    "monitoring.googleapis.com", # alert policies and the dashboard (monitoring.tf)
    "pubsub.googleapis.com",
    "run.googleapis.com", # gen2 functions are Cloud Run services
    "secretmanager.googleapis.com",
    "serviceusage.googleapis.com", # enabling the others
    "storage.googleapis.com",
  ])
  project            = var.project_id
  service            = each.value
  disable_on_destroy = false
}
