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

{{/* <fullname>-<suffix>, the full name cut so that the whole stays within 63 characters (a Service
name is a DNS label) and the suffix survives: two objects never collapse into one name. */}}
{{- define "relay.suffixed" -}}
{{- $root := index . 0 }}
{{- $suffix := index . 1 }}
{{- printf "%s-%s" (include "relay.fullname" $root | trunc (int (sub 62 (len $suffix))) | trimSuffix "-") $suffix }}
{{- end }}

{{/* Labels on every object, as a YAML map: the chart's own, then commonLabels (which win). Emitted
through toYaml so that a label the user repeats appears once (strict YAML loaders refuse duplicates). */}}
{{- define "relay.labelMap" -}}
{{- $labels := dict
  "helm.sh/chart" (include "relay.chart" .)
  "app.kubernetes.io/name" (include "relay.name" .)
  "app.kubernetes.io/instance" .Release.Name
  "app.kubernetes.io/version" .Chart.AppVersion
  "app.kubernetes.io/managed-by" .Release.Service
  "app.kubernetes.io/part-of" "relay" }}
{{- toYaml (merge (deepCopy (.Values.commonLabels | default dict)) $labels) }}
{{- end }}

{{/* Object labels: relay.labelMap plus the given component. Call with (list $ "component"). */}}
{{- define "relay.componentLabels" -}}
{{- $root := index . 0 }}
{{- $labels := include "relay.labelMap" $root | fromYaml }}
{{- if gt (len .) 1 }}{{ $_ := set $labels "app.kubernetes.io/component" (index . 1) }}{{ end }}
{{- toYaml $labels }}
{{- end }}

{{- define "relay.labels" -}}
{{- include "relay.labelMap" . }}
{{- end }}

{{/* Pod template labels: object labels, extra pod labels, then the selector (which must win). */}}
{{- define "relay.podLabels" -}}
{{- $root := index . 0 }}
{{- $selector := index . 1 | fromYaml }}
{{- $extra := index . 2 | default dict }}
{{- $labels := include "relay.labelMap" $root | fromYaml }}
{{- toYaml (merge $selector (deepCopy $extra) $labels) }}
{{- end }}

{{/* Selector of the relay pods (immutable in a Deployment: never add to it). */}}
{{- define "relay.selectorLabels" -}}
app.kubernetes.io/name: {{ include "relay.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: relay
{{- end }}

{{- define "relay.redis.fullname" -}}
{{- include "relay.suffixed" (list . "redis") }}
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

{{/* A repository with global.imageRegistry in place of its registry (the first path part when it
names a host: it has a dot or a port, or is localhost), or in front of it when it has none. */}}
{{- define "relay.repository" -}}
{{- $repository := index . 1 }}
{{- $registry := (index . 0).Values.global.imageRegistry }}
{{- if $registry }}
{{- $parts := splitList "/" $repository }}
{{- $first := first $parts }}
{{- if and (gt (len $parts) 1) (or (contains "." $first) (contains ":" $first) (eq $first "localhost")) }}
{{- $repository = join "/" (rest $parts) }}
{{- end }}
{{- printf "%s/%s" (trimSuffix "/" $registry) $repository }}
{{- else }}
{{- $repository }}
{{- end }}
{{- end }}

{{/* The relay image. There is no published one: an empty image.repository fails the install here,
rather than leaving pods in ImagePullBackOff. */}}
{{- define "relay.image" -}}
{{- if not .Values.image.repository }}
{{- fail "relay: image.repository is empty. There is no published relay image: build it from the repository's Dockerfile, push it to a registry your cluster can pull from, and set image.repository (and image.tag or image.digest); deploy/helm/relay/README.md, \"The image\", shows the commands" }}
{{- end }}
{{- $repository := include "relay.repository" (list . .Values.image.repository) }}
{{- if .Values.image.digest }}
{{- printf "%s@%s" $repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" $repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{- define "relay.redis.image" -}}
{{- printf "%s:%s" (include "relay.repository" (list . .Values.redis.image.repository)) .Values.redis.image.tag }}
{{- end }}

{{/* The relay pods' console: relay.console when set, else on unless an Ingress or HTTPRoute exposes
the WebSocket port beyond the cluster. */}}
{{- define "relay.console" -}}
{{- if kindIs "bool" .Values.relay.console }}
{{- .Values.relay.console }}
{{- else }}
{{- not (or .Values.ingress.enabled .Values.httpRoute.enabled) }}
{{- end }}
{{- end }}

{{/* The in-chart Redis password: redis.auth.password, else the one in the existing Secret (lookup,
on `helm install/upgrade` against a cluster), else a new random one. Drawn once per render and kept
in a dict shared by every template, so the Secret and both checksum annotations agree. */}}
{{- define "relay.redisPassword" -}}
{{- $memo := .Values.redis.auth }}
{{- if not (hasKey $memo "_renderedPassword") }}
{{- $password := .Values.redis.enabled | ternary .Values.redis.auth.password .Values.externalRedis.password }}
{{- if not $password }}
{{- $existing := lookup "v1" "Secret" .Release.Namespace (include "relay.redis.fullname" .) }}
{{- $password = $existing | dig "data" (include "relay.redisSecretKey" .) "" | b64dec | default (randAlphaNum 32) }}
{{- end }}
{{- $_ := set $memo "_renderedPassword" $password }}
{{- end }}
{{- get $memo "_renderedPassword" }}
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

{{/* Shortest grace period that covers the drain: delay + window + 1.25 x close timeout + 1 s (pod.py
waits that long for the last sockets: stalled ones are cut between 1 and 1.25 close timeouts). */}}
{{- define "relay.drainSeconds" -}}
{{- $r := .Values.relay }}
{{- addf $r.drainDelay $r.drainWindow (mulf $r.closeTimeout 1.25) 1 | ceil | int }}
{{- end }}

{{- define "relay.terminationGracePeriodSeconds" -}}
{{- $drain := include "relay.drainSeconds" . | int }}
{{- if kindIs "invalid" .Values.terminationGracePeriodSeconds }}
{{- add $drain 15 }}
{{- else if le (int .Values.terminationGracePeriodSeconds) (add $drain 5) }}
{{- fail (printf "relay: terminationGracePeriodSeconds=%d must exceed relay.drainDelay + relay.drainWindow + 1.25 x relay.closeTimeout + 1 (%d s) by more than 5 s, or the kubelet kills pods mid-drain" (int .Values.terminationGracePeriodSeconds) $drain) }}
{{- else }}
{{- .Values.terminationGracePeriodSeconds }}
{{- end }}
{{- end }}

{{/* A relay value as the text of an environment variable; whole numbers print without an exponent (1e+06). */}}
{{- define "relay.envText" -}}
{{- if and (kindIs "float64" .) (eq . (float64 (int64 .))) }}
{{- int64 . }}
{{- else }}
{{- toString . }}
{{- end }}
{{- end }}

{{/* The inline JWKS as JSON text (relay.auth.jwks may be JSON text or a YAML object). */}}
{{- define "relay.auth.jwksText" -}}
{{- $jwks := .Values.relay.auth.jwks }}
{{- if kindIs "map" $jwks }}
{{- toPrettyJson $jwks }}
{{- else }}
{{- $jwks }}
{{- end }}
{{- end }}

{{/* Where the key files come from: "inline" (the chart's <fullname>-auth ConfigMap), "configMap", "secret", or "". */}}
{{- define "relay.auth.keySource" -}}
{{- $a := .Values.relay.auth }}
{{- if or $a.jwks $a.publicKey }}inline
{{- else if $a.keysFrom.configMap }}configMap
{{- else if $a.keysFrom.secret }}secret
{{- end }}
{{- end }}

{{/* "true" when a JWKS (inline or from keysFrom) is mounted at /etc/relay/auth/jwks.json. */}}
{{- define "relay.auth.hasJwks" -}}
{{- $a := .Values.relay.auth }}
{{- if and $a.enabled (or $a.jwks (and (or $a.keysFrom.configMap $a.keysFrom.secret) $a.keysFrom.jwksKey)) }}true{{ end }}
{{- end }}

{{/* "true" when a PEM public key is mounted at /etc/relay/auth/public-key.pem. */}}
{{- define "relay.auth.hasPublicKey" -}}
{{- $a := .Values.relay.auth }}
{{- if and $a.enabled (or $a.publicKey (and (or $a.keysFrom.configMap $a.keysFrom.secret) $a.keysFrom.publicKeyKey)) }}true{{ end }}
{{- end }}

{{/* The Secret holding RELAY_API_KEYS: the user's existingSecret, or the chart's <fullname>-api. */}}
{{- define "relay.api.secretName" -}}
{{- if .Values.relay.api.enabled }}
{{- default (include "relay.suffixed" (list . "api")) .Values.relay.api.existingSecret }}
{{- end }}
{{- end }}

{{- define "relay.api.secretKey" -}}
{{- ternary .Values.relay.api.existingSecretKey "api-keys" (not (empty .Values.relay.api.existingSecret)) }}
{{- end }}

{{/* Whether the chart itself must create the API key Secret. */}}
{{- define "relay.api.createSecret" -}}
{{- if and .Values.relay.api.enabled (not .Values.relay.api.existingSecret) }}true{{ end }}
{{- end }}

{{/* Fails the render on security settings that contradict each other or would leak a secret. */}}
{{- define "relay.validateSecurity" -}}
{{- $a := .Values.relay.auth }}
{{- $from := $a.keysFrom }}
{{- $api := .Values.relay.api }}
{{- $keySources := compact (list $a.jwks $a.publicKey $from.configMap $from.secret $a.existingSecret) }}
{{- if and $a.enabled (empty $keySources) }}
{{- fail "relay: relay.auth.enabled needs a key to verify tokens with: relay.auth.jwks, relay.auth.publicKey, relay.auth.keysFrom (a ConfigMap or Secret you manage) or relay.auth.existingSecret (HS256 shared secret)" }}
{{- end }}
{{- if and (not $a.enabled) (not (empty $keySources)) }}
{{- fail "relay: relay.auth has key material (jwks, publicKey, keysFrom or existingSecret) but relay.auth.enabled is false; set enabled: true to require tokens, or remove the keys" }}
{{- end }}
{{- if and $a.jwks $a.publicKey }}
{{- fail "relay: set relay.auth.jwks or relay.auth.publicKey, not both (relay verifies with the JWKS and would ignore the PEM key)" }}
{{- end }}
{{- if and (or $a.jwks $a.publicKey) (or $from.configMap $from.secret) }}
{{- fail "relay: set the token keys inline (relay.auth.jwks / publicKey) or through relay.auth.keysFrom, not both" }}
{{- end }}
{{- if and $from.configMap $from.secret }}
{{- fail "relay: set relay.auth.keysFrom.configMap or relay.auth.keysFrom.secret, not both" }}
{{- end }}
{{- if and (or $from.configMap $from.secret) (not (or $from.jwksKey $from.publicKeyKey)) }}
{{- fail "relay: relay.auth.keysFrom needs jwksKey or publicKeyKey: the key in the ConfigMap or Secret that holds the JWKS or PEM public key" }}
{{- end }}
{{- if and $from.jwksKey $from.publicKeyKey }}
{{- fail "relay: set relay.auth.keysFrom.jwksKey or publicKeyKey, not both (relay verifies with the JWKS and would ignore the PEM key)" }}
{{- end }}
{{- if and (or $from.jwksKey $from.publicKeyKey) (not (or $from.configMap $from.secret)) }}
{{- fail "relay: relay.auth.keysFrom.jwksKey / publicKeyKey name a key of relay.auth.keysFrom.configMap or keysFrom.secret, and neither is set" }}
{{- end }}
{{- if $a.jwks }}
{{- $parsed := include "relay.auth.jwksText" . | fromJson }}
{{- if or (hasKey $parsed "Error") (not (kindIs "slice" (get $parsed "keys"))) }}
{{- fail "relay: relay.auth.jwks is not a JWKS: it must be a JSON object with a \"keys\" list" }}
{{- end }}
{{- end }}
{{- if $a.enabled }}
{{- $hmac := false }}
{{- $asym := false }}
{{- range $a.algorithms }}
{{- if hasPrefix "HS" . }}{{ $hmac = true }}{{ else }}{{ $asym = true }}{{ end }}
{{- end }}
{{- $hasFile := or $a.jwks $a.publicKey $from.jwksKey $from.publicKeyKey }}
{{- if and $hmac (not $a.existingSecret) }}
{{- fail "relay: relay.auth.algorithms lists an HS algorithm, which needs the shared secret from relay.auth.existingSecret" }}
{{- end }}
{{- if and $asym (not $hasFile) }}
{{- fail "relay: relay.auth.algorithms lists a public-key algorithm (RS/ES/PS/EdDSA), which needs relay.auth.jwks, publicKey or keysFrom" }}
{{- end }}
{{- if and (not $a.algorithms) $a.existingSecret $hasFile }}
{{- fail "relay: relay.auth has both an HS256 secret (existingSecret) and a JWKS or public key; list relay.auth.algorithms (e.g. [HS256, RS256]), since relay's default with a secret is HS256 alone" }}
{{- end }}
{{- if and $a.algorithms (not $hmac) $a.existingSecret }}
{{- fail "relay: relay.auth.existingSecret holds an HS256 secret, but relay.auth.algorithms lists no HS algorithm: tokens signed with it would all be refused" }}
{{- end }}
{{- if and $a.algorithms (not $asym) $hasFile }}
{{- fail "relay: relay.auth has a JWKS or public key, but relay.auth.algorithms lists only HS algorithms: tokens signed with those keys would all be refused" }}
{{- end }}
{{- end }}
{{- if and $api.enabled (not (or $api.existingSecret $api.keys)) }}
{{- fail "relay: relay.api.enabled needs API keys: relay.api.existingSecret (preferred) or relay.api.keys" }}
{{- end }}
{{- if and $api.existingSecret $api.keys }}
{{- fail "relay: set relay.api.existingSecret or relay.api.keys, not both" }}
{{- end }}
{{- if and (not $api.enabled) (or $api.existingSecret $api.keys) }}
{{- fail "relay: relay.api has keys (existingSecret or keys) but relay.api.enabled is false; set enabled: true to serve POST /api/publish, or remove the keys" }}
{{- end }}
{{- if and $api.enabled .Values.networkPolicy.enabled (empty .Values.networkPolicy.apiFrom) }}
{{- fail "relay: relay.api.enabled with networkPolicy.enabled needs networkPolicy.apiFrom (your backends' namespace or pods): otherwise no backend can reach POST /api/publish on the internal port" }}
{{- end }}
{{- range .Values.extraEnv }}
{{- if has .name (list "RELAY_JWT_SECRET" "RELAY_JWT_JWKS_FILE" "RELAY_JWT_PUBLIC_KEY_FILE" "RELAY_API_KEYS" "RELAY_ALLOWED_ORIGINS") }}
{{- fail (printf "relay: extraEnv sets %s; use relay.auth, relay.api or relay.allowedOrigins instead, so that secrets come from a Secret, key files are mounted and the NetworkPolicy follows relay.api.enabled" .name) }}
{{- end }}
{{- if and (eq .name "RELAY_REDIS_PASSWORD") (hasKey . "value") }}
{{- fail "relay: extraEnv sets RELAY_REDIS_PASSWORD as a plain value, which lands in the Deployment and the release; use externalRedis.existingSecret" }}
{{- end }}
{{- if and (eq .name "RELAY_REDIS_PASSWORD") (include "relay.redisSecretName" $) }}
{{- fail "relay: extraEnv sets RELAY_REDIS_PASSWORD, which the chart already sets from the Redis settings; remove it from extraEnv" }}
{{- end }}
{{- end }}
{{- end }}

{{/* The Service backends publish through (ready pods only). */}}
{{- define "relay.apiServiceName" -}}
{{- include "relay.suffixed" (list . "publish") }}
{{- end }}

{{/* The TCP ports of the external Redis, as a JSON list: the port of every host:port in the broker URL
(6379 when a host names none), 6379 for the master Sentinel names, and networkPolicy.externalRedisPorts. */}}
{{- define "relay.externalRedisPorts" -}}
{{- $url := include "relay.brokerUrl" . }}
{{- $scheme := first (splitList "://" $url) }}
{{- $rest := index (splitList "://" $url) 1 }}
{{- $hosts := first (splitList "/" $rest) }}
{{- $ports := list }}
{{- range splitList "," $hosts }}
{{- $hostPort := last (splitList "@" .) }}
{{- if regexMatch ":[0-9]+$" $hostPort }}
{{- $ports = append $ports (regexFind "[0-9]+$" $hostPort | int) }}
{{- else }}
{{- $ports = append $ports 6379 }}
{{- end }}
{{- end }}
{{- if eq $scheme "redis+sentinel" }}
{{- $ports = append $ports 6379 }}
{{- end }}
{{- range .Values.networkPolicy.externalRedisPorts }}
{{- $ports = append $ports (int .) }}
{{- end }}
{{- $ports | uniq | toJson }}
{{- end }}
