# Several VM projects (MESHJOIN_VM_PROJECTS): one deployment in the host project (var.project_id:
# functions, topics, secrets) serves the VMs of var.vm_projects too, e.g. the service projects of a
# Shared VPC. Every grant a VM project needs is made in that project, per project:
#   - the functions' Compute role (a project-level custom role can only be granted in its own
#     project, so each VM project gets its own copy, with the host role's exact permissions);
#   - a Log Router sink with the host sink's filter (its own project's audit log), routed to the
#     host's events topic, and its writer identity's publish grant on that topic.
# Unchanged by the number of projects: actAs on the bound VM accounts (iam.tf, act_as_vm, granted on
# each account itself through projects/-/, whatever project the account lives in) and those
# accounts' nudge grant on the host's events topic (iam.tf, vm_nudge: one per account, not per
# project). The host project's own resources keep their addresses (iam.tf, pubsub.tf), so adding
# VM projects to an existing deployment moves nothing in the state.
#
# The alternative to one sink per project is one aggregated sink on a folder or the organisation
# (deploy/README.md, "Several VM projects"): google_logging_folder_sink with include_children = true
# and a filter on the VM projects' logNames, which needs roles/logging.configWriter on the folder.

locals {
  # Host first, then the others, each once: MESHJOIN_VM_PROJECTS as the functions read it.
  vm_projects = distinct(concat([var.project_id], var.vm_projects))
  # The VM projects that need their own grants and sink (the host has its own in iam.tf/pubsub.tf).
  other_vm_projects = [for p in local.vm_projects : p if p != var.project_id]
}

resource "google_project_iam_custom_role" "compute_vm_projects" {
  for_each = toset(local.other_vm_projects)

  project     = each.value
  role_id     = google_project_iam_custom_role.compute.role_id
  title       = google_project_iam_custom_role.compute.title
  description = google_project_iam_custom_role.compute.description
  permissions = google_project_iam_custom_role.compute.permissions
}

resource "google_project_iam_member" "functions_compute_vm_projects" {
  for_each = toset(local.other_vm_projects)

  project = each.value
  role    = google_project_iam_custom_role.compute_vm_projects[each.key].id
  member  = local.functions_member
}

# The host sink's filter with the VM project's own audit log: the same methods, both prefixes.
resource "google_logging_project_sink" "vm_events_vm_projects" {
  for_each = toset(local.other_vm_projects)

  project     = each.value
  name        = "${var.name}-vm-events"
  destination = "pubsub.googleapis.com/${google_pubsub_topic.events.id}"
  filter = replace(google_logging_project_sink.vm_events.filter, "logName=\"projects/${var.project_id}/logs/",
  "logName=\"projects/${each.value}/logs/")

  # A dedicated writer identity per sink, granted publish on the host's events topic only. Required
  # here: without it a project sink's destination must be in the sink's own project (Logging API,
  # CreateSinkRequest.unique_writer_identity).
  unique_writer_identity = true
}

resource "google_pubsub_topic_iam_member" "sink_publisher_vm_projects" {
  for_each = toset(local.other_vm_projects)

  topic  = google_pubsub_topic.events.id
  role   = "roles/pubsub.publisher"
  member = google_logging_project_sink.vm_events_vm_projects[each.key].writer_identity
}
