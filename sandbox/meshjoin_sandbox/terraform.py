"""Read deploy/terraform the way `terraform plan` would, for the parts the sandbox enforces.

The sandbox's IAM (iam.py) and Kubernetes RBAC are *derived* from the module a deployment
applies, so a grant missing from Terraform is missing in the sandbox too (one source of truth).
python-hcl2 parses the files; it keeps every expression as source text (`${...}` or a quoted
template), so this module evaluates the subset of the HCL expression language the module uses:
literals, templates with `${...}`, lists, objects, traversals (`var.`, `local.`, `each.`,
`count.`, `data.google_project.this.number`, `path.module`, resource attributes), indexing,
`a ? b : c`, the logical, comparison and arithmetic operators, `for` expressions and a small set of
functions. Anything else fails loudly with the file and the expression, never a guess.

Resource attributes known only after apply are computed as the provider computes them for the few
resource types IAM and RBAC refer to (`COMPUTED`); any other such reference is an error.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable


class TerraformError(Exception):
    """An expression the sandbox cannot (or will not) evaluate, with where it is."""


class TfSet(tuple):
    """A Terraform set (`toset`): unique, ordered as Terraform orders strings (lexically)."""


_NO_DEFAULT = object()


# --- the expression parser (source text → nested tuples) ----------------------------------------

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")
_NUMBER = re.compile(r"[0-9]+(\.[0-9]+)?([eE][+-]?[0-9]+)?")
_BINARY = [("||",), ("&&",), ("==", "!="), ("<=", ">=", "<", ">"), ("+", "-"), ("*", "/", "%")]
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", '"': '"', "\\": "\\"}


class _Parser:
    """Recursive descent over one expression's source; produces a small AST of tuples."""

    def __init__(self, text: str):
        self.text = text
        self.pos = 0

    def fail(self, why: str):
        raise TerraformError(f"{why} at offset {self.pos} of `{self.text}`")

    def ws(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos] in " \t\r\n":
            self.pos += 1

    def peek(self, token: str) -> bool:
        self.ws()
        return self.text.startswith(token, self.pos)

    def take(self, token: str) -> bool:
        if not self.peek(token):
            return False
        # A one-character operator must not swallow a two-character one: `=` in `==`/`=>`,
        # `!` in `!=`, `<` in `<=`, `>` in `>=`.
        after = self.text[self.pos + len(token):self.pos + len(token) + 1]
        if token in ("=", "!", "<", ">") and (after == "=" or (token == "=" and after == ">")):
            return False
        self.pos += len(token)
        return True

    def expect(self, token: str) -> None:
        if not self.take(token):
            self.fail(f"expected {token!r}")

    def keyword(self, word: str) -> bool:
        self.ws()
        match = _IDENT.match(self.text, self.pos)
        if match and match.group() == word:
            self.pos = match.end()
            return True
        return False

    def parse(self):
        node = self.expression()
        self.ws()
        if self.pos != len(self.text):
            self.fail("unexpected trailing text")
        return node

    def expression(self):
        cond = self.binary(0)
        if self.take("?"):
            yes = self.expression()
            self.expect(":")
            no = self.expression()
            return ("cond", cond, yes, no)
        return cond

    def binary(self, level: int):
        if level == len(_BINARY):
            return self.unary()
        left = self.binary(level + 1)
        while True:
            for op in _BINARY[level]:
                if self.take(op):
                    left = ("op", op, left, self.binary(level + 1))
                    break
            else:
                return left

    def unary(self):
        if self.take("!"):
            return ("not", self.unary())
        if self.take("-"):
            return ("neg", self.unary())
        return self.postfix(self.primary())

    def postfix(self, node):
        while True:
            self.ws()
            if self.text.startswith("[*]", self.pos) or self.text.startswith(".*", self.pos):
                self.fail("splat expressions are not supported")
            if self.take("."):
                self.ws()
                number = _NUMBER.match(self.text, self.pos)
                if number:  # legacy index syntax a.0
                    self.pos = number.end()
                    node = ("index", node, ("lit", int(number.group())))
                    continue
                match = _IDENT.match(self.text, self.pos)
                if not match:
                    self.fail("expected an attribute name")
                self.pos = match.end()
                node = ("attr", node, match.group())
            elif self.peek("[") and not self.peek("[for "):
                self.take("[")
                key = self.expression()
                self.expect("]")
                node = ("index", node, key)
            else:
                return node

    def primary(self):
        self.ws()
        if self.pos >= len(self.text):
            self.fail("unexpected end")
        char = self.text[self.pos]
        if char == '"':
            return self.template()
        if self.text.startswith("<<", self.pos):
            self.fail("heredocs are not supported")
        number = _NUMBER.match(self.text, self.pos)
        if number:
            self.pos = number.end()
            text = number.group()
            return ("lit", float(text) if any(c in text for c in ".eE") else int(text))
        if self.take("("):
            inner = self.expression()
            self.expect(")")
            return inner
        if self.take("["):
            if self.keyword("for"):
                return self.for_expr("]")
            items = []
            while not self.take("]"):
                items.append(self.expression())
                if not self.take(","):
                    self.expect("]")
                    break
            return ("list", items)
        if self.take("{"):
            if self.keyword("for"):
                return self.for_expr("}")
            items = []
            while not self.take("}"):
                key = self.object_key()
                if not (self.take("=") or self.take(":")):
                    self.fail("expected '=' or ':' in an object")
                items.append((key, self.expression()))
                self.take(",")
            return ("object", items)
        match = _IDENT.match(self.text, self.pos)
        if not match:
            self.fail(f"unexpected {char!r}")
        self.pos = match.end()
        name = match.group()
        if name in ("true", "false"):
            return ("lit", name == "true")
        if name == "null":
            return ("lit", None)
        if self.peek("("):
            self.take("(")
            args = []
            while not self.take(")"):
                args.append(self.expression())
                if self.take("..."):
                    self.fail("argument expansion (...) is not supported")
                if not self.take(","):
                    self.expect(")")
                    break
            return ("call", name, args)
        return ("name", name)

    def object_key(self):
        self.ws()
        match = _IDENT.match(self.text, self.pos)
        if match and not self.text.startswith("(", match.end()):
            rest = self.text[match.end():].lstrip()
            if rest.startswith("=") and not rest.startswith("==") or rest.startswith(":"):
                self.pos = match.end()
                return ("lit", match.group())  # a bare word is a literal key
        return self.binary(0)

    def for_expr(self, close: str):
        names = [self.identifier()]
        if self.take(","):
            names.append(self.identifier())
        if not self.keyword("in"):
            self.fail("expected 'in'")
        collection = self.expression()
        self.expect(":")
        key = None
        value = self.expression()
        if close == "}":
            self.expect("=>")
            key, value = value, self.expression()
            if self.take("..."):
                self.fail("grouping (...) in for expressions is not supported")
        condition = self.expression() if self.keyword("if") else None
        self.expect(close)
        return ("for", close, names, collection, key, value, condition)

    def identifier(self) -> str:
        self.ws()
        match = _IDENT.match(self.text, self.pos)
        if not match:
            self.fail("expected a name")
        self.pos = match.end()
        return match.group()

    def template(self):
        """A quoted template: literal parts and `${expr}` interpolations (no %{ } directives)."""
        self.pos += 1
        parts: list = []
        literal = []
        while True:
            if self.pos >= len(self.text):
                self.fail("unterminated string")
            char = self.text[self.pos]
            if char == '"':
                self.pos += 1
                break
            if char == "\\":
                escaped = self.text[self.pos + 1:self.pos + 2]
                if escaped not in _ESCAPES:
                    self.fail(f"unsupported escape \\{escaped}")
                literal.append(_ESCAPES[escaped])
                self.pos += 2
            elif self.text.startswith("$${", self.pos) or self.text.startswith("%%{", self.pos):
                literal.append(self.text[self.pos + 1:self.pos + 3])
                self.pos += 3
            elif self.text.startswith("%{", self.pos):
                self.fail("template directives (%{...}) are not supported")
            elif self.text.startswith("${", self.pos):
                if literal:
                    parts.append(("lit", "".join(literal)))
                    literal = []
                self.pos += 2
                parts.append(self.expression())
                self.expect("}")
            else:
                literal.append(char)
                self.pos += 1
        if literal or not parts:
            parts.append(("lit", "".join(literal)))
        return ("template", parts) if len(parts) != 1 or parts[0][0] != "lit" else parts[0]


def parse_expression(text: str):
    return _Parser(text).parse()


# --- functions ----------------------------------------------------------------------------------


def _toset(values) -> TfSet:
    items = list(values.values()) if isinstance(values, dict) else list(values)
    unique = sorted(set(items), key=lambda v: (str(type(v)), v))
    return TfSet(unique)


def _tostring(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float, str)):
        return str(value)
    raise TerraformError(f"tostring of {type(value).__name__}")


def _coalesce(*values):
    for value in values:
        if value is not None and value != "":
            return value
    raise TerraformError("coalesce: no non-null, non-empty argument")


def _merge(*maps):
    merged: dict = {}
    for item in maps:
        merged.update(item)
    return merged


def _concat(*lists):
    out: list = []
    for item in lists:
        if not isinstance(item, (list, tuple)):
            raise TerraformError("concat takes lists")
        out.extend(item)
    return out


def _flatten(values) -> list:
    """Terraform's flatten(): nested lists (and tuples) into one list, depth first."""
    if not isinstance(values, (list, tuple)):
        raise TerraformError(f"flatten takes a list, not {type(values).__name__}")
    out: list = []
    for value in values:
        out.extend(_flatten(value) if isinstance(value, (list, tuple)) else [value])
    return out


def _jsonencode(value) -> str:
    """Terraform's jsonencode(): object keys sorted (cty objects and maps are), compact, UTF-8 kept, and the
    characters Go's encoding/json escapes (`<`, `>`, `&`, U+2028, U+2029) escaped."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    for char, escaped in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"), ("\u2028", "\\u2028"),
                          ("\u2029", "\\u2029")):
        text = text.replace(char, escaped)
    return text


def _distinct(values) -> list:
    """Terraform's distinct(): a list without its repeats, each first occurrence kept in order. It takes a
    list; a set converts to one in its own order, a map does not. Elements may be objects, compared by value."""
    if not isinstance(values, (list, tuple)):
        raise TerraformError(f"distinct takes a list, not {type(values).__name__}")
    out: list = []
    seen: set[str] = set()
    for value in values:
        identity = json.dumps(value, sort_keys=True)
        if identity not in seen:
            seen.add(identity)
            out.append(value)
    return out


FUNCTIONS: dict[str, Callable[..., Any]] = {
    "toset": _toset,
    "tolist": lambda values: list(values),
    "distinct": _distinct,
    "contains": lambda collection, value: value in collection,
    "replace": lambda text, old, new: text.replace(old, new) if not (old.startswith("/") and old.endswith("/") and len(old) > 1)
    else re.sub(old[1:-1], re.sub(r"\$\{?(\d+)\}?", r"\\\1", new), text),
    "concat": _concat,
    "split": lambda sep, text: text.split(sep),
    "join": lambda sep, items: sep.join(items),
    "merge": _merge,
    "keys": lambda mapping: sorted(mapping),
    "values": lambda mapping: [mapping[k] for k in sorted(mapping)],
    "length": lambda value: len(value),
    "lower": str.lower,
    "upper": str.upper,
    "alltrue": lambda items: all(items),
    "anytrue": lambda items: any(items),
    "startswith": lambda text, prefix: text.startswith(prefix),
    "endswith": lambda text, suffix: text.endswith(suffix),
    "tostring": _tostring,
    "coalesce": _coalesce,
    "jsonencode": _jsonencode,
    "flatten": _flatten,
    "substr": lambda text, offset, length: _substr(text, offset, length),
}


def _substr(text: str, offset: int, length: int) -> str:
    """Terraform's substr(): `length` -1 means to the end; a negative offset counts from the end."""
    if not isinstance(text, str) or not all(isinstance(n, int) and not isinstance(n, bool) for n in (offset, length)):
        raise TerraformError("substr takes a string and two whole numbers")
    start = offset if offset >= 0 else max(len(text) + offset, 0)
    return text[start:] if length == -1 else text[start:start + length]


def _repository_root(directory: Path) -> Path:
    """The checkout holding the module (the nearest ancestor with .git), else the module itself."""
    for candidate in (directory, *directory.parents):
        if (candidate / ".git").exists():
            return candidate
    return directory

# Functions that read files: evaluated by the model, which knows the module's directory.
FILE_FUNCTIONS = ("file", "filesha256")


# --- the module ---------------------------------------------------------------------------------


def _unquote(label: str) -> str:
    return label[1:-1] if len(label) >= 2 and label[0] == label[-1] == '"' else label


@dataclass
class _Block:
    kind: str  # resource, data, variable, locals, provider
    rtype: str
    name: str
    body: dict
    file: str


class _Scope(dict):
    """Names visible to an expression: var, local, each, count, iterators of for/dynamic."""


@dataclass
class _Instance:
    """One instance of a resource: its inputs evaluate on demand, computed attributes by table."""

    model: "TerraformModel"
    block: _Block
    scope: _Scope
    cache: dict = field(default_factory=dict)

    def get(self, attr: str):
        if attr in self.cache:
            return self.cache[attr]
        body = self.block.body
        if attr in body:
            value = self.model._value(body[attr], self.scope, self.block, attr)
        else:
            computed = COMPUTED.get(self.block.rtype, {}).get(attr)
            if computed is None:
                raise TerraformError(
                    f"{self.block.file}: {self.block.rtype}.{self.block.name}.{attr} is known only after "
                    "apply and the sandbox does not compute it")
            value = computed(self, self.model)
        self.cache[attr] = value
        return value

    def project(self) -> str:
        return self.get("project") if "project" in self.block.body else self.model.provider_project()


def _sa_email(inst: _Instance, model: "TerraformModel") -> str:
    return f"{inst.get('account_id')}@{inst.project()}.iam.gserviceaccount.com"


# Attributes providers compute, for the resources IAM and RBAC refer to (provider docs:
# google_service_account email/name/member, google_project_iam_custom_role id/name
# "projects/P/roles/ID", google_secret_manager_secret id "projects/P/secrets/ID" and name
# "projects/NUMBER/secrets/ID").
COMPUTED: dict[str, dict[str, Callable[[_Instance, "TerraformModel"], Any]]] = {
    "google_service_account": {
        "email": _sa_email,
        "member": lambda i, m: f"serviceAccount:{_sa_email(i, m)}",
        "name": lambda i, m: f"projects/{i.project()}/serviceAccounts/{_sa_email(i, m)}",
        "id": lambda i, m: f"projects/{i.project()}/serviceAccounts/{_sa_email(i, m)}",
    },
    "google_project_iam_custom_role": {
        "id": lambda i, m: f"projects/{i.project()}/roles/{i.get('role_id')}",
        "name": lambda i, m: f"projects/{i.project()}/roles/{i.get('role_id')}",
    },
    # A Google-managed service agent: service-NUMBER@gcp-sa-SERVICE.iam.gserviceaccount.com
    # (pubsub.googleapis.com -> gcp-sa-pubsub), as the provider reports it in `email`.
    "google_project_service_identity": {
        "email": lambda i, m: (f"service-{m.project_number_or_fail()}@gcp-sa-"
                               f"{i.get('service').split('.')[0]}.iam.gserviceaccount.com"),
    },
    "google_pubsub_topic": {
        "id": lambda i, m: f"projects/{i.project()}/topics/{i.get('name')}",
        "name": lambda i, m: i.get("name"),
    },
    "google_secret_manager_secret": {
        "id": lambda i, m: f"projects/{i.project()}/secrets/{i.get('secret_id')}",
        "name": lambda i, m: f"projects/{m.project_number_or_fail()}/secrets/{i.get('secret_id')}",
    },
}

# Meta-arguments and blocks of a resource that are not its configuration.
_META = {"for_each", "count", "depends_on", "lifecycle", "provider", "provisioner", "connection"}


class _Locals(Mapping):
    """`locals`, each evaluated when first read (a local that cannot be evaluated fails only then)."""

    def __init__(self, model: "TerraformModel"):
        self._model = model

    def __getitem__(self, name: str):
        return self._model.local(name)

    def __iter__(self):
        return iter(self._model._local_blocks)

    def __len__(self):
        return len(self._model._local_blocks)


class TerraformModel:
    """The module's blocks with variables bound; locals and resources evaluate on demand."""

    def __init__(self, directory: Path, variables: dict, project_number: str | None = None):
        from hcl2 import SerializationOptions

        self.directory = Path(directory)
        self.project_number = project_number
        options = SerializationOptions(with_comments=False, explicit_blocks=False, preserve_heredocs=False,
                                       strip_string_quotes=False)
        self._blocks: list[_Block] = []
        self._local_blocks: dict[str, tuple[Any, _Block]] = {}
        files = sorted(self.directory.glob("*.tf"))
        if not files:
            raise TerraformError(f"no *.tf files in {self.directory}")
        for path in files:
            parsed = _parse(path, options)
            for kind, items in parsed.items():
                for item in items:
                    self._add(kind, item, path.name)
        self.variables = self._bind_variables(dict(variables))
        self._local_cache: dict[str, Any] = {}
        self._evaluating: set[str] = set()
        self.locals: Mapping[str, Any] = _Locals(self)

    def _add(self, kind: str, item: dict, file: str) -> None:
        if kind == "locals":
            for name, value in item.items():
                self._local_blocks[name] = (value, _Block("locals", "", name, item, file))
        elif kind in ("resource", "data"):
            for rtype, named in item.items():
                for name, body in named.items():
                    self._blocks.append(_Block(kind, _unquote(rtype), _unquote(name), body, file))
        elif kind in ("variable", "provider", "output"):
            for name, body in item.items():
                self._blocks.append(_Block(kind, "", _unquote(name), body, file))

    def _bind_variables(self, given: dict) -> dict:
        declared = {b.name: b for b in self._blocks if b.kind == "variable"}
        unknown = set(given) - set(declared)
        if unknown:
            raise TerraformError(f"variables not declared by the module: {', '.join(sorted(unknown))}")
        bound = {}
        for name, block in declared.items():
            if name in given:
                bound[name] = given[name]
            elif "default" in block.body:
                bound[name] = self._value(block.body["default"], _Scope(), block, "default")
            else:
                bound[name] = _NO_DEFAULT
        return bound

    # ---- public --------------------------------------------------------------------------------

    def local(self, name: str):
        if name in self._local_cache:
            return self._local_cache[name]
        if name not in self._local_blocks:
            raise TerraformError(f"no local value {name!r}")
        if name in self._evaluating:
            raise TerraformError(f"local.{name} refers to itself")
        value, block = self._local_blocks[name]
        self._evaluating.add(name)
        try:
            result = self._value(value, _Scope(), block, f"local.{name}")
        finally:
            self._evaluating.discard(name)
        self._local_cache[name] = result
        return result

    def resources(self, rtype: str) -> list[dict]:
        """Every instance of every resource of `rtype`, configuration evaluated.

        Each dict holds the evaluated arguments and blocks (blocks as lists of dicts, `dynamic`
        blocks expanded), plus `_name` (the resource name), `_key` (the for_each key or count index,
        None for a single instance) and `_address` (e.g. `google_x.y["k"]`).
        """
        out = []
        for block in self._blocks:
            if block.kind == "resource" and block.rtype == rtype:
                for key, instance in self._instances(block):
                    body = {}
                    for attr, raw in block.body.items():
                        if attr in _META:
                            continue
                        if attr == "dynamic":
                            for name, expanded in self._dynamic(raw, instance.scope, block).items():
                                body.setdefault(name, []).extend(expanded)
                            continue
                        body[attr] = instance.get(attr)
                    self._check_preconditions(block, instance.scope)
                    address = f"{rtype}.{block.name}" + ("" if key is None else f"[{json.dumps(key)}]")
                    out.append({**body, "_name": block.name, "_key": key, "_address": address})
        return out

    def provider_project(self) -> str:
        for block in self._blocks:
            if block.kind == "provider" and block.name == "google" and "project" in block.body:
                return self._value(block.body["project"], _Scope(), block, "project")
        raise TerraformError("no `provider \"google\" { project = ... }` to take the default project from")

    def project_number_or_fail(self) -> str:
        if self.project_number is None:
            raise TerraformError("data.google_project.this.number needs the project number (load_terraform(..., project_number=))")
        return self.project_number

    # ---- internals -----------------------------------------------------------------------------

    def _instances(self, block: _Block) -> list[tuple[Any, _Instance]]:
        where = f"{block.rtype}.{block.name}"
        if "for_each" in block.body:
            collection = self._value(block.body["for_each"], _Scope(), block, "for_each")
            if isinstance(collection, dict):
                pairs = list(collection.items())
            elif isinstance(collection, TfSet):
                pairs = [(value, value) for value in collection]
            else:
                raise TerraformError(f"{block.file}: {where}: for_each needs a map or a set (use toset), got "
                                     f"{type(collection).__name__}")
            return [(k, _Instance(self, block, _Scope(each={"key": k, "value": v}))) for k, v in pairs]
        if "count" in block.body:
            count = self._value(block.body["count"], _Scope(), block, "count")
            if not isinstance(count, int) or isinstance(count, bool) or count < 0:
                raise TerraformError(f"{block.file}: {where}: count must be a whole number, got {count!r}")
            return [(i, _Instance(self, block, _Scope(count={"index": i}))) for i in range(count)]
        return [(None, _Instance(self, block, _Scope()))]

    def _dynamic(self, raw: list, scope: _Scope, block: _Block) -> dict[str, list]:
        expanded: dict[str, list] = {}
        for item in raw:
            for label, spec in item.items():
                name = _unquote(label)
                iterator = _unquote(spec.get("iterator", name)) if isinstance(spec.get("iterator"), str) else name
                collection = self._value(spec["for_each"], scope, block, f"dynamic {name} for_each")
                pairs = collection.items() if isinstance(collection, dict) else enumerate(collection)
                for key, value in pairs:
                    inner = _Scope({**scope, iterator: {"key": key, "value": value}})
                    for content in spec.get("content", [{}]):
                        expanded.setdefault(name, []).append(self._value(content, inner, block, f"dynamic {name}"))
        return expanded

    def _check_preconditions(self, block: _Block, scope: _Scope) -> None:
        for lifecycle in block.body.get("lifecycle", []):
            for pre in lifecycle.get("precondition", []):
                if not self._value(pre["condition"], scope, block, "precondition"):
                    message = self._value(pre.get("error_message", '"precondition failed"'), scope, block, "error_message")
                    raise TerraformError(f"{block.file}: {block.rtype}.{block.name}: precondition failed: {message}")

    def _value(self, raw, scope: _Scope, block: _Block, where: str):
        """Evaluate one value as python-hcl2 renders it (expression text, or lists/dicts of them)."""
        if isinstance(raw, list):
            return [self._value(item, scope, block, where) for item in raw]
        if isinstance(raw, dict):
            return {self._key(k, scope, block, where): self._value(v, scope, block, where) for k, v in raw.items()}
        if not isinstance(raw, str):
            return raw
        text = raw[2:-1] if raw.startswith("${") and raw.endswith("}") and _single_interpolation(raw) else raw
        try:
            return self._eval(parse_expression(text), scope)
        except TerraformError as exc:
            label = f"{block.rtype}.{block.name}" if block.rtype else block.name
            if str(exc).startswith(block.file + ":"):
                raise
            raise TerraformError(f"{block.file}: {label}: {where}: cannot evaluate `{raw}`: {exc}") from None

    def _key(self, key: str, scope: _Scope, block: _Block, where: str):
        if key.startswith('"') or key.startswith("${"):
            return self._value(key, scope, block, where)
        return key

    def _eval(self, node, scope: _Scope):
        kind = node[0]
        if kind == "lit":
            return node[1]
        if kind == "template":
            return "".join(_tostring(self._eval(part, scope)) for part in node[1])
        if kind == "list":
            return [self._eval(item, scope) for item in node[1]]
        if kind == "object":
            return {_tostring(self._eval(k, scope)): self._eval(v, scope) for k, v in node[1]}
        if kind == "name":
            return self._root(node[1], scope)
        if kind == "attr":
            return self._get(self._eval(node[1], scope), node[2])
        if kind == "index":
            return self._get(self._eval(node[1], scope), self._eval(node[2], scope))
        if kind == "cond":
            return self._eval(node[2] if self._truth(self._eval(node[1], scope)) else node[3], scope)
        if kind == "not":
            return not self._truth(self._eval(node[1], scope))
        if kind == "neg":
            return -self._eval(node[1], scope)
        if kind == "op":
            return self._operate(node[1], node[2], node[3], scope)
        if kind == "call" and node[1] in FILE_FUNCTIONS:
            return self._file_function(node[1], [self._eval(arg, scope) for arg in node[2]])
        if kind == "call":
            function = FUNCTIONS.get(node[1])
            if function is None:
                raise TerraformError(f"function {node[1]}() is not supported by the sandbox's evaluator")
            args = [self._eval(arg, scope) for arg in node[2]]
            try:
                return function(*args)
            except TerraformError:
                raise
            except Exception as exc:
                raise TerraformError(f"{node[1]}(): {exc}") from exc
        if kind == "for":
            return self._for(node, scope)
        raise TerraformError(f"unknown expression node {kind}")

    def _file_function(self, name: str, args: list):
        """file() and filesha256(): a path relative to the module (Terraform resolves it against the working
        directory, which is the root module's), read as UTF-8. Only files of the module's own checkout: a
        sandbox world must not depend on anything beside it."""
        if len(args) != 1 or not isinstance(args[0], str):
            raise TerraformError(f"{name}() takes one path")
        path = (self.directory / args[0]).resolve()
        root = _repository_root(self.directory.resolve())
        if not path.is_relative_to(root):
            raise TerraformError(f"{name}(): {args[0]} is outside the module's repository {root}")
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise TerraformError(f"{name}(): no file {args[0]}: {exc.strerror}") from None
        if name == "filesha256":
            return hashlib.sha256(data).hexdigest()
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            raise TerraformError(f"file(): {args[0]} is not UTF-8 (Terraform refuses it too)") from None

    def _for(self, node, scope: _Scope):
        _, close, names, collection_node, key_node, value_node, condition = node
        collection = self._eval(collection_node, scope)
        if isinstance(collection, dict):
            pairs = list(collection.items())
        elif isinstance(collection, TfSet):
            pairs = [(v, v) for v in collection]
        elif isinstance(collection, (list, tuple)):
            pairs = list(enumerate(collection))
        else:
            raise TerraformError(f"cannot iterate over {type(collection).__name__}")
        out_list, out_map = [], {}
        for key, value in pairs:
            inner = _Scope(scope)
            if len(names) == 2:
                inner[names[0]], inner[names[1]] = key, value
            else:
                inner[names[0]] = value
            if condition is not None and not self._truth(self._eval(condition, inner)):
                continue
            if close == "]":
                out_list.append(self._eval(value_node, inner))
            else:
                map_key = _tostring(self._eval(key_node, inner))
                if map_key in out_map:
                    raise TerraformError(f"duplicate key {map_key!r} in a for expression")
                out_map[map_key] = self._eval(value_node, inner)
        return out_list if close == "]" else out_map

    def _operate(self, op: str, left_node, right_node, scope: _Scope):
        left = self._eval(left_node, scope)
        if op == "&&":
            return self._truth(left) and self._truth(self._eval(right_node, scope))
        if op == "||":
            return self._truth(left) or self._truth(self._eval(right_node, scope))
        right = self._eval(right_node, scope)
        if op == "==":
            return left == right
        if op == "!=":
            return left != right
        try:
            return {"<": lambda: left < right, ">": lambda: left > right, "<=": lambda: left <= right,
                    ">=": lambda: left >= right, "+": lambda: left + right, "-": lambda: left - right,
                    "*": lambda: left * right, "/": lambda: left / right, "%": lambda: left % right}[op]()
        except TypeError as exc:
            raise TerraformError(f"operator {op}: {exc}") from exc

    @staticmethod
    def _truth(value) -> bool:
        if not isinstance(value, bool):
            raise TerraformError(f"a condition must be a bool, got {value!r}")
        return value

    def _root(self, name: str, scope: _Scope):
        if name in scope:
            return scope[name]
        if name == "var":
            return _Namespace("var", self._var)
        if name == "local":
            return _Namespace("local", self.local)
        if name == "path":
            return {"module": str(self.directory), "root": str(self.directory), "cwd": str(self.directory)}
        if name == "data":
            return _Namespace("data", self._data)
        if name in ("each", "count", "self"):
            raise TerraformError(f"`{name}` is not available here")
        if any(b.kind == "resource" and b.rtype == name for b in self._blocks):
            return _Namespace(name, lambda rname: self._resource_ref(name, rname))
        raise TerraformError(f"unknown name {name!r}")

    def _var(self, name: str):
        if name not in self.variables:
            raise TerraformError(f"undeclared variable var.{name}")
        value = self.variables[name]
        if value is _NO_DEFAULT:
            raise TerraformError(f"variable var.{name} has no value (add it to SandboxConfig.terraform_vars)")
        return value

    def _data(self, dtype: str):
        if dtype == "google_project":
            return _Namespace("data.google_project", lambda name: {"number": self.project_number_or_fail(),
                                                                   "project_id": self._var("project_id")})
        raise TerraformError(f"data source data.{dtype} is not evaluated by the sandbox")

    def _resource_ref(self, rtype: str, name: str):
        for block in self._blocks:
            if block.kind == "resource" and block.rtype == rtype and block.name == name:
                instances = self._instances(block)
                if "for_each" in block.body:
                    return {key: inst for key, inst in instances}
                if "count" in block.body:
                    return [inst for _, inst in instances]
                return instances[0][1]
        raise TerraformError(f"no resource {rtype}.{name}")

    def _get(self, container, key):
        if isinstance(container, _Instance):
            return container.get(key)
        if isinstance(container, _Namespace):
            return container.lookup(key)
        if isinstance(container, dict):
            if key not in container:
                raise TerraformError(f"no key {key!r} in an object with keys {sorted(container)}")
            return container[key]
        if isinstance(container, (list, tuple)) and not isinstance(container, TfSet):
            if not isinstance(key, int) or not 0 <= key < len(container):
                raise TerraformError(f"index {key!r} out of range of a list of {len(container)}")
            return container[key]
        raise TerraformError(f"cannot index {type(container).__name__} with {key!r}")


_PARSED: dict[tuple[str, int, int], dict] = {}


def _parse(path: Path, options) -> dict:
    """hcl2's parse of one file, cached by (path, mtime, size): parsing takes ~1 s, worlds are many."""
    import hcl2

    stat = path.stat()
    key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size)
    if key not in _PARSED:
        with path.open() as handle:
            try:
                _PARSED[key] = hcl2.load(handle, serialization_options=options)
            except Exception as exc:  # the parser's own errors vary by version
                raise TerraformError(f"{path.name}: cannot parse: {exc}") from exc
    return _PARSED[key]


def _single_interpolation(raw: str) -> bool:
    """`${a}` is one expression; `${a}-${b}` unquoted would not be (hcl2 never emits it, but be sure)."""
    depth = 0
    in_string = False
    i = 0
    while i < len(raw):
        char = raw[i]
        if in_string:
            if char == "\\":
                i += 2
                continue
            if char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0 and i != len(raw) - 1:
                return False
        i += 1
    return True


class _Namespace:
    """`var`, `local`, `data`, a resource type: attribute access looks the name up."""

    def __init__(self, label: str, lookup: Callable[[str], Any]):
        self.label = label
        self._lookup = lookup

    def lookup(self, key: str):
        return self._lookup(key)


def load_terraform(directory: Path | str, variables: dict, project_number: str | None = None) -> TerraformModel:
    """The module in `directory` with `variables` bound (declared defaults fill the rest).

    `project_number` answers `data.google_project.this.number` (the sandbox's project number).
    """
    return TerraformModel(Path(directory), variables, project_number)


def default_terraform_dir() -> Path:
    """deploy/terraform of this checkout (the sandbox is installed editable from it)."""
    return Path(__file__).resolve().parents[2] / "deploy" / "terraform"
