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

{{- /* The values' affinity; without one, and with more than one replica, a preference for
replicas on different nodes; otherwise none. */ -}}
{{- define "sparsemoe-operator.affinity" -}}
{{- if .Values.affinity -}}
{{- toYaml .Values.affinity -}}
{{- else if gt (int .Values.replicaCount) 1 -}}
podAntiAffinity:
  preferredDuringSchedulingIgnoredDuringExecution:
    - weight: 100
      podAffinityTerm:
        topologyKey: kubernetes.io/hostname
        labelSelector:
          matchLabels:
            {{- include "sparsemoe-operator.selectorLabels" . | nindent 12 }}
{{- else -}}
{}
{{- end -}}
{{- end -}}
