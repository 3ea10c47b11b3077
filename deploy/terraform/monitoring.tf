# Operating meshjoin: log-based metrics over the functions' structured log lines, alert policies
# on them and on the dead-letter backlog, and a small dashboard.
#
# The functions log one JSON object per line to stdout (shared/meshjoin/logs.py); Cloud Logging
# parses it into jsonPayload, with `severity`, `message`, the VM key (`vm`, `project`, `zone`,
# `instance`) and an `outcome` verb. Gen2 functions are Cloud Run services: their entries have
# resource.type "cloud_run_revision" and the function's name as resource.labels.service_name.
# tests/deploy/test_monitoring.py checks every field and value named here against the log(...)
# calls of the product.

locals {
  function_logs = {
    for key in keys(local.functions) : key => "resource.type=\"cloud_run_revision\" AND resource.labels.service_name=\"${var.name}-${key}\""
  }
  any_function_logs = "resource.type=\"cloud_run_revision\" AND resource.labels.service_name=(\"${var.name}-events\" OR \"${var.name}-maintenance\")"

  # Log-based counters: name → (description, filter).
  log_counters = {
    # A WorkloadEntry written for a VM: a first join, or a re-registration after a change;
    # by the events function or by the sweep (reconcile.py logs it once either way).
    joins = {
      description = "VMs registered in the mesh (WorkloadEntry written)"
      filter      = "${local.any_function_logs} AND jsonPayload.outcome=\"registered\" AND jsonPayload.message=~\"^WorkloadEntry \""
    }
    denials = {
      description = "VMs refused an identity by policy"
      filter      = "${local.any_function_logs} AND jsonPayload.outcome=\"denied\""
    }
    # Permanent reconcile failures, invalid settings, failed sweep actions and aborted sweeps.
    failures = {
      description = "Reconciles and sweeps that failed"
      filter      = "${local.any_function_logs} AND jsonPayload.outcome=\"failed\""
    }
    sweep_aborts = {
      description = "Sweeps that stopped on an unexpected error (the next tick retries)"
      filter      = "${local.function_logs.maintenance} AND jsonPayload.outcome=\"failed\" AND jsonPayload.message=~\"^sweep aborted\""
    }
    # The sweep's summary names the shortest remaining life among the delivered certificates.
    # Renewal is due at about half of a certificate's life, so one this close to its end means
    # renewals have failed for hours.
    certs_near_expiry = {
      description = "Sweeps that found a workload certificate within cert_expiry_alert_hours of expiry"
      filter      = "${local.function_logs.maintenance} AND jsonPayload.outcome=\"swept\" AND jsonPayload.soonest_cert_expiry_s < ${var.cert_expiry_alert_hours * 3600}"
    }
  }

  event_outcomes_filter = "${local.function_logs.events} AND jsonPayload.outcome:* AND jsonPayload.state:*"

  # The metrics' types, from their names (resource.name below); the policies and the dashboard
  # depend_on the metrics, since Monitoring refuses a filter naming a metric that does not exist.
  metric_type          = { for name in keys(local.log_counters) : name => "logging.googleapis.com/user/${var.name}/${name}" }
  outcomes_metric_type = "logging.googleapis.com/user/${var.name}/event_outcomes"
}

resource "google_logging_metric" "counter" {
  for_each = local.log_counters

  name        = "${var.name}/${each.key}"
  description = "meshjoin: ${each.value.description}"
  filter      = each.value.filter

  metric_descriptor {
    metric_kind = "DELTA"
    value_type  = "INT64"
    unit        = "1"
  }

  depends_on = [google_project_service.apis]
}

# Every reconcile the events function finished, by outcome (the entry point's line, the only one
# carrying `state`): the denominator of the join failure rate.
resource "google_logging_metric" "event_outcomes" {
  name        = "${var.name}/event_outcomes"
  description = "meshjoin: reconciles finished by the events function, by outcome"
  filter      = local.event_outcomes_filter

  metric_descriptor {
    metric_kind = "DELTA"
    value_type  = "INT64"
    unit        = "1"
    labels {
      key         = "outcome"
      value_type  = "STRING"
      description = "registered, renewed, reissued, refreshed, unchanged, left, denied, failed, ..."
    }
  }
  label_extractors = {
    outcome = "EXTRACT(jsonPayload.outcome)"
  }

  depends_on = [google_project_service.apis]
}

# --- alert policies ----------------------------------------------------------------------------

resource "google_monitoring_alert_policy" "dead_letters" {
  display_name          = "meshjoin: messages in the dead-letter subscription"
  combiner              = "OR"
  severity              = "ERROR"
  notification_channels = var.alert_notification_channels
  depends_on            = [google_logging_metric.counter, google_logging_metric.event_outcomes]

  conditions {
    display_name = "undelivered messages in ${google_pubsub_subscription.dead_letter.name}"
    condition_threshold {
      filter          = "resource.type=\"pubsub_subscription\" AND resource.labels.subscription_id=\"${google_pubsub_subscription.dead_letter.name}\" AND metric.type=\"pubsub.googleapis.com/subscription/num_undelivered_messages\""
      comparison      = "COMPARISON_GT"
      threshold_value = 0
      duration        = "300s"
      aggregations {
        alignment_period   = "300s"
        per_series_aligner = "ALIGN_MAX"
      }
    }
  }

  documentation {
    mime_type = "text/markdown"
    content   = "Events the functions failed on ${var.events_max_delivery_attempts} times. Inspect: `gcloud pubsub subscriptions pull ${google_pubsub_subscription.dead_letter.name} --limit 5`; the function logs say why (`outcome=retrying`)."
  }
}

resource "google_monitoring_alert_policy" "sweep_aborted" {
  display_name          = "meshjoin: maintenance sweep aborted"
  combiner              = "OR"
  severity              = "ERROR"
  notification_channels = var.alert_notification_channels
  depends_on            = [google_logging_metric.counter, google_logging_metric.event_outcomes]

  conditions {
    display_name = "sweep aborted"
    condition_threshold {
      filter          = "resource.type=\"cloud_run_revision\" AND metric.type=\"${local.metric_type.sweep_aborts}\""
      comparison      = "COMPARISON_GT"
      threshold_value = 0
      duration        = "0s"
      aggregations {
        alignment_period     = "600s"
        per_series_aligner   = "ALIGN_SUM"
        cross_series_reducer = "REDUCE_SUM"
      }
    }
  }

  documentation {
    mime_type = "text/markdown"
    content   = "A sweep stopped on an unexpected error; renewals and pruning wait. `gcloud logging read 'jsonPayload.message=~\"^sweep aborted\"' --limit 5`."
  }
}

resource "google_monitoring_alert_policy" "cert_near_expiry" {
  display_name          = "meshjoin: workload certificate within ${var.cert_expiry_alert_hours}h of expiry"
  combiner              = "OR"
  severity              = "CRITICAL"
  notification_channels = var.alert_notification_channels
  depends_on            = [google_logging_metric.counter, google_logging_metric.event_outcomes]

  conditions {
    display_name = "a sweep found a certificate within ${var.cert_expiry_alert_hours}h of expiry"
    condition_threshold {
      filter          = "resource.type=\"cloud_run_revision\" AND metric.type=\"${local.metric_type.certs_near_expiry}\""
      comparison      = "COMPARISON_GT"
      threshold_value = 0
      duration        = "0s"
      aggregations {
        alignment_period     = "${var.sweep_interval_minutes * 60 * 2}s"
        per_series_aligner   = "ALIGN_SUM"
        cross_series_reducer = "REDUCE_SUM"
      }
    }
  }

  documentation {
    mime_type = "text/markdown"
    content   = "Renewals have been failing: `meshjoin status` lists VMs by time left, `meshjoin explain VM` says why."
  }
}

resource "google_monitoring_alert_policy" "join_failure_rate" {
  display_name          = "meshjoin: join failure rate above ${var.join_failure_ratio * 100}%"
  combiner              = "OR"
  severity              = "WARNING"
  notification_channels = var.alert_notification_channels
  depends_on            = [google_logging_metric.counter, google_logging_metric.event_outcomes]

  conditions {
    display_name = "failed / all reconciles of the events function over 15 minutes"
    condition_threshold {
      filter             = "resource.type=\"cloud_run_revision\" AND metric.type=\"${local.outcomes_metric_type}\" AND metric.labels.outcome=\"failed\""
      denominator_filter = "resource.type=\"cloud_run_revision\" AND metric.type=\"${local.outcomes_metric_type}\""
      comparison         = "COMPARISON_GT"
      threshold_value    = var.join_failure_ratio
      duration           = "0s"
      aggregations {
        alignment_period     = "900s"
        per_series_aligner   = "ALIGN_SUM"
        cross_series_reducer = "REDUCE_SUM"
      }
      denominator_aggregations {
        alignment_period     = "900s"
        per_series_aligner   = "ALIGN_SUM"
        cross_series_reducer = "REDUCE_SUM"
      }
    }
  }

  documentation {
    mime_type = "text/markdown"
    content   = "Reconciles ending in `state=error`: the reason is in each VM's meshjoin-status and the ERROR lines (`jsonPayload.outcome=\"failed\"`)."
  }
}

# --- dashboard ---------------------------------------------------------------------------------

locals {
  dashboard_counters = ["joins", "denials", "failures", "sweep_aborts"]
}

resource "google_monitoring_dashboard" "meshjoin" {
  dashboard_json = jsonencode({
    displayName = "meshjoin"
    mosaicLayout = {
      columns = 12
      tiles = concat(
        [for i, name in local.dashboard_counters : {
          xPos   = (i % 2) * 6
          yPos   = floor(i / 2) * 4
          width  = 6
          height = 4
          widget = {
            title = local.log_counters[name].description
            xyChart = {
              dataSets = [{
                plotType = "STACKED_BAR"
                timeSeriesQuery = {
                  timeSeriesFilter = {
                    filter      = "resource.type=\"cloud_run_revision\" AND metric.type=\"${local.metric_type[name]}\""
                    aggregation = { alignmentPeriod = "300s", perSeriesAligner = "ALIGN_SUM", crossSeriesReducer = "REDUCE_SUM" }
                  }
                }
              }]
            }
          }
        }],
        [{
          xPos   = 0
          yPos   = 8
          width  = 6
          height = 4
          widget = {
            title = "Reconciles of the events function by outcome"
            xyChart = {
              dataSets = [{
                plotType = "STACKED_BAR"
                timeSeriesQuery = {
                  timeSeriesFilter = {
                    filter      = "resource.type=\"cloud_run_revision\" AND metric.type=\"${local.outcomes_metric_type}\""
                    aggregation = { alignmentPeriod = "300s", perSeriesAligner = "ALIGN_SUM", crossSeriesReducer = "REDUCE_SUM", groupByFields = ["metric.label.outcome"] }
                  }
                }
              }]
            }
          }
          }, {
          xPos   = 6
          yPos   = 8
          width  = 6
          height = 4
          widget = {
            title = "Dead-letter backlog"
            xyChart = {
              dataSets = [{
                plotType = "LINE"
                timeSeriesQuery = {
                  timeSeriesFilter = {
                    filter      = "resource.type=\"pubsub_subscription\" AND resource.labels.subscription_id=\"${google_pubsub_subscription.dead_letter.name}\" AND metric.type=\"pubsub.googleapis.com/subscription/num_undelivered_messages\""
                    aggregation = { alignmentPeriod = "300s", perSeriesAligner = "ALIGN_MAX" }
                  }
                }
              }]
            }
          }
        }],
      )
    }
  })

  depends_on = [google_project_service.apis, google_logging_metric.counter, google_logging_metric.event_outcomes]
}
