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
