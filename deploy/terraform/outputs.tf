output "functions_service_account" {
  description = "Identity the functions run as (the Kubernetes user in the cluster's RBAC)."
  value       = google_service_account.functions.email
}

output "functions" {
  description = "Deployed function names."
  value       = { for key, fn in google_cloudfunctions2_function.fn : key => fn.name }
}

output "events_topic" {
  description = "Topic of VM events; operators may publish {\"project\", \"zone\", \"instance\"} here."
  value       = google_pubsub_topic.events.name
}

output "schedule_topic" {
  description = "Topic Cloud Scheduler ticks on; publish to it to run a sweep now."
  value       = google_pubsub_topic.schedule.name
}

output "dead_letter_subscription" {
  description = "Pull subscription holding events the functions failed on events_max_delivery_attempts times."
  value       = google_pubsub_subscription.dead_letter.name
}

output "sink_writer_identity" {
  description = "Identity the Log Router sink publishes as."
  value       = google_logging_project_sink.vm_events.writer_identity
}

output "ca_secrets" {
  description = "Secrets the plug-in CA goes into (deploy/upload_ca.py)."
  value       = local.ca_secrets
}

output "nudge_command" {
  description = "How an operator asks meshjoin to look at one VM now."
  value       = "gcloud pubsub topics publish ${google_pubsub_topic.events.name} --project ${var.project_id} --message '{\"project\":\"${var.project_id}\",\"zone\":\"ZONE\",\"instance\":\"VM\"}'"
}

output "kubernetes_rbac_manifest" {
  description = "The functions' RBAC as YAML, for `kubectl apply -f -` when manage_kubernetes_rbac is false."
  value       = join("---\n", [for object in local.rbac_objects : yamlencode(object)])
}
