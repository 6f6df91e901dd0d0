{{/* The Service, PodDisruptionBudget and NetworkPolicy of one service; args: ctx, component. */}}

{{- define "rlhf.service" -}}
{{- $ := .ctx -}}
{{- $v := index $.Values .component -}}
apiVersion: v1
kind: Service
metadata:
  name: {{ include "rlhf.componentFullname" . }}
  namespace: {{ $.Release.Namespace }}
  labels:
    {{- include "rlhf.componentLabels" . | nindent 4 }}
  {{- with $v.service.annotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
spec:
  type: {{ $v.service.type }}
  selector:
    {{- include "rlhf.componentSelectorLabels" . | nindent 4 }}
  ports:
    - {name: grpc, port: {{ $v.ports.grpc }}, targetPort: grpc, protocol: TCP, appProtocol: grpc}
    - {name: metrics, port: {{ $v.ports.metrics }}, targetPort: metrics, protocol: TCP, appProtocol: http}
    {{- if $v.ports.http }}
    - {name: http, port: {{ $v.ports.http }}, targetPort: http, protocol: TCP, appProtocol: http}
    {{- end }}
{{- end -}}

{{- define "rlhf.pdb" -}}
{{- $ := .ctx -}}
{{- $v := index $.Values .component -}}
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata:
  name: {{ include "rlhf.componentFullname" . }}
  namespace: {{ $.Release.Namespace }}
  labels:
    {{- include "rlhf.componentLabels" . | nindent 4 }}
spec:
  maxUnavailable: {{ $v.pdb.maxUnavailable }}
  selector:
    matchLabels:
      {{- include "rlhf.componentSelectorLabels" . | nindent 6 }}
{{- end -}}

{{/* a NetworkPolicyPeer selecting the pods of a component; args: ctx, component */}}
{{- define "rlhf.peer" -}}
- podSelector:
    matchLabels:
      {{- include "rlhf.componentSelectorLabels" . | nindent 6 }}
{{- end -}}

{{/*
Only what talks to what. Ingress: the public APIs (policy-server gRPC and HTTP, the feedback-store's
gRPC and labeling page, the trainer's gRPC) admit networkPolicy.apiClients (anyone when empty);
the prompt-collector admits the policy-server (opted-in prompts) and the trainer; the
reward-scorer only the trainer; the trainer's training Jobs' pods call what the trainer calls
(trainer/job-networkpolicy.yaml); /metrics admits networkPolicy.metricsScrapers. Egress: DNS, the
Kafka ports, PostgreSQL (prompt-collector, feedback-store, trainer), the peers a service calls, and
the API server (trainer, for its training Jobs).
*/}}
{{- define "rlhf.networkPolicy" -}}
{{- $ := .ctx -}}
{{- $key := .component -}}
{{- $v := index $.Values $key -}}
{{- $np := $.Values.networkPolicy -}}
{{- $public := has $key (list "policyServer" "feedbackStore" "trainer") -}}
{{- $callers := dict "promptCollector" (list "policyServer" "trainer" "trainerJob") "rewardScorer" (list "trainer" "trainerJob") "policyServer" (list "trainer" "trainerJob") "feedbackStore" (list "trainer" "trainerJob") "trainer" (list) -}}
{{- $peers := list -}}
{{- range (index $callers $key) -}}
{{- if eq . "trainerJob" -}}
{{- if include "rlhf.trainerJobs" $ -}}
{{- $peers = append $peers . -}}
{{- end -}}
{{- else if (index $.Values .).enabled -}}
{{- $peers = append $peers . -}}
{{- end -}}
{{- end -}}
{{- $calls := dict "policyServer" (list "promptCollector") "trainer" (list "promptCollector" "policyServer" "rewardScorer" "feedbackStore") -}}
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: {{ include "rlhf.componentFullname" . }}
  namespace: {{ $.Release.Namespace }}
  labels:
    {{- include "rlhf.componentLabels" . | nindent 4 }}
spec:
  podSelector:
    matchLabels:
      {{- include "rlhf.componentSelectorLabels" . | nindent 6 }}
  policyTypes: [Ingress, Egress]
  ingress:
    {{- if or (and $public (not $np.apiClients)) $peers (and $public $np.apiClients) }}
    - ports:
        - {port: grpc, protocol: TCP}
        {{- if $v.ports.http }}
        - {port: http, protocol: TCP}
        {{- end }}
      {{- if not (and $public (not $np.apiClients)) }}
      from:
        {{- if $public }}
        {{- toYaml $np.apiClients | nindent 8 }}
        {{- end }}
        {{- range $peers }}
        {{- include "rlhf.peer" (dict "ctx" $ "component" .) | nindent 8 }}
        {{- end }}
      {{- end }}
    {{- end }}
    - ports:
        - {port: metrics, protocol: TCP}
      {{- with $np.metricsScrapers }}
      from:
        {{- toYaml . | nindent 8 }}
      {{- end }}
  egress:
    - ports:
        - {port: 53, protocol: UDP}
        - {port: 53, protocol: TCP}
    - ports:
        {{- range $np.kafkaPorts }}
        - {port: {{ . }}, protocol: TCP}
        {{- end }}
    {{- if has $key (list "promptCollector" "feedbackStore" "trainer") }}
    - ports:
        {{- range $np.databasePorts }}
        - {port: {{ . }}, protocol: TCP}
        {{- end }}
    {{- end }}
    {{- range (index $calls $key | default list) }}
    {{- $peer := index $.Values . }}
    {{- if $peer.enabled }}
    - to:
        {{- include "rlhf.peer" (dict "ctx" $ "component" .) | nindent 8 }}
      ports:
        - {port: {{ $peer.ports.grpc }}, protocol: TCP}
    {{- end }}
    {{- end }}
    {{- if eq $key "trainer" }}
    - ports:
        {{- range $np.apiServerPorts }}
        - {port: {{ . }}, protocol: TCP}
        {{- end }}
    {{- end }}
    {{- with $np.extraEgress }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
{{- end -}}
