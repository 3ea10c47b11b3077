# Inputs. Optional settings of the functions default to null: the variable is then not set at
# all and the product applies its own documented default (README, "Settings"), so the two can
# never drift apart. Values are checked here with the same rules the functions apply at cold
# start, so a typo fails `terraform plan` instead of the first event.

# --- where -----------------------------------------------------------------------------------

variable "project_id" {
  description = "Project whose VMs meshjoin manages; the functions, topics and secrets live here too."
  type        = string
}

variable "vm_projects" {
  description = "Further projects whose VMs meshjoin manages (MESHJOIN_VM_PROJECTS), e.g. Shared VPC service projects; the host project_id is always included. Each gets the functions' Compute role and a Log Router sink to the events topic (vm_projects.tf)."
  type        = list(string)
  default     = []

  validation {
    condition     = alltrue([for p in var.vm_projects : can(regex("^([a-z][a-z0-9.-]{0,62}:)?[a-z][-a-z0-9]{4,28}[a-z0-9]$", p))])
    error_message = "vm_projects: each entry must be a project id (6-30 lowercase letters, digits and hyphens, starting with a letter)."
  }
}

variable "region" {
  description = "Region of the functions, the Cloud Scheduler job and the source bucket."
  type        = string
  default     = "us-central1"
}

variable "cluster" {
  description = "The mesh's GKE cluster as projects/P/locations/L/clusters/C (MESHJOIN_CLUSTER); it may live in another project."
  type        = string

  validation {
    condition     = can(regex("^projects/[^/]+/locations/[^/]+/clusters/[^/]+$", var.cluster))
    error_message = "cluster must look like projects/P/locations/L/clusters/C."
  }
}

variable "name" {
  description = "Prefix of every resource name (topics, functions, service accounts, custom roles)."
  type        = string
  default     = "meshjoin"

  validation {
    # Service account ids allow 6-30 characters and the longest suffix is "-functions".
    condition     = can(regex("^[a-z][a-z0-9-]{2,18}[a-z0-9]$", var.name))
    error_message = "name must be 4-20 characters of lowercase letters, digits and hyphens."
  }
}

variable "build_dir" {
  description = "Directory holding the packaged function sources (one subdirectory per function); empty means build/functions at the repository root, where `make package` writes them."
  type        = string
  default     = ""
}

variable "build_service_account" {
  description = "Service account (email) Cloud Build uses to build the functions. null uses the project's default build identity, which organisations that disable automatic grants leave without roles/cloudbuild.builds.builder; name a dedicated account holding it then."
  type        = string
  default     = null
}

# --- who may join ----------------------------------------------------------------------------

variable "identity_bindings" {
  description = <<-EOT
    Who may join (MESHJOIN_IDENTITY_BINDINGS; README, "Who may join"): each binding lets VMs running as
    the Google service account `gsa` take the Kubernetes identity `namespace`/`serviceAccount`, with the
    `app` label of one of `apps` (so they become endpoints of the Services selecting those apps). A VM on
    any other account is denied (default-deny). The functions may act as exactly these accounts (Compute
    Engine requires it to write a VM's metadata) and get write RBAC in exactly these namespaces. Binding
    the project's default compute account would let every VM on it read the keys: don't.
  EOT
  type = list(object({
    gsa            = string
    namespace      = string
    serviceAccount = string
    apps           = list(string)
  }))
  default = []

  validation {
    condition     = alltrue([for b in var.identity_bindings : can(regex("^[a-z0-9][-a-z0-9]{0,62}@[a-z0-9][-a-z0-9.:]{0,100}\\.gserviceaccount\\.com$", b.gsa))])
    error_message = "identity_bindings: gsa must be a service-account email (NAME@PROJECT.iam.gserviceaccount.com)."
  }

  validation {
    condition = alltrue([for b in var.identity_bindings :
      can(regex("^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$", b.namespace)) && can(regex("^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$", b.serviceAccount))
    ])
    error_message = "identity_bindings: namespace and serviceAccount must be Kubernetes names (RFC 1123 labels)."
  }

  validation {
    condition = alltrue([for b in var.identity_bindings :
      !contains(["istio-system", "istio-ingress", "kube-system", "kube-public", "kube-node-lease", "cert-manager"], b.namespace)
      && !can(regex("^(kube|gke|gmp|istio)-", b.namespace))
    ])
    error_message = "identity_bindings: a namespace of the platform (istio-*, kube-*, gke-*, gmp-*, cert-manager) cannot be bound."
  }

  validation {
    condition = alltrue([for b in var.identity_bindings :
      length(b.apps) > 0 && length(distinct(b.apps)) == length(b.apps)
      && alltrue([for a in b.apps : can(regex("^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$", a))])
    ])
    error_message = "identity_bindings: apps must be a non-empty list of distinct Service names."
  }
}

# --- the CA and the legacy per-VM secrets -----------------------------------------------------------

variable "create_ca_secrets" {
  description = "Create the four (empty) CA secrets; set false when they already exist. Versions are added with deploy/upload_ca.py, never by Terraform, so the CA key stays out of the state."
  type        = bool
  default     = true
}

variable "ca_cert_secret" {
  description = "Secret holding ca-cert.pem (MESHJOIN_CA_CERT_SECRET)."
  type        = string
  default     = "istio-ca-cert"
}

variable "ca_key_secret" {
  description = "Secret holding ca-key.pem (MESHJOIN_CA_KEY_SECRET)."
  type        = string
  default     = "istio-ca-key"
}

variable "ca_chain_secret" {
  description = "Secret holding cert-chain.pem (MESHJOIN_CA_CHAIN_SECRET)."
  type        = string
  default     = "istio-cert-chain"
}

variable "ca_root_secret" {
  description = "Secret holding root-cert.pem (MESHJOIN_CA_ROOT_SECRET)."
  type        = string
  default     = "istio-root-cert"
}

variable "secret_prefix" {
  description = "Prefix of the per-VM secret ids earlier versions of meshjoin made (MESHJOIN_SECRET_PREFIX); the functions may read the metadata of and delete (prune) only secrets starting with \"<prefix>-\", and create none."
  type        = string
  default     = "meshjoin-vm"

  validation {
    condition     = can(regex("^[a-zA-Z0-9_-]{1,100}$", var.secret_prefix))
    error_message = "secret_prefix must be letters, digits, underscores and hyphens."
  }
}

variable "ca_cache" {
  description = "How long a function instance trusts its cached CA (MESHJOIN_CA_CACHE), e.g. 60s; null keeps the product default."
  type        = string
  default     = null

  validation {
    condition     = var.ca_cache == null || can(regex("^([0-9]+d)?([0-9]+h)?([0-9]+m)?([0-9]+s)?$", var.ca_cache))
    error_message = "ca_cache must be a duration like 60s, 5m or 1h30m."
  }
}

# --- certificates and bootstrap --------------------------------------------------------------

variable "trust_domain" {
  description = "SPIFFE trust domain (MESHJOIN_TRUST_DOMAIN); null keeps the product default (cluster.local)."
  type        = string
  default     = null

  validation {
    condition     = var.trust_domain == null || can(regex("^[a-z0-9._-]{1,255}$", var.trust_domain))
    error_message = "trust_domain: a SPIFFE trust domain has only lower-case letters, digits, '.', '-' and '_'."
  }
}

variable "cert_ttl" {
  description = "Workload certificate lifetime (MESHJOIN_CERT_TTL), e.g. 24h; null keeps the product default."
  type        = string
  default     = null

  validation {
    condition     = var.cert_ttl == null || can(regex("^([0-9]+d)?([0-9]+h)?([0-9]+m)?([0-9]+s)?$", var.cert_ttl))
    error_message = "cert_ttl must be a duration like 24h or 90m."
  }
}

variable "renew_fraction" {
  description = "Renew at this fraction of a certificate's life (MESHJOIN_RENEW_FRACTION); null keeps the product default."
  type        = number
  default     = null

  validation {
    condition     = var.renew_fraction == null || try(var.renew_fraction >= 0 && var.renew_fraction < 1, false)
    error_message = "renew_fraction must be in [0, 1)."
  }
}

variable "renew_jitter" {
  description = "Per-VM jitter subtracted from the renewal point, as a fraction of life (MESHJOIN_RENEW_JITTER); null keeps the product default."
  type        = number
  default     = null

  validation {
    condition     = var.renew_jitter == null || try(var.renew_jitter >= 0 && var.renew_jitter < 1, false)
    error_message = "renew_jitter must be in [0, 1)."
  }
}

variable "key_algorithm" {
  description = "Workload key algorithm (MESHJOIN_KEY_ALGORITHM): ecdsa-p256 or rsa-2048; null keeps the product default."
  type        = string
  default     = null

  validation {
    condition     = var.key_algorithm == null || contains(["ecdsa-p256", "rsa-2048"], coalesce(var.key_algorithm, "ecdsa-p256"))
    error_message = "key_algorithm must be ecdsa-p256 or rsa-2048."
  }
}

variable "key_rotation_renewals" {
  description = "Key rotation policy (MESHJOIN_KEY_ROTATION_RENEWALS): after this many certificates for one VM key, meshjoin asks the VM's agent for a new key at the next renewal; 0 never asks. null keeps the product default (3)."
  type        = number
  default     = null

  validation {
    condition     = var.key_rotation_renewals == null || try(var.key_rotation_renewals >= 0 && floor(var.key_rotation_renewals) == var.key_rotation_renewals, false)
    error_message = "key_rotation_renewals must be a non-negative integer."
  }
}

variable "istiod_address" {
  description = "discoveryAddress written for the VMs (MESHJOIN_ISTIOD_ADDRESS); null keeps the product default."
  type        = string
  default     = null
}

variable "istiod_ip" {
  description = "Address of the east-west gateway for the VMs' istiod hosts line (MESHJOIN_ISTIOD_IP)."
  type        = string
  default     = null
}

variable "mesh_id" {
  description = "Mesh id for cluster.env (MESHJOIN_MESH_ID)."
  type        = string
  default     = null

  validation {
    condition     = var.mesh_id == null || var.mesh_id == "" || can(regex("^[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$", var.mesh_id))
    error_message = "mesh_id: 1-63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit (as the functions' settings require)."
  }
}

variable "cluster_id" {
  description = "Istio cluster id for cluster.env (MESHJOIN_CLUSTER_ID); null keeps the product default (Kubernetes)."
  type        = string
  default     = null

  validation {
    condition     = var.cluster_id == null || var.cluster_id == "" || can(regex("^[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$", var.cluster_id))
    error_message = "cluster_id: 1-63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit (as the functions' settings require)."
  }
}

variable "network" {
  description = "Istio network of the VMs (MESHJOIN_NETWORK), for multi-network meshes."
  type        = string
  default     = null

  validation {
    condition     = var.network == null || var.network == "" || can(regex("^[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$", var.network))
    error_message = "network: 1-63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit (as the functions' settings require)."
  }
}

variable "sidecar_url" {
  description = "Where the VM agent downloads the Istio sidecar package (MESHJOIN_SIDECAR_URL)."
  type        = string
  default     = null
}

variable "sidecar_sha256" {
  description = "SHA-256 the sidecar package must have (MESHJOIN_SIDECAR_SHA256)."
  type        = string
  default     = null
}

variable "pubsub_endpoint" {
  description = "The Pub/Sub API as the VMs reach it, where their agents publish the nudge after confirming (project metadata meshjoin-pubsub-endpoint): e.g. a Private Service Connect endpoint for VMs without internet access. Only the VMs use it."
  type        = string
  default     = "https://pubsub.googleapis.com"

  validation {
    condition     = can(regex("^https?://[A-Za-z0-9.-]+(:[0-9]+)?$", var.pubsub_endpoint))
    error_message = "pubsub_endpoint must be a scheme and host (and port), e.g. https://pubsub.googleapis.com."
  }
}

# --- event handling --------------------------------------------------------------------------

variable "max_event_age" {
  description = "Events published longer ago are dropped, the sweep covers them (MESHJOIN_MAX_EVENT_AGE); null keeps the product default."
  type        = string
  default     = null

  validation {
    condition     = var.max_event_age == null || can(regex("^([0-9]+d)?([0-9]+h)?([0-9]+m)?([0-9]+s)?$", var.max_event_age))
    error_message = "max_event_age must be a duration like 1h."
  }
}

variable "api_attempts" {
  description = "Attempts per API call on transient errors (MESHJOIN_API_ATTEMPTS); null keeps the product default."
  type        = number
  default     = null

  validation {
    condition     = var.api_attempts == null || try(var.api_attempts >= 1 && floor(var.api_attempts) == var.api_attempts, false)
    error_message = "api_attempts must be a positive integer."
  }
}

variable "api_timeout" {
  description = "Deadline of one API call, after which it counts as a transient failure (MESHJOIN_API_TIMEOUT), e.g. 30s; null keeps the product default."
  type        = string
  default     = null

  validation {
    condition     = var.api_timeout == null || can(regex("^([0-9]+d)?([0-9]+h)?([0-9]+m)?([0-9]+s)?$", var.api_timeout))
    error_message = "api_timeout must be a duration like 30s or 1m."
  }
}

variable "extra_settings" {
  description = "Further MESHJOIN_* environment variables for both functions (a setting newer than this module); they override the ones above."
  type        = map(string)
  default     = {}

  validation {
    condition     = alltrue([for k in keys(var.extra_settings) : can(regex("^MESHJOIN_[A-Z0-9_]+$", k))])
    error_message = "extra_settings keys must be MESHJOIN_* variable names."
  }
}

variable "prune_cap" {
  description = "Most deletions one sweep may make; above it the sweep stops and says so (MESHJOIN_PRUNE_CAP). null keeps the product default."
  type        = number
  default     = null

  validation {
    condition     = var.prune_cap == null || try(var.prune_cap >= 1 && floor(var.prune_cap) == var.prune_cap, false)
    error_message = "prune_cap must be a positive integer."
  }
}

variable "sweep_renewals" {
  description = "Optional upper bound on the per-VM work one sweep publishes, in renewals (MESHJOIN_SWEEP_RENEWALS); the quota model (shared/meshjoin/capacity.py) sets the budget, this only lowers it. null: no bound."
  type        = number
  default     = null

  validation {
    condition     = var.sweep_renewals == null || try(var.sweep_renewals >= 1 && floor(var.sweep_renewals) == var.sweep_renewals, false)
    error_message = "sweep_renewals must be a positive integer."
  }
}

variable "sweep_time_budget" {
  description = "Wall time after which a sweep stops starting work (MESHJOIN_SWEEP_SECONDS), e.g. 4m. null keeps the product default."
  type        = string
  default     = null

  validation {
    # Below 8 minutes: the maintenance function is killed at 9 (timeout_seconds in main.tf), and
    # the sweep needs time to finish what it started and log its summary.
    condition = var.sweep_time_budget == null || try(sum([
      for i, n in regex("^(?:([0-9]+)d)?(?:([0-9]+)h)?(?:([0-9]+)m)?(?:([0-9]+)s)?$", var.sweep_time_budget) :
      (n == null || n == "" ? 0 : tonumber(n)) * [86400, 3600, 60, 1][i]
    ]) < 480, false)
    error_message = "sweep_time_budget must be a duration below 8m, e.g. 4m or 300s."
  }
}

variable "sweep_workers" {
  description = "VMs one sweep reconciles in parallel (MESHJOIN_SWEEP_WORKERS). null keeps the product default."
  type        = number
  default     = null

  validation {
    condition     = var.sweep_workers == null || try(var.sweep_workers >= 1 && floor(var.sweep_workers) == var.sweep_workers, false)
    error_message = "sweep_workers must be a positive integer."
  }
}

variable "sweep_interval_minutes" {
  description = "Minutes between maintenance sweeps (Cloud Scheduler). A divisor of 60 (evenly spaced across the hour) and longer than the maintenance function's 9-minute timeout, so one sweep has always ended, on its own or killed, before the next tick."
  type        = number
  default     = 10

  validation {
    condition     = contains([10, 12, 15, 20, 30], var.sweep_interval_minutes)
    error_message = "sweep_interval_minutes must divide 60 and exceed the 9-minute sweep timeout: 10, 12, 15, 20 or 30."
  }
}

# --- sizing the events function (the arithmetic is in main.tf, local.events_sizing) ----------

variable "events_max_instances" {
  description = "Upper bound on concurrent event-function instances. Together with events_concurrency it caps the reconciles in flight, and so the Secret Manager writes a burst of VM creations can cause (main.tf checks the product stays under the project's 600 writes/minute)."
  type        = number
  default     = 8

  validation {
    condition     = try(var.events_max_instances >= 1 && floor(var.events_max_instances) == var.events_max_instances, false)
    error_message = "events_max_instances must be a positive integer."
  }
}

variable "events_concurrency" {
  description = "Requests one event-function instance serves at once (Cloud Run concurrency; functions-framework gets as many threads). Reconciles wait on APIs, not CPU, so one instance (1 vCPU) serves several."
  type        = number
  default     = 8

  validation {
    condition     = try(var.events_concurrency >= 1 && var.events_concurrency <= 80 && floor(var.events_concurrency) == var.events_concurrency, false)
    error_message = "events_concurrency must be an integer from 1 to 80."
  }
}

variable "events_max_delivery_attempts" {
  description = "Deliveries of one event before it is parked in the dead-letter topic. Refusals while every instance is busy (429) count as attempts, so this must cover the time the largest burst takes to drain (main.tf checks it against events_burst)."
  type        = number
  default     = 10

  validation {
    condition     = try(var.events_max_delivery_attempts >= 5 && var.events_max_delivery_attempts <= 100 && floor(var.events_max_delivery_attempts) == var.events_max_delivery_attempts, false)
    error_message = "events_max_delivery_attempts must be an integer from 5 to 100 (Pub/Sub's range)."
  }
}

variable "events_burst" {
  description = "The largest number of VMs expected to be created or labelled at once (a managed instance group resize, a fleet relabel). Only used to check, at plan time, that such a burst drains before its events are dead-lettered."
  type        = number
  default     = 1000
}

variable "function_memory" {
  description = "Memory of each function instance."
  type        = string
  default     = "512Mi"
}

# --- cluster RBAC ----------------------------------------------------------------------------

variable "manage_kubernetes_rbac" {
  description = "Create the functions' Kubernetes RBAC with Terraform. Set false when cluster RBAC is managed elsewhere (GitOps): apply the kubernetes_rbac_manifest output there instead."
  type        = bool
  default     = true
}

# --- the VM's own truth and API quotas (unset: the product's defaults) -----------------------

variable "confirm_timeout" {
  description = "How long a VM may wait for its agent to confirm before each sweep reports it (MESHJOIN_CONFIRM_TIMEOUT)."
  type        = string
  default     = null
}

variable "quota_share" {
  description = "Share of each per-minute API quota one function instance may use (MESHJOIN_QUOTA_SHARE); the rest is left to other callers. null: the events function's share is derived, (1 - quota_reserve) / events_max_instances, and the maintenance function keeps the product default."
  type        = number
  default     = null
}

variable "quota_reserve" {
  description = "Share of each per-minute API quota left to callers that are not meshjoin's functions (MESHJOIN_QUOTA_RESERVE): events_max_instances x quota_share must stay within 1 - this."
  type        = number
  default     = 0.2

  validation {
    condition     = var.quota_reserve >= 0 && var.quota_reserve < 1
    error_message = "quota_reserve must be a fraction in [0, 1)."
  }
}

variable "sweep_work_share" {
  description = "Share of each per-minute API quota the per-VM work one sweep publishes may use over a sweep interval (MESHJOIN_SWEEP_WORK_SHARE); at most 1 - quota_reserve. null keeps the product default (0.4)."
  type        = number
  default     = null
}

variable "secretmanager_reads_per_minute" {
  description = "The project's Secret Manager read quota per minute, if raised above Google's default 600."
  type        = number
  default     = null
}

variable "secretmanager_writes_per_minute" {
  description = "The project's Secret Manager write quota per minute, if raised above Google's default 600."
  type        = number
  default     = null
}

variable "compute_reads_per_minute" {
  description = "The project's Compute Engine read-request quota per minute (MESHJOIN_COMPUTE_READS_PER_MINUTE)."
  type        = number
  default     = null
}

variable "compute_writes_per_minute" {
  description = "The project's Compute Engine mutation quota per minute (MESHJOIN_COMPUTE_WRITES_PER_MINUTE)."
  type        = number
  default     = null
}

# --- network: private clusters -----------------------------------------------------------------

variable "cluster_endpoint" {
  description = "How the functions and Terraform reach the cluster's Kubernetes API (MESHJOIN_CLUSTER_ENDPOINT): \"ip\" (the endpoint clusters.get names, with the cluster CA) or \"dns\" (GKE's DNS-based endpoint, gke-....gke.goog, which reaches private clusters without any VPC path; enable it with `gcloud container clusters update C --enable-dns-access`)."
  type        = string
  default     = "ip"

  validation {
    condition     = contains(["ip", "dns"], var.cluster_endpoint)
    error_message = "cluster_endpoint must be \"ip\" or \"dns\"."
  }
}

variable "vpc_connector" {
  description = "Serverless VPC Access connector (projects/P/locations/R/connectors/N) for the functions' egress, for a private cluster reached by its private IP endpoint. null: no VPC egress (the DNS endpoint needs none)."
  type        = string
  default     = null

  validation {
    condition     = var.vpc_connector == null || can(regex("^projects/[^/]+/locations/[^/]+/connectors/[^/]+$", var.vpc_connector))
    error_message = "vpc_connector must look like projects/P/locations/R/connectors/N."
  }
}

variable "vpc_connector_egress" {
  description = "What goes through vpc_connector: PRIVATE_RANGES_ONLY (the control plane's private endpoint; Google APIs stay direct) or ALL_TRAFFIC."
  type        = string
  default     = "PRIVATE_RANGES_ONLY"

  validation {
    condition     = contains(["PRIVATE_RANGES_ONLY", "ALL_TRAFFIC"], var.vpc_connector_egress)
    error_message = "vpc_connector_egress must be PRIVATE_RANGES_ONLY or ALL_TRAFFIC."
  }
}

# --- storage policy of the CA secrets ----------------------------------------------------------

variable "secret_locations" {
  description = "Regions the CA secrets are replicated to (user-managed replication), for organisations whose gcp.resourceLocations policy rejects automatic replication. Empty: automatic replication."
  type        = list(string)
  default     = []
}

variable "secret_kms_keys" {
  description = "Customer-managed encryption keys of the CA secrets (CMEK): with automatic replication one key under the key \"global\" (a key in location global); with secret_locations one key per listed location. The Secret Manager service agent needs roles/cloudkms.cryptoKeyEncrypterDecrypter on each key. Empty: Google-managed keys."
  type        = map(string)
  default     = {}

  validation {
    condition     = alltrue([for k in values(var.secret_kms_keys) : can(regex("^projects/[^/]+/locations/[^/]+/keyRings/[^/]+/cryptoKeys/[^/]+$", k))])
    error_message = "secret_kms_keys values must be projects/P/locations/L/keyRings/R/cryptoKeys/K."
  }
}

# --- operating it --------------------------------------------------------------------------------

variable "alert_notification_channels" {
  description = "Cloud Monitoring notification channel ids (projects/P/notificationChannels/N) the alert policies notify. Empty: the alerts open incidents on the console only."
  type        = list(string)
  default     = []
}

variable "cert_expiry_alert_hours" {
  description = "Alert when the sweep finds a workload certificate with less than this many hours left. Renewal happens at about half of a certificate's life (12h of the default 24h), so a certificate only gets this close when renewals have been failing for hours."
  type        = number
  default     = 6

  validation {
    condition     = var.cert_expiry_alert_hours > 0
    error_message = "cert_expiry_alert_hours must be positive."
  }
}

variable "join_failure_ratio" {
  description = "Alert when more than this share of the events function's reconciles fail (outcome failed) over 15 minutes."
  type        = number
  default     = 0.1

  validation {
    condition     = var.join_failure_ratio > 0 && var.join_failure_ratio < 1
    error_message = "join_failure_ratio must be in (0, 1)."
  }
}
