{{/*
Checks that values.schema.json cannot express: relations between values, minimums of durations,
and keys the chart reserves. Each failure names the value and says what to do. Included once,
from deployment.yaml.
*/}}

{{/* Milliseconds of a duration the schema has already checked (one number, then ms, s, m or h). */}}
{{- define "tandem.durationMillis" -}}
{{- $n := regexReplaceAll "^([0-9]+)(ms|s|m|h)$" . "${1}" | int64 }}
{{- $unit := regexReplaceAll "^([0-9]+)(ms|s|m|h)$" . "${2}" }}
{{- mul $n (get (dict "ms" 1 "s" 1000 "m" 60000 "h" 3600000) $unit) }}
{{- end }}

{{- define "tandem.validate" -}}
{{- $v := .Values }}

{{- /*
The Lease records whole seconds (leaseDurationSeconds), and the holder renews every third of
the duration and steps down after two thirds without a renewal: below 5s one slow API answer
makes the leader step down, and a fraction of a second would make the holder count on a longer
Lease than its standby sees.
*/}}
{{- $lease := include "tandem.durationMillis" $v.leaderElection.leaseDuration | int64 }}
{{- if lt $lease 5000 }}
{{- fail (printf "leaderElection.leaseDuration must be at least 5s (got %s): the leader renews every third of it and steps down after two thirds without a renewal" $v.leaderElection.leaseDuration) }}
{{- end }}
{{- if mod $lease 1000 }}
{{- fail (printf "leaderElection.leaseDuration must be a whole number of seconds (got %s): the Lease records whole seconds" $v.leaderElection.leaseDuration) }}
{{- end }}

{{- /*
Every reconcile that changes something makes API calls; below 5s a loaded API server (p99 of
a reconcile up to half a second at 1,000 pipelines, docs/benchmarks.md) times reconciles out.
*/}}
{{- $timeout := include "tandem.durationMillis" $v.reconcileTimeout | int64 }}
{{- if lt $timeout 5000 }}
{{- fail (printf "reconcileTimeout must be at least 5s (got %s): a reconcile that calls the API server would time out" $v.reconcileTimeout) }}
{{- end }}

{{- /*
On SIGTERM the leader takes no new work, lets running reconciles finish (each up to
reconcileTimeout), then releases the Lease: the grace period must cover both, or the kubelet
kills a reconcile half way and the standby waits out the whole Lease.
*/}}
{{- $grace := mul (int64 $v.terminationGracePeriodSeconds) 1000 }}
{{- if lt $grace (add $timeout 10000) }}
{{- fail (printf "terminationGracePeriodSeconds (%d) must be at least reconcileTimeout (%s) + 10s, so a stopping leader finishes its reconciles and releases the Lease before it is killed" (int64 $v.terminationGracePeriodSeconds) $v.reconcileTimeout) }}
{{- end }}

{{- if and (eq $v.rbac.scope "Cluster") $v.rbac.watchNamespaces }}
{{- fail (printf "rbac.watchNamespaces (%s) is only read with rbac.scope=Namespaced; rbac.scope=Cluster watches every namespace: set rbac.scope=Namespaced, or leave rbac.watchNamespaces empty" ($v.rbac.watchNamespaces | join ",")) }}
{{- end }}

{{- range $key := include "tandem.selectorLabels" . | fromYaml | keys | sortAlpha }}
{{- if hasKey $v.podLabels $key }}
{{- fail (printf "podLabels must not set %s: the chart sets it to select the operator pods" $key) }}
{{- end }}
{{- end }}

{{- /* The Lease RBAC covers the chart's Lease in the release namespace only. */}}
{{- range $v.extraArgs }}
{{- if or (hasPrefix "--lease-name" .) (hasPrefix "--lease-namespace" .) }}
{{- fail (printf "extraArgs must not set %s: the chart's RBAC covers only its own Lease; set leaderElection.leaseName instead" .) }}
{{- end }}
{{- end }}

{{- /* The ServiceMonitor scrapes the operator through the metrics Service. */}}
{{- if and $v.monitoring.serviceMonitor.enabled (not $v.metrics.service.enabled) }}
{{- fail "monitoring.serviceMonitor.enabled needs metrics.service.enabled: the ServiceMonitor selects the operator through that Service (or scrape the pods with your own PodMonitor)" }}
{{- end }}
{{- end }}
