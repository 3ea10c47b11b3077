# The meshjoin VM agent lives once per VM project: its text in project metadata under a versioned key,
# `meshjoin-agent-<first 16 hex of its SHA-256>`. Each VM's `startup-script` (written by the functions) is a
# short stub that fetches `project/attributes/<that key>` from the metadata server, checks the full SHA-256
# it pins and runs it. The functions compute the same key and checksum from the same file, which their
# bundle carries (meshjoin/agent/meshjoin-agent.sh; bootstrap.agent_metadata_key()), so both sides agree by
# construction (tests/deploy/test_agent_tf.py evaluates this expression against the package).
# Only this deployment writes project metadata: the functions hold no grant for it.
#
# A new agent is a new key: `terraform apply` replaces the item (the key forces a new resource) and so
# removes the previous version. A VM whose stub still pins it runs its installed copy of that agent
# (/usr/local/sbin/meshjoin-agent, from its last boot) if that copy has the pinned SHA-256, and gets the new
# stub with its next reconcile: a waiting VM at the next sweep, a joined one at its next renewal or event
# (deploy/README.md, "Updating the agent").

# FALLBACK until the several-projects work (issue 16) is merged, which defines local.vm_projects (host +
# var.vm_projects, deduplicated) in main.tf: delete this block then.
locals {
  vm_projects = [var.project_id]
}

locals {
  checkout     = "${path.module}/../.."
  agent_file   = "${local.checkout}/shared/meshjoin/agent/meshjoin-agent.sh"
  agent_sha256 = filesha256(local.agent_file)
  agent_key    = "meshjoin-agent-${substr(local.agent_sha256, 0, 16)}"
}

resource "google_compute_project_metadata_item" "agent" {
  for_each = toset(local.vm_projects)

  project = each.value
  key     = local.agent_key
  value   = file(local.agent_file)
}
