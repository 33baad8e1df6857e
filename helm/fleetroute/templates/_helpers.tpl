{{/* Names ----------------------------------------------------------------------------------------- */}}

{{- define "fleetroute.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "fleetroute.fullname" -}}
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

{{- define "fleetroute.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "fleetroute.configMapName" -}}
{{- printf "%s-config" (include "fleetroute.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "fleetroute.redisName" -}}
{{- printf "%s-redis" (include "fleetroute.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The Secret that holds FLEETROUTE_REDIS_URL: an existing one, or the chart's for redis.external.url. */}}
{{- define "fleetroute.redisSecretName" -}}
{{- if .Values.redis.external.existingSecret }}
{{- .Values.redis.external.existingSecret }}
{{- else }}
{{- printf "%s-redis-url" (include "fleetroute.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{- define "fleetroute.serviceAccountName" -}}
{{- if eq (include "fleetroute.createServiceAccount" .) "true" }}
{{- default (include "fleetroute.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* "true" when the chart renders a ServiceAccount: serviceAccount.create, or null and kubernetes discovery. */}}
{{- define "fleetroute.createServiceAccount" -}}
{{- if kindIs "bool" .Values.serviceAccount.create }}
{{- .Values.serviceAccount.create }}
{{- else }}
{{- eq .Values.discovery.mode "kubernetes" }}
{{- end }}
{{- end }}

{{/* Labels ---------------------------------------------------------------------------------------- */}}

{{- define "fleetroute.selectorLabels" -}}
app.kubernetes.io/name: {{ include "fleetroute.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "fleetroute.labels" -}}
helm.sh/chart: {{ include "fleetroute.chart" . }}
{{ include "fleetroute.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: fleetroute
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Validation -------------------------------------------------------------------------------------- */}}

{{- define "fleetroute.validate" -}}
{{- $ext := .Values.redis.external }}
{{- if and .Values.redis.enabled (or $ext.url $ext.existingSecret) }}
{{- fail "redis: set either redis.enabled (bundled Redis) or redis.external.url / redis.external.existingSecret, not both" }}
{{- end }}
{{- if and $ext.url $ext.existingSecret }}
{{- fail "redis.external: set url or existingSecret, not both" }}
{{- end }}
{{- if and .Values.admin.expose (not .Values.admin.tokenSecret.name) }}
{{- fail "admin.expose needs admin.tokenSecret.name: an exposed admin API must require a token" }}
{{- end }}
{{- if and .Values.admin.enabled (eq (int .Values.admin.port) (int .Values.service.containerPort)) }}
{{- fail "admin.port must differ from service.containerPort" }}
{{- end }}
{{- $d := .Values.discovery }}
{{- if eq $d.mode "dns" }}
{{- $_ := required "discovery.dns.service is required with discovery.mode=dns" $d.dns.service }}
{{- else if eq $d.mode "kubernetes" }}
{{- $_ := required "discovery.kubernetes.service is required with discovery.mode=kubernetes" $d.kubernetes.service }}
{{- end }}
{{- end }}

{{/* The router container ------------------------------------------------------------------------------ */}}

{{- define "fleetroute.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* Environment: the Redis URL (from a Secret unless bundled) and the admin token. */}}
{{- define "fleetroute.env" -}}
{{- if .Values.redis.enabled }}
- name: FLEETROUTE_REDIS_URL
  value: {{ printf "redis://%s:%d/0" (include "fleetroute.redisName" .) (int .Values.redis.port) | quote }}
{{- else if or .Values.redis.external.url .Values.redis.external.existingSecret }}
- name: FLEETROUTE_REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "fleetroute.redisSecretName" . }}
      key: {{ .Values.redis.external.existingSecretKey }}
{{- end }}
{{- if and .Values.admin.enabled .Values.admin.tokenSecret.name }}
- name: FLEETROUTE_ADMIN_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ .Values.admin.tokenSecret.name }}
      key: {{ .Values.admin.tokenSecret.key }}
{{- end }}
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* The router container, shared by the gateway Deployment and the sidecar snippet. */}}
{{- define "fleetroute.container" -}}
{{- $sidecar := eq .Values.mode "sidecar" }}
{{- /* Port names are unique in a pod: in someone else's pod, "http" may be taken. */}}
{{- $port := ternary "fleetroute" "http" $sidecar -}}
name: {{ ternary .Values.sidecar.containerName "fleetroute" $sidecar }}
image: {{ include "fleetroute.image" . }}
imagePullPolicy: {{ .Values.image.pullPolicy }}
{{- if and $sidecar .Values.sidecar.native }}
restartPolicy: Always
{{- end }}
args:
  - serve
  - --config
  - /etc/fleetroute/config.yaml
  {{- with .Values.extraArgs }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- with (include "fleetroute.env" . | trim) }}
env:
  {{- . | nindent 2 }}
{{- end }}
ports:
  - name: {{ $port }}
    containerPort: {{ .Values.service.containerPort }}
    protocol: TCP
  {{- if and .Values.admin.enabled .Values.admin.expose }}
  - name: {{ ternary "fleetroute-adm" "admin" $sidecar }}
    containerPort: {{ .Values.admin.port }}
    protocol: TCP
  {{- end }}
{{- if not $sidecar }}
startupProbe:
  httpGet:
    path: /health
    port: http
  {{- toYaml .Values.probes.startup | nindent 2 }}
livenessProbe:
  httpGet:
    path: /health
    port: http
  {{- toYaml .Values.probes.liveness | nindent 2 }}
{{- end }}
{{- if or (not $sidecar) .Values.sidecar.readinessProbe }}
readinessProbe:
  httpGet:
    path: /ready
    port: {{ $port }}
  {{- toYaml .Values.probes.readiness | nindent 2 }}
{{- end }}
{{- if and (not $sidecar) (gt (int .Values.preStopSleepSeconds) 0) }}
lifecycle:
  preStop:
    exec:
      command: ["sleep", "{{ int .Values.preStopSleepSeconds }}"]
{{- end }}
resources:
  {{- toYaml .Values.resources | nindent 2 }}
securityContext:
  {{- toYaml .Values.securityContext | nindent 2 }}
volumeMounts:
  - name: fleetroute-config
    mountPath: /etc/fleetroute
    readOnly: true
  - name: fleetroute-tmp
    mountPath: /tmp
  {{- with .Values.extraVolumeMounts }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- end }}

{{/* The volumes the router container mounts. */}}
{{- define "fleetroute.volumes" -}}
- name: fleetroute-config
  configMap:
    name: {{ include "fleetroute.configMapName" . }}
- name: fleetroute-tmp
  emptyDir:
    sizeLimit: 64Mi
{{- with .Values.extraVolumes }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Sidecar mode: the container to add to your pod's `containers` (or `initContainers` when sidecar.native),
and the volumes to add to its `volumes`. A parent chart with this one as a dependency can render them with
  {{ include "fleetroute.sidecarContainer" (dict "Values" .Values.fleetroute "Release" .Release
       "Chart" (dict "Name" "fleetroute" "AppVersion" "0.1.0")) }}
(the parent must also enable this chart, for the ConfigMap); or copy the YAML that NOTES.txt prints.
*/}}
{{- define "fleetroute.sidecarContainer" -}}
- {{ include "fleetroute.container" . | indent 2 | trim }}
{{- end }}

{{- define "fleetroute.sidecarVolumes" -}}
{{ include "fleetroute.volumes" . }}
{{- end }}

{{/* The router's configuration file: the config values plus what the chart manages. */}}
{{- define "fleetroute.configFile" -}}
{{- $cfg := deepCopy .Values.config }}
{{- $_ := set $cfg "host" "0.0.0.0" }}
{{- $_ := set $cfg "port" (int .Values.service.containerPort) }}
{{- if .Values.admin.enabled }}
{{- $_ := set $cfg "admin_host" (ternary "0.0.0.0" "127.0.0.1" .Values.admin.expose) }}
{{- $_ := set $cfg "admin_port" (int .Values.admin.port) }}
{{- else }}
{{- $_ := set $cfg "admin_port" nil }}
{{- end }}
{{- $d := .Values.discovery }}
{{- if eq $d.mode "static" }}
{{- $_ := set $cfg "replicas" $d.static.replicas }}
{{- else if eq $d.mode "dns" }}
{{- $_ := set $cfg "dns_service" $d.dns.service }}
{{- $_ := set $cfg "dns_port" (int $d.dns.port) }}
{{- $_ := set $cfg "dns_interval_s" $d.dns.intervalSeconds }}
{{- else if eq $d.mode "kubernetes" }}
{{- $_ := set $cfg "k8s_service" $d.kubernetes.service }}
{{- $_ := set $cfg "k8s_namespace" (default .Release.Namespace $d.kubernetes.namespace) }}
{{- if $d.kubernetes.portName }}
{{- $_ := set $cfg "k8s_port_name" $d.kubernetes.portName }}
{{- end }}
{{- end }}
{{- toYaml $cfg }}
{{- end }}
