#!/bin/bash
# meshjoin-startup-script
# The meshjoin VM agent. One static file for every VM: Terraform publishes it to project metadata as
# `meshjoin-agent-<first 16 hex of its SHA-256>`, and each VM's `startup-script` is a short stub that fetches that
# item, checks its full SHA-256 and runs it as root at every boot. It turns a stock Debian/Ubuntu VM into an Istio mesh workload from the bootstrap items meshjoin
# writes into instance metadata (and those every VM shares, which meshjoin's Terraform writes into project
# metadata), and keeps it one:
#   (no argument)   boot: install the watcher, lay down Istio's VM files, make this VM's key, ask meshjoin to
#                   certify it, wait (at most MESHJOIN_WAIT_SECONDS) for the certificate, start the sidecar
#   watch [--once]  the watcher (meshjoin-watch.service): converge again whenever the instance metadata changes
#                   (each converge reads the project's shared items afresh)
#                   (renewed certificates, a new key when meshjoin asks for one, leaving the mesh)
# The private key is made here, with openssl, straight into /etc/certs, and never leaves the VM: meshjoin only
# ever sees a PKCS#10 request for it (guest attribute `meshjoin/csr`) and answers with a public
# certificate (metadata item `meshjoin-cert-chain`), which is installed only if it certifies a key this VM holds.
# After every converge it reports what this VM holds through guest attributes `meshjoin/*`
# (agent-version, cert-serial, sidecar, updated): meshjoin calls the VM `joined`, and gives it mesh traffic, only
# once that report names a certificate meshjoin issued and a running sidecar. It then nudges meshjoin by
# publishing {"project","zone","instance"} to meshjoin's events topic (a failed nudge is only logged: meshjoin's
# scheduled sweep reads the report anyway).
# Each step is logged with `logger -t meshjoin` (journalctl -t meshjoin); a failure names the step and the remedy,
# and leaves the files already in place untouched. Identical for every VM: no value of any VM reaches
# this text (the metadata key names below must equal meshjoin/names.py's; a unit test checks them); per-VM values are read from metadata at run time and validated before use.
# JSON and base64 go through python3, which stock Debian/Ubuntu images ship (jq they do not).
# Overrides: MESHJOIN_ROOT (prefix of every path, for tests), GCE_METADATA_HOST, MESHJOIN_SIDECAR_URL and
# MESHJOIN_SIDECAR_SHA256 (instead of metadata), MESHJOIN_WAIT_SECONDS (longest wait for a metadata change).
set -Eeuo pipefail
umask 077 # nothing is readable by others unless a mode is given explicitly

ROOT="${MESHJOIN_ROOT:-}"
METADATA="http://${GCE_METADATA_HOST:-metadata.google.internal}/computeMetadata/v1"
WAIT_SECONDS="${MESHJOIN_WAIT_SECONDS:-300}"
CERTS="$ROOT/etc/certs"
CLUSTER_ENV="$ROOT/var/lib/istio/envoy/cluster.env"
MESH_CONFIG="$ROOT/etc/istio/config/mesh"
HOSTS="$ROOT/etc/hosts"
STATE="$ROOT/var/lib/meshjoin" # what was last applied: instance id, metadata ETag, sidecar checksum; never a key
STAGE="$STATE/stage"           # root-only: files get their content, owner and mode here, then move into place
AGENT=/usr/local/sbin/meshjoin-agent
UNIT="$ROOT/etc/systemd/system/meshjoin-watch.service"
PROXY_USER=istio-proxy
HOSTS_BEGIN="# BEGIN meshjoin (istiod; rewritten by the meshjoin agent)"
HOSTS_END="# END meshjoin"
MARKER='# meshjoin-startup-script'
KEY_CERT_CHAIN='meshjoin-cert-chain'
KEY_ROOT_CERT='meshjoin-root-cert'
KEY_KEY_ALGORITHM='meshjoin-key-algorithm'
KEY_REKEY='meshjoin-rekey'
KEY_CLUSTER_ENV='meshjoin-cluster-env'
KEY_MESH_ENV='meshjoin-mesh-env'
KEY_MESH_CONFIG='meshjoin-mesh-config'
KEY_HOSTS='meshjoin-hosts'
KEY_SIDECAR_URL='meshjoin-sidecar-url'
KEY_SIDECAR_SHA256='meshjoin-sidecar-sha256'
KEY_EVENTS_TOPIC='meshjoin-events-topic'
KEY_PUBSUB_ENDPOINT='meshjoin-pubsub-endpoint'
DEPLOYMENT_KEYS=("$KEY_MESH_ENV" "$KEY_MESH_CONFIG" "$KEY_HOSTS" "$KEY_KEY_ALGORITHM" "$KEY_SIDECAR_URL" "$KEY_SIDECAR_SHA256"
  "$KEY_EVENTS_TOPIC" "$KEY_PUBSUB_ENDPOINT") # in project metadata, unless the instance has its own
AGENT_VERSION='3'
GUEST="$METADATA/instance/guest-attributes/meshjoin"
METADATA_REMEDY="run on a GCE VM, or point GCE_METADATA_HOST at a metadata server"
REISSUE_REMEDY="an operator runs 'meshjoin join THIS_VM' (meshjoin-status says what meshjoin last did); the \
files in place are kept until then"

WORK="$(mktemp -d)" # private (umask): the access token, metadata, public keys and requests; never a private key
KEY_TMP="" # a private key being generated (inside $CERTS only): removed if the run ends before it is renamed
trap 'rm -rf "$WORK"; if [ -n "$KEY_TMP" ]; then rm -f "$KEY_TMP"; fi' EXIT
STEP="start"
CHANGED="" # files (and "sidecar", "stale-cert") the current run replaced
GUEST_STATUS="" # the metadata server's answer to the last guest-attribute write
INSTANCE_ID="" UNKNOWN_KEY="" KEY_ALGORITHM="" WANTED_KEY_ID="" # this run's facts (check_instance, ensure_key)
HAVE_CERT="" REQUESTED="" NUDGED="" RETRY="" # a usable certificate; a CSR written; nudged; something to write again

log() { # PRIORITY MESSAGE
  logger -t meshjoin -p "user.$1" -- "$2" || true
  printf 'meshjoin %s: %s\n' "$1" "$2" >&2
}

fail() { # WHAT REMEDY
  log err "$STEP failed: $1. Remedy: $2"
  exit 1
}

on_error() { # the safety net for a failure no step anticipated
  log err "$STEP failed: command at line $1 exited $2. Remedy: see the lines above (journalctl -t meshjoin)"
}
trap 'on_error "$LINENO" "$?"' ERR

py() { # COMMAND ARGS...: the JSON and base64 chores
  python3 -I - "$@" <<'PY'
import base64, json, os, sys


def die(message):
    sys.stderr.write(message + "\n")
    sys.exit(2)


def load(path, what):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as exc:
        die(f"{what} is not JSON ({exc})")


def write(path, text):
    with open(path, "w", encoding="utf-8", newline="") as f:
        f.write(text)


command, args = sys.argv[1], sys.argv[2:]
if command == "attributes":  # ANSWER DIR KEY...: each present item, exactly as stored, into DIR/KEY
    attributes = load(args[0], "the metadata server's answer")
    if not isinstance(attributes, dict):
        die("the metadata server's answer is not a JSON object")
    for key in args[2:]:
        if isinstance(attributes.get(key), str):
            write(os.path.join(args[1], key), attributes[key])
elif command == "token":  # ANSWER HEADER_FILE: in a file, so the token never shows in `ps`
    token = load(args[0], "the token answer").get("access_token")
    if not isinstance(token, str) or not token.isprintable() or " " in token:
        die("the metadata server returned no usable access_token")
    write(args[1], f"Authorization: Bearer {token}\n")
elif command == "nudge":  # PROJECT ZONE INSTANCE: a Pub/Sub publish body naming this VM, as operators send it
    message = json.dumps({"project": args[0], "zone": args[1], "instance": args[2]}).encode()
    print(json.dumps({"messages": [{"data": base64.b64encode(message).decode()}]}))
elif command == "error":  # ANSWER: the message of a Google API error body, for the log; never fails
    try:
        with open(args[0], encoding="utf-8") as f:
            print(json.load(f)["error"]["message"][:300])
    except Exception:
        print("no error message")
else:
    die(f"unknown command {command}")
PY
}

# --- files and state ----------------------------------------------------------------------------------------

# File safety. istio-proxy may plant symlinks in any directory it ever owned (the sidecar package's postinst gives
# it /etc/certs and /var/lib/istio/envoy). So the agent never changes the owner or mode of a path an unprivileged
# user could swap: a file is finished (content, owner, mode) in $STAGE, a root-only directory, and renamed into
# place (rename replaces a symlink, it never follows one); a directory is changed only while its parent is root's
# alone, and never through a symlink. $CERTS is taken back first (own_certs_dir) and stays root's: private keys
# are made, read and renamed only there, never staged elsewhere.

system_dir() { (umask 022 && mkdir -p "$1"); } # a system directory: created if missing, never re-moded

owner_ids() { # USER: UID:GID, numeric, resolved once
  printf '%s:%s' "$(id -u "$1")" "$(id -g "$1")"
}

root_only_dir() { # DIR: true when DIR is a real directory that only root can change
  [ ! -L "$1" ] && [ -d "$1" ] && [ "$(stat -c %u "$1")" = 0 ] && [ -z "$(find "$1" -maxdepth 0 -perm /022)" ]
}

ensure_dir() { # DIR MODE [OWNER]: one of ours, its mode and owner enforced
  local dir="$1" mode="$2" ids="0:0"
  if ! root_only_dir "$(dirname "$dir")"; then
    fail "$(dirname "$dir") is not a directory only root can change (a symlink, or owned by another user)" \
      "restore it: root-owned, mode 0755; then run $AGENT again"
  fi
  if [ -L "$dir" ] || { [ -e "$dir" ] && [ ! -d "$dir" ]; }; then
    log warning "$dir was a symlink or not a directory: replaced (not followed)"
    rm -f "$dir"
  fi
  (umask 077 && mkdir -p "$dir")
  if [ -n "${3:-}" ]; then ids="$(owner_ids "$3")"; fi
  # The parent is root's alone, so $dir cannot be swapped for a symlink between the check and these calls.
  chown -h "$ids" "$dir"
  chmod "$mode" "$dir"
}

install_file() { # SRC DEST MODE [OWNER]: replace DEST atomically (staged as root, renamed into place), if it differs
  local src="$1" dest="$2" mode="$3" ids="0:0" staged
  if [ -n "${4:-}" ]; then ids="$(owner_ids "$4")"; fi
  if [ ! -L "$dest" ] && [ -f "$dest" ] && [ "$(stat -c '%u:%g %a' "$dest")" = "$ids ${mode#0}" ] &&
    cmp -s "$src" "$dest"; then
    return 0 # same content, owner and mode: nothing is rewritten
  fi
  if [ "$(stat -c %d "$STAGE")" != "$(stat -c %d "$(dirname "$dest")")" ]; then
    fail "$(dirname "$dest") is on another file system than $STAGE" "keep /var/lib/meshjoin on the root file system"
  fi
  staged="$(mktemp "$STAGE/file.XXXXXX")"
  install -m "$mode" -o "${ids%:*}" -g "${ids#*:}" "$src" "$staged" # owner and mode set in one step
  mv -fT "$staged" "$dest"
  CHANGED="$CHANGED $dest"
}

get_state() { cat "$STATE/$1" 2>/dev/null || true; }

put_state() { # NAME VALUE
  if [ "$(get_state "$1")" = "$2" ]; then return 0; fi
  printf '%s\n' "$2" >"$STATE/.$1.tmp"
  mv -f "$STATE/.$1.tmp" "$STATE/$1"
}

lock() { # one converge at a time: the boot run and the watcher can overlap
  system_dir "$ROOT/var/lib"
  ensure_dir "$STATE" 0700
  ensure_dir "$STAGE" 0700
  exec 9>>"$STATE/lock"
  flock 9
}

unlock() { exec 9>&-; }

# --- the metadata server -----------------------------------------------------------------

http_get() { # URL OUT [CURL_ARGS...]: sets HTTP_STATUS ("000" when there was no answer)
  local url="$1" out="$2"
  shift 2
  HTTP_STATUS="$(curl -sS --connect-timeout 5 --max-time "$((WAIT_SECONDS + 30))" --retry 3 --retry-delay 1 \
    --retry-connrefused -o "$out" -D "$WORK/headers" -w '%{http_code}' "$@" "$url" 2>"$WORK/curl.err")" || true
  if [ -z "$HTTP_STATUS" ]; then HTTP_STATUS=000; fi
}

curl_error() { tr '\n' ' ' <"$WORK/curl.err" | head -c 300; }

md_get() { # PATH OUT REMEDY
  http_get "$METADATA/$1" "$2" -H 'Metadata-Flavor: Google'
  if [ "$HTTP_STATUS" != 200 ]; then
    fail "the metadata server answered $HTTP_STATUS for $1 $(curl_error)" "$3"
  fi
}

read_attributes() { # [QUERY]: one consistent snapshot of the instance attributes into $WORK/md; ETag in MD_ETAG
  # What every VM of the deployment shares (DEPLOYMENT_KEYS) is in project metadata (meshjoin's Terraform writes
  # it): taken from one snapshot of the project's attributes, then the instance's own item of the same key wins,
  # as GCE's own precedence for startup-script (an owner's instance item only affects the owner's VM). Only the
  # instance's ETag is watched: a project change applies at the next boot or the next time the watcher wakes.
  rm -rf "$WORK/md"
  mkdir "$WORK/md"
  md_get "instance/attributes/?recursive=true&alt=json${1:-}" "$WORK/attributes.json" "$METADATA_REMEDY"
  MD_ETAG="$(sed -n 's/^[Ee][Tt][Aa][Gg]: *//p' "$WORK/headers" | tr -d '\r' | tail -n 1)"
  md_get "project/attributes/?recursive=true&alt=json" "$WORK/project-attributes.json" "$METADATA_REMEDY"
  if ! py attributes "$WORK/project-attributes.json" "$WORK/md" "${DEPLOYMENT_KEYS[@]}" 2>"$WORK/py.err" ||
    ! py attributes "$WORK/attributes.json" "$WORK/md" "$KEY_CLUSTER_ENV" "$KEY_ROOT_CERT" "$KEY_CERT_CHAIN" \
      "$KEY_REKEY" "${DEPLOYMENT_KEYS[@]}" 2>"$WORK/py.err"; then
    fail "$(cat "$WORK/py.err")" "$METADATA_REMEDY"
  fi
}

md() { cat "$WORK/md/$1" 2>/dev/null || true; } # an item of the snapshot, empty when absent

auth_header() { # the VM service account's access token, as a curl header file
  md_get "instance/service-accounts/default/token" "$WORK/token.json" \
    "create the VM with its own service account and the cloud-platform scope (meshjoin requires one)"
  if ! py token "$WORK/token.json" "$WORK/auth" 2>"$WORK/py.err"; then
    fail "$(cat "$WORK/py.err")" "create the VM with its own service account and the cloud-platform scope"
  fi
}

# --- keys and certificates: openssl, and only ever the public half leaves /etc/certs -------------------------

public_key() { # KEY_FILE OUT: the key's SubjectPublicKeyInfo (PEM); nothing of the private key is printed
  openssl pkey -in "$1" -pubout -out "$2" 2>/dev/null
}

leaf_public_key() { # CERT_FILE OUT: the public key of the (first) certificate
  openssl x509 -in "$1" -noout -pubkey >"$2" 2>/dev/null
}

key_id() { # PUBLIC_KEY_PEM: the first 16 hex digits of the SHA-256 of its DER (meshjoin-status calls it keyId)
  openssl pkey -pubin -in "$1" -outform DER 2>/dev/null | sha256sum | cut -c 1-16
}

key_kind() { # PUBLIC_KEY_PEM: ecdsa-p256, rsa-BITS or other
  local text bits
  text="$(openssl pkey -pubin -in "$1" -noout -text 2>/dev/null || true)"
  case "$text" in
    *"ASN1 OID: prime256v1"*) echo ecdsa-p256 ;;
    *Modulus*)
      bits="$(printf '%s\n' "$text" | sed -n 's/^.*Public-Key: (\([0-9]*\) bit).*$/\1/p' | head -n 1)"
      echo "rsa-${bits:-0}"
      ;;
    *) echo other ;;
  esac
}

kind_fits() { # KIND: whether a key of this kind is one meshjoin certifies under $KEY_ALGORITHM
  case "$KEY_ALGORITHM:$1" in
    ecdsa-p256:ecdsa-p256) return 0 ;;
    rsa-2048:rsa-*) [ "${1#rsa-}" -ge 2048 ] && [ "${1#rsa-}" -le 4096 ] ;;
    *) return 1 ;;
  esac
}

cert_serial() { # CERT_FILE: the serial number as meshjoin records it: lower-case hex, no leading zeros
  local serial
  serial="$(openssl x509 -in "$1" -noout -serial 2>/dev/null)" || return 1
  serial="$(printf '%s' "${serial#serial=}" | tr 'A-F' 'a-f' | sed 's/^0*//')"
  printf '%s\n' "${serial:-0}"
}

first_cert() { # PEM_FILE OUT: the first certificate of a chain
  awk '/-----BEGIN CERTIFICATE-----/ { n++ } n == 1' "$1" >"$2"
}

have_cert() { # true when key.pem and the leaf of cert-chain.pem belong together and the leaf has not expired
  [ -f "$CERTS/key.pem" ] && [ -f "$CERTS/cert-chain.pem" ] || return 1
  public_key "$CERTS/key.pem" "$WORK/have-key.pub" || return 1
  leaf_public_key "$CERTS/cert-chain.pem" "$WORK/have-cert.pub" || return 1
  cmp -s "$WORK/have-key.pub" "$WORK/have-cert.pub" &&
    openssl x509 -checkend 0 -noout -in "$CERTS/cert-chain.pem" >/dev/null 2>&1
}

own_certs_dir() { # root's alone: nobody else can plant or swap a file where the agent makes and reads keys
  system_dir "$(dirname "$CERTS")"
  # istio-sidecar's postinst (and agents before version 3, for istio-agent's own rotation) gave it to istio-proxy;
  # with FILE_MOUNTED_CERTS istio-agent only reads here.
  ensure_dir "$CERTS" 0755
  local name
  for name in key.pem key.next.pem cert-chain.pem root-cert.pem; do
    if [ -L "$CERTS/$name" ] || { [ -e "$CERTS/$name" ] && [ ! -f "$CERTS/$name" ]; }; then
      log warning "$CERTS/$name was a symlink or not a regular file: removed (not followed)"
      rm -rf "${CERTS:?}/${name:?}"
    fi
  done
  rm -f "$CERTS"/.key.next.* # a key whose making was cut short
}

check_instance() { # a disk made on another instance (a clone, or a recreated VM) must not keep that VM's keys
  STEP="check this VM's instance id"
  local had
  md_get instance/id "$WORK/instance-id" "$METADATA_REMEDY"
  INSTANCE_ID="$(cat "$WORK/instance-id")"
  if ! printf '%s' "$INSTANCE_ID" | grep -Eqx '[0-9]{1,20}'; then
    fail "the metadata server's instance/id is not a number" "$METADATA_REMEDY"
  fi
  had="$(get_state instance-id)"
  UNKNOWN_KEY=""
  if [ -n "$had" ] && [ "$had" != "$INSTANCE_ID" ]; then
    systemctl stop istio.service 2>/dev/null || true
    rm -f "$CERTS/key.pem" "$CERTS/key.next.pem" "$CERTS/cert-chain.pem"
    rm -f "$STATE/cert-serial" "$STATE/csr-key-id" "$STATE"/reported.*
    CHANGED="$CHANGED stale-cert"
    log warning "this disk's keys were made on instance $had, but this VM is instance $INSTANCE_ID (a clone, or a \
recreated VM): its key, pending key and certificate were deleted; a fresh key is made"
  elif [ -z "$had" ] && { [ -e "$CERTS/key.pem" ] || [ -e "$CERTS/key.next.pem" ]; }; then
    # An agent before version 3 (its key came from Secret Manager), or a copied disk without this agent's state:
    # that key may exist elsewhere, so it is never certified again. It is served until its successor is.
    rm -f "$CERTS/key.next.pem"
    UNKNOWN_KEY=1
  fi
}

new_pending_key() { # WHY: a fresh private key, made here, into $CERTS/key.next.pem (0600, istio-proxy)
  local why="$1" ids next_id
  ids="$(owner_ids "$PROXY_USER")"
  # Made inside $CERTS (root's alone, see own_certs_dir), 0600 from the start (umask 077), renamed when whole.
  KEY_TMP="$(mktemp "$CERTS/.key.next.XXXXXX")"
  case "$KEY_ALGORITHM" in
    rsa-2048) set -- -algorithm RSA -pkeyopt rsa_keygen_bits:2048 ;;
    *) set -- -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -pkeyopt ec_param_enc:named_curve ;;
  esac
  if ! openssl genpkey "$@" -out "$KEY_TMP" >/dev/null 2>"$WORK/openssl.err"; then
    fail "openssl genpkey ($KEY_ALGORITHM): $(tail -n 2 "$WORK/openssl.err" | tr '\n' ' ')" \
      "install a working openssl (apt-get install -y openssl), then run $AGENT"
  fi
  chown "$ids" "$KEY_TMP"
  chmod 0600 "$KEY_TMP"
  mv -fT "$KEY_TMP" "$CERTS/key.next.pem"
  KEY_TMP=""
  public_key "$CERTS/key.next.pem" "$WORK/next.pub"
  next_id="$(key_id "$WORK/next.pub")"
  log notice "made a new $KEY_ALGORITHM key $next_id on this VM ($CERTS/key.next.pem, 0600, $PROXY_USER): $why"
}

ensure_key() { # the key that needs a certificate exists, of the kind meshjoin certifies
  STEP="make this VM's key"
  local token wanted kind why=""
  KEY_ALGORITHM="$(md "$KEY_KEY_ALGORITHM")"
  KEY_ALGORITHM="${KEY_ALGORITHM:-ecdsa-p256}"
  case "$KEY_ALGORITHM" in
    ecdsa-p256 | rsa-2048) ;;
    *) fail "metadata item $KEY_KEY_ALGORITHM names no key algorithm this agent makes (ecdsa-p256, rsa-2048)" \
      "set meshjoin's Terraform variable key_algorithm to ecdsa-p256 or rsa-2048 (project metadata)" ;;
  esac
  token="$(md "$KEY_REKEY")"
  if [ -n "$token" ] && ! printf '%s' "$token" | grep -Eqx '[A-Za-z0-9._-]{1,64}'; then
    log warning "metadata item $KEY_REKEY is not a token of 1-64 characters [A-Za-z0-9._-]: ignored"
    token=""
  fi
  if [ -n "$UNKNOWN_KEY" ]; then
    why="the key in place was not made by this agent on this instance (an earlier agent, or a copied disk); \
it is served until meshjoin certifies the new one"
  elif [ ! -f "$CERTS/key.pem" ] && [ ! -f "$CERTS/key.next.pem" ]; then
    why="this VM has no key yet"
  elif [ -n "$token" ] && [ "$token" != "$(get_state rekey)" ]; then
    why="meshjoin asked for a new key (rekey $token); the current key is served until the new one is certified"
  else
    wanted=key.pem
    if [ -f "$CERTS/key.next.pem" ]; then wanted=key.next.pem; fi
    if ! public_key "$CERTS/$wanted" "$WORK/wanted.pub"; then
      why="$CERTS/$wanted is not a private key openssl can read"
    else
      kind="$(key_kind "$WORK/wanted.pub")"
      if ! kind_fits "$kind"; then why="meshjoin certifies $KEY_ALGORITHM keys, and $wanted is $kind"; fi
    fi
  fi
  if [ -n "$why" ]; then new_pending_key "$why"; fi
  if [ -n "$token" ]; then put_state rekey "$token"; fi # acted on: a new key for it exists
  put_state instance-id "$INSTANCE_ID" # the keys in $CERTS are now this instance's own
}

request_cert() { # ask meshjoin to certify the key that needs a certificate (guest attribute csr), once per key
  STEP="ask meshjoin to certify this VM's key (guest attribute meshjoin/csr)"
  local wanted=key.pem
  if [ -f "$CERTS/key.next.pem" ]; then wanted=key.next.pem; fi
  if ! public_key "$CERTS/$wanted" "$WORK/csr.pub"; then
    fail "$CERTS/$wanted is not a private key openssl can read" "delete it and run $AGENT: a new key is made"
  fi
  WANTED_KEY_ID="$(key_id "$WORK/csr.pub")"
  if [ "$(get_state csr-key-id)" = "$WANTED_KEY_ID" ]; then return 0; fi # already asked: guest attributes persist
  # meshjoin ignores every name in the request and certifies only the identity policy grants this VM.
  if ! openssl req -new -batch -sha256 -key "$CERTS/$wanted" -subj "/O=meshjoin-agent" -out "$WORK/csr.pem" \
    2>"$WORK/openssl.err"; then
    fail "openssl req: $(tail -n 2 "$WORK/openssl.err" | tr '\n' ' ')" "install a working openssl, then run $AGENT"
  fi
  if guest_put csr "@$WORK/csr.pem"; then
    put_state csr-key-id "$WANTED_KEY_ID"
    REQUESTED=1
    log notice "asked meshjoin to certify key $WANTED_KEY_ID ($CERTS/$wanted): CSR in guest attribute \
meshjoin/csr"
  else
    RETRY=1
    log warning "$STEP: could not write it (the metadata server answered ${GUEST_STATUS:-000} $(curl_error)). \
Remedy: enable guest attributes (metadata enable-guest-attributes=TRUE, which meshjoin sets unless the owner \
chose otherwise); the watcher tries again"
  fi
}

install_cert() { # meshjoin's certificate, but only for a key this VM holds: the pending one, or a renewal
  STEP="install the workload certificate"
  local chain="$WORK/md/$KEY_CERT_CHAIN" root="$WORK/md/$KEY_ROOT_CERT" leaf="$WORK/leaf.pem" target="" id serial
  if [ ! -s "$root" ] || ! grep -q -- '-----BEGIN CERTIFICATE-----' "$root"; then
    fail "metadata item $KEY_ROOT_CERT holds no certificate" "$REISSUE_REMEDY"
  fi
  # Root first: a new CA's chain must never be served before its root is trusted.
  install_file "$root" "$CERTS/root-cert.pem" 0644 "$PROXY_USER"
  if [ ! -s "$chain" ]; then
    log info "no certificate in $KEY_CERT_CHAIN yet: waiting for meshjoin to certify key $WANTED_KEY_ID"
    return 0
  fi
  first_cert "$chain" "$leaf"
  if ! leaf_public_key "$leaf" "$WORK/leaf.pub"; then
    log warning "$STEP: metadata item $KEY_CERT_CHAIN holds no readable certificate: not installed; the files in \
place are kept. Remedy: $REISSUE_REMEDY"
    return 0
  fi
  id="$(key_id "$WORK/leaf.pub")"
  if [ -f "$CERTS/key.next.pem" ] && public_key "$CERTS/key.next.pem" "$WORK/next.pub" &&
    cmp -s "$WORK/leaf.pub" "$WORK/next.pub"; then
    target=key.next.pem # the pending key's certificate: a first join, a rotation, or a clone's fresh key
  elif [ -f "$CERTS/key.pem" ] && public_key "$CERTS/key.pem" "$WORK/current.pub" &&
    cmp -s "$WORK/leaf.pub" "$WORK/current.pub"; then
    target=key.pem # a renewal or a re-issue for the key in use
  else
    log warning "$STEP: $KEY_CERT_CHAIN certifies key $id, which this VM does not hold (it waits for key \
$WANTED_KEY_ID): not installed; the files in place are kept until meshjoin certifies this VM's key"
    return 0
  fi
  if [ "$target" = key.pem ] && cmp -s "$chain" "$CERTS/cert-chain.pem"; then return 0; fi # installed already
  if ! openssl verify -CAfile "$root" -untrusted "$chain" "$leaf" >"$WORK/verify.out" 2>&1; then
    log warning "$STEP: the certificate for key $id does not verify against $KEY_ROOT_CERT ($(grep -m 1 -i error \
"$WORK/verify.out" | head -c 200)): not installed; the files in place are kept. Remedy: $REISSUE_REMEDY"
    return 0
  fi
  if ! have_cert; then CHANGED="$CHANGED stale-cert"; fi # a sidecar started without a usable one starts again
  if [ "$target" = key.next.pem ]; then
    # The key first: istio-agent watches the certificate file and re-reads both when it changes.
    mv -fT "$CERTS/key.next.pem" "$CERTS/key.pem"
    CHANGED="$CHANGED $CERTS/key.pem"
  fi
  install_file "$chain" "$CERTS/cert-chain.pem" 0644 "$PROXY_USER"
  serial="$(cert_serial "$CERTS/cert-chain.pem")"
  put_state cert-serial "$serial"
  log notice "installed certificate $serial for key $id into $CERTS ($([ "$target" = key.pem ] &&
    echo "a renewal of the key in use" || echo "the new key is now key.pem"))"
}

# --- the steps ----------------------------------------------------------------------------------------------

preflight() {
  STEP="check the tools the agent needs"
  local tool missing=""
  for tool in curl python3 openssl flock sha256sum cmp dpkg dpkg-deb dpkg-query systemctl useradd; do
    if ! command -v "$tool" >/dev/null 2>&1; then missing="$missing $tool"; fi
  done
  if [ -n "$missing" ]; then
    fail "missing:$missing" "use a Debian or Ubuntu image, or install them (apt-get install -y curl python3 openssl)"
  fi
}

ensure_user() {
  STEP="create the $PROXY_USER user"
  if id -u "$PROXY_USER" >/dev/null 2>&1; then return 0; fi
  # istio-sidecar's own postinst keeps an existing user; it must exist now to own the key.
  if ! useradd --system --user-group --home-dir /var/lib/istio --no-create-home --shell /usr/sbin/nologin \
    "$PROXY_USER" 2>"$WORK/useradd.err"; then
    fail "useradd: $(cat "$WORK/useradd.err")" "create the system user $PROXY_USER by hand"
  fi
  log notice "created the system user $PROXY_USER"
}

own_config_dirs() { # root's: istio-start.sh sources cluster.env as root, so istio-proxy must not replace it
  system_dir "$ROOT/var/lib"
  system_dir "$ROOT/etc"
  ensure_dir "$ROOT/var/lib/istio" 0755
  ensure_dir "$ROOT/var/lib/istio/envoy" 0755
  ensure_dir "$ROOT/etc/istio" 0755
  ensure_dir "$ROOT/etc/istio/config" 0755
}

write_config() {
  STEP="write cluster.env and the mesh config"
  local env="$WORK/md/$KEY_CLUSTER_ENV" shared="$WORK/md/$KEY_MESH_ENV" mesh="$WORK/md/$KEY_MESH_CONFIG" item
  if [ ! -s "$env" ]; then
    fail "metadata item $KEY_CLUSTER_ENV is missing" "$REISSUE_REMEDY"
  fi
  for item in "$shared" "$mesh"; do
    if [ ! -s "$item" ]; then
      fail "metadata item ${item##*/} is missing from the project's metadata (and the instance's)" \
        "an operator applies meshjoin's Terraform to this VM's project (deploy/terraform/agent.tf writes it)"
    fi
  done
  for item in "$env" "$shared"; do # istio-start.sh sources cluster.env: only NAME=value lines may pass
    if grep -Evq '^[A-Z][A-Z0-9_]*=' "$item"; then
      fail "metadata item ${item##*/} holds a line that is not NAME=value" "$REISSUE_REMEDY"
    fi
  done
  cat "$env" "$shared" >"$WORK/cluster.env" # this VM's lines, then the deployment's (bootstrap.cluster_env)
  own_config_dirs
  install_file "$WORK/cluster.env" "$CLUSTER_ENV" 0644
  install_file "$mesh" "$MESH_CONFIG" 0644
  log info "cluster.env and mesh config in place"
}

write_hosts() {
  STEP="write istiod's address into /etc/hosts"
  local lines="$WORK/md/$KEY_HOSTS"
  local line_re='^[0-9A-Fa-f.:]+[[:blank:]]+[A-Za-z0-9.-]+([[:blank:]]+[A-Za-z0-9.-]+)*$' # ADDRESS NAME...
  if [ -s "$lines" ] && grep -Evq "$line_re" "$lines"; then
    fail "metadata item $KEY_HOSTS holds a line that is not 'ADDRESS NAME'" \
      "fix meshjoin's Terraform variables istiod_ip and istiod_address (project metadata)"
  fi
  { # the file without our block, then the block anew: the same lines once, however often this runs
    if [ -f "$HOSTS" ]; then
      awk -v b="$HOSTS_BEGIN" -v e="$HOSTS_END" '$0 == b { skip = 1; next } $0 == e { skip = 0; next } !skip' "$HOSTS"
    fi
    if [ -s "$lines" ]; then
      printf '%s\n' "$HOSTS_BEGIN"
      awk 1 "$lines"
      printf '%s\n' "$HOSTS_END"
    fi
  } >"$WORK/hosts"
  system_dir "$(dirname "$HOSTS")"
  install_file "$WORK/hosts" "$HOSTS" 0644
  log info "/etc/hosts holds meshjoin's block"
}

sidecar_version() { # the installed istio-sidecar version, empty when it is not installed
  local status
  # shellcheck disable=SC2016 # dpkg-query's own ${field} syntax
  status="$(dpkg-query -W -f='${db:Status-Status} ${Version}' istio-sidecar 2>/dev/null || true)"
  case "$status" in "installed "*) printf '%s' "${status#installed }" ;; esac
}

install_sidecar() {
  STEP="install the Istio sidecar package"
  local url sha installed deb="$WORK/istio-sidecar.deb" got package version
  url="${MESHJOIN_SIDECAR_URL:-$(md "$KEY_SIDECAR_URL")}"
  sha="$(printf '%s' "${MESHJOIN_SIDECAR_SHA256:-$(md "$KEY_SIDECAR_SHA256")}" | tr 'A-F' 'a-f')"
  installed="$(sidecar_version)"
  if [ -z "$url" ]; then
    if [ -z "$installed" ]; then
      fail "istio-sidecar is not installed and no package URL is configured" \
        "set meshjoin's Terraform variables sidecar_url and sidecar_sha256, or bake istio-sidecar \
into the image"
    fi
    log info "istio-sidecar $installed kept (no package URL configured)"
    return 0
  fi
  if ! printf '%s' "$sha" | grep -Eqx '[0-9a-f]{64}'; then
    fail "no valid SHA-256 for $url: refusing to install an unverified package" \
      "set MESHJOIN_SIDECAR_SHA256 to the output of sha256sum istio-sidecar.deb"
  fi
  if [ -n "$installed" ] && [ "$(get_state sidecar.sha256)" = "$sha" ]; then
    log info "istio-sidecar $installed already installed from this package; download skipped"
    return 0
  fi
  case "$url" in # the operator's private bucket: read with the VM's own token
    https://storage.googleapis.com/*)
      auth_header
      http_get "$url" "$deb" -L -H "@$WORK/auth"
      ;;
    *) http_get "$url" "$deb" -L ;;
  esac
  if [ "$HTTP_STATUS" != 200 ]; then
    fail "downloading $url answered $HTTP_STATUS $(curl_error)" \
      "check MESHJOIN_SIDECAR_URL and that this VM may read it"
  fi
  got="$(sha256sum "$deb" | cut -d ' ' -f 1)"
  if [ "$got" != "$sha" ]; then
    fail "checksum mismatch for $url: expected sha256 $sha, got $got; nothing was installed" \
      "publish the intended istio-sidecar.deb, or set MESHJOIN_SIDECAR_SHA256 to its sha256sum"
  fi
  package="$(dpkg-deb -f "$deb" Package 2>/dev/null || true)"
  version="$(dpkg-deb -f "$deb" Version 2>/dev/null || true)"
  if [ "$package" != istio-sidecar ] || [ -z "$version" ]; then
    fail "$url is not an istio-sidecar package (Package: ${package:-none})" \
      "point MESHJOIN_SIDECAR_URL at Istio's istio-sidecar.deb"
  fi
  if [ "$version" = "$installed" ]; then
    log info "istio-sidecar $version already installed; dpkg skipped"
  else
    # 9>&-: a daemon a maintainer script might start must not inherit (and hold) the agent's lock
    if ! DEBIAN_FRONTEND=noninteractive dpkg -i "$deb" >"$WORK/dpkg.log" 2>&1 9>&-; then
      fail "dpkg -i istio-sidecar $version: $(tail -n 3 "$WORK/dpkg.log" | tr '\n' ' ')" \
        "fix what dpkg says, then run $AGENT (or reboot)"
    fi
    CHANGED="$CHANGED sidecar"
    log notice "installed istio-sidecar $version (sha256 verified)"
  fi
  put_state sidecar.sha256 "$sha"
}

start_sidecar() {
  STEP="start istio.service"
  local action=start
  # A new identity, trust, mesh config, binary, or a cert replacing an unusable one needs a restart; a renewal
  # or a new key does not: with FILE_MOUNTED_CERTS istio-agent watches cert-chain.pem and re-reads the key with it
  # (security/pkg/nodeagent/cache/secretcache.go, generateFileSecret).
  case "$CHANGED " in
    *" $CLUSTER_ENV "* | *" $MESH_CONFIG "* | *" $CERTS/root-cert.pem "* | *" sidecar "* | *" stale-cert "*)
      action=restart ;;
  esac
  if ! systemctl enable istio.service 2>"$WORK/systemctl.err" ||
    ! systemctl "$action" istio.service 2>>"$WORK/systemctl.err"; then
    report failed || true # meshjoin keeps the VM out of traffic and its status says so
    STEP="start istio.service"
    fail "systemctl $action istio.service: $(tr '\n' ' ' <"$WORK/systemctl.err")" "journalctl -u istio.service says why"
  fi
  log notice "istio.service ${action}ed"
}

install_watcher() {
  STEP="install the watcher (meshjoin-watch.service)"
  if [ ! -f "$0" ] || ! grep -qF "$MARKER" "$0"; then # e.g. piped into bash: still converge, just once
    log warning "$STEP skipped: cannot copy the agent from $0; run it from a file, as GCE's startup-script runner does"
    return 0
  fi
  CHANGED=""
  system_dir "$ROOT/usr/local/sbin"
  install_file "$0" "$ROOT$AGENT" 0755 # itself: one agent, whatever version meshjoin rendered last
  cat >"$WORK/unit" <<EOF
[Unit]
Description=meshjoin watcher: applies renewed certificates and bootstrap from instance metadata
After=network-online.target
Wants=network-online.target

[Service]
ExecStart=$AGENT watch
# A failed step exits; systemd retries it after a pause instead of a tight loop.
Restart=always
RestartSec=30

[Install]
WantedBy=multi-user.target
EOF
  system_dir "$(dirname "$UNIT")"
  install_file "$WORK/unit" "$UNIT" 0644
  local action=start
  if [ -n "$CHANGED" ]; then
    systemctl daemon-reload
    action=restart # safe: this run holds the lock, so the old watcher is at most waiting, never converging
  fi
  if ! systemctl enable meshjoin-watch.service 2>"$WORK/systemctl.err" ||
    ! systemctl "$action" meshjoin-watch.service 2>>"$WORK/systemctl.err"; then
    fail "systemctl $action meshjoin-watch.service: $(tr '\n' ' ' <"$WORK/systemctl.err")" \
      "journalctl -u meshjoin-watch.service says why"
  fi
  log info "meshjoin-watch.service ${action}ed"
}

# --- the VM's own truth: report to meshjoin -----------------------------------------------------------------

sidecar_state() {
  if systemctl is-active --quiet istio.service 2>/dev/null; then
    echo running
  elif systemctl is-failed --quiet istio.service 2>/dev/null; then
    echo failed
  else
    echo stopped
  fi
}

guest_put() { # KEY VALUE|@FILE: write one guest attribute through this VM's own metadata server; GUEST_STATUS
  # GCE allows bursts of 3 writes a second (10 a minute) per VM: writes are spaced, and one refused
  # as too many (429) is tried again after a pause.
  local attempt
  for attempt in 1 2 3; do
    sleep 0.4
    GUEST_STATUS="$(curl -sS --connect-timeout 5 --max-time 15 -X PUT --data-binary "$2" \
      -H 'Metadata-Flavor: Google' -o /dev/null -w '%{http_code}' "$GUEST/$1" 2>"$WORK/curl.err")" || true
    [ "$GUEST_STATUS" = 429 ] || break
    sleep "$attempt"
  done
  [ "$GUEST_STATUS" = 200 ]
}

guest_delete() { # KEY: remove one of this VM's guest attributes (only the VM itself can, like writing them)
  GUEST_STATUS="$(curl -sS --connect-timeout 5 --max-time 15 -X DELETE -H 'Metadata-Flavor: Google' \
    -o /dev/null -w '%{http_code}' "$GUEST/$1" 2>"$WORK/curl.err")" || true
  [ "$GUEST_STATUS" = 200 ]
}

report() { # [SIDECAR]: guest attributes meshjoin reads; true when something it did not know changed
  STEP="report to meshjoin (guest attributes)"
  local sidecar="${1:-}" key value changed=1 failed=""
  if [ -z "$sidecar" ]; then sidecar="$(sidecar_state)"; fi
  # Guest attributes allow 10 writes a minute per VM (over it, GCE "might arbitrarily remove guest attributes
  # that are in the process of being written": compute/docs/metadata/manage-guest-attributes), and they outlive
  # reboots: only values that changed are written, then `updated`. A failed write is tried again (RETRY).
  for key in agent-version cert-serial sidecar; do
    case "$key" in
      agent-version) value="$AGENT_VERSION" ;;
      cert-serial) value="$(get_state cert-serial)" ;;
      sidecar) value="$sidecar" ;;
    esac
    if [ "$(get_state "reported.$key")" = "$value" ] && { [ -f "$STATE/reported.$key" ] || [ -z "$value" ]; }; then
      continue # written before, or nothing to say yet
    fi
    if guest_put "$key" "$value"; then
      put_state "reported.$key" "$value"
      changed=0
    else
      failed="$failed $key"
    fi
  done
  if [ "$changed" = 0 ] || [ -n "$failed" ]; then
    guest_put updated "$(date -u +%Y-%m-%dT%H:%M:%SZ)" || failed="$failed updated"
  fi
  if [ -n "$failed" ]; then
    RETRY=1
    log warning "$STEP: could not write$failed (the metadata server answered ${GUEST_STATUS:-000} \
$(curl_error)). Remedy: enable guest attributes (metadata \
enable-guest-attributes=TRUE, which meshjoin sets unless the owner chose otherwise); until then meshjoin \
keeps this VM out of mesh traffic"
  elif [ "$changed" = 0 ]; then
    log info "reported to meshjoin: agent $AGENT_VERSION, certificate $(get_state cert-serial), sidecar $sidecar"
  fi
  return "$changed"
}

nudge() { # tell meshjoin to look at this VM now (it would notice at its next sweep anyway)
  STEP="nudge meshjoin"
  local topic endpoint project zone instance
  topic="$(md "$KEY_EVENTS_TOPIC")"
  endpoint="$(md "$KEY_PUBSUB_ENDPOINT")"
  if [ -z "$topic" ]; then
    log info "$STEP skipped: no $KEY_EVENTS_TOPIC in metadata; meshjoin's sweep reads the report"
    return 0
  fi
  if ! printf '%s' "$topic" | grep -Eqx 'projects/[a-z][-a-z0-9.:]+/topics/[A-Za-z][-A-Za-z0-9_.~+%]+' ||
    ! printf '%s' "$endpoint" | grep -Eqx 'https?://[A-Za-z0-9.-]+(:[0-9]+)?'; then
    log warning "$STEP skipped: $KEY_EVENTS_TOPIC or $KEY_PUBSUB_ENDPOINT is malformed; meshjoin's sweep reads the report"
    return 0
  fi
  http_get "$METADATA/project/project-id" "$WORK/project-id" -H 'Metadata-Flavor: Google'
  project="$(cat "$WORK/project-id" 2>/dev/null || true)"
  http_get "$METADATA/instance/zone" "$WORK/zone" -H 'Metadata-Flavor: Google'
  zone="$(cat "$WORK/zone" 2>/dev/null || true)"
  zone="${zone##*/}"
  http_get "$METADATA/instance/name" "$WORK/name" -H 'Metadata-Flavor: Google'
  instance="$(cat "$WORK/name" 2>/dev/null || true)"
  if [ -z "$project" ] || [ -z "$zone" ] || [ -z "$instance" ]; then
    log warning "$STEP skipped: the metadata server did not name this VM; meshjoin's sweep reads the report"
    return 0
  fi
  py nudge "$project" "$zone" "$instance" >"$WORK/nudge.json"
  auth_header
  http_get "$endpoint/v1/$topic:publish" "$WORK/published.json" -H "@$WORK/auth" \
    -H 'Content-Type: application/json' --data-binary "@$WORK/nudge.json"
  if [ "$HTTP_STATUS" = 200 ]; then
    log info "nudged meshjoin through $topic"
  else
    log warning "$STEP: publishing to $topic answered $HTTP_STATUS $(py error "$WORK/published.json") \
(the VM's service account needs roles/pubsub.publisher on it); meshjoin's sweep reads the report anyway"
  fi
}

report_and_nudge() { # MODE (boot|watch)
  if report || [ -n "$REQUESTED" ] || { [ "$1" = boot ] && [ -z "$NUDGED" ]; }; then
    # in a subshell: a failing nudge (even one whose token fetch fails) must never fail the converge
    (nudge) || log warning "nudge meshjoin failed; meshjoin's sweep reads the report anyway"
    NUDGED=1
  fi
  REQUESTED=""
}

apply() { # MODE: make the files, the key, the request, the package and the service match the snapshot
  ensure_user
  own_certs_dir
  check_instance # before anything reads or certifies a key
  ensure_key
  request_cert
  install_cert
  write_config
  write_hosts
  install_sidecar
  own_config_dirs # the package's postinst hands /var/lib/istio/envoy to istio-proxy: take it back
  if have_cert; then
    HAVE_CERT=1
    start_sidecar
  else
    HAVE_CERT=""
    log info "istio.service not started: no certificate for key $WANTED_KEY_ID yet"
  fi
  report_and_nudge "$1"
}

withdrawn() { [ ! -s "$WORK/md/$KEY_CLUSTER_ENV" ]; } # meshjoin removed the bootstrap (left, denied)

converge() { # MODE (boot|watch)
  STEP="read meshjoin's metadata"
  CHANGED=""
  read_attributes
  if withdrawn; then
    leave_mesh
    if [ "$1" = boot ]; then
      fail "no $KEY_CLUSTER_ENV in this VM's metadata" \
        "label the VM mesh=join; its meshjoin-status metadata item says why it has not joined"
    fi
  else
    apply "$1"
    if [ "$1" = boot ] && [ -z "$HAVE_CERT" ]; then
      if [ "$(get_state csr-key-id)" = "$WANTED_KEY_ID" ]; then
        wait_for_certificate
      else # meshjoin cannot see the request: waiting would only delay the boot (the watcher writes it again)
        log warning "not waiting for a certificate: the CSR for key $WANTED_KEY_ID could not be written"
      fi
    fi
  fi
  put_state etag "$MD_ETAG"
}

wait_for_certificate() { # boot: one run ends with the sidecar serving when meshjoin answers in time
  local deadline=$((SECONDS + WAIT_SECONDS))
  log notice "waiting up to ${WAIT_SECONDS}s for meshjoin to certify key $WANTED_KEY_ID ($KEY_CERT_CHAIN)"
  while [ -z "$HAVE_CERT" ] && [ "$SECONDS" -lt "$deadline" ]; do
    STEP="wait for meshjoin's certificate"
    read_attributes "&wait_for_change=true&last_etag=$MD_ETAG&timeout_sec=$((deadline - SECONDS))"
    if withdrawn; then
      leave_mesh
      fail "meshjoin withdrew this VM's bootstrap while it waited" "its meshjoin-status metadata item says why"
    fi
    apply boot
  done
  if [ -z "$HAVE_CERT" ]; then
    log warning "no certificate for key $WANTED_KEY_ID after ${WAIT_SECONDS}s: meshjoin-status says why; \
meshjoin-watch.service installs it when it arrives"
  fi
}

leave_mesh() { # meshjoin withdrew the bootstrap: the VM must stop presenting its mesh identity
  STEP="leave the mesh"
  if [ ! -e "$CERTS/key.pem" ] && [ ! -e "$CERTS/key.next.pem" ] && [ ! -e "$CERTS/cert-chain.pem" ] &&
    [ -z "$(get_state cert-serial)" ]; then
    log info "no $KEY_CLUSTER_ENV in metadata and no identity in place: nothing to remove"
    return 0
  fi
  systemctl stop istio.service 2>"$WORK/systemctl.err" ||
    log warning "$STEP: systemctl stop istio.service: $(tr '\n' ' ' <"$WORK/systemctl.err")"
  systemctl disable istio.service 2>/dev/null || true
  rm -f "$CERTS/key.pem" "$CERTS/key.next.pem" "$CERTS/cert-chain.pem"
  rm -f "$STATE/cert-serial" "$STATE/csr-key-id"
  guest_delete csr || true # a request for a key that no longer exists
  report stopped || true
  log notice "left the mesh: $KEY_CLUSTER_ENV was withdrawn (meshjoin-status says why); istio.service stopped, \
keys and certificate removed"
}

watch() { # [--once]
  while :; do
    STEP="wait for metadata changes"
    local since timeout="$WAIT_SECONDS"
    since="$(get_state etag)"
    if [ -n "$RETRY" ] && [ "$timeout" -gt 20 ]; then timeout=20; fi # a report or request to write again
    if [ -n "$since" ]; then # returns at once when the metadata changed since the last converge
      read_attributes "&wait_for_change=true&last_etag=$since&timeout_sec=$timeout"
    fi
    if [ -z "$since" ] || [ "$MD_ETAG" != "$since" ] || [ -n "$RETRY" ]; then
      lock
      if [ -z "$since" ]; then
        log info "converging: the watcher started"
      else
        log info "converging: the metadata changed${RETRY:+ (or a write to retry)}"
      fi
      RETRY=""
      converge watch
      unlock
    fi
    if [ "${1:-}" = --once ]; then return 0; fi
  done
}

main() {
  case "${1:-}" in
    "")
      preflight
      lock # held to the end: a watcher started meanwhile waits instead of converging alongside
      install_watcher
      converge boot
      if [ -n "$HAVE_CERT" ]; then
        log notice "boot done: this VM is a mesh workload (certificate $(get_state cert-serial))"
      else
        log notice "boot done: waiting for meshjoin's certificate (meshjoin-watch.service installs it)"
      fi
      ;;
    watch)
      preflight
      shift
      watch "$@"
      ;;
    *)
      echo "usage: $0 [watch [--once]]" >&2
      exit 2
      ;;
  esac
}

# Run, unless sourced: tests/agent sources this file to call one function at a time in a throwaway root
# (`return` succeeds only in a sourced file; run as a file, piped into bash or by the stub, main runs).
if ! (return 0 2>/dev/null); then main "$@"; fi
