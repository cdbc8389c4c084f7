{{/* The chart name, truncated to the 63 characters a label value allows. */}}
{{- define "relay.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The prefix of every resource name: <release>-relay, or the release name when it already says relay. */}}
{{- define "relay.fullname" -}}
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

{{- define "relay.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels on every object. */}}
{{- define "relay.labels" -}}
helm.sh/chart: {{ include "relay.chart" . }}
app.kubernetes.io/name: {{ include "relay.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: relay
{{- end }}

{{/* Selector of the relay pods (immutable in a Deployment: never add to it). */}}
{{- define "relay.selectorLabels" -}}
app.kubernetes.io/name: {{ include "relay.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: relay
{{- end }}

{{- define "relay.redis.fullname" -}}
{{- printf "%s-redis" (include "relay.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "relay.redis.selectorLabels" -}}
app.kubernetes.io/name: {{ include "relay.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: redis
{{- end }}

{{- define "relay.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "relay.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "relay.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* Fails the render unless exactly one Redis is configured, and an external one is complete. */}}
{{- define "relay.validateRedis" -}}
{{- $in := .Values.redis.enabled }}
{{- $ext := .Values.externalRedis }}
{{- if and $in $ext.enabled }}
{{- fail "relay: set exactly one of redis.enabled (Redis inside this release) and externalRedis.enabled (your own Redis); both are true" }}
{{- end }}
{{- if not (or $in $ext.enabled) }}
{{- fail "relay: set exactly one of redis.enabled (Redis inside this release) and externalRedis.enabled (your own Redis); both are false, and pods on several nodes can only meet through Redis" }}
{{- end }}
{{- if $ext.enabled }}
{{- if and $ext.sentinel.enabled $ext.cluster.enabled }}
{{- fail "relay: externalRedis.sentinel.enabled and externalRedis.cluster.enabled exclude each other" }}
{{- end }}
{{- if and $ext.sentinel.enabled (not $ext.url) (empty $ext.sentinel.hosts) }}
{{- fail "relay: externalRedis.sentinel.enabled needs externalRedis.sentinel.hosts (host:port of each Sentinel)" }}
{{- end }}
{{- if and $ext.cluster.enabled (not $ext.url) (empty $ext.cluster.nodes) }}
{{- fail "relay: externalRedis.cluster.enabled needs externalRedis.cluster.nodes (host:port of some nodes)" }}
{{- end }}
{{- if not (or $ext.url $ext.host $ext.sentinel.enabled $ext.cluster.enabled) }}
{{- fail "relay: externalRedis.enabled needs externalRedis.url, externalRedis.host, sentinel.hosts or cluster.nodes" }}
{{- end }}
{{- if and $ext.password $ext.existingSecret }}
{{- fail "relay: set externalRedis.password or externalRedis.existingSecret, not both" }}
{{- end }}
{{- end }}
{{- end }}

{{/* RELAY_BROKER_URL. Credentials never go into it: the password travels as RELAY_REDIS_PASSWORD. */}}
{{- define "relay.brokerUrl" -}}
{{- $ext := .Values.externalRedis }}
{{- if .Values.redis.enabled }}
{{- printf "redis://%s:6379/0" (include "relay.redis.fullname" .) }}
{{- else if $ext.url }}
{{- $ext.url }}
{{- else if $ext.sentinel.enabled }}
{{- printf "redis+sentinel://%s/%s" (join "," $ext.sentinel.hosts) $ext.sentinel.masterName }}
{{- else if $ext.cluster.enabled }}
{{- printf "redis+cluster://%s" (join "," $ext.cluster.nodes) }}
{{- else }}
{{- printf "%s://%s:%d/%d" (ternary "rediss" "redis" $ext.tls.enabled) $ext.host (int $ext.port) (int $ext.db) }}
{{- end }}
{{- end }}

{{/* The Secret and key holding the Redis password, or nothing when Redis has none. */}}
{{- define "relay.redisSecretName" -}}
{{- if .Values.redis.enabled }}
{{- if .Values.redis.auth.enabled }}
{{- default (include "relay.redis.fullname" .) .Values.redis.auth.existingSecret }}
{{- end }}
{{- else if .Values.externalRedis.existingSecret }}
{{- .Values.externalRedis.existingSecret }}
{{- else if .Values.externalRedis.password }}
{{- include "relay.redis.fullname" . }}
{{- end }}
{{- end }}

{{- define "relay.redisSecretKey" -}}
{{- if .Values.redis.enabled }}
{{- .Values.redis.auth.existingSecretPasswordKey }}
{{- else }}
{{- .Values.externalRedis.existingSecretPasswordKey }}
{{- end }}
{{- end }}

{{/* Whether the chart itself must create the password Secret. */}}
{{- define "relay.createRedisSecret" -}}
{{- if .Values.redis.enabled }}
{{- if and .Values.redis.auth.enabled (not .Values.redis.auth.existingSecret) }}true{{ end }}
{{- else if and .Values.externalRedis.password (not .Values.externalRedis.existingSecret) }}true{{ end }}
{{- end }}

{{/* Shortest grace period that covers the drain: delay + window + close timeout + 1 s (pod.py). */}}
{{- define "relay.drainSeconds" -}}
{{- $r := .Values.relay }}
{{- addf $r.drainDelay $r.drainWindow $r.closeTimeout 1 | ceil | int }}
{{- end }}

{{- define "relay.terminationGracePeriodSeconds" -}}
{{- $drain := include "relay.drainSeconds" . | int }}
{{- if kindIs "invalid" .Values.terminationGracePeriodSeconds }}
{{- add $drain 15 }}
{{- else if le (int .Values.terminationGracePeriodSeconds) (add $drain 5) }}
{{- fail (printf "relay: terminationGracePeriodSeconds=%d must exceed relay.drainDelay + relay.drainWindow + relay.closeTimeout + 1 (%d s) by more than 5 s, or the kubelet kills pods mid-drain" (int .Values.terminationGracePeriodSeconds) $drain) }}
{{- else }}
{{- .Values.terminationGracePeriodSeconds }}
{{- end }}
{{- end }}
