{{- define "sparsemoe-operator.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "sparsemoe-operator.serviceAccountName" -}}
{{- default (include "sparsemoe-operator.fullname" .) .Values.serviceAccount.name -}}
{{- end -}}

{{- define "sparsemoe-operator.selectorLabels" -}}
app.kubernetes.io/name: sparsemoe-operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "sparsemoe-operator.labels" -}}
{{ include "sparsemoe-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}
