{{/*
Names, labels and the pieces every service's resources share. A "component" is one of the five
services, given by its values key (promptCollector, ...); rlhf.components maps keys to names.
*/}}

{{- define "rlhf.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "rlhf.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "rlhf.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* values key -> service name (as `rlhf serve NAME` and RLHF_<SERVICE>_* know it); trainerJob:
the pods of the trainer's training Jobs (services/trainer/launchers.py) */}}
{{- define "rlhf.components" -}}
promptCollector: prompt-collector
policyServer: policy-server
rewardScorer: reward-scorer
feedbackStore: feedback-store
trainer: trainer
trainerJob: trainer-job
{{- end -}}

{{/* "true" when the trainer runs its jobs as Kubernetes Jobs */}}
{{- define "rlhf.trainerJobs" -}}
{{- if and .Values.trainer.enabled (eq .Values.trainer.jobs.launcher "kubernetes") -}}true{{- end -}}
{{- end -}}

{{- define "rlhf.componentName" -}}
{{- index (include "rlhf.components" . | fromYaml) .component -}}
{{- end -}}

{{/* "<fullname>-<service>": names of a component's Deployment, Service, ... */}}
{{- define "rlhf.componentFullname" -}}
{{- printf "%s-%s" (include "rlhf.fullname" .ctx) (include "rlhf.componentName" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "rlhf.selectorLabels" -}}
app.kubernetes.io/name: {{ include "rlhf.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "rlhf.labels" -}}
helm.sh/chart: {{ include "rlhf.chart" . }}
{{ include "rlhf.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: rlhf
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* labels of a component's resources; args: ctx, component */}}
{{- define "rlhf.componentLabels" -}}
{{ include "rlhf.labels" .ctx }}
app.kubernetes.io/component: {{ include "rlhf.componentName" . }}
{{- end -}}

{{- define "rlhf.componentSelectorLabels" -}}
{{ include "rlhf.selectorLabels" .ctx }}
app.kubernetes.io/component: {{ include "rlhf.componentName" . }}
{{- end -}}

{{- define "rlhf.annotations" -}}
{{- with .Values.commonAnnotations }}
annotations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* the RLHF_<SERVICE>_ prefix of a component's settings */}}
{{- define "rlhf.envPrefix" -}}
{{- printf "RLHF_%s_" (include "rlhf.componentName" . | upper | replace "-" "_") -}}
{{- end -}}

{{/* GPUs a component asks for (resources.limits nvidia.com/gpu); 0 without */}}
{{- define "rlhf.gpus" -}}
{{- $v := index .ctx.Values .component -}}
{{- $limits := ($v.resources | default dict).limits | default dict -}}
{{- index $limits "nvidia.com/gpu" | default 0 | int -}}
{{- end -}}

{{/* the image of a component: its override, else the common image; the CUDA tag with GPUs */}}
{{- define "rlhf.image" -}}
{{- $v := index .ctx.Values .component -}}
{{- $img := merge (deepCopy ($v.image | default dict)) .ctx.Values.image -}}
{{- $tag := $img.tag | default .ctx.Chart.AppVersion | toString -}}
{{- if and (gt (include "rlhf.gpus" . | int) 0) (not ($v.image | default dict).tag) -}}
{{- $tag = printf "%s%s" $tag $img.cudaTagSuffix -}}
{{- end -}}
{{- $repo := $img.repository -}}
{{- if $img.registry -}}
{{- $repo = printf "%s/%s" $img.registry $img.repository -}}
{{- end -}}
{{- if $img.digest -}}
{{- printf "%s@%s" $repo $img.digest -}}
{{- else -}}
{{- printf "%s:%s" $repo $tag -}}
{{- end -}}
{{- end -}}

{{- define "rlhf.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "rlhf.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "rlhf.trainerServiceAccountName" -}}
{{- printf "%s-trainer" (include "rlhf.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* host:port of a component's gRPC Service */}}
{{- define "rlhf.address" -}}
{{- printf "%s:%v" (include "rlhf.componentFullname" .) (index .ctx.Values .component).ports.grpc -}}
{{- end -}}

{{- define "rlhf.kafkaBootstrap" -}}
{{- if .Values.kafka.inCluster.enabled -}}
{{- printf "%s-kafka:9092" (include "rlhf.fullname" .) -}}
{{- else -}}
{{- .Values.kafka.bootstrapServers -}}
{{- end -}}
{{- end -}}

{{/* the Secret and key that hold the database URL */}}
{{- define "rlhf.databaseSecretName" -}}
{{- if .Values.database.existingSecret -}}
{{- .Values.database.existingSecret -}}
{{- else -}}
{{- printf "%s-database" (include "rlhf.fullname" .) -}}
{{- end -}}
{{- end -}}

{{- define "rlhf.databaseSecretKey" -}}
{{- if .Values.database.existingSecret -}}
{{- .Values.database.existingSecretKey -}}
{{- else -}}
database-url
{{- end -}}
{{- end -}}

{{- define "rlhf.databaseUrl" -}}
{{- if .Values.database.inCluster.enabled -}}
{{- printf "postgresql+psycopg://rlhf@%s-postgresql:5432/rlhf" (include "rlhf.fullname" .) -}}
{{- else -}}
{{- .Values.database.url -}}
{{- end -}}
{{- end -}}

{{/*
The migration Job runs before install when the database's Secret exists before the release
(database.existingSecret, external database); otherwise (the chart creates the Secret, or runs the
database) after install, and the services then also migrate at start (idempotent: the migration
holds a PostgreSQL advisory lock). Before every upgrade it always runs first.
*/}}
{{- define "rlhf.migrateBeforeInstall" -}}
{{- if and .Values.migrations.enabled .Values.database.existingSecret (not .Values.database.inCluster.enabled) -}}true{{- end -}}
{{- end -}}

{{/*
Every check that a values file can fail; each message names the value and what to do.
The values' types are checked by values.schema.json before this runs.
*/}}
{{- define "rlhf.validateValues" -}}
{{- $msgs := list -}}
{{- if and (not .Values.kafka.inCluster.enabled) (not .Values.kafka.bootstrapServers) -}}
{{- $msgs = append $msgs "kafka.bootstrapServers is required: the Kafka brokers (host:port,...) the services publish and consume events on; or set kafka.inCluster.enabled=true for a single trial broker (deploy/values-dev.yaml)" -}}
{{- end -}}
{{- if and (hasPrefix "SASL" .Values.kafka.securityProtocol) (not (and .Values.kafka.sasl.mechanism .Values.kafka.sasl.username .Values.kafka.sasl.existingSecret)) -}}
{{- $msgs = append $msgs (printf "kafka.securityProtocol=%s needs kafka.sasl.mechanism, kafka.sasl.username and kafka.sasl.existingSecret (the Secret holding the password)" .Values.kafka.securityProtocol) -}}
{{- end -}}
{{- $usesDb := or .Values.promptCollector.enabled .Values.feedbackStore.enabled .Values.trainer.enabled -}}
{{- if and $usesDb (not .Values.database.inCluster.enabled) (not .Values.database.existingSecret) (not .Values.database.url) -}}
{{- $msgs = append $msgs "database.url or database.existingSecret is required: the PostgreSQL database of the prompt-collector, the feedback-store and the trainer's jobs (postgresql+psycopg://user:password@host:5432/db); or set database.inCluster.enabled=true for a trial server (deploy/values-dev.yaml)" -}}
{{- end -}}
{{- if and (not .Values.database.inCluster.enabled) (not .Values.database.existingSecret) (hasPrefix "sqlite" .Values.database.url) -}}
{{- $msgs = append $msgs "database.url must name a PostgreSQL server: a SQLite file cannot be shared by replicas on different nodes" -}}
{{- end -}}
{{- if and (not .Values.auth.allowAnonymous) (not .Values.auth.credentials.existingSecret) -}}
{{- $msgs = append $msgs "auth.credentials.existingSecret is required: the Secret with the callers file (tokens or certificate names -> roles, docs/security.md) without which every service refuses to start; or auth.allowAnonymous=true to let anyone call with every role (trials only)" -}}
{{- end -}}
{{- if and .Values.auth.credentials.existingSecret (not .Values.auth.peerToken.existingSecret) (not .Values.tls.clientAuth) -}}
{{- $msgs = append $msgs "auth.peerToken.existingSecret is required with auth.credentials: the token the trainer and the policy-server present to the other services (a `service` caller of the callers file); or tls.clientAuth=true, where they present their certificates" -}}
{{- end -}}
{{- if and .Values.tls.enabled (not .Values.tls.existingSecret) -}}
{{- $msgs = append $msgs "tls.enabled=true needs tls.existingSecret: a Secret of type kubernetes.io/tls with tls.crt, tls.key and ca.crt" -}}
{{- end -}}
{{- if and (not .Values.registry.persistence.enabled) (not .Values.registry.volume) -}}
{{- $msgs = append $msgs "registry.persistence.enabled=false needs registry.volume: the model registry must be a volume every model service mounts (e.g. an object-store CSI volume)" -}}
{{- end -}}
{{- range $key, $name := include "rlhf.components" . | fromYaml -}}
{{- $v := index $.Values $key -}}
{{- if $v.enabled -}}
{{- $gpus := include "rlhf.gpus" (dict "ctx" $ "component" $key) | int -}}
{{- $nodeAffinity := ($v.affinity | default dict).nodeAffinity -}}
{{- if and (gt $gpus 0) (not $v.nodeSelector) (not $nodeAffinity) -}}
{{- $msgs = append $msgs (printf "%s.resources asks for %d nvidia.com/gpu but %s.nodeSelector is empty: set it to the GPU nodes' label (e.g. nvidia.com/gpu.present: \"true\") and add %s.tolerations for their taint, or the pods wait for a GPU node without saying why" $key $gpus $key $key) -}}
{{- end -}}
{{- if le (int $v.terminationGracePeriodSeconds) (int $v.graceSeconds) -}}
{{- $msgs = append $msgs (printf "%s.terminationGracePeriodSeconds (%v) must exceed %s.graceSeconds (%v): Kubernetes would kill the service before its in-flight calls have drained" $key $v.terminationGracePeriodSeconds $key $v.graceSeconds) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- with .Values.policyServer.autoscaling -}}
{{- if and .enabled (lt (int .maxReplicas) (int .minReplicas)) -}}
{{- $msgs = append $msgs (printf "policyServer.autoscaling.maxReplicas (%v) must be >= minReplicas (%v)" .maxReplicas .minReplicas) -}}
{{- end -}}
{{- if and .enabled (not .queueDepth.enabled) (eq (int .targetCPUUtilizationPercentage) 0) -}}
{{- $msgs = append $msgs "policyServer.autoscaling needs a target: targetCPUUtilizationPercentage > 0 or queueDepth.enabled=true" -}}
{{- end -}}
{{- end -}}
{{- if $msgs -}}
{{- fail (printf "\n\nINVALID VALUES:\n- %s\n" (join "\n- " $msgs)) -}}
{{- end -}}
{{- end -}}
