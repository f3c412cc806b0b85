{{/* Chart name, truncated to the 63 characters a label value allows. */}}
{{- define "tandem.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name of the release's objects: the release name when it already contains the chart name,
else "<release>-<chart>". Truncated to 63 characters (DNS label).
*/}}
{{- define "tandem.fullname" -}}
{{- if contains .Chart.Name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{/*
Name of cluster-scoped objects (ClusterRole, ClusterRoleBinding): the full name qualified by the
release namespace, so two releases with the same name in different namespaces never collide.
*/}}
{{- define "tandem.clusterName" -}}
{{- printf "%s-%s" .Release.Namespace (include "tandem.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "tandem.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels every object of the release carries. */}}
{{- define "tandem.labels" -}}
helm.sh/chart: {{ include "tandem.chart" . }}
{{ include "tandem.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: tandem
{{- end }}

{{/* Labels that select the operator pods; never change them (Deployment selectors are immutable). */}}
{{- define "tandem.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tandem.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{/* The operator's ServiceAccount name. */}}
{{- define "tandem.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "tandem.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name must name an existing ServiceAccount when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The leader-election Lease name. */}}
{{- define "tandem.leaseName" -}}
{{- default (include "tandem.fullname" .) .Values.leaderElection.leaseName }}
{{- end }}

{{/* The namespaces watched in Namespaced scope, as a JSON list (fromJsonArray to range). */}}
{{- define "tandem.watchNamespaces" -}}
{{- default (list .Release.Namespace) .Values.rbac.watchNamespaces | uniq | toJson }}
{{- end }}

{{/*
Where NOTES.txt suggests creating a pipeline: the first watched namespace, or a placeholder in
Cluster scope (pipelines belong in their teams' namespaces, not the operator's).
*/}}
{{- define "tandem.exampleNamespace" -}}
{{- if eq .Values.rbac.scope "Namespaced" }}
{{- include "tandem.watchNamespaces" . | fromJsonArray | first }}
{{- else }}
{{- "<namespace>" }}
{{- end }}
{{- end }}

{{/* "repository:tag" or "repository@digest"; the tag defaults to the chart's appVersion. */}}
{{- define "tandem.image" -}}
{{- if .digest }}
{{- printf "%s@%s" .repository .digest }}
{{- else }}
{{- printf "%s:%s" .repository (default .appVersion .tag) }}
{{- end }}
{{- end }}

{{- define "tandem.operatorImage" -}}
{{- include "tandem.image" (dict "repository" .Values.image.repository "tag" .Values.image.tag "digest" .Values.image.digest "appVersion" .Chart.AppVersion) }}
{{- end }}

{{- define "tandem.workerImage" -}}
{{- include "tandem.image" (dict "repository" .Values.worker.image.repository "tag" .Values.worker.image.tag "digest" .Values.worker.image.digest "appVersion" .Chart.AppVersion) }}
{{- end }}
