"""ComputeAdapter reads through the Compute REST API as plain JSON (issue 16: no proto conversions of whole
instances on the hot path; writes go through google-cloud-compute's client, tested against the sandbox).

A recording session stands in for `requests`: the adapter must send the API's own paths and bodies, read its
answers, and turn its errors into what the reconcile expects (404 → no VM). No I/O.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

from meshjoin.adapters.compute import ComputeAdapter
from meshjoin.model import VmKey

from .test_hostile_input import SETTINGS

KEY = VmKey(SETTINGS.project, "us-central1-a", "vm-1")
INSTANCE = {"name": "vm-1", "id": "4242", "status": "RUNNING", "labels": {"mesh": "join"},
            "metadata": {"fingerprint": "fp-1", "items": [{"key": "a", "value": "1"}, {"key": "b", "value": "2"}]},
            "networkInterfaces": [{"networkIP": "10.128.0.7"}], "serviceAccounts": [{"email": "vm-1@p.iam"}]}


class Answer:
    def __init__(self, status: int, body: dict):
        self.status_code, self._body = status, body
        self.text = json.dumps(body)
        self.content = self.text.encode()
        self.headers = {"content-type": "application/json"}
        self.request = SimpleNamespace(method="POST", url="https://compute.googleapis.com/x")
        self.reason = "x"

    def json(self):
        return self._body


class Session:
    def __init__(self, answers: list[Answer]):
        self.answers, self.sent = answers, []

    def get(self, url, params=None, timeout=None):
        self.sent.append(("GET", url, params))
        return self.answers.pop(0)

    def post(self, url, json=None, timeout=None):
        self.sent.append(("POST", url, json))
        return self.answers.pop(0)


def adapter(*answers: Answer) -> tuple[ComputeAdapter, Session]:
    compute = ComputeAdapter(SETTINGS, credentials=None)
    compute._json_session = session = Session(list(answers))
    return compute, session


def base(key: VmKey = KEY) -> str:
    return f"https://compute.googleapis.com/compute/v1/projects/{key.project}/zones/{key.zone}"


def test_the_shared_settings_use_the_real_endpoint():
    assert ComputeAdapter(SETTINGS, credentials=None)._base_url() == "https://compute.googleapis.com"


def test_get_vm_reads_the_instance_and_a_404_is_no_vm():
    compute, session = adapter(Answer(200, INSTANCE), Answer(404, {"error": {"code": 404, "message": "gone"}}))
    vm = compute.get_vm(KEY)
    assert (vm.instance_id, vm.metadata, vm.metadata_fingerprint, vm.network_ip, vm.status) == \
        ("4242", {"a": "1", "b": "2"}, "fp-1", "10.128.0.7", "RUNNING")
    assert compute.get_vm(KEY) is None
    assert [s[:2] for s in session.sent] == [("GET", f"{base()}/instances/vm-1")] * 2


