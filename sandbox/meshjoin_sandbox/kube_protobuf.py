"""Decoding the Kubernetes protobuf wire format for the few built-in kinds kubectl sends that way.

kubectl's typed clients (`kubectl create namespace`, `kubectl auth can-i`, `kubectl create
rolebinding`, ...) send built-in kinds as `application/vnd.kubernetes.protobuf`, and client-go does
not fall back to JSON on 415. The body is the apimachinery envelope: the 4 magic bytes `k8s\\x00`,
then a `runtime.Unknown` message (1: typeMeta{1: apiVersion, 2: kind}, 2: raw, 3: contentEncoding,
4: contentType) whose `raw` is the object's own message (k8s.io/apimachinery/pkg/runtime/types_proto.go).

No maintained Python library ships the generated messages of k8s.io/api, so the handful of
messages needed are described here by field number (from k8s.io/api's generated.proto files) and
decoded with a small wire-format reader. Fields not described are skipped, as a proto2 reader
skips unknown fields. Answers still go out as JSON, which kubectl also accepts.
"""

from __future__ import annotations

from typing import Any

from .web import ApiError

PROTOBUF_MEDIA_TYPE = "application/vnd.kubernetes.protobuf"
MAGIC = b"k8s\x00"

# A message spec maps field number -> (json name, type); a type is "string", "bytes", "int",
# "bool", a nested spec (dict), ("repeated", type) or "map" (map<string, string>).
STRING, BYTES, INT, BOOL, MAP = "string", "bytes", "int", "bool", "map"


def repeated(kind: Any) -> tuple:
    return ("repeated", kind)


OBJECT_META = {
    1: ("name", STRING), 2: ("generateName", STRING), 3: ("namespace", STRING), 5: ("uid", STRING),
    6: ("resourceVersion", STRING), 7: ("generation", INT), 11: ("labels", MAP), 12: ("annotations", MAP),
    14: ("finalizers", repeated(STRING)),
}
NAMESPACE = {1: ("metadata", OBJECT_META), 2: ("spec", {1: ("finalizers", repeated(STRING))})}
SERVICE_ACCOUNT = {1: ("metadata", OBJECT_META), 4: ("automountServiceAccountToken", BOOL)}
POLICY_RULE = {
    1: ("verbs", repeated(STRING)), 2: ("apiGroups", repeated(STRING)), 3: ("resources", repeated(STRING)),
    4: ("resourceNames", repeated(STRING)), 5: ("nonResourceURLs", repeated(STRING)),
}
ROLE = {1: ("metadata", OBJECT_META), 2: ("rules", repeated(POLICY_RULE))}
SUBJECT = {1: ("kind", STRING), 2: ("apiGroup", STRING), 3: ("name", STRING), 4: ("namespace", STRING)}
ROLE_REF = {1: ("apiGroup", STRING), 2: ("kind", STRING), 3: ("name", STRING)}
BINDING = {1: ("metadata", OBJECT_META), 2: ("subjects", repeated(SUBJECT)), 3: ("roleRef", ROLE_REF)}
RESOURCE_ATTRIBUTES = {
    1: ("namespace", STRING), 2: ("verb", STRING), 3: ("group", STRING), 4: ("version", STRING),
    5: ("resource", STRING), 6: ("subresource", STRING), 7: ("name", STRING),
}
NON_RESOURCE_ATTRIBUTES = {1: ("path", STRING), 2: ("verb", STRING)}
SELF_SUBJECT_ACCESS_REVIEW = {
    1: ("metadata", OBJECT_META),
    2: ("spec", {1: ("resourceAttributes", RESOURCE_ATTRIBUTES), 2: ("nonResourceAttributes", NON_RESOURCE_ATTRIBUTES)}),
}

# The kinds accepted in protobuf, by (apiVersion, kind) as the envelope's typeMeta names them.
MESSAGES: dict[tuple[str, str], dict] = {
    ("v1", "Namespace"): NAMESPACE,
    ("v1", "ServiceAccount"): SERVICE_ACCOUNT,
    ("rbac.authorization.k8s.io/v1", "Role"): ROLE,
    ("rbac.authorization.k8s.io/v1", "ClusterRole"): ROLE,
    ("rbac.authorization.k8s.io/v1", "RoleBinding"): BINDING,
    ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding"): BINDING,
    ("authorization.k8s.io/v1", "SelfSubjectAccessReview"): SELF_SUBJECT_ACCESS_REVIEW,
}
UNKNOWN = {1: ("typeMeta", {1: ("apiVersion", STRING), 2: ("kind", STRING)}), 2: ("raw", BYTES),
           3: ("contentEncoding", STRING), 4: ("contentType", STRING)}


class ProtobufError(ValueError):
    """Bytes that are not a well-formed protobuf message."""


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(data):
            raise ProtobufError("truncated varint")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ProtobufError("varint too long")


def _fields(data: bytes):
    """(field number, wire type, value) of each field: ints for varints, bytes for length-delimited."""
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(data, pos)
        elif wire == 2:
            size, pos = _varint(data, pos)
            if pos + size > len(data):
                raise ProtobufError("truncated length-delimited field")
            value, pos = data[pos:pos + size], pos + size
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            value, pos = data[pos:pos + size], pos + size
        else:
            raise ProtobufError(f"unsupported wire type {wire}")
        yield number, wire, value


def _scalar(kind: Any, wire: int, value: Any) -> Any:
    if isinstance(kind, dict):
        return decode_message(value, kind)
    if kind == STRING:
        try:
            return value.decode("utf-8")
        except (AttributeError, UnicodeDecodeError) as exc:
            raise ProtobufError("a string field is not UTF-8") from exc
    if kind == BYTES:
        return bytes(value)
    if kind == INT:
        return value if value < 1 << 63 else value - (1 << 64)
    if kind == BOOL:
        return bool(value)
    raise ProtobufError(f"unknown field type {kind!r}")


def decode_message(data: bytes, spec: dict) -> dict:
    out: dict[str, Any] = {}
    for number, wire, value in _fields(data):
        if number not in spec:
            continue  # a field the sandbox does not read, skipped as proto2 readers skip unknown ones
        name, kind = spec[number]
        if kind == MAP:
            entry = decode_message(value, {1: ("key", STRING), 2: ("value", STRING)})
            out.setdefault(name, {})[entry.get("key", "")] = entry.get("value", "")
        elif isinstance(kind, tuple):
            out.setdefault(name, []).append(_scalar(kind[1], wire, value))
        else:
            out[name] = _scalar(kind, wire, value)
    return out


def decode_object(body: bytes) -> dict:
    """A protobuf request body as the JSON object it stands for; 415 for kinds the sandbox cannot read."""
    if not body.startswith(MAGIC):
        raise ApiError(400, "the protobuf body does not start with the Kubernetes magic bytes", "BadRequest")
    try:
        envelope = decode_message(body[len(MAGIC):], UNKNOWN)
        type_meta = envelope.get("typeMeta", {})
        api_version, kind = type_meta.get("apiVersion", ""), type_meta.get("kind", "")
        spec = MESSAGES.get((api_version, kind))
        if spec is None:
            raise ApiError(415, f"the sandbox API server reads {api_version} {kind} only as JSON or YAML: "
                                "accepted media types include: application/json, application/yaml",
                           "UnsupportedMediaType")
        if envelope.get("contentEncoding"):
            raise ApiError(415, f"content encoding {envelope['contentEncoding']!r} is not supported",
                           "UnsupportedMediaType")
        obj = decode_message(envelope.get("raw", b""), spec)
    except ProtobufError as exc:
        raise ApiError(400, f"the protobuf body cannot be decoded: {exc}", "BadRequest") from exc
    return {"apiVersion": api_version, "kind": kind, **obj}


# --- encoding, for tests that speak protobuf as kubectl does -------------------------------------


def _encode_varint(value: int) -> bytes:
    value &= (1 << 64) - 1
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _encode_field(number: int, kind: Any, value: Any) -> bytes:
    if kind in (INT, BOOL):
        return _encode_varint(number << 3) + _encode_varint(int(value))
    if isinstance(kind, dict):
        payload = encode_message(value, kind)
    elif kind == STRING:
        payload = value.encode()
    else:
        payload = bytes(value)
    return _encode_varint(number << 3 | 2) + _encode_varint(len(payload)) + payload


def encode_message(obj: dict, spec: dict) -> bytes:
    out = bytearray()
    for number, (name, kind) in sorted(spec.items()):
        if name not in obj:
            continue
        value = obj[name]
        if kind == MAP:
            for key, item in value.items():
                out += _encode_field(number, {1: ("key", STRING), 2: ("value", STRING)}, {"key": key, "value": item})
        elif isinstance(kind, tuple):
            for item in value:
                out += _encode_field(number, kind[1], item)
        else:
            out += _encode_field(number, kind, value)
    return bytes(out)


def encode_object(obj: dict) -> bytes:
    """`obj` (with apiVersion and kind) in the envelope kubectl sends."""
    spec = MESSAGES[(obj["apiVersion"], obj["kind"])]
    envelope = {"typeMeta": {"apiVersion": obj["apiVersion"], "kind": obj["kind"]}, "raw": encode_message(obj, spec)}
    return MAGIC + encode_message(envelope, UNKNOWN)
