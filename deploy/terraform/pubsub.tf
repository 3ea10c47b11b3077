# Where events come from and how they reach the functions.

resource "google_pubsub_topic" "events" {
  name       = "${var.name}-events"
  depends_on = [google_project_service.apis]
}

resource "google_pubsub_topic" "schedule" {
  name       = "${var.name}-schedule"
  depends_on = [google_project_service.apis]
}

# Messages the functions failed on 5 times land here instead of being retried forever.
resource "google_pubsub_topic" "dead_letter" {
  name       = "${var.name}-dead-letter"
  depends_on = [google_project_service.apis]
}

# A topic without a subscription drops what is published to it: keep dead letters a week for
# inspection (`gcloud pubsub subscriptions pull <name>-dead-letter`).
resource "google_pubsub_subscription" "dead_letter" {
  name                       = "${var.name}-dead-letter"
  topic                      = google_pubsub_topic.dead_letter.id
  message_retention_duration = "604800s"
  ack_deadline_seconds       = 60

  expiration_policy {
    ttl = "" # never expire, however quiet
  }
}

# --- the audit-log route ---------------------------------------------------------------------

# Admin Activity entries of VM creation, deletion and label changes. The Console logs the
# `beta.` method names and gcloud/the API the `v1.` ones, so both prefixes are listed (DESIGN.md).
# setMetadata is deliberately absent: meshjoin writes metadata itself and must not wake itself.
# Both `first` and `last` entries of an operation arrive; the function acts on the last.
resource "google_logging_project_sink" "vm_events" {
  name        = "${var.name}-vm-events"
  destination = "pubsub.googleapis.com/${google_pubsub_topic.events.id}"
  filter      = <<-EOT
    logName="projects/${var.project_id}/logs/cloudaudit.googleapis.com%2Factivity"
    AND resource.type="gce_instance"
    AND protoPayload.serviceName="compute.googleapis.com"
    AND protoPayload.methodName=(
      "v1.compute.instances.insert" OR "beta.compute.instances.insert" OR
      "v1.compute.instances.delete" OR "beta.compute.instances.delete" OR
      "v1.compute.instances.setLabels" OR "beta.compute.instances.setLabels" OR
      "v1.compute.instances.stop" OR "beta.compute.instances.stop" OR
      "v1.compute.instances.start" OR "beta.compute.instances.start"
    )
  EOT

  # A dedicated writer identity, granted publish on this one topic only (iam.tf).
  unique_writer_identity = true
}

# --- the schedule ----------------------------------------------------------------------------

# What `meshjoin sandbox tick` publishes in the sandbox. Cloud Scheduler publishes with its own
# service agent, which holds pubsub.topics.publish through its service-agent role.
resource "google_cloud_scheduler_job" "sweep" {
  name        = "${var.name}-sweep"
  region      = var.region
  description = "meshjoin maintenance sweep every ${var.sweep_interval_minutes} minutes"
  schedule    = "*/${var.sweep_interval_minutes} * * * *"
  time_zone   = "Etc/UTC"

  pubsub_target {
    topic_name = google_pubsub_topic.schedule.id
    data       = base64encode(jsonencode({ source = "cloud-scheduler", job = "${var.name}-sweep" }))
  }

  depends_on = [google_project_service.apis]
}

# --- delivery to the functions ---------------------------------------------------------------

# Our own push subscriptions rather than the functions' Eventarc triggers: an Eventarc trigger
# manages its subscription and offers no dead-letter policy. The body is the raw Pub/Sub push,
# which functions-framework converts to the CloudEvent the handlers expect; the sandbox delivers
# exactly the same way.
resource "google_pubsub_subscription" "push" {
  for_each = local.functions

  name  = "${var.name}-${each.key}-push"
  topic = each.value.topic

  # For push this is how long Pub/Sub waits for the HTTP answer: as long as the function may run.
  ack_deadline_seconds       = min(600, each.value.timeout_seconds)
  message_retention_duration = each.value.message_retention

  push_config {
    push_endpoint = google_cloudfunctions2_function.fn[each.key].service_config[0].uri

    # Signed by the push identity, which alone may invoke the functions.
    oidc_token {
      service_account_email = google_service_account.push.email
    }
  }

  # A transient failure (HTTP 500) or a refusal (429) is retried with backoff.
  retry_policy {
    minimum_backoff = "10s"
    maximum_backoff = "600s"
  }

  # Events: parked after max_delivery_attempts (sized in main.tf, local.events_sizing). Ticks: never
  # (a refused or failed tick is superseded by the next; a dead-lettered one would only alarm).
  dynamic "dead_letter_policy" {
    for_each = each.value.max_delivery_attempts == null ? [] : [each.value.max_delivery_attempts]
    content {
      dead_letter_topic     = google_pubsub_topic.dead_letter.id
      max_delivery_attempts = dead_letter_policy.value
    }
  }

  expiration_policy {
    ttl = "" # the default deletes a subscription after 31 idle days: a quiet month would break meshjoin
  }

  # Dead-lettering needs these grants before the first failure, not after.
  depends_on = [
    google_pubsub_topic_iam_member.dead_letter_publisher,
    google_cloud_run_v2_service_iam_member.push_invoker,
  ]

  lifecycle {
    # The overload arithmetic of main.tf (local.events_sizing), enforced at plan time.
    precondition {
      condition     = each.key != "events" || local.events_sizing.joins_per_minute * local.events_sizing.writes_per_join <= local.events_sizing.write_quota_pm
      error_message = "events_max_instances x events_concurrency = ${local.events_sizing.in_flight} reconciles in flight would exceed Compute Engine's ${local.events_sizing.write_quota_pm} mutations a minute (about ${local.events_sizing.joins_per_minute * local.events_sizing.writes_per_join}); lower one of them."
    }
    precondition {
      condition     = each.key != "events" || local.events_sizing.drain_seconds < local.events_sizing.retry_window_seconds
      error_message = "A burst of ${var.events_burst} VMs takes about ${local.events_sizing.drain_seconds}s to drain but ${var.events_max_delivery_attempts} delivery attempts only cover ${local.events_sizing.retry_window_seconds}s of retries: raise events_max_delivery_attempts (or the capacity)."
    }
    precondition {
      condition     = each.key != "maintenance" || local.sweep_spacing_ok
      error_message = "sweep_interval_minutes must exceed the maintenance function's 9-minute timeout, or sweeps could overlap."
    }
  }
}
