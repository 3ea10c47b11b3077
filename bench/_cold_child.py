"""Child process of the cold-start benchmark (a fresh interpreter every time).

`event VM`: load the event function with functions-framework as Cloud Functions does, deliver one
Pub/Sub push naming VM through its test client, print phase timestamps as JSON.
`imports MODULE...`: import only these modules and print the timestamp (the import floor).
"""

import time

T_START = time.time()

import base64  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402


def main(argv: list[str]) -> None:
    marks = {"start": T_START}
    if argv[0] == "imports":
        for module in argv[1:]:
            __import__(module)
        marks["done"] = time.time()
    else:
        vm, project, zone, source = argv[1], os.environ["MESHJOIN_PROJECT"], argv[2], argv[3]
        import functions_framework

        marks["framework_imported"] = time.time()
        app = functions_framework.create_app(target="on_vm_event", source=source, signature_type="cloudevent")
        marks["function_loaded"] = time.time()
        message = {"data": base64.b64encode(json.dumps({"project": project, "zone": zone, "instance": vm}).encode())
                   .decode(), "messageId": "cold-1", "publishTime": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        envelope = {"message": message, "subscription": f"projects/{project}/subscriptions/meshjoin-events-push"}
        response = app.test_client().post("/", json=envelope)
        marks["done"] = time.time()
        marks["status"] = response.status_code
        marks["modules"] = len(sys.modules)
    with open("/proc/self/status") as status:  # VmHWM: ru_maxrss would include the parent's peak
        marks["maxrss_kb"] = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
    print(json.dumps(marks))


if __name__ == "__main__":
    main(sys.argv[1:])
