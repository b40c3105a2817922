{{/* Combinations of values that make no sense fail here, with a sentence saying what to change. */}}
{{- define "taskserver.validate" -}}
{{- $platform := include "taskserver.platform" . | fromJson -}}
{{- $gpuNames := list -}}
{{- range $platform.gpus }}{{ $gpuNames = append $gpuNames .name }}{{ end -}}
{{- $priorityNames := list -}}
{{- range $platform.priorities }}{{ $priorityNames = append $priorityNames .name }}{{ end -}}
{{- $poolNames := list -}}
{{- range $platform.pools }}{{ $poolNames = append $poolNames .name }}{{ end -}}

{{- if and .Values.postgresql.enabled .Values.externalDatabase.enabled -}}
{{- fail "taskserver: postgresql.enabled and externalDatabase.enabled are both true; choose the bundled Postgres or an external database, not both." -}}
{{- end -}}
{{- if not (or .Values.postgresql.enabled .Values.externalDatabase.enabled) -}}
{{- fail "taskserver: no database; set postgresql.enabled=true for the bundled Postgres, or externalDatabase.enabled=true with existingSecret or connectionUrl." -}}
{{- end -}}
{{- if and .Values.externalDatabase.enabled (not (or .Values.externalDatabase.existingSecret .Values.externalDatabase.connectionUrl)) -}}
{{- fail "taskserver: externalDatabase.enabled needs externalDatabase.existingSecret (a Secret with the connection URL) or externalDatabase.connectionUrl." -}}
{{- end -}}
{{- if and .Values.externalDatabase.existingSecret .Values.externalDatabase.connectionUrl -}}
{{- fail "taskserver: set externalDatabase.existingSecret or externalDatabase.connectionUrl, not both." -}}
{{- end -}}

{{- range $key, $_ := .Values.commonAnnotations -}}
{{- if hasPrefix "helm.sh/" $key -}}
{{- fail (printf "taskserver: commonAnnotations may not set %s; Helm's own annotations belong to the chart (hooks, resource policy)." $key) -}}
{{- end -}}
{{- end -}}
{{- range $name, $worker := .Values.workers -}}
{{- if and (ne $name "defaults") (not (has $name $poolNames)) -}}
{{- fail (printf "taskserver: workers.%s names no work pool; the pools are %s (taskserver.platform.tasks.POOLS); the %s lane is configured under warm, not workers." $name (join ", " $poolNames) $platform.warmPool.name) -}}
{{- end -}}
{{- end -}}
{{- range $pool := $platform.pools -}}
{{- $values := include "taskserver.workerValues" (dict "root" $ "pool" $pool) | fromJson -}}
{{- $job := $values.job | default dict -}}
{{- if and $pool.gpu $values.enabled (not $job.gpuType) -}}
{{- fail (printf "taskserver: the %s pool is enabled but workers.%s.job.gpuType is empty; name a GPU type (%s) or disable the pool." $pool.name $pool.name (join ", " $gpuNames)) -}}
{{- end -}}
{{- if and $pool.gpu $job.gpuType (not (has $job.gpuType $gpuNames)) -}}
{{- fail (printf "taskserver: workers.%s.job.gpuType %q is not in the GPU catalogue; choose one of %s, or add it to taskserver.platform.gpus." $pool.name $job.gpuType (join ", " $gpuNames)) -}}
{{- end -}}
{{- if and $job.defaultPriority (not (has $job.defaultPriority $priorityNames)) -}}
{{- fail (printf "taskserver: workers.%s.job.defaultPriority %q is not a priority; choose one of %s." $pool.name $job.defaultPriority (join ", " $priorityNames)) -}}
{{- end -}}
{{- if and $job.gpuCount (gt (int $job.gpuCount) (int $platform.maxGpusPerJob)) -}}
{{- fail (printf "taskserver: workers.%s.job.gpuCount %v is above the %v GPUs one job may request (taskserver.platform.kubernetes.MAX_GPUS_PER_JOB)." $pool.name $job.gpuCount $platform.maxGpusPerJob) -}}
{{- end -}}
{{- end -}}

{{- $warm := .Values.warm -}}
{{- if $warm.enabled -}}
{{- if and (eq $warm.image "gpu") (gt (int $warm.gpuCount) (int $platform.maxGpusPerJob)) -}}
{{- fail (printf "taskserver: warm.gpuCount %v is above the %v GPUs one pod may request (taskserver.platform.kubernetes.MAX_GPUS_PER_JOB)." $warm.gpuCount $platform.maxGpusPerJob) -}}
{{- end -}}
{{- if and (eq $warm.image "gpu") (not (has $warm.gpuType $gpuNames)) -}}
{{- fail (printf "taskserver: warm.image=gpu needs warm.gpuType from the GPU catalogue (%s); %q is not in it." (join ", " $gpuNames) $warm.gpuType) -}}
{{- end -}}
{{- if and $warm.priority (not (has $warm.priority $priorityNames)) -}}
{{- fail (printf "taskserver: warm.priority %q is not a priority; choose one of %s, or leave it empty for the highest." $warm.priority (join ", " $priorityNames)) -}}
{{- end -}}
{{- if and $warm.autoscaling.enabled (gt (int $warm.autoscaling.minReplicas) (int $warm.autoscaling.maxReplicas)) -}}
{{- fail (printf "taskserver: warm.autoscaling.minReplicas (%v) is above maxReplicas (%v)." $warm.autoscaling.minReplicas $warm.autoscaling.maxReplicas) -}}
{{- end -}}
{{- $limitMiB := include "taskserver.memoryMiB" $warm.resources.limits.memory | int64 -}}
{{- $maxRssMB := $warm.maxRssMB | default $platform.defaults.warmMaxRssMB -}}
{{- $neededMiB := add (mul (int64 $warm.interpreters) (int64 $maxRssMB)) 512 -}}
{{- if lt $limitMiB 0 -}}
{{- fail (printf "taskserver: warm.resources.limits.memory %q is not a memory quantity (e.g. 5Gi or 5120Mi)." (toString $warm.resources.limits.memory)) -}}
{{- end -}}
{{- if lt $limitMiB $neededMiB -}}
{{- fail (printf "taskserver: warm.resources.limits.memory %v is below warm.interpreters x warm.maxRssMB + 512Mi for the worker (%vMi); the pod would be OOM-killed before an interpreter is recycled. Raise the limit, or lower interpreters or maxRssMB." $warm.resources.limits.memory $neededMiB) -}}
{{- end -}}
{{- end -}}

{{- if and (eq .Values.data.mode "objectStore") (not .Values.data.objectStore.url) -}}
{{- fail "taskserver: data.mode=objectStore needs data.objectStore.url (e.g. s3://bucket/taskserver)." -}}
{{- end -}}
{{- if and (eq .Values.data.mode "volume") .Values.data.volume.existingClaim .Values.data.volume.storageClass -}}
{{- fail "taskserver: data.volume.existingClaim and data.volume.storageClass are both set; the storage class only applies to a claim the chart creates." -}}
{{- end -}}

{{- if .Values.karpenter.enabled -}}
{{- if not .Values.karpenter.gpuTypes -}}
{{- fail (printf "taskserver: karpenter.enabled needs karpenter.gpuTypes, the GPU types to scale from zero (%s)." (join ", " $gpuNames)) -}}
{{- end -}}
{{- range .Values.karpenter.gpuTypes -}}
{{- if not (has . $gpuNames) -}}
{{- fail (printf "taskserver: karpenter.gpuTypes has %q, which is not in the GPU catalogue (%s)." . (join ", " $gpuNames)) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- if and .Values.auth.existingSecret (not .Values.auth.enabled) -}}
{{- fail "taskserver: auth.existingSecret is set but auth.enabled is false; enable auth or drop the secret." -}}
{{- end -}}
{{- if and .Values.server.ingress.enabled (not .Values.server.ingress.host) -}}
{{- fail "taskserver: server.ingress.enabled needs server.ingress.host." -}}
{{- end -}}
{{- $ingress := .Values.server.ingress -}}
{{- if and $ingress.enabled .Values.auth.enabled (not $ingress.tlsSecretName) (not $ingress.tlsTerminatedUpstream) -}}
{{- fail "taskserver: server.ingress has basic auth but no TLS, so the password would cross the network in clear; set server.ingress.tlsSecretName, or server.ingress.tlsTerminatedUpstream=true if TLS ends in front of the ingress controller." -}}
{{- end -}}
{{- if and $ingress.enabled .Values.networkPolicy.enabled (not .Values.networkPolicy.ingressFromNamespaceLabels) -}}
{{- fail "taskserver: server.ingress is enabled but the server's NetworkPolicy admits no ingress controller; set networkPolicy.ingressFromNamespaceLabels to its namespace's labels (e.g. kubernetes.io/metadata.name: ingress-nginx)." -}}
{{- end -}}
{{- if and (gt (int .Values.server.replicas) 1) (not .Values.server.messaging.redis.host) -}}
{{- fail (printf "taskserver: server.replicas=%v needs a shared message broker: without it each server keeps its own events and caches (Prefect's in-memory messaging). Set server.messaging.redis.host, or run one replica." .Values.server.replicas) -}}
{{- end -}}
{{- if and .Values.jobs.createNamespace (eq (include "taskserver.jobsNamespace" .) .Release.Namespace) (ne .Values.jobs.podSecurityLevel "restricted") -}}
{{- fail "taskserver: jobs.podSecurityLevel only labels a jobs namespace the chart creates; with jobs.namespace equal to the release namespace, label that namespace yourself." -}}
{{- end -}}
{{- end -}}
