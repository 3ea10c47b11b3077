"""Cloud Function (gen2, Pub/Sub trigger): a VM event or an operator message → reconcile that VM."""

import functions_framework

from meshjoin.entrypoints import handle_vm_event


@functions_framework.cloud_event
def on_vm_event(cloud_event):
    handle_vm_event(cloud_event)
