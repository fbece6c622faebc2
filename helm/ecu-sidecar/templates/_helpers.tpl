{{/*
Names and labels. Every label comes from these helpers.
*/}}
{{- /* The chart's name, fixed: a host chart's `alias` renames .Chart.Name (to ecuSidecar,
say), which would give invalid object names and names the injected container could not find. */}}
{{- define "ecu-sidecar.name" -}}
{{- default "ecu-sidecar" .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "ecu-sidecar.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := include "ecu-sidecar.name" . }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "ecu-sidecar.chart" -}}
{{- printf "ecu-sidecar-%s" (.Chart.Version | default "0") | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "ecu-sidecar.selectorLabels" -}}
app.kubernetes.io/name: {{ include "ecu-sidecar.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "ecu-sidecar.labels" -}}
helm.sh/chart: {{ include "ecu-sidecar.chart" . }}
{{ include "ecu-sidecar.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | default "unknown" | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: ecu-sidecar
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "ecu-sidecar.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "ecu-sidecar.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "ecu-sidecar.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}
{{- end }}

{{/*
Secret and ConfigMap names: an existing Secret when given, else the chart's own.
*/}}
{{- define "ecu-sidecar.secretName" -}}
{{- include "ecu-sidecar.fullname" . }}
{{- end }}

{{- define "ecu-sidecar.rateCardName" -}}
{{- printf "%s-ratecard" (include "ecu-sidecar.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "ecu-sidecar.embedded" -}}
{{- if eq .Values.redis.mode "embedded" }}true{{- end }}
{{- end }}

{{/* Whether the chart itself must create a Secret (values given inline). */}}
{{- define "ecu-sidecar.ownSecret" -}}
{{- if or (and (not (include "ecu-sidecar.embedded" .)) (not .Values.redis.existingSecret) (not .Values.redis.passwordSecret) .Values.redis.url) (and .Values.ledger.enabled (not .Values.ledger.existingSecret) .Values.ledger.url) (and .Values.admin.enabled (not .Values.admin.existingSecret) .Values.admin.token) }}true{{- end }}
{{- end }}

{{/*
Fail early, with a message naming the values to fix, on combinations that cannot work.
*/}}
{{- define "ecu-sidecar.validate" -}}
{{- if include "ecu-sidecar.embedded" . }}
{{- if .Values.flusher.enabled }}
{{- fail "redis.mode=embedded keeps state inside each sidecar: a separate flusher cannot reach it. Set flusher.enabled=false (the flusher then runs inside `serve` with ledger.sqliteEmptyDir=true), or use redis.mode=standalone|cluster." }}
{{- end }}
{{- else }}
{{- if not (or .Values.redis.existingSecret .Values.redis.url) }}
{{- fail "redis.mode=standalone|cluster needs redis.existingSecret (a Secret with the URL) or redis.url." }}
{{- end }}
{{- if .Values.redis.passwordSecret }}
{{- if or .Values.redis.existingSecret (not .Values.redis.url) }}
{{- fail "redis.passwordSecret takes the password from a Secret into redis.url: set redis.url (without a password, e.g. redis://redis-master.redis:6379/0) and leave redis.existingSecret empty." }}
{{- end }}
{{- if regexMatch "^[a-z+]+://[^@/]*:[^@/]*@" .Values.redis.url }}
{{- fail "redis.url carries a password and redis.passwordSecret is set: remove the password from the URL." }}
{{- end }}
{{- if not (regexMatch "^(redis|rediss|redis\\+sentinel)://" .Values.redis.url) }}
{{- fail "redis.url must start with redis://, rediss:// or redis+sentinel://." }}
{{- end }}
{{- end }}
{{- if and .Values.flusher.migrateJob.enabled .Values.ledger.enabled (not .Values.ledger.existingSecret) }}
{{- fail "flusher.migrateJob runs before the release's objects exist (a pre-install/pre-upgrade hook), so the ledger URL must come from ledger.existingSecret, not the chart's own Secret." }}
{{- end }}
{{- end }}
{{- if and .Values.flusher.enabled (not .Values.ledger.enabled) }}
{{- fail "flusher.enabled=true needs the ledger: set ledger.enabled=true with ledger.existingSecret or ledger.url." }}
{{- end }}
{{- if and .Values.ledger.enabled (not (include "ecu-sidecar.embedded" .)) (not (or .Values.ledger.existingSecret .Values.ledger.url)) }}
{{- fail "ledger.enabled=true needs ledger.existingSecret (a Secret with the database URL) or ledger.url." }}
{{- end }}
{{- if and .Values.admin.enabled (not (or .Values.admin.existingSecret .Values.admin.token)) }}
{{- fail "admin.enabled=true needs admin.existingSecret or admin.token." }}
{{- end }}
{{- if gt (len .Values.metrics.orgs) 100 }}
{{- fail "metrics.orgs: at most 100 organizations (one series per organization and gauge)." }}
{{- end }}
{{- end }}

{{/* redis.url (no password in it) with $(REDIS_PASSWORD) as its password: scheme://[user]:$(REDIS_PASSWORD)@rest. */}}
{{- define "ecu-sidecar.redisUrlWithPassword" -}}
{{- $scheme := regexFind "^[a-z+]+://" .Values.redis.url }}
{{- $rest := trimPrefix $scheme .Values.redis.url }}
{{- $user := "" }}
{{- if contains "@" $rest }}
{{- $user = regexReplaceAll "@.*$" $rest "" }}
{{- $rest = regexReplaceAll "^[^@]*@" $rest "" }}
{{- end }}
{{- printf "%s%s:$(REDIS_PASSWORD)@%s" $scheme $user $rest }}
{{- end }}

{{/*
Environment shared by the sidecar and the flusher: Redis, ledger, quota behaviour, logging.
*/}}
{{- define "ecu-sidecar.commonEnv" -}}
{{- $secret := include "ecu-sidecar.secretName" . }}
{{- if not (include "ecu-sidecar.embedded" .) }}
{{- if .Values.redis.passwordSecret }}
{{- /* The password of an existing Secret (as Redis charts create it), put into the URL by
Kubernetes' $(VAR) expansion: REDIS_PASSWORD must come first in the list. */}}
- name: REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ .Values.redis.passwordSecret }}
      key: {{ .Values.redis.passwordSecretKey }}
- name: ECU_REDIS_URL
  value: {{ include "ecu-sidecar.redisUrlWithPassword" . | quote }}
{{- else }}
- name: ECU_REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ .Values.redis.existingSecret | default $secret }}
      key: {{ .Values.redis.existingSecretKey }}
{{- end }}
{{- if eq .Values.redis.mode "cluster" }}
- name: ECU_REDIS_CLUSTER
  value: "true"
{{- end }}
{{- end }}
- name: ECU_REDIS_TIMEOUT_MS
  value: {{ .Values.redis.timeoutMs | int64 | quote }}
- name: ECU_REDIS_CONNECT_TIMEOUT_MS
  value: {{ .Values.redis.connectTimeoutMs | int64 | quote }}
- name: ECU_REDIS_POOL_SIZE
  value: {{ .Values.redis.poolSize | int64 | quote }}
{{- if not (include "ecu-sidecar.embedded" .) }}
- name: ECU_REDIS_WAIT_REPLICAS
  value: {{ .Values.redis.waitReplicas | int64 | quote }}
- name: ECU_REDIS_WAIT_TIMEOUT_MS
  value: {{ .Values.redis.waitTimeoutMs | int64 | quote }}
{{- end }}
- name: ECU_KEY_PREFIX
  value: {{ .Values.redis.keyPrefix | quote }}
- name: ECU_DEFAULT_TTL_MS
  value: {{ .Values.config.defaultTtlMs | int64 | quote }}
- name: ECU_MIN_TTL_MS
  value: {{ .Values.config.minTtlMs | int64 | quote }}
- name: ECU_MAX_TTL_MS
  value: {{ .Values.config.maxTtlMs | int64 | quote }}
- name: ECU_JOB_TTL_MS
  value: {{ .Values.config.jobTtlMs | int64 | quote }}
- name: ECU_JOB_MAX_TTL_MS
  value: {{ .Values.config.jobMaxTtlMs | int64 | quote }}
- name: ECU_TOMBSTONE_TTL_MS
  value: {{ .Values.config.tombstoneTtlMs | int64 | quote }}
- name: ECU_OVERAGE_MAX_PERCENT
  value: {{ .Values.config.overageMaxPercent | int64 | quote }}
- name: ECU_MAX_BATCH_ITEMS
  value: {{ .Values.config.maxBatchItems | int64 | quote }}
- name: ECU_SWEEP_INTERVAL_MS
  value: {{ .Values.config.sweepIntervalMs | int64 | quote }}
- name: ECU_SWEEP_LIMIT
  value: {{ .Values.config.sweepLimit | int64 | quote }}
- name: ECU_SHUTDOWN_GRACE_S
  value: {{ .Values.config.shutdownGraceS | toString | quote }}
- name: ECU_SHUTDOWN_DELAY_S
  value: {{ .Values.config.shutdownDelayS | toString | quote }}
- name: ECU_LOG_LEVEL
  value: {{ .Values.logging.level | quote }}
- name: ECU_LOG_FORMAT
  value: {{ .Values.logging.format | quote }}
- name: ECU_METRICS_LISTEN
  value: {{ printf "0.0.0.0:%d" (int .Values.metrics.port) | quote }}
{{- range $name, $value := .Values.config.extraEnv }}
- name: {{ $name }}
  value: {{ $value | quote }}
{{- end }}
{{- end }}

{{- define "ecu-sidecar.ledgerEnv" -}}
{{- if include "ecu-sidecar.embedded" . }}
{{- if .Values.ledger.sqliteEmptyDir }}
- name: ECU_LEDGER_URL
  value: sqlite:///var/lib/ecu/ledger.db
{{- end }}
{{- else if .Values.ledger.enabled }}
- name: ECU_LEDGER_URL
  valueFrom:
    secretKeyRef:
      name: {{ .Values.ledger.existingSecret | default (include "ecu-sidecar.secretName" .) }}
      key: {{ .Values.ledger.existingSecretKey }}
{{- end }}
{{- end }}

{{/*
Certificates from Secrets, mounted read-only where the URLs name them (docs/operations.md):
  redis.tls.caSecret          -> /etc/ecu/redis-tls/ca.crt          (?ssl_ca_certs=…)
  redis.tls.clientCertSecret  -> /etc/ecu/redis-tls/client/tls.crt, tls.key
                                                                    (?ssl_certfile=…&ssl_keyfile=…)
  ledger.tls.caSecret         -> /etc/ecu/ledger-tls/ca.crt         (?sslmode=verify-full&sslrootcert=…)
The ledger's only where a container connects to the ledger (argument: "ledger" in a list).
Volume names start with ecu- so they cannot collide with a host pod's own volumes.
*/}}
{{- define "ecu-sidecar.tlsMounts" -}}
{{- $ctx := index . 0 }}{{- $ledger := index . 1 }}
{{- if $ctx.Values.redis.tls.caSecret }}
- name: ecu-redis-tls
  mountPath: /etc/ecu/redis-tls
  readOnly: true
{{- end }}
{{- if $ctx.Values.redis.tls.clientCertSecret }}
- name: ecu-redis-client-tls
  mountPath: /etc/ecu/redis-tls/client
  readOnly: true
{{- end }}
{{- if and $ledger $ctx.Values.ledger.tls.caSecret }}
- name: ecu-ledger-tls
  mountPath: /etc/ecu/ledger-tls
  readOnly: true
{{- end }}
{{- end }}

{{- define "ecu-sidecar.tlsVolumes" -}}
{{- $ctx := index . 0 }}{{- $ledger := index . 1 }}
{{- if $ctx.Values.redis.tls.caSecret }}
- name: ecu-redis-tls
  secret:
    secretName: {{ $ctx.Values.redis.tls.caSecret }}
    items:
      - key: {{ $ctx.Values.redis.tls.caKey }}
        path: ca.crt
{{- end }}
{{- if $ctx.Values.redis.tls.clientCertSecret }}
- name: ecu-redis-client-tls
  secret:
    secretName: {{ $ctx.Values.redis.tls.clientCertSecret }}
    items:
      - key: tls.crt
        path: tls.crt
      - key: tls.key
        path: tls.key
{{- end }}
{{- if and $ledger $ctx.Values.ledger.tls.caSecret }}
- name: ecu-ledger-tls
  secret:
    secretName: {{ $ctx.Values.ledger.tls.caSecret }}
    items:
      - key: {{ $ctx.Values.ledger.tls.caKey }}
        path: ca.crt
{{- end }}
{{- end }}

{{/* Whether the sidecar container connects to the ledger. */}}
{{- define "ecu-sidecar.sidecarUsesLedger" -}}
{{- if and .Values.ledger.enabled (or (include "ecu-sidecar.embedded" .) .Values.sidecar.useLedger) }}true{{- end }}
{{- end }}

{{/*
Injection into worker pods. A host chart that depends on this chart (alias ecuSidecar) takes
the dependency's own context (Helm 3.7+), so the container names exactly the Secrets and
ConfigMaps the dependency renders, with the dependency's values and defaults:

  $ecu := .Subcharts.ecuSidecar

and includes, in its worker's pod template, with that context:
  ecu-sidecar.sidecarPodLabels       -> metadata.labels (the PodMonitor selects them)
  ecu-sidecar.sidecarPodAnnotations  -> metadata.annotations (checksums that roll the pod)
  ecu-sidecar.sidecarContainer       -> one item of spec.containers (or initContainers)
  ecu-sidecar.sidecarVolumes         -> items of spec.volumes
templates/worker-example.yaml does exactly this; docs/operations.md shows a host chart.
*/}}

{{/* Labels that mark a pod as carrying the sidecar (the PodMonitor selects them). */}}
{{- define "ecu-sidecar.sidecarPodLabels" -}}
ecu-sidecar.io/sidecar: {{ include "ecu-sidecar.fullname" . | quote }}
{{- end }}

{{/* Checksums that roll the pod when its configuration changes. */}}
{{- define "ecu-sidecar.sidecarPodAnnotations" -}}
{{- if .Values.rateCard.rollPods }}
checksum/ratecard: {{ toJson (dict "c" .Values.rateCard.content "a" .Values.rateCard.archive) | sha256sum }}
{{- end }}
{{- if include "ecu-sidecar.ownSecret" . }}
checksum/secret: {{ toJson (dict "r" .Values.redis.url "l" .Values.ledger.url "a" .Values.admin.token) | sha256sum }}
{{- end }}
{{- end }}

{{/* The sidecar container: one list item for `containers` (or `initContainers` with
sidecar.nativeSidecar). gRPC on 127.0.0.1, health on the pod IP for the probes. */}}
{{- define "ecu-sidecar.sidecarContainer" -}}
{{- if and .Values.sidecar.nativeSidecar (semverCompare "<1.29.0-0" .Capabilities.KubeVersion.Version) }}
{{- fail (printf "sidecar.nativeSidecar needs Kubernetes 1.29+ (restartPolicy on an init container); this cluster is %s: set sidecar.nativeSidecar=false" .Capabilities.KubeVersion.Version) }}
{{- end }}
- name: ecu-sidecar
  image: {{ include "ecu-sidecar.image" . | quote }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  {{- if .Values.sidecar.nativeSidecar }}
  restartPolicy: Always
  {{- end }}
  args: ["serve"]
  ports:
    - name: ecu-health
      containerPort: {{ .Values.sidecar.healthPort }}
      protocol: TCP
    - name: ecu-metrics
      containerPort: {{ .Values.metrics.port }}
      protocol: TCP
  env:
    - name: ECU_LISTEN
      value: {{ include "ecu-sidecar.workerTarget" . | quote }}
    - name: ECU_HEALTH_LISTEN
      value: {{ printf "0.0.0.0:%d" (int .Values.sidecar.healthPort) | quote }}
    {{- with include "ecu-sidecar.commonEnv" . }}{{ . | trim | nindent 4 }}{{- end }}
    {{- if or (include "ecu-sidecar.embedded" .) .Values.sidecar.useLedger }}
    {{- with include "ecu-sidecar.ledgerEnv" . }}{{ . | trim | nindent 4 }}{{- end }}
    {{- end }}
    {{- if and .Values.flusher.enabled (not (include "ecu-sidecar.embedded" .)) (not .Values.sidecar.useLedger) }}
    {{- /* No ledger in this container, yet the flushers drain every outbox into theirs: the
    sidecar must never bound an outbox (it skips those with a consumer group, but a new
    organization's stream has none until a flusher discovers it). */}}
    - name: ECU_OUTBOX_MAX_LEN
      value: "0"
    {{- end }}
    {{- if .Values.rateCard.content }}
    - name: ECU_RATE_CARD_FILE
      value: /etc/ecu/ratecard/current.toml
    - name: ECU_RATE_CARD_POLL_MS
      value: {{ .Values.rateCard.pollMs | int64 | quote }}
    {{- if .Values.rateCard.archive }}
    - name: ECU_RATE_CARD_ARCHIVE_DIR
      value: /etc/ecu/ratecard-archive
    {{- end }}
    {{- end }}
    {{- if .Values.sidecar.allowedOrgs }}
    - name: ECU_ALLOWED_ORGS
      value: {{ join "," .Values.sidecar.allowedOrgs | quote }}
    {{- end }}
    {{- if .Values.admin.enabled }}
    - name: ECU_ADMIN_TOKEN
      valueFrom:
        secretKeyRef:
          name: {{ .Values.admin.existingSecret | default (include "ecu-sidecar.secretName" .) }}
          key: {{ .Values.admin.existingSecretKey }}
    {{- end }}
    {{- with .Values.sidecar.extraEnv }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- with .Values.sidecar.startupProbe }}
  startupProbe:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.sidecar.readinessProbe }}
  readinessProbe:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.sidecar.livenessProbe }}
  livenessProbe:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  resources:
    {{- toYaml .Values.sidecar.resources | nindent 4 }}
  securityContext:
    {{- toYaml .Values.sidecar.securityContext | nindent 4 }}
  volumeMounts:
    - name: ecu-tmp
      mountPath: /tmp
    {{- with include "ecu-sidecar.workerVolumeMounts" . }}{{ . | trim | nindent 4 }}{{- end }}
    {{- if .Values.rateCard.content }}
    - name: ecu-ratecard
      mountPath: /etc/ecu/ratecard
      readOnly: true
    {{- if .Values.rateCard.archive }}
    - name: ecu-ratecard-archive
      mountPath: /etc/ecu/ratecard-archive
      readOnly: true
    {{- end }}
    {{- end }}
    {{- if and (include "ecu-sidecar.embedded" .) .Values.ledger.sqliteEmptyDir }}
    - name: ecu-ledger
      mountPath: /var/lib/ecu
    {{- end }}
    {{- with include "ecu-sidecar.tlsMounts" (list . (include "ecu-sidecar.sidecarUsesLedger" .)) }}{{ . | trim | nindent 4 }}{{- end }}
    {{- with .Values.sidecar.extraVolumeMounts }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
{{- end }}

{{/* Where the worker reaches its sidecar (ECU_LISTEN of the sidecar): 127.0.0.1:<grpcPort>,
or with sidecar.unixSocket.enabled the Unix socket in the shared ecu-socket volume. */}}
{{- define "ecu-sidecar.workerTarget" -}}
{{- if .Values.sidecar.unixSocket.enabled -}}
unix:///var/run/ecu/ecu.sock
{{- else -}}
{{ printf "127.0.0.1:%d" (int .Values.sidecar.grpcPort) }}
{{- end -}}
{{- end }}

{{/* The worker container's volumeMounts for the Unix socket (items; nothing over TCP). */}}
{{- define "ecu-sidecar.workerVolumeMounts" -}}
{{- if .Values.sidecar.unixSocket.enabled }}
- name: ecu-socket
  mountPath: /var/run/ecu
{{- end }}
{{- end }}

{{/* The volumes the sidecar container mounts: items for the pod's `volumes`. */}}
{{- define "ecu-sidecar.sidecarVolumes" -}}
- name: ecu-tmp
  emptyDir:
    medium: Memory
    sizeLimit: 16Mi
{{- if .Values.sidecar.unixSocket.enabled }}
- name: ecu-socket
  emptyDir:
    medium: Memory
    sizeLimit: 1Mi
{{- end }}
{{- if .Values.rateCard.content }}
- name: ecu-ratecard
  configMap:
    name: {{ include "ecu-sidecar.rateCardName" . }}
    items:
      - key: current.toml
        path: current.toml
{{- if .Values.rateCard.archive }}
- name: ecu-ratecard-archive
  configMap:
    name: {{ include "ecu-sidecar.rateCardName" . }}
    items:
      {{- range $file, $_ := .Values.rateCard.archive }}
      - key: {{ printf "archive-%s" $file }}
        path: {{ $file }}
      {{- end }}
{{- end }}
{{- end }}
{{- if and (include "ecu-sidecar.embedded" .) .Values.ledger.sqliteEmptyDir }}
- name: ecu-ledger
  emptyDir: {}
{{- end }}
{{- with include "ecu-sidecar.tlsVolumes" (list . (include "ecu-sidecar.sidecarUsesLedger" .)) }}
{{ . | trim }}
{{- end }}
{{- with .Values.sidecar.extraVolumes }}
{{ toYaml . }}
{{- end }}
{{- end }}
