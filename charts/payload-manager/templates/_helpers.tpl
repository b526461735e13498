{{/* The operator's name: the release's, unless the release is the chart. */}}
{{- define "payload-manager.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "payload-manager.labels" -}}
app.kubernetes.io/name: payload-operator
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "payload-manager.selector" -}}
app.kubernetes.io/name: payload-operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* repository:tag of (dict "image" .Values.x.image "appVersion" .Chart.AppVersion). */}}
{{- define "payload-manager.image" -}}
{{- printf "%s:%s" .image.repository (.image.tag | default .appVersion) -}}
{{- end -}}

{{/* The bundled PostgreSQL's own name, so neither the operator's
     Deployment nor the catalog's Service selects its pod. */}}
{{- define "payload-manager.postgresql.selector" -}}
app.kubernetes.io/name: payload-manager-postgresql
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "payload-manager.postgresql.labels" -}}
{{ include "payload-manager.postgresql.selector" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* The Secret holding the catalog's DSN: catalog.databaseSecret, else the
     bundled PostgreSQL's; empty when there is no catalog. */}}
{{- define "payload-manager.databaseSecret" -}}
{{- if .Values.catalog.databaseSecret -}}
{{- .Values.catalog.databaseSecret -}}
{{- else if .Values.postgresql.enabled -}}
{{- include "payload-manager.postgresql.name" . -}}
{{- end -}}
{{- end -}}

{{/* The bundled PostgreSQL's objects: within 63 characters with the suffix. */}}
{{- define "payload-manager.postgresql.name" -}}
{{- printf "%s-postgresql" (include "payload-manager.fullname" . | trunc 52 | trimSuffix "-") -}}
{{- end -}}
