{{/*
Names, labels and checks shared by every template.
*/}}

{{/* The chart's name, or nameOverride. */}}
{{- define "squall.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The prefix of every object's name: fullnameOverride, or the release name when it already
contains the chart's name, or `<release>-<name>`. Kept short enough for a `-forkd` suffix.
*/}}
{{- define "squall.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 56 | trimSuffix "-" }}
{{- else }}
{{- $name := include "squall.name" . }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 56 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 56 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* The forkd DaemonSet's name, which is also its headless Service's. */}}
{{- define "squall.forkd.fullname" -}}
{{- printf "%s-forkd" (include "squall.fullname" .) }}
{{- end }}

{{/* Labels on every object. */}}
{{- define "squall.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "squall.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* Selector labels of the balancer and scaler. */}}
{{- define "squall.selectorLabels" -}}
app.kubernetes.io/name: {{ include "squall.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: scaler
{{- end }}

{{/* Selector labels of forkd. */}}
{{- define "squall.forkd.selectorLabels" -}}
app.kubernetes.io/name: {{ include "squall.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: forkd
{{- end }}

{{/* The squall image of the balancer and scaler. */}}
{{- define "squall.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* The image of forkd: forkd.image, falling back field by field to image; with the vm
driver the default name is image.repository with "-forkd-vm" appended (the image
scripts/build-images makes with QEMU, a kernel and busybox). */}}
{{- define "squall.forkd.image" -}}
{{- $fallback := .Values.image.repository }}
{{- if eq .Values.driver "vm" }}
{{- $fallback = printf "%s-forkd-vm" .Values.image.repository }}
{{- end }}
{{- $repository := default $fallback .Values.forkd.image.repository }}
{{- $tag := default (default .Chart.AppVersion .Values.image.tag) .Values.forkd.image.tag }}
{{- printf "%s:%s" $repository $tag }}
{{- end }}

{{/* The name of the Secret that holds forkd's token. */}}
{{- define "squall.tokenSecret" -}}
{{- default (printf "%s-forkd-token" (include "squall.fullname" .)) .Values.forkd.token.existingSecret }}
{{- end }}

{{/* The key of the token in that Secret. */}}
{{- define "squall.tokenKey" -}}
{{- if .Values.forkd.token.existingSecret }}{{ .Values.forkd.token.existingSecretKey }}{{ else }}token{{ end }}
{{- end }}

{{/*
A token the chart keeps in a Secret of its own: the value given, else the one the Secret
already has (so that an upgrade does not change it under running pods), else a new random
one. It is computed once per render and kept in the token's values (`_generated`), so the
Secret and the pods' checksum agree. Called with a dict: `values` (forkd.token or
admin.token), `secret` (the Secret's name) and `namespace`.
*/}}
{{- define "squall.generatedToken" -}}
{{- $values := .values }}
{{- if not (hasKey $values "_generated") }}
{{- $token := $values.value }}
{{- if not $token }}
{{- $existing := lookup "v1" "Secret" .namespace .secret }}
{{- if and $existing $existing.data (hasKey $existing.data "token") }}
{{- $token = index $existing.data "token" | b64dec }}
{{- else }}
{{- $token = randAlphaNum 48 }}
{{- end }}
{{- end }}
{{- $_ := set $values "_generated" $token }}
{{- end }}
{{- index $values "_generated" }}
{{- end }}

{{/* The token the chart's forkd token Secret holds. */}}
{{- define "squall.token" -}}
{{- include "squall.generatedToken" (dict "values" .Values.forkd.token "secret" (include "squall.tokenSecret" .) "namespace" .Release.Namespace) }}
{{- end }}

{{/* Where the pods find the token file. */}}
{{- define "squall.tokenFile" -}}
/etc/squall/token/{{ include "squall.tokenKey" . }}
{{- end }}

{{/* The name of the Secret that holds the admin listener's token. */}}
{{- define "squall.adminTokenSecret" -}}
{{- default (printf "%s-admin-token" (include "squall.fullname" .)) .Values.admin.token.existingSecret }}
{{- end }}

{{/* The key of the admin token in that Secret. */}}
{{- define "squall.adminTokenKey" -}}
{{- if .Values.admin.token.existingSecret }}{{ .Values.admin.token.existingSecretKey }}{{ else }}token{{ end }}
{{- end }}

{{/* The token the chart's admin token Secret holds. */}}
{{- define "squall.adminToken" -}}
{{- include "squall.generatedToken" (dict "values" .Values.admin.token "secret" (include "squall.adminTokenSecret" .) "namespace" .Release.Namespace) }}
{{- end }}

{{/* Where squall up finds the admin token file. */}}
{{- define "squall.adminTokenFile" -}}
/etc/squall/admin-token/{{ include "squall.adminTokenKey" . }}
{{- end }}

{{/* Whether Prometheus must send the admin token to scrape /metrics. */}}
{{- define "squall.metricsNeedToken" -}}
{{- if and .Values.admin.token.enabled (not .Values.admin.metricsOpen) }}true{{ end }}
{{- end }}

{{/*
Refuses values that cannot work, with a message that says which value and why. Included by
every workload template, so a bad value fails the render whatever is rendered.
*/}}
{{- define "squall.validate" -}}
{{- if not (has .Values.driver (list "fork" "spawn" "vm")) }}
{{- fail (printf "driver must be one of fork, spawn or vm (got %q)" (toString .Values.driver)) }}
{{- end }}
{{- if not (and (kindIs "slice" .Values.app.command) .Values.app.command) }}
{{- fail "app.command must be a non-empty list: the app's executable and its arguments, which forkd runs" }}
{{- end }}
{{- $replicas := int .Values.replicas }}
{{- if or (lt $replicas 0) (gt $replicas 1) }}
{{- fail (printf "replicas must be 1 (or 0), got %v: each replica would run its own scaler, and two scalers cannot share the forkd daemons" .Values.replicas) }}
{{- end }}
{{- if and .Values.forkd.token.existingSecret .Values.forkd.token.value }}
{{- fail "forkd.token.value and forkd.token.existingSecret are both set: give the token one way" }}
{{- end }}
{{- if and (eq .Values.driver "vm") (not (hasPrefix "/" (toString (first .Values.app.command)))) }}
{{- fail (printf "with driver vm, app.command[0] must be an absolute path (got %q): it is the executable packed into the guest" (toString (first .Values.app.command))) }}
{{- end }}
{{- if not (has .Values.app.protocol (list "http1" "h2c")) }}
{{- fail (printf "app.protocol must be http1 or h2c (got %q)" (toString .Values.app.protocol)) }}
{{- end }}
{{- if and (eq .Values.driver "vm") (eq .Values.app.protocol "h2c") }}
{{- fail "app.protocol h2c needs driver fork or spawn: the vm driver checks a worker's health over HTTP/1.1" }}
{{- end }}
{{- $admin := .Values.admin.token }}
{{- if and $admin.existingSecret $admin.value }}
{{- fail "admin.token.value and admin.token.existingSecret are both set: give the token one way" }}
{{- end }}
{{- if and (or $admin.existingSecret $admin.value) (not $admin.enabled) }}
{{- fail "admin.token.value or admin.token.existingSecret is set but admin.token.enabled is false: set it to true to protect the admin listener" }}
{{- end }}
{{- if and $admin.value (or (not (regexMatch "^[!-~]+$" (toString $admin.value))) (gt (len (toString $admin.value)) 4096)) }}
{{- fail "admin.token.value must be printable ASCII without spaces, at most 4096 characters" }}
{{- end }}
{{- if and .Values.admin.metricsOpen (not $admin.enabled) }}
{{- fail "admin.metricsOpen needs admin.token.enabled: without a token every admin endpoint is open already" }}
{{- end }}
{{- $start := .Values.app.startTimeoutSeconds }}
{{- if and (not (kindIs "invalid" $start)) (or (not (regexMatch "^[0-9]+$" (toString $start))) (lt (int $start) 1) (gt (int $start) 600)) }}
{{- fail (printf "app.startTimeoutSeconds must be a whole number of seconds from 1 to 600, or empty for forkd's default of 30 (got %q)" (toString $start)) }}
{{- end }}
{{- if not (kindIs "string" .Values.policy.inline) }}
{{- fail "policy.inline must be a string holding the policy YAML (use `inline: |`)" }}
{{- end }}
{{- end }}

{{/* The policy file's contents: policy.inline, or the chart's copy of the default policy. */}}
{{- define "squall.policy" -}}
{{- if .Values.policy.inline }}
{{- .Values.policy.inline }}
{{- else }}
{{- .Files.Get "files/policy.yaml" }}
{{- end }}
{{- end }}
