{{/* Names, labels and small shared pieces of the kvpn chart. */}}

{{/* The chart name, or nameOverride: the app.kubernetes.io/name label. */}}
{{- define "kvpn.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Prefix of object names: the release name, with the chart name unless it already holds it. */}}
{{- define "kvpn.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 52 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 52 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 52 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Where every namespaced object goes: namespace.name, else the release namespace. */}}
{{- define "kvpn.namespace" -}}
{{- default .Release.Namespace .Values.namespace.name -}}
{{- end -}}

{{/* The namespaces that hold VpnServers, as a list: agent.serverNamespaces, else the chart's namespace. */}}
{{- define "kvpn.serverNamespaces" -}}
{{- $namespaces := .Values.agent.serverNamespaces | default (list (include "kvpn.namespace" .)) -}}
{{- toJson (uniq $namespaces) -}}
{{- end -}}

{{/* The namespaces where the operator may read and write Secrets (unless operator.clusterWideSecrets), as
a list: the server namespaces (server keys, peer bindings), then developers.namespaces and
operator.secretNamespaces (the config Secrets of the VpnPeers there), each once. */}}
{{- define "kvpn.operatorSecretNamespaces" -}}
{{- $serverNamespaces := include "kvpn.serverNamespaces" . | fromJsonArray -}}
{{- $peerNamespaces := concat (.Values.developers.namespaces | default list) (.Values.operator.secretNamespaces | default list) -}}
{{- toJson (concat $serverNamespaces $peerNamespaces | uniq) -}}
{{- end -}}

{{- define "kvpn.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels of every object. */}}
{{- define "kvpn.labels" -}}
helm.sh/chart: {{ include "kvpn.chart" . }}
{{ include "kvpn.selectorLabels" . }}
{{- if .Chart.AppVersion }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: kvpn
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "kvpn.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kvpn.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* Labels of one component: (dict "root" $ "component" "operator"). */}}
{{- define "kvpn.componentLabels" -}}
{{ include "kvpn.labels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "kvpn.componentSelectorLabels" -}}
{{ include "kvpn.selectorLabels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* metadata.annotations of every object, when commonAnnotations has any. */}}
{{- define "kvpn.annotations" -}}
{{- with .Values.commonAnnotations -}}
annotations:
  {{- toYaml . | nindent 2 }}
{{- end -}}
{{- end -}}

{{- define "kvpn.operatorServiceAccountName" -}}
{{- if .Values.operator.serviceAccount.create -}}
{{- default (printf "%s-operator" (include "kvpn.fullname" .)) .Values.operator.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.operator.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "kvpn.agentServiceAccountName" -}}
{{- if .Values.agent.serviceAccount.create -}}
{{- default (printf "%s-agent" (include "kvpn.fullname" .)) .Values.agent.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.agent.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* repository:tag, or repository@digest. */}}
{{- define "kvpn.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{/* Checks across values that the schema cannot express; rendered once, from NOTES-independent templates. */}}
{{- define "kvpn.validate" -}}
{{- if and .Values.namespace.create (or (not .Values.namespace.name) (eq .Values.namespace.name .Release.Namespace)) -}}
{{- fail "namespace.create=true needs namespace.name set to a namespace other than the release's (Helm cannot create the namespace it installs into; use --create-namespace and label it, see values.yaml)" -}}
{{- end -}}
{{- $serverNamespaces := include "kvpn.serverNamespaces" . | fromJsonArray -}}
{{- range .Values.developers.namespaces -}}
{{- if or (has . $serverNamespaces) (eq . (include "kvpn.namespace" $)) -}}
{{- fail (printf "developers.namespaces must not list %s, the chart's namespace or one that holds VpnServers (agent.serverNamespaces): the developer role may read every Secret of the namespace it is bound in, and the server keys and peer bindings live there; give the team's peers a namespace of their own" .) -}}
{{- end -}}
{{- end -}}
{{- /* The chart's own VpnServer: every namespace it serves must be one whose Secrets the operator may
write, or its peers there never get a config (a VpnServer made by hand is not the chart's to check).
operator.secretNamespaces beside clusterWideSecrets is allowed, not refused: the ClusterRole covers
those namespaces already, and the list takes over again when clusterWideSecrets is turned off. */ -}}
{{- if and .Values.server.create (not .Values.operator.clusterWideSecrets) -}}
{{- $secretNamespaces := include "kvpn.operatorSecretNamespaces" . | fromJsonArray -}}
{{- range .Values.server.peerNamespaces -}}
{{- if eq . "*" -}}
{{- fail "server.peerNamespaces \"*\" serves VpnPeers of every namespace, but the operator may write their config Secrets only in the server namespaces, developers.namespaces and operator.secretNamespaces: set operator.clusterWideSecrets=true, or list the peers' namespaces in server.peerNamespaces and operator.secretNamespaces" -}}
{{- else if not (has . $secretNamespaces) -}}
{{- fail (printf "server.peerNamespaces lists %s, where the operator may not write the peers' config Secrets: add it to operator.secretNamespaces (or developers.namespaces), or set operator.clusterWideSecrets=true" .) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- if and .Values.developers.namespaces (not .Values.developers.subjects) -}}
{{- fail "developers.namespaces needs developers.subjects: the RoleBindings there would bind nobody" -}}
{{- end -}}
{{- if .Values.relay.enabled -}}
{{- if eq .Values.relay.namespace (include "kvpn.namespace" .) -}}
{{- fail "relay.namespace must not be the chart's namespace: developers may port-forward to any pod in the relay's namespace, and the agent's pods there run on the nodes' network" -}}
{{- end -}}
{{- if and .Values.relay.createNamespace (eq .Values.relay.namespace .Release.Namespace) -}}
{{- fail "relay.createNamespace=true needs relay.namespace other than the release's (Helm cannot create the namespace it installs into); set relay.createNamespace=false, or another relay.namespace" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* RBAC subjects from a values list of {kind, name, apiGroup, namespace} (relay.users,
developers.subjects): User and Group in rbac.authorization.k8s.io unless apiGroup says otherwise. */}}
{{- define "kvpn.subjects" -}}
{{- range . }}
- kind: {{ .kind }}
  name: {{ .name | quote }}
  {{- if hasKey . "apiGroup" }}
  apiGroup: {{ .apiGroup | quote }}
  {{- else if ne .kind "ServiceAccount" }}
  apiGroup: rbac.authorization.k8s.io
  {{- end }}
  {{- with .namespace }}
  namespace: {{ . }}
  {{- end }}
{{- end }}
{{- end -}}

{{- define "kvpn.relayServiceAccountName" -}}
{{- printf "%s-relay" (include "kvpn.fullname" .) -}}
{{- end -}}
