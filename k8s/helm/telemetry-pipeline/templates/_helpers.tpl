{{/* ------------------------------------------------------------------ names ---------- */}}

{{- define "tp.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "tp.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Name of a component's objects: (dict "root" $ "component" "api-gateway") */}}
{{- define "tp.componentName" -}}
{{- printf "%s-%s" (include "tp.fullname" .root) .component | trunc 52 | trimSuffix "-" -}}
{{- end -}}

{{- define "tp.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "tp.envConfigMap" -}}
{{- printf "%s-env" (include "tp.fullname" .) -}}
{{- end -}}

{{- define "tp.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "tp.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "tp.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* The full image (dashboard, helm test): notebookImage, else image.repository + "-notebooks", same tag. */}}
{{- define "tp.notebookImage" -}}
{{- $nb := .Values.notebookImage | default dict -}}
{{- $repo := $nb.repository | default (printf "%s-notebooks" .Values.image.repository) -}}
{{- printf "%s:%s" $repo ($nb.tag | default .Values.image.tag | default .Chart.AppVersion) -}}
{{- end -}}

{{- define "tp.notebookImagePullPolicy" -}}
{{- (.Values.notebookImage | default dict).pullPolicy | default .Values.image.pullPolicy -}}
{{- end -}}

{{/* ------------------------------------------------------------------ labels --------- */}}

{{/* (dict "root" $ "component" "streamer") */}}
{{- define "tp.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tp.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "tp.labels" -}}
{{ include "tp.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/part-of: telemetry-pipeline
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
helm.sh/chart: {{ include "tp.chart" .root }}
{{- end -}}

{{/* Labels of objects that belong to no one component (ConfigMap, Secrets, ServiceAccount). */}}
{{- define "tp.commonLabels" -}}
app.kubernetes.io/name: {{ include "tp.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: telemetry-pipeline
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ include "tp.chart" . }}
{{- end -}}

{{/* ------------------------------------------------------------------ redis ---------- */}}

{{- define "tp.redis.configured" -}}
{{- if or .Values.redis.enabled .Values.externalRedis.host -}}true{{- end -}}
{{- end -}}

{{- define "tp.redis.host" -}}
{{- if .Values.redis.enabled -}}
{{- include "tp.componentName" (dict "root" . "component" "redis") -}}
{{- else -}}
{{- .Values.externalRedis.host -}}
{{- end -}}
{{- end -}}

{{- define "tp.redis.port" -}}
{{- if .Values.redis.enabled -}}{{ .Values.redis.service.port }}{{- else -}}{{ .Values.externalRedis.port }}{{- end -}}
{{- end -}}

{{- define "tp.redis.tls" -}}
{{- if and (not .Values.redis.enabled) .Values.externalRedis.tls.enabled -}}true{{- end -}}
{{- end -}}

{{- define "tp.redis.caPath" -}}/etc/telemetry/redis-ca/{{ .Values.externalRedis.tls.caKey }}{{- end -}}

{{/* REDIS_URL: scheme://host:port/db, never with a password (REDIS_PASSWORD carries it);
     for an external Redis Cluster redis+cluster://host:port[,node…] (rediss+cluster with TLS). */}}
{{- define "tp.redis.url" -}}
{{- $scheme := ternary "rediss" "redis" (eq (include "tp.redis.tls" .) "true") -}}
{{- $db := ternary 0 .Values.externalRedis.db .Values.redis.enabled -}}
{{- $url := printf "%s://%s:%v/%v" $scheme (include "tp.redis.host" .) (include "tp.redis.port" .) $db -}}
{{- if and (not .Values.redis.enabled) .Values.externalRedis.cluster -}}
{{- $nodes := prepend (.Values.externalRedis.clusterNodes | default list) (printf "%s:%v" (include "tp.redis.host" .) (include "tp.redis.port" .)) -}}
{{- $url = printf "%s+cluster://%s" $scheme (join "," $nodes) -}}
{{- end -}}
{{- $query := list -}}
{{- if eq (include "tp.redis.tls" .) "true" -}}
{{- if .Values.externalRedis.tls.caSecret -}}
{{- $query = append $query (printf "ssl_ca_certs=%s" (include "tp.redis.caPath" .)) -}}
{{- end -}}
{{- if .Values.externalRedis.tls.insecureSkipVerify -}}
{{- $query = append $query "ssl_cert_reqs=none" -}}
{{- end -}}
{{- end -}}
{{- if $query -}}{{ printf "%s?%s" $url (join "&" $query) }}{{- else -}}{{ $url }}{{- end -}}
{{- end -}}

{{/* Secret + key holding the Redis password; empty secret name = Redis without auth. */}}
{{- define "tp.redis.secretName" -}}
{{- if .Values.redis.enabled -}}
{{- if .Values.redis.auth.enabled -}}
{{- default (include "tp.componentName" (dict "root" . "component" "redis")) .Values.redis.auth.existingSecret -}}
{{- end -}}
{{- else if .Values.externalRedis.existingSecret -}}
{{- .Values.externalRedis.existingSecret -}}
{{- else if .Values.externalRedis.password -}}
{{- printf "%s-external-redis" (include "tp.fullname" .) -}}
{{- end -}}
{{- end -}}

{{- define "tp.redis.secretKey" -}}
{{- if .Values.redis.enabled -}}
{{- .Values.redis.auth.existingSecretPasswordKey | default "redis-password" -}}
{{- else if .Values.externalRedis.existingSecret -}}
{{- .Values.externalRedis.existingSecretPasswordKey | default "redis-password" -}}
{{- else -}}
redis-password
{{- end -}}
{{- end -}}

{{/* --------------------------------------------------------------- database ---------- */}}

{{- define "tp.db.configured" -}}
{{- if or .Values.postgresql.enabled .Values.externalDatabase.host -}}true{{- end -}}
{{- end -}}

{{/* DATABASE_URL: postgresql://user@host:port/db?sslmode=..., never with a password (PGPASSWORD). */}}
{{- define "tp.db.url" -}}
{{- if .Values.postgresql.enabled -}}
{{- printf "postgresql://%s@%s:%v/%s?sslmode=%s" (.Values.postgresql.auth.username | urlquery) (include "tp.componentName" (dict "root" . "component" "postgresql")) .Values.postgresql.service.port .Values.postgresql.auth.database .Values.postgresql.sslmode -}}
{{- else -}}
{{- $e := .Values.externalDatabase -}}
{{- printf "postgresql://%s@%s:%v/%s?sslmode=%s" ($e.user | urlquery) $e.host $e.port $e.database $e.sslmode -}}
{{- end -}}
{{- end -}}

{{- define "tp.db.secretName" -}}
{{- if .Values.postgresql.enabled -}}
{{- default (include "tp.componentName" (dict "root" . "component" "postgresql")) .Values.postgresql.auth.existingSecret -}}
{{- else if .Values.externalDatabase.existingSecret -}}
{{- .Values.externalDatabase.existingSecret -}}
{{- else if .Values.externalDatabase.password -}}
{{- printf "%s-external-db" (include "tp.fullname" .) -}}
{{- end -}}
{{- end -}}

{{- define "tp.db.secretKey" -}}
{{- if .Values.postgresql.enabled -}}
{{- .Values.postgresql.auth.existingSecretPasswordKey | default "postgres-password" -}}
{{- else if .Values.externalDatabase.existingSecret -}}
{{- .Values.externalDatabase.existingSecretPasswordKey | default "db-password" -}}
{{- else -}}
db-password
{{- end -}}
{{- end -}}

{{/* ------------------------------------------------------------ validation ----------- */}}

{{- define "tp.validate" -}}
{{- $v := .Values -}}
{{- if and $v.redis.enabled $v.externalRedis.host -}}
{{- fail "redis.enabled=true and externalRedis.host are both set: set redis.enabled=false to use an external Redis" -}}
{{- end -}}
{{- if and $v.externalRedis.cluster $v.redis.enabled -}}
{{- fail "externalRedis.cluster=true needs redis.enabled=false and externalRedis.host (the built-in Redis is one node)" -}}
{{- end -}}
{{- if and $v.externalRedis.cluster (ne (int $v.externalRedis.db) 0) -}}
{{- fail "externalRedis.cluster=true needs externalRedis.db=0 (a Redis Cluster has only database 0)" -}}
{{- end -}}
{{- if and $v.postgresql.enabled $v.externalDatabase.host -}}
{{- fail "postgresql.enabled=true and externalDatabase.host are both set: set postgresql.enabled=false to use an external database" -}}
{{- end -}}
{{- if and (or $v.streamer.enabled $v.collector.enabled) (not (include "tp.redis.configured" .)) -}}
{{- fail "externalRedis.host is required when redis.enabled=false (streamers and collectors need a Redis)" -}}
{{- end -}}
{{- if and (or $v.collector.enabled $v.apiGateway.enabled) (not (include "tp.db.configured" .)) -}}
{{- fail "externalDatabase.host is required when postgresql.enabled=false (collectors and the API gateway need a database)" -}}
{{- end -}}
{{- if and $v.dashboard.enabled (not $v.apiGateway.enabled) (not $v.dashboard.apiUrl) -}}
{{- fail "dashboard.apiUrl is required when apiGateway.enabled=false" -}}
{{- end -}}
{{- if and $v.streamer.enabled (ne (default "csv" $v.streamer.source) "scrape") -}}
{{- $in := $v.streamer.input -}}
{{- if and (eq $in.type "configMap") (not $in.configMap.name) (not $in.configMap.data) -}}
{{- fail "streamer.input.type=configMap needs streamer.input.configMap.name (an existing ConfigMap) or streamer.input.configMap.data (the CSV)" -}}
{{- end -}}
{{- if and (eq $in.type "pvc") (not $in.pvc.claimName) -}}
{{- fail "streamer.input.type=pvc needs streamer.input.pvc.claimName" -}}
{{- end -}}
{{- if and (eq $in.type "url") (not $in.url.url) -}}
{{- fail "streamer.input.type=url needs streamer.input.url.url" -}}
{{- end -}}
{{- end -}}
{{- range $k, $_ := $v.config.extraEnv -}}
{{- if regexMatch "(?i)(PASSWORD|SECRET|TOKEN|CREDENTIAL)" $k -}}
{{- fail (printf "config.extraEnv.%s looks like a credential: put it in a Secret and reference it from <component>.extraEnv with valueFrom.secretKeyRef" $k) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* ------------------------------------------------------------ pod pieces ----------- */}}

{{/* Pod-level securityContext meeting Pod Security "restricted". (dict "sc" <uids>) */}}
{{- define "tp.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .runAsUser }}
runAsGroup: {{ .runAsGroup }}
fsGroup: {{ .fsGroup }}
fsGroupChangePolicy: OnRootMismatch
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* Container-level securityContext meeting Pod Security "restricted". */}}
{{- define "tp.containerSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .runAsUser }}
runAsGroup: {{ .runAsGroup }}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
privileged: false
capabilities:
  drop:
    - ALL
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* envFrom + secret env of an app container. (dict "root" $ "redis" bool "db" bool) */}}
{{- define "tp.appEnvFrom" -}}
envFrom:
  - configMapRef:
      name: {{ include "tp.envConfigMap" .root }}
{{- end -}}

{{- define "tp.secretEnv" -}}
{{- $root := .root -}}
{{- if and .redis (include "tp.redis.configured" $root) (include "tp.redis.secretName" $root) }}
- name: REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "tp.redis.secretName" $root }}
      key: {{ include "tp.redis.secretKey" $root }}
{{- end }}
{{- if and .db (include "tp.db.configured" $root) (include "tp.db.secretName" $root) }}
- name: PGPASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "tp.db.secretName" $root }}
      key: {{ include "tp.db.secretKey" $root }}
{{- end }}
{{- end -}}

{{/* Volumes every app pod gets: a writable /tmp (TELEMETRY_NB_HOME, HOME live there). */}}
{{- define "tp.appVolumes" -}}
- name: tmp
  emptyDir:
    sizeLimit: 1Gi
{{- if and .redis (eq (include "tp.redis.tls" .root) "true") .root.Values.externalRedis.tls.caSecret }}
- name: redis-ca
  secret:
    secretName: {{ .root.Values.externalRedis.tls.caSecret }}
{{- end }}
{{- end -}}

{{- define "tp.appVolumeMounts" -}}
- name: tmp
  mountPath: /tmp
{{- if and .redis (eq (include "tp.redis.tls" .root) "true") .root.Values.externalRedis.tls.caSecret }}
- name: redis-ca
  mountPath: /etc/telemetry/redis-ca
  readOnly: true
{{- end }}
{{- end -}}

{{/* Scheduling block of a component: (dict "c" .Values.streamer) */}}
{{- define "tp.scheduling" -}}
{{- with .c.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .c.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .c.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* Pod template metadata: (dict "root" $ "component" "streamer") */}}
{{- define "tp.podMetadata" -}}
labels:
  {{- include "tp.labels" . | nindent 2 }}
  {{- with .root.Values.podLabels }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
annotations:
  checksum/config: {{ include (print .root.Template.BasePath "/configmap.yaml") .root | sha256sum }}
  checksum/secrets: {{ include (print .root.Template.BasePath "/secrets.yaml") .root | sha256sum }}
  {{- with .root.Values.podAnnotations }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- end -}}

{{/* HTTP probe: (dict "probe" .Values.x.livenessProbe "path" "/health" "port" "metrics") */}}
{{- define "tp.httpProbe" -}}
httpGet:
  path: {{ .path }}
  port: {{ .port }}
initialDelaySeconds: {{ .probe.initialDelaySeconds }}
periodSeconds: {{ .probe.periodSeconds }}
timeoutSeconds: {{ .probe.timeoutSeconds }}
failureThreshold: {{ .probe.failureThreshold }}
{{- end -}}

{{/* The Secret holding the API tokens, and its keys. "" when auth is off, or when this release runs
no API gateway and was given no tokens (a generated one could match no API). */}}
{{- define "tp.apiAuth.secretName" -}}
{{- $a := .Values.apiAuth -}}
{{- if $a.enabled -}}
{{- if $a.existingSecret -}}
{{- $a.existingSecret -}}
{{- else if or .Values.apiGateway.enabled $a.tokens -}}
{{- printf "%s-api-tokens" (include "tp.fullname" .) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "tp.apiAuth.tokensKey" -}}
{{- if .Values.apiAuth.existingSecret -}}{{ .Values.apiAuth.existingSecretTokensKey | default "tokens" }}{{- else -}}tokens{{- end -}}
{{- end -}}

{{- define "tp.apiAuth.clientKey" -}}
{{- if .Values.apiAuth.existingSecret -}}{{ .Values.apiAuth.existingSecretClientKey | default "token" }}{{- else -}}token{{- end -}}
{{- end -}}

{{/* TELEMETRY_API_TOKEN from the Secret, for the API's clients (dashboard, helm test). */}}
{{- define "tp.apiAuth.clientEnv" -}}
{{- if include "tp.apiAuth.secretName" . }}
- name: TELEMETRY_API_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "tp.apiAuth.secretName" . }}
      key: {{ include "tp.apiAuth.clientKey" . }}
{{- end }}
{{- end -}}
