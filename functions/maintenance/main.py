"""Cloud Function (gen2, Pub/Sub trigger from Cloud Scheduler): sweep the whole fleet."""

import functions_framework

from meshjoin.entrypoints import handle_schedule


@functions_framework.cloud_event
def on_schedule(cloud_event):
    handle_schedule(cloud_event)
