{{/* Standard name helpers, as in the kube-state-metrics chart. */}}
{{- define "genrun.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "genrun.fullname" -}}
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

{{- define "genrun.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "genrun.selectorLabels" -}}
app.kubernetes.io/name: {{ include "genrun.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "genrun.labels" -}}
helm.sh/chart: {{ include "genrun.chart" . }}
{{ include "genrun.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: genrun
{{- end }}

{{- define "genrun.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "genrun.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "genrun.watchNamespace" -}}
{{- if .Values.operator.watchNamespace }}{{ .Values.operator.watchNamespace }}{{ else if not .Values.rbac.clusterWide }}{{ .Release.Namespace }}{{ end }}
{{- end }}

{{- /* Egress of the NetworkPolicies when networkPolicy.egress is set: DNS, then the listed rules. */ -}}
{{- define "genrun.networkPolicyEgress" -}}
- ports:
    - port: 53
      protocol: UDP
    - port: 53
      protocol: TCP
{{ toYaml .Values.networkPolicy.egress }}
{{- end }}
