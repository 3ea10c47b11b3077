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
# the vm_projects variable, deduplicated) in main.tf: delete this block then.
locals {
  vm_projects = [var.project_id]
}

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
