{{/* Names, labels and the platform document (priorities, GPUs, pools) generated from code. */}}

{{- define "taskserver.name" -}}
{{- .Values.nameOverride | default .Chart.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}

{{- define "taskserver.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- $name := include "taskserver.name" . -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "taskserver.labels" -}}
app.kubernetes.io/name: {{ include "taskserver.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* commonAnnotations on an object's metadata: "taskserver.annotations" where the object has
     none of its own, "taskserver.commonAnnotationItems" under an annotations: key it has. */}}
{{- define "taskserver.annotations" -}}
{{- with .Values.commonAnnotations }}
annotations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{- define "taskserver.commonAnnotationItems" -}}
{{- with .Values.commonAnnotations }}
{{- toYaml . }}
{{- end }}
{{- end -}}

{{- define "taskserver.selector" -}}
app.kubernetes.io/name: {{ include "taskserver.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* A pod's annotations, affinity and topology spread (server, workers, warm worker):
     (dict "values" <the component's values>), indented by the caller. */}}
{{- define "taskserver.podAnnotations" -}}
{{- with .values.podAnnotations }}
annotations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* nodeSelector, tolerations, affinity and topology spread of a pod whose placement is its
     values alone (recovery, the request lane, Postgres): (dict "values" <its values>). */}}
{{- define "taskserver.podScheduling" -}}
{{- with .values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- include "taskserver.podPlacement" . }}
{{- end -}}

{{- define "taskserver.podPlacement" -}}
{{- with .values.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .values.topologySpreadConstraints }}
topologySpreadConstraints:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* The platform document: the chart's only source of priority, GPU and pool names. */}}
{{- define "taskserver.platform" -}}
{{- .Files.Get "files/platform.json" -}}
{{- end -}}

{{/* Flow-run Jobs and the warm worker: a namespace of their own unless told otherwise. */}}
{{- define "taskserver.jobsNamespace" -}}
{{- .Values.jobs.namespace | default (printf "%s-jobs" .Release.Namespace) -}}
{{- end -}}

{{- define "taskserver.serverName" -}}
{{- printf "%s-server" (include "taskserver.fullname" .) -}}
{{- end -}}

{{- define "taskserver.apiUrl" -}}
{{- printf "http://%s.%s.svc:%v/api" (include "taskserver.serverName" .) .Release.Namespace .Values.server.port -}}
{{- end -}}

{{- define "taskserver.authSecretName" -}}
{{- .Values.auth.existingSecret | default (printf "%s-api-auth" (include "taskserver.fullname" .)) -}}
{{- end -}}

{{- define "taskserver.postgresName" -}}
{{- printf "%s-postgresql" (include "taskserver.fullname" .) -}}
{{- end -}}

{{- define "taskserver.postgresSecretName" -}}
{{- .Values.postgresql.existingSecret | default (include "taskserver.postgresName" .) -}}
{{- end -}}

{{- define "taskserver.databaseSecretName" -}}
{{- if .Values.externalDatabase.existingSecret -}}
{{- .Values.externalDatabase.existingSecret -}}
{{- else -}}
{{- printf "%s-database" (include "taskserver.fullname" .) -}}
{{- end -}}
{{- end -}}

{{/* A fully qualified image reference: registry/repository:tag[@digest]. .image is an image
     value (registry, repository, tag, digest); an empty registry is images.registry. */}}
{{- define "taskserver.imageRef" -}}
{{- $image := .image -}}
{{- $registry := $image.registry | default .root.Values.images.registry -}}
{{- $repository := $image.repository -}}
{{- if and (eq $registry "docker.io") (not (contains "/" $repository)) -}}
{{- $repository = printf "library/%s" $repository -}}
{{- end -}}
{{- $reference := printf "%s/%s:%s" $registry $repository (toString ($image.tag | default .root.Chart.AppVersion)) -}}
{{- with $image.digest }}{{ $reference = printf "%s@%s" $reference . }}{{ end -}}
{{- $reference -}}
{{- end -}}

{{/* The warm worker's image: warm.customImage when it names a repository, else images.<warm.image>. */}}
{{- define "taskserver.warmImage" -}}
{{- if (.Values.warm.customImage | default dict).repository -}}
{{- include "taskserver.imageRef" (dict "root" . "image" .Values.warm.customImage) -}}
{{- else -}}
{{- include "taskserver.image" (dict "root" . "name" .Values.warm.image) -}}
{{- end -}}
{{- end -}}

{{- define "taskserver.image" -}}
{{- include "taskserver.imageRef" (dict "root" .root "image" (index .root.Values.images .name)) -}}
{{- end -}}

{{- define "taskserver.dataClaimName" -}}
{{- .Values.data.volume.existingClaim | default (printf "%s-data" (include "taskserver.fullname" .)) -}}
{{- end -}}

{{/* Pod and container security: non-root, no privilege escalation, no capabilities. */}}
{{- define "taskserver.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .uid }}
runAsGroup: {{ .uid }}
fsGroup: {{ .uid }}
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* Every container: read-only root filesystem; what must be written goes to size-limited
     emptyDirs (taskserver.scratchVolume). */}}
{{- define "taskserver.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
capabilities:
  drop: ["ALL"]
{{- end -}}

{{/* A size-limited emptyDir: an unbounded one lets a pod fill its node's disk. */}}
{{- define "taskserver.scratchVolume" -}}
- name: {{ .name }}
  emptyDir:
    sizeLimit: {{ .size }}
{{- end -}}

{{/* A PriorityClass name of the model, with priorityClasses.namePrefix. */}}
{{- define "taskserver.priorityClassName" -}}
{{- printf "%s%s" .root.Values.priorityClasses.namePrefix .className -}}
{{- end -}}

{{/* Environment every Prefect client container needs: the API URL and the auth string. */}}
{{- define "taskserver.clientEnv" -}}
- name: PREFECT_API_URL
  value: {{ include "taskserver.apiUrl" . | quote }}
{{- /* The root filesystem is read-only: Prefect's and taskserver's homes (the embedding cache
     when data is not a volume) live on the pod's /tmp emptyDir. */}}
- name: PREFECT_HOME
  value: /tmp/prefect
- name: TASKSERVER_HOME
  value: /tmp/taskserver
- name: DO_NOT_TRACK
  value: "true"
{{- range $name, $value := (include "taskserver.platform" . | fromJson).clientEnv }}
- name: {{ $name }}
  value: {{ $value | quote }}
{{- end }}
{{- if .Values.auth.enabled }}
- name: PREFECT_API_AUTH_STRING
  valueFrom:
    secretKeyRef:
      name: {{ include "taskserver.authSecretName" . }}
      key: {{ .Values.auth.secretKey }}
{{- end }}
{{- end -}}

{{/* Per-pool values: the pool's own entry merged over workers.defaults. */}}
{{- define "taskserver.workerValues" -}}
{{- $defaults := deepCopy .root.Values.workers.defaults -}}
{{- $own := deepCopy (index .root.Values.workers .pool.name | default dict) -}}
{{- toJson (mergeOverwrite $defaults $own) -}}
{{- end -}}

{{/* The job options the bootstrap hook bakes into each pool's base job template
     (taskserver.platform.kubernetes.PoolJobOptions, one entry per pool). */}}
{{- define "taskserver.jobOptions" -}}
{{- $root := . -}}
{{- $platform := include "taskserver.platform" . | fromJson -}}
{{- $options := dict -}}
{{- range $pool := $platform.pools -}}
{{- $values := include "taskserver.workerValues" (dict "root" $root "pool" $pool) | fromJson -}}
{{- $job := $values.job | default dict -}}
{{- $resources := $job.resources | default dict -}}
{{- $code := $pool.jobResources | default dict -}}
{{- $imageName := ternary "gpu" "cpu" $pool.gpu -}}
{{- $priority := $job.defaultPriority -}}
{{- if not $priority -}}
{{- range $platform.priorities }}{{ if .default }}{{ $priority = .name }}{{ end }}{{ end -}}
{{- end -}}
{{- $image := include "taskserver.image" (dict "root" $root "name" $imageName) -}}
{{- if ($job.image | default dict).repository -}}
{{- $image = include "taskserver.imageRef" (dict "root" $root "image" $job.image) -}}
{{- end -}}
{{- $entry := dict
      "image" $image
      "image_pull_policy" $root.Values.images.pullPolicy
      "namespace" (include "taskserver.jobsNamespace" $root)
      "service_account_name" (printf "%s-%s-job" (include "taskserver.fullname" $root) $pool.name)
      "priority" $priority
      "priority_class_prefix" $root.Values.priorityClasses.namePrefix
      "finished_job_ttl" (ternary $platform.defaults.finishedJobTTL $job.finishedJobTTL (kindIs "invalid" $job.finishedJobTTL))
      "pod_watch_timeout_seconds" (ternary $platform.defaults.podWatchTimeoutSeconds $job.podWatchTimeoutSeconds (kindIs "invalid" $job.podWatchTimeoutSeconds))
      "resources" (dict "cpu_request" ($resources.cpuRequest | default $code.cpuRequest) "cpu_limit" ($resources.cpuLimit | default $code.cpuLimit) "memory_request" ($resources.memoryRequest | default $code.memoryRequest) "memory_limit" ($resources.memoryLimit | default $code.memoryLimit))
      "kueue" (dict "enabled" $root.Values.kueue.enabled "queue_name" ($root.Values.kueue.localQueue | default $platform.defaults.kueueLocalQueue))
-}}
{{- if $pool.gpu -}}
{{- $_ := set $entry "gpu_type" $job.gpuType -}}
{{- $_ := set $entry "gpu_count" ($job.gpuCount | default 1) -}}
{{- end -}}
{{- $data := $root.Values.data -}}
{{- if eq $data.mode "volume" -}}
{{- $_ := set $entry "data" (dict "kind" "volume" "claim_name" (include "taskserver.dataClaimName" $root) "mount_path" $data.mountPath) -}}
{{- else if eq $data.mode "objectStore" -}}
{{- $_ := set $entry "data" (dict "kind" "object_store" "url" $data.objectStore.url "credentials_secret" ($data.objectStore.existingSecret | default nil) "endpoint_url" ($data.objectStore.endpointUrl | default nil) "result_storage_block" ($data.objectStore.resultStorageBlock | default nil)) -}}
{{- end -}}
{{- $_ := set $options $pool.name $entry -}}
{{- end -}}
{{- toPrettyJson $options -}}
{{- end -}}

{{/* The server's database settings: the URL comes from a Secret, never a literal. */}}
{{- define "taskserver.serverDatabaseEnv" -}}
- name: PREFECT_HOME
  value: /tmp/prefect
- name: DO_NOT_TRACK
  value: "true"
{{- if .Values.postgresql.enabled }}
- name: PREFECT_SERVER_DATABASE_DRIVER
  value: postgresql+asyncpg
- name: PREFECT_SERVER_DATABASE_HOST
  value: {{ printf "%s.%s.svc" (include "taskserver.postgresName" .) .Release.Namespace | quote }}
- name: PREFECT_SERVER_DATABASE_PORT
  value: "5432"
- name: PREFECT_SERVER_DATABASE_NAME
  value: {{ .Values.postgresql.database | quote }}
- name: PREFECT_SERVER_DATABASE_USER
  value: {{ .Values.postgresql.username | quote }}
- name: PREFECT_SERVER_DATABASE_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "taskserver.postgresSecretName" . }}
      key: password
{{- else }}
- name: PREFECT_SERVER_DATABASE_CONNECTION_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "taskserver.databaseSecretName" . }}
      key: {{ .Values.externalDatabase.existingSecretKey }}
{{- end }}
{{- end -}}

{{/* A container that waits until the API answers /api/health (hook Jobs start before it does). */}}
{{- define "taskserver.waitForApi" -}}
- name: wait-for-api
  image: {{ include "taskserver.image" (dict "root" . "name" "cpu") }}
  imagePullPolicy: {{ .Values.images.pullPolicy }}
  command:
    - python
    - -c
    - |
      import os, time, urllib.request
      url = os.environ["PREFECT_API_URL"] + "/health"
      for attempt in range(180):
          try:
              urllib.request.urlopen(url, timeout=5).read()
              break
          except OSError as exc:
              print(f"waiting for {url}: {exc}", flush=True)
              time.sleep(5)
      else:
          raise SystemExit(f"{url} did not answer within 15 minutes")
  env:
    {{- include "taskserver.clientEnv" . | nindent 4 }}
  securityContext:
    {{- include "taskserver.containerSecurityContext" (dict) | nindent 4 }}
  resources:
    requests: {cpu: 10m, memory: 64Mi, ephemeral-storage: 8Mi}
    limits: {cpu: 100m, memory: 128Mi, ephemeral-storage: 64Mi}
  volumeMounts:
    - name: tmp
      mountPath: /tmp
{{- end -}}

{{/* The shared data location as a pod sees it, exactly as the job template gives it to jobs
     (taskserver.platform.kubernetes.SharedData: env() and the "data" volume). tests/charts
     compares the warm worker's env, volumes and mounts with the jobs' generated ones. */}}
{{- define "taskserver.dataEnv" -}}
{{- $platform := include "taskserver.platform" . | fromJson -}}
{{- $data := .Values.data -}}
{{- if eq $data.mode "volume" }}
- name: TASKSERVER_DATA_DIR
  value: {{ $data.mountPath | quote }}
- name: PREFECT_RESULTS_PERSIST_BY_DEFAULT
  value: "true"
- name: PREFECT_LOCAL_STORAGE_PATH
  value: {{ printf "%s/%s" (trimSuffix "/" $data.mountPath) $platform.resultsDirname | quote }}
{{- else if eq $data.mode "objectStore" }}
- name: TASKSERVER_DATA_DIR
  value: {{ $data.objectStore.url | quote }}
{{- with $data.objectStore.endpointUrl }}
- name: AWS_ENDPOINT_URL
  value: {{ . | quote }}
{{- end }}
{{- with $data.objectStore.existingSecret }}
{{- $secret := . }}
{{- range list "AWS_ACCESS_KEY_ID" "AWS_SECRET_ACCESS_KEY" }}
- name: {{ . }}
  valueFrom:
    secretKeyRef:
      name: {{ $secret }}
      key: {{ . }}
{{- end }}
{{- end }}
{{- with $data.objectStore.resultStorageBlock }}
- name: PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK
  value: {{ . | quote }}
- name: PREFECT_RESULTS_PERSIST_BY_DEFAULT
  value: "true"
{{- end }}
{{- end }}
{{- end -}}

{{- define "taskserver.dataVolumes" -}}
{{- if eq .Values.data.mode "volume" }}
- name: data
  persistentVolumeClaim:
    claimName: {{ include "taskserver.dataClaimName" . }}
{{- end }}
{{- end -}}

{{- define "taskserver.dataVolumeMounts" -}}
{{- if eq .Values.data.mode "volume" }}
- name: data
  mountPath: {{ .Values.data.mountPath }}
{{- end }}
{{- end -}}

{{/* The PriorityClass of the highest priority in the model (largest value). */}}
{{- define "taskserver.topPriorityClass" -}}
{{- $platform := include "taskserver.platform" . | fromJson -}}
{{- $top := dict -}}
{{- range $platform.priorities -}}
{{- if or (not $top) (gt (int64 .value) (int64 $top.value)) }}{{ $top = . }}{{ end -}}
{{- end -}}
{{- $top.className -}}
{{- end -}}

{{/* The PriorityClass of a named priority; empty name means the model's highest. */}}
{{- define "taskserver.priorityClassOf" -}}
{{- $platform := include "taskserver.platform" .root | fromJson -}}
{{- $className := include "taskserver.topPriorityClass" .root -}}
{{- if .name -}}
{{- range $platform.priorities }}{{ if eq .name $.name }}{{ $className = .className }}{{ end }}{{ end -}}
{{- end -}}
{{- include "taskserver.priorityClassName" (dict "root" .root "className" $className) -}}
{{- end -}}

{{/* A GPU catalogue entry by name, as JSON ({} when the name is not in the catalogue). */}}
{{- define "taskserver.gpu" -}}
{{- $platform := include "taskserver.platform" .root | fromJson -}}
{{- $found := dict -}}
{{- range $platform.gpus }}{{ if eq .name $.name }}{{ $found = . }}{{ end }}{{ end -}}
{{- toJson $found -}}
{{- end -}}

{{/* Tolerations of a GPU's node taints (the catalogue's taints, as GPU jobs tolerate them). */}}
{{- define "taskserver.gpuTolerations" -}}
{{- range .taints }}
- key: {{ .key | quote }}
  operator: Equal
  value: {{ .value | quote }}
  effect: {{ .effect }}
{{- end }}
{{- end -}}

{{/* A memory quantity (512Mi, 5Gi, 4G, 4096M, bytes) in MiB, as an integer; -1 if unreadable. */}}
{{- define "taskserver.memoryMiB" -}}
{{- $quantity := toString . -}}
{{- $number := regexFind "^[0-9]+(\\.[0-9]+)?" $quantity -}}
{{- $suffix := trimPrefix $number $quantity -}}
{{- $factors := dict "" (divf 1.0 1048576.0) "Ki" (divf 1.0 1024.0) "Mi" 1.0 "Gi" 1024.0 "Ti" 1048576.0 "k" (divf 1000.0 1048576.0) "M" (divf 1000000.0 1048576.0) "G" (divf 1000000000.0 1048576.0) "T" (divf 1000000000000.0 1048576.0) -}}
{{- if and $number (hasKey $factors $suffix) -}}
{{- mulf (float64 $number) (index $factors $suffix) | floor | int64 -}}
{{- else -}}
-1
{{- end -}}
{{- end -}}
