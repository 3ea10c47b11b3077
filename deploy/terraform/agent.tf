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
