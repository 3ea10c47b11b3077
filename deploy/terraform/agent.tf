# The meshjoin VM agent lives once per VM project: its text in project metadata under a versioned key,
# `meshjoin-agent-<first 16 hex of its SHA-256>`. Each VM's `startup-script` (written by the functions) is a
# short stub that fetches `project/attributes/<that key>` from the metadata server, checks the full SHA-256
# it pins and runs it. The functions compute the same key and checksum from the same file, which their
# bundle carries (meshjoin/agent/meshjoin-agent.sh; bootstrap.agent_metadata_key()), so both sides agree by
# construction (tests/deploy/test_agent_tf.py evaluates this expression against the package).
# Only this deployment writes project metadata: the functions hold no grant for it.
#
# A new agent is a new key: `terraform apply` replaces the item (the key forces a new resource) and so
# removes the previous version. A VM whose stub still pins it keeps converging through its running watcher
# (meshjoin-watch.service, installed at an earlier boot); if it reboots before its next reconcile writes the
# new stub, that boot runs nothing and says so on the serial console ("no agent of SHA-256 ... not run").
# The next reconcile writes the new stub: a waiting VM at the next sweep, a joined one at its next renewal
# or event (deploy/README.md, "Updating the agent"). local.vm_projects: vm_projects.tf.

locals {
  # The file the functions' bundle carries too (deploy/package.py copies the meshjoin package whole).
  checkout   = "${path.module}/../.."
  agent_file = "${local.checkout}/shared/meshjoin/agent/meshjoin-agent.sh"
}

resource "google_compute_project_metadata_item" "agent" {
  for_each = toset(local.vm_projects)

  project = each.value
  # bootstrap.agent_metadata_key(): the first 16 hex digits of the agent's SHA-256.
  key   = "meshjoin-agent-${substr(filesha256(local.agent_file), 0, 16)}"
  value = file(local.agent_file)
}

# What every VM of this deployment shares, beside the agent: the agent's inputs that are the same for every VM
# (names.DEPLOYMENT_KEYS). Rendered here from the very variables the functions' settings come from (main.tf,
# function_settings), exactly as bootstrap.deployment_items() renders them from those settings (the functions
# write them on no VM; tests/deploy/test_agent_settings_tf.py compares both, with Terraform itself). Each VM's
# agent reads an instance item of the same key first, else this one. A change here reaches a VM at its next
# boot, or the next time its watcher wakes (at the latest its next renewal): the watcher waits on the
# instance's own metadata only (deploy/README.md, "Updating the agent").
locals {
  # settings.py's defaults, where the functions get the variable unset (main.tf drops null and "").
  vm_istiod_address = coalesce(var.istiod_address, "istiod.istio-system.svc:15012")
  # bootstrap.mesh_env(): the lines of cluster.env every VM shares, each value quoted as shlex.quote does
  # (left bare when it only has characters from its safe set, else in single quotes); an empty mesh id or
  # network is left out.
  vm_mesh_env_values = [
    ["ISTIO_LOCAL_EXCLUDE_PORTS", "15090,15021,15020"],
    ["ISTIO_META_CLUSTER_ID", coalesce(var.cluster_id, "Kubernetes")],
    ["ISTIO_META_DNS_CAPTURE", "true"],
    ["ISTIO_META_MESH_ID", var.mesh_id != null ? var.mesh_id : ""],
    ["ISTIO_META_NETWORK", var.network != null ? var.network : ""],
    ["ISTIO_SERVICE_CIDR", "*"],
    ["TRUST_DOMAIN", coalesce(var.trust_domain, "cluster.local")],
    ["FILE_MOUNTED_CERTS", "true"],
    ["PROV_CERT", ""],
    ["OUTPUT_CERTS", ""],
  ]
  vm_mesh_env = join("", [for line in local.vm_mesh_env_values :
    "${line[0]}=${line[1] != "" && replace(line[1], "/[A-Za-z0-9_@%+=:,./-]/", "") == "" ? line[1] : "'${replace(line[1], "'", "'\"'\"'")}'"}\n"
  if line[1] != "" || !contains(["ISTIO_META_MESH_ID", "ISTIO_META_NETWORK"], line[0])])
  vm_settings_all = {
    "meshjoin-mesh-env" = local.vm_mesh_env
    # bootstrap.mesh_config(): /etc/istio/config/mesh.
    "meshjoin-mesh-config" = "${jsonencode({ defaultConfig = merge({
      discoveryAddress = local.vm_istiod_address
      proxyMetadata = {
        CANONICAL_SERVICE_FROM_CLUSTER_ENV = "true"
        ISTIO_META_TLS_CLIENT_CERT_CHAIN   = "/etc/certs/cert-chain.pem"
        ISTIO_META_TLS_CLIENT_KEY          = "/etc/certs/key.pem"
        ISTIO_META_TLS_CLIENT_ROOT_CERT    = "/etc/certs/root-cert.pem"
      }
    }, { for k, v in { meshId = var.mesh_id } : k => v if v != null && v != "" }) })}\n"
    # bootstrap.hosts_lines(): the VMs resolve istiod through the east-west gateway.
    "meshjoin-hosts" = join("", [for ip in [var.istiod_ip] : "${ip} ${replace(local.vm_istiod_address, "/:[0-9]+$/", "")}\n"
    if ip != null && ip != ""])
    "meshjoin-key-algorithm"  = coalesce(var.key_algorithm, "ecdsa-p256")
    "meshjoin-sidecar-url"    = var.sidecar_url
    "meshjoin-sidecar-sha256" = var.sidecar_url == null || var.sidecar_url == "" ? null : var.sidecar_sha256
    # google_pubsub_topic.events.id (pubsub.tf), spelled out so that `terraform console` evaluates it.
    "meshjoin-events-topic"    = "projects/${var.project_id}/topics/${var.name}-events"
    "meshjoin-pubsub-endpoint" = var.pubsub_endpoint
  }
  vm_settings = { for key, value in local.vm_settings_all : key => value if value != null && value != "" }
  # One item per (VM project, key).
  vm_setting_items = { for pair in flatten([for project in local.vm_projects : [
    for key, value in local.vm_settings : { project = project, key = key, value = value }
  ]]) : "${pair.project}/${pair.key}" => pair }
}

resource "google_compute_project_metadata_item" "vm_settings" {
  for_each = local.vm_setting_items

  project = each.value.project
  key     = each.value.key
  value   = each.value.value
}
