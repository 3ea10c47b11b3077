# The two functions, built by Cloud Functions from the bundles `make package` writes
# (main.py + requirements.txt + the meshjoin package; deploy/package.py).

# Holds only build inputs; nothing here is secret.
resource "google_storage_bucket" "source" {
  name                        = "${var.project_id}-${var.name}-source"
  location                    = var.region
  uniform_bucket_level_access = true
  public_access_prevention    = "enforced"
  # Nothing but re-creatable zips lives here: `terraform destroy` must not stall on them.
  force_destroy = true

  depends_on = [google_project_service.apis]
}

data "archive_file" "source" {
  for_each = local.functions

  type        = "zip"
  source_dir  = "${local.build_dir}/${each.key}"
  output_path = "${path.module}/.build/${each.key}.zip"

  lifecycle {
    precondition {
      condition     = fileexists("${local.build_dir}/${each.key}/main.py")
      error_message = "No packaged source in ${local.build_dir}/${each.key}: run `make package` first."
    }
  }
}

resource "google_storage_bucket_object" "source" {
  for_each = local.functions

  # Named by content (the archive provider zips with fixed timestamps), so an unchanged bundle
  # keeps the same object and the function is rebuilt only when its code or pins change.
  name   = "${each.key}/${data.archive_file.source[each.key].output_sha256}.zip"
  bucket = google_storage_bucket.source.name
  source = data.archive_file.source[each.key].output_path
}

resource "google_cloudfunctions2_function" "fn" {
  for_each = local.functions

  name        = "${var.name}-${each.key}"
  location    = var.region
  description = each.value.description

  build_config {
    runtime     = "python311" # the version the repository is tested with
    entry_point = each.value.entry_point
    # null: the project's default build identity (see the variable's description).
    service_account = var.build_service_account == null ? null : "projects/${var.project_id}/serviceAccounts/${var.build_service_account}"
    source {
      storage_source {
        bucket = google_storage_bucket.source.name
        object = google_storage_bucket_object.source[each.key].name
      }
    }
  }

  # No event_trigger: the function is an HTTP endpoint that only our push subscription may call
  # (see pubsub.tf). Its @functions_framework.cloud_event decorator takes precedence over the
  # HTTP signature type Cloud Functions then sets.
  service_config {
    service_account_email            = google_service_account.functions.email
    available_memory                 = var.function_memory
    available_cpu                    = each.value.cpu
    timeout_seconds                  = each.value.timeout_seconds
    min_instance_count               = 0
    max_instance_count               = each.value.max_instances
    max_instance_request_concurrency = each.value.concurrency
    # Private clusters by IP: the functions' egress to the control plane's private endpoint.
    vpc_connector                 = var.vpc_connector
    vpc_connector_egress_settings = var.vpc_connector == null ? null : var.vpc_connector_egress
    # Pub/Sub push from the same project counts as internal traffic; nothing else can reach it.
    ingress_settings               = "ALLOW_INTERNAL_ONLY"
    all_traffic_on_latest_revision = true
    # THREADS: functions-framework's gunicorn serves this many requests at once (default 4 per
    # CPU it sees); it must match the concurrency Cloud Run sends.
    # MESHJOIN_QUOTA_SHARE of the events function: see local.events_quota_share (main.tf).
    environment_variables = merge(local.function_env, { THREADS = tostring(each.value.concurrency) },
    each.key == "events" ? { MESHJOIN_QUOTA_SHARE = tostring(local.events_quota_share) } : {})
  }

  lifecycle {
    # Decision 2 of issue 16: the events function's instances together stay inside 1 - quota_reserve
    # of every per-minute quota (each paces itself to MESHJOIN_QUOTA_SHARE).
    precondition {
      condition     = each.key != "events" || var.events_max_instances * local.events_quota_share <= 1 - var.quota_reserve + 0.0001
      error_message = "events_max_instances x quota_share = ${var.events_max_instances} x ${local.events_quota_share} would take more than 1 - quota_reserve (${1 - var.quota_reserve}) of every API quota; lower quota_share (or leave it unset: it is then derived) or events_max_instances."
    }
  }

  # The functions act on their first event: their permissions must already be in place.
  depends_on = [
    google_project_service.apis,
    google_project_iam_member.functions_compute,
    google_project_iam_member.functions_secret_inventory,
    google_project_iam_member.functions_vm_secrets,
    google_secret_manager_secret_iam_member.ca_reader,
    google_project_iam_member.functions_cluster_viewer,
    google_pubsub_topic_iam_member.functions_publish_work,
  ]
}

# Only the push identity may invoke the functions (gen2 functions are Cloud Run services).
resource "google_cloud_run_v2_service_iam_member" "push_invoker" {
  for_each = local.functions

  project  = var.project_id
  location = var.region
  name     = google_cloudfunctions2_function.fn[each.key].service_config[0].service
  role     = "roles/run.invoker"
  member   = "serviceAccount:${google_service_account.push.email}"
}
