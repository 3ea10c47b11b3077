# Kubernetes RBAC for the functions in the mesh's cluster. GKE maps a Google service account to
# the Kubernetes user named by its email, so that is the subject.
#
# The verbs are those shared/meshjoin/adapters/kube.py sends (GET/POST/PUT/DELETE → get, create,
# update, delete; label-selector listings → list), on the kinds it handles (kube.PATHS):
# WorkloadEntries, the Service an app's entries need, the ServiceAccount the identity names, and
# Pods (only listed, to never prune a Service that selects them).
# It never patches, watches, or touches WorkloadGroups, and it never deletes ServiceAccounts
# (pods may use them), so none of that is granted.

locals {
  kube_user = google_service_account.functions.email

  # Writes, bound per namespace of var.identity_bindings: a VM can never get objects written outside policy.
  writer_rules = [
    {
      api_groups = ["networking.istio.io"]
      resources  = ["workloadentries"]
      verbs      = ["get", "list", "create", "update", "delete"]
    },
    {
      api_groups = [""]
      resources  = ["services"]
      verbs      = ["get", "create", "update", "delete"] # update: a changed mesh-ports reaches meshjoin's Service
    },
    {
      # Listed before a Service is pruned: meshjoin never deletes one that selects pods.
      api_groups = [""]
      resources  = ["pods"]
      verbs      = ["list"]
    },
    {
      api_groups = [""]
      resources  = ["serviceaccounts"]
      verbs      = ["get", "create"]
    },
  ]

  # Reads across the cluster, of the two kinds meshjoin lists by its ownership label: a VM that
  # leaves is cleaned up over all namespaces (its entry may sit in a namespace it has since
  # left), and the sweep's inventory lists owned WorkloadEntries and Services cluster-wide.
  # `get` on services: pruning a Service (delete_owned) reads it first to check ownership.
  # Reading is all: an object outside the bound namespaces cannot be changed.
  reader_rules = [
    {
      api_groups = ["networking.istio.io"]
      resources  = ["workloadentries"]
      verbs      = ["get", "list"]
    },
    {
      api_groups = [""]
      resources  = ["services"]
      verbs      = ["get", "list"]
    },
  ]

  # Write access in exactly the namespaces the identity bindings name, never cluster-wide.
  rbac_namespaces = distinct([for b in var.identity_bindings : b.namespace])

  rbac_labels = {
    "app.kubernetes.io/part-of"    = "meshjoin"
    "app.kubernetes.io/managed-by" = "terraform"
  }

  rbac_subject = {
    kind     = "User"
    name     = local.kube_user
    apiGroup = "rbac.authorization.k8s.io"
  }

  rbac_roles = {
    "${var.name}-writer" = local.writer_rules
    "${var.name}-reader" = local.reader_rules
  }
  # ClusterRole names bound cluster-wide (the binding carries the role's name).
  rbac_cluster_bindings = ["${var.name}-reader"]

  # The same objects as a manifest, for clusters whose RBAC is applied by other means
  # (output kubernetes_rbac_manifest; `kubectl apply -f -`).
  rbac_objects = concat(
    [for name, rules in local.rbac_roles : {
      apiVersion = "rbac.authorization.k8s.io/v1"
      kind       = "ClusterRole"
      metadata   = { name = name, labels = local.rbac_labels }
      rules      = [for r in rules : { apiGroups = r.api_groups, resources = r.resources, verbs = r.verbs }]
    }],
    [for ns in local.rbac_namespaces : {
      apiVersion = "rbac.authorization.k8s.io/v1"
      kind       = "RoleBinding"
      metadata   = { name = "${var.name}-writer", namespace = ns, labels = local.rbac_labels }
      roleRef    = { apiGroup = "rbac.authorization.k8s.io", kind = "ClusterRole", name = "${var.name}-writer" }
      subjects   = [local.rbac_subject]
    }],
    [for role in local.rbac_cluster_bindings : {
      apiVersion = "rbac.authorization.k8s.io/v1"
      kind       = "ClusterRoleBinding"
      metadata   = { name = role, labels = local.rbac_labels }
      roleRef    = { apiGroup = "rbac.authorization.k8s.io", kind = "ClusterRole", name = role }
      subjects   = [local.rbac_subject]
    }],
  )
}

resource "kubernetes_cluster_role_v1" "writer" {
  count = var.manage_kubernetes_rbac ? 1 : 0

  metadata {
    name   = "${var.name}-writer"
    labels = local.rbac_labels
  }

  dynamic "rule" {
    for_each = local.writer_rules
    content {
      api_groups = rule.value.api_groups
      resources  = rule.value.resources
      verbs      = rule.value.verbs
    }
  }
}

# A RoleBinding to a ClusterRole grants its rules in that namespace only: one role definition,
# one binding per bound namespace. The namespaces must exist (meshjoin never creates them).
resource "kubernetes_role_binding_v1" "writer" {
  for_each = var.manage_kubernetes_rbac ? toset(local.rbac_namespaces) : toset([])

  metadata {
    name      = "${var.name}-writer"
    namespace = each.value
    labels    = local.rbac_labels
  }

  role_ref {
    api_group = "rbac.authorization.k8s.io"
    kind      = "ClusterRole"
    name      = kubernetes_cluster_role_v1.writer[0].metadata[0].name
  }

  subject {
    kind      = "User"
    name      = local.kube_user
    api_group = "rbac.authorization.k8s.io"
  }
}

resource "kubernetes_cluster_role_v1" "reader" {
  count = var.manage_kubernetes_rbac ? 1 : 0

  metadata {
    name   = "${var.name}-reader"
    labels = local.rbac_labels
  }

  dynamic "rule" {
    for_each = local.reader_rules
    content {
      api_groups = rule.value.api_groups
      resources  = rule.value.resources
      verbs      = rule.value.verbs
    }
  }
}

resource "kubernetes_cluster_role_binding_v1" "reader" {
  count = var.manage_kubernetes_rbac ? 1 : 0

  metadata {
    name   = "${var.name}-reader"
    labels = local.rbac_labels
  }

  role_ref {
    api_group = "rbac.authorization.k8s.io"
    kind      = "ClusterRole"
    name      = kubernetes_cluster_role_v1.reader[0].metadata[0].name
  }

  subject {
    kind      = "User"
    name      = local.kube_user
    api_group = "rbac.authorization.k8s.io"
  }
}
