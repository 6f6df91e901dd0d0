{{/*
The Deployment of one service; args: ctx (the root context), component (its values key).
Settings reach the service as RLHF_<SERVICE>_<FIELD> variables (docs/services-reference.md).
*/}}
{{- define "rlhf.deployment" -}}
{{- $ := .ctx -}}
{{- $key := .component -}}
{{- $v := index $.Values $key -}}
{{- $name := include "rlhf.componentName" . -}}
{{- $p := include "rlhf.envPrefix" . -}}
{{- $gpus := include "rlhf.gpus" . | int -}}
{{- $usesDb := has $key (list "promptCollector" "feedbackStore" "trainer") -}}
{{- $jobPods := and (eq $key "trainer") (include "rlhf.trainerJobs" $) -}}
{{- $usesRegistry := has $key (list "policyServer" "rewardScorer" "trainer") -}}
{{- $k := $.Values.kafka -}}
{{- $auth := $.Values.auth -}}
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ include "rlhf.componentFullname" . }}
  namespace: {{ $.Release.Namespace }}
  labels:
    {{- include "rlhf.componentLabels" . | nindent 4 }}
  {{- include "rlhf.annotations" $ | nindent 2 }}
spec:
  {{- if not (and (eq $key "policyServer") $v.autoscaling.enabled) }}
  replicas: {{ $v.replicaCount }}
  {{- end }}
  revisionHistoryLimit: 5
  selector:
    matchLabels:
      {{- include "rlhf.componentSelectorLabels" . | nindent 6 }}
  {{- if $usesRegistry }}
  strategy:
    # a new pod loads its model before the old one leaves
    type: RollingUpdate
    rollingUpdate: {maxSurge: 1, maxUnavailable: 0}
  {{- end }}
  template:
    metadata:
      labels:
        {{- include "rlhf.componentLabels" . | nindent 8 }}
        {{- with $v.podLabels }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- with $v.podAnnotations }}
      annotations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
    spec:
      serviceAccountName: {{ ternary (include "rlhf.trainerServiceAccountName" $) (include "rlhf.serviceAccountName" $) (eq $key "trainer") }}
      {{- /* only the trainer calls the Kubernetes API */}}
      automountServiceAccountToken: {{ eq $key "trainer" }}
      {{- with $.Values.imagePullSecrets }}
      imagePullSecrets:
        {{- range . }}
        - name: {{ . }}
        {{- end }}
      {{- end }}
      securityContext:
        {{- toYaml $.Values.podSecurityContext | nindent 8 }}
      terminationGracePeriodSeconds: {{ $v.terminationGracePeriodSeconds }}
      {{- with $v.nodeSelector }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $v.tolerations }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $v.affinity }}
      affinity:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      containers:
        - name: {{ $name }}
          image: {{ include "rlhf.image" . }}
          imagePullPolicy: {{ $.Values.image.pullPolicy }}
          {{- if $.Values.dev.restartOnSync }}
          # development (Tilt): a live update ends the server (kill of /tmp/serve.pid) and the
          # loop starts it again on the synced sources; SIGTERM still drains and stops the pod
          command: ["sh", "-c"]
          args:
            - >-
              trap 'kill -TERM "$pid" 2>/dev/null; wait "$pid"; exit 0' TERM;
              while :; do rlhf serve {{ $name }} & pid=$!; echo "$pid" >/tmp/serve.pid; wait "$pid"; sleep 1; done
          {{- else }}
          args: ["serve", {{ $name | quote }}]
          {{- end }}
          ports:
            - {name: grpc, containerPort: {{ $v.ports.grpc }}, protocol: TCP}
            - {name: metrics, containerPort: {{ $v.ports.metrics }}, protocol: TCP}
            {{- if $v.ports.http }}
            - {name: http, containerPort: {{ $v.ports.http }}, protocol: TCP}
            {{- end }}
          env:
            - {name: {{ $p }}HOST, value: "0.0.0.0"}
            - {name: {{ $p }}PORT, value: {{ $v.ports.grpc | quote }}}
            - {name: {{ $p }}METRICS_PORT, value: {{ $v.ports.metrics | quote }}}
            - {name: {{ $p }}GRACE_SECONDS, value: {{ $v.graceSeconds | quote }}}
            - {name: {{ $p }}KAFKA_BOOTSTRAP, value: {{ include "rlhf.kafkaBootstrap" $ | quote }}}
            {{- if ne $k.securityProtocol "PLAINTEXT" }}
            - {name: {{ $p }}KAFKA_SECURITY_PROTOCOL, value: {{ $k.securityProtocol | quote }}}
            {{- end }}
            {{- if hasPrefix "SASL" $k.securityProtocol }}
            - {name: {{ $p }}KAFKA_SASL_MECHANISM, value: {{ $k.sasl.mechanism | quote }}}
            - {name: {{ $p }}KAFKA_SASL_USERNAME, value: {{ $k.sasl.username | quote }}}
            - {name: {{ $p }}KAFKA_SASL_PASSWORD_FILE, value: "/etc/rlhf/kafka-sasl/{{ $k.sasl.passwordKey }}"}
            {{- end }}
            {{- if $k.tls.caExistingSecret }}
            - {name: {{ $p }}KAFKA_SSL_CA_FILE, value: "/etc/rlhf/kafka-ca/{{ $k.tls.caKey }}"}
            {{- end }}
            {{- if $usesDb }}
            - name: {{ $p }}DATABASE_URL
              valueFrom:
                secretKeyRef:
                  name: {{ include "rlhf.databaseSecretName" $ }}
                  key: {{ include "rlhf.databaseSecretKey" $ }}
            - {name: {{ $p }}MIGRATE_ON_START, value: {{ not (include "rlhf.migrateBeforeInstall" $) | quote }}}
            {{- end }}
            {{- if $usesRegistry }}
            - {name: {{ $p }}REGISTRY_DIR, value: {{ $.Values.registry.mountPath | quote }}}
            - {name: {{ $p }}DEVICE, value: {{ ternary "cuda" "cpu" (gt $gpus 0) | quote }}}
            {{- end }}
            {{- if $v.ports.http }}
            - {name: {{ $p }}HTTP_PORT, value: {{ $v.ports.http | quote }}}
            {{- end }}
            {{- if eq $key "policyServer" }}
            {{- if $.Values.promptCollector.enabled }}
            - {name: {{ $p }}PROMPT_COLLECTOR_ADDR, value: {{ include "rlhf.address" (dict "ctx" $ "component" "promptCollector") | quote }}}
            {{- end }}
            {{- if $auth.apiKeys.existingSecret }}
            - {name: {{ $p }}API_KEYS_FILE, value: "/etc/rlhf/api-keys/{{ $auth.apiKeys.key }}"}
            {{- end }}
            {{- end }}
            {{- if eq $key "trainer" }}
            {{- range $peer := list "promptCollector" "policyServer" "rewardScorer" "feedbackStore" }}
            - {name: {{ $p }}{{ include "rlhf.componentName" (dict "component" $peer) | upper | replace "-" "_" }}_ADDR, value: {{ include "rlhf.address" (dict "ctx" $ "component" $peer) | quote }}}
            {{- end }}
            - {name: {{ $p }}LAUNCHER, value: {{ $v.jobs.launcher | quote }}}
            {{- if $jobPods }}
            - {name: {{ $p }}KUBERNETES_NAMESPACE, value: {{ $.Release.Namespace | quote }}}
            - {name: {{ $p }}KUBERNETES_POD_TEMPLATE, value: /etc/rlhf/job-pod/pod.yaml}
            - {name: {{ $p }}KUBERNETES_JOB_TTL_SECONDS, value: {{ $v.jobs.ttlSecondsAfterFinished | quote }}}
            {{- end }}
            {{- end }}
            {{- if $auth.credentials.existingSecret }}
            - {name: {{ $p }}CREDENTIALS_FILE, value: "/etc/rlhf/credentials/{{ $auth.credentials.key }}"}
            {{- else if $auth.allowAnonymous }}
            - {name: {{ $p }}ALLOW_ANONYMOUS, value: "true"}
            {{- end }}
            {{- if $auth.peerToken.existingSecret }}
            - {name: {{ $p }}PEER_TOKEN_FILE, value: "/etc/rlhf/peer-token/{{ $auth.peerToken.key }}"}
            {{- end }}
            {{- if $.Values.tls.enabled }}
            - {name: {{ $p }}TLS_CERT_FILE, value: /etc/rlhf/tls/tls.crt}
            - {name: {{ $p }}TLS_KEY_FILE, value: /etc/rlhf/tls/tls.key}
            - {name: {{ $p }}PEER_TLS_CA_FILE, value: /etc/rlhf/tls/ca.crt}
            {{- if $.Values.tls.clientAuth }}
            - {name: {{ $p }}TLS_CLIENT_CA_FILE, value: /etc/rlhf/tls/ca.crt}
            - {name: {{ $p }}PEER_TLS_CERT_FILE, value: /etc/rlhf/tls/tls.crt}
            - {name: {{ $p }}PEER_TLS_KEY_FILE, value: /etc/rlhf/tls/tls.key}
            {{- end }}
            {{- end }}
            {{- range $field, $value := $v.settings }}
            - {name: {{ $p }}{{ $field | snakecase | upper }}, value: {{ $value | toString | quote }}}
            {{- end }}
            # caches and scratch space on the emptyDir volumes (the root file system is read-only)
            - {name: HOME, value: /tmp}
            - {name: RLHF_CACHE_DIR, value: /cache/rlhf}
            - {name: HF_HOME, value: /cache/huggingface}
            - {name: MPLCONFIGDIR, value: /tmp/matplotlib}
            {{- with $v.env }}
            {{- toYaml . | nindent 12 }}
            {{- end }}
          {{- if $.Values.tls.enabled }}
          # kubelet's gRPC probes speak plaintext only: with TLS the probes check the port
          startupProbe:
            tcpSocket: {port: grpc}
            periodSeconds: {{ $.Values.probes.startup.periodSeconds }}
            failureThreshold: {{ $.Values.probes.startup.failureThreshold }}
          readinessProbe:
            tcpSocket: {port: grpc}
            periodSeconds: {{ $.Values.probes.readiness.periodSeconds }}
            failureThreshold: {{ $.Values.probes.readiness.failureThreshold }}
          livenessProbe:
            tcpSocket: {port: grpc}
            periodSeconds: {{ $.Values.probes.liveness.periodSeconds }}
            failureThreshold: {{ $.Values.probes.liveness.failureThreshold }}
          {{- else }}
          # grpc.health.v1 of the whole server (""): SERVING once the service has started (its
          # model loaded), NOT_SERVING from the first moment of a shutdown
          startupProbe:
            grpc: {port: {{ $v.ports.grpc }}}
            periodSeconds: {{ $.Values.probes.startup.periodSeconds }}
            failureThreshold: {{ $.Values.probes.startup.failureThreshold }}
          readinessProbe:
            grpc: {port: {{ $v.ports.grpc }}}
            periodSeconds: {{ $.Values.probes.readiness.periodSeconds }}
            failureThreshold: {{ $.Values.probes.readiness.failureThreshold }}
          livenessProbe:
            grpc: {port: {{ $v.ports.grpc }}}
            periodSeconds: {{ $.Values.probes.liveness.periodSeconds }}
            failureThreshold: {{ $.Values.probes.liveness.failureThreshold }}
          {{- end }}
          resources:
            {{- toYaml $v.resources | nindent 12 }}
          securityContext:
            {{- $sc := deepCopy $.Values.containerSecurityContext }}
            {{- if $.Values.dev.restartOnSync }}
            {{- /* live updates write the synced sources into the image's site-packages */}}
            {{- $_ := set $sc "readOnlyRootFilesystem" false }}
            {{- end }}
            {{- toYaml $sc | nindent 12 }}
          volumeMounts:
            - {name: tmp, mountPath: /tmp}
            - {name: cache, mountPath: /cache}
            {{- if $usesRegistry }}
            - {name: registry, mountPath: {{ $.Values.registry.mountPath }}}
            {{- end }}
            {{- if hasPrefix "SASL" $k.securityProtocol }}
            - {name: kafka-sasl, mountPath: /etc/rlhf/kafka-sasl, readOnly: true}
            {{- end }}
            {{- if $k.tls.caExistingSecret }}
            - {name: kafka-ca, mountPath: /etc/rlhf/kafka-ca, readOnly: true}
            {{- end }}
            {{- if and (eq $key "policyServer") $auth.apiKeys.existingSecret }}
            - {name: api-keys, mountPath: /etc/rlhf/api-keys, readOnly: true}
            {{- end }}
            {{- if $auth.credentials.existingSecret }}
            - {name: credentials, mountPath: /etc/rlhf/credentials, readOnly: true}
            {{- end }}
            {{- if $auth.peerToken.existingSecret }}
            - {name: peer-token, mountPath: /etc/rlhf/peer-token, readOnly: true}
            {{- end }}
            {{- if $.Values.tls.enabled }}
            - {name: tls, mountPath: /etc/rlhf/tls, readOnly: true}
            {{- end }}
            {{- if $jobPods }}
            - {name: job-pod, mountPath: /etc/rlhf/job-pod, readOnly: true}
            {{- end }}
            {{- with $v.extraVolumeMounts }}
            {{- toYaml . | nindent 12 }}
            {{- end }}
      volumes:
        - name: tmp
          emptyDir: {sizeLimit: {{ $.Values.tmpVolume.sizeLimit }}}
        - name: cache
          emptyDir: {sizeLimit: {{ $.Values.tmpVolume.sizeLimit }}}
        {{- if $usesRegistry }}
        - name: registry
          {{- if $.Values.registry.persistence.enabled }}
          persistentVolumeClaim:
            claimName: {{ $.Values.registry.persistence.existingClaim | default (printf "%s-registry" (include "rlhf.fullname" $)) }}
          {{- else }}
          {{- toYaml $.Values.registry.volume | nindent 10 }}
          {{- end }}
        {{- end }}
        {{- if hasPrefix "SASL" $k.securityProtocol }}
        - name: kafka-sasl
          secret: {secretName: {{ $k.sasl.existingSecret }}, defaultMode: 0440}
        {{- end }}
        {{- if $k.tls.caExistingSecret }}
        - name: kafka-ca
          secret: {secretName: {{ $k.tls.caExistingSecret }}, defaultMode: 0444}
        {{- end }}
        {{- if and (eq $key "policyServer") $auth.apiKeys.existingSecret }}
        - name: api-keys
          secret: {secretName: {{ $auth.apiKeys.existingSecret }}, defaultMode: 0440}
        {{- end }}
        {{- if $auth.credentials.existingSecret }}
        - name: credentials
          secret: {secretName: {{ $auth.credentials.existingSecret }}, defaultMode: 0440}
        {{- end }}
        {{- if $auth.peerToken.existingSecret }}
        - name: peer-token
          secret: {secretName: {{ $auth.peerToken.existingSecret }}, defaultMode: 0440}
        {{- end }}
        {{- if $.Values.tls.enabled }}
        - name: tls
          secret: {secretName: {{ $.Values.tls.existingSecret }}, defaultMode: 0440}
        {{- end }}
        {{- if $jobPods }}
        - name: job-pod
          configMap: {name: {{ include "rlhf.componentFullname" (dict "ctx" $ "component" "trainerJob") }}}
        {{- end }}
        {{- with $v.extraVolumes }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
{{- end -}}
