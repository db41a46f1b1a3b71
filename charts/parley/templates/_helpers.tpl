{{/* The chart's name, overridable. */}}
{{- define "parley.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The base name of the release's objects: the release name when it already
contains the chart's name (`helm install parley ...` gives `parley`), else
`<release>-<chart>`.
*/}}
{{- define "parley.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* Labels of every object of the chart; `component` says which part. */}}
{{- define "parley.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "parley.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: parley
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* The operator's pods, selected by its Deployment and metrics Service. */}}
{{- define "parley.selectorLabels" -}}
app.kubernetes.io/name: {{ include "parley.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "parley.operatorLabels" -}}
{{ include "parley.labels" . }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "parley.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "parley.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "parley.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "parley.serviceImage" -}}
{{- printf "%s:%s" .Values.serviceImage.repository (default .Chart.AppVersion .Values.serviceImage.tag) }}
{{- end }}

{{/* Leader election: on with more than one replica, or when asked for. */}}
{{- define "parley.leaderElection" -}}
{{- if or .Values.leaderElection (gt (int .Values.replicas) 1) }}true{{ else }}false{{ end }}
{{- end }}

{{/*
The operator's rules, read from operator/rbac/cluster-role.yaml (linked as
files/operator-rbac.yaml): the one list of what the operator may do. The
lease rules go to a Role in the release's namespace (only with leader
election, and only there: the Lease lives next to the operator); every other
rule to the ClusterRole, or to a Role in the watched namespace.
*/}}
{{- define "parley.rules" -}}
{{- $rules := (.Files.Get "files/operator-rbac.yaml" | fromYaml).rules }}
{{- if not $rules }}{{ fail "files/operator-rbac.yaml has no rules" }}{{ end }}
{{- $kept := list }}
{{- range $rules }}
{{- if not (has "coordination.k8s.io" .apiGroups) }}{{ $kept = append $kept . }}{{ end }}
{{- end }}
{{- toYaml $kept }}
{{- end }}

{{- define "parley.leaseRules" -}}
{{- $rules := (.Files.Get "files/operator-rbac.yaml" | fromYaml).rules }}
{{- $kept := list }}
{{- range $rules }}
{{- if has "coordination.k8s.io" .apiGroups }}{{ $kept = append $kept . }}{{ end }}
{{- end }}
{{- if not $kept }}{{ fail "files/operator-rbac.yaml has no lease rule" }}{{ end }}
{{- toYaml $kept }}
{{- end }}

{{/* The sample chat service's name. */}}
{{- define "parley.sampleName" -}}
{{- default (printf "%s-sample" (include "parley.fullname" .)) .Values.sample.name | trunc 52 | trimSuffix "-" }}
{{- end }}
