{{/* A Grafana dashboard of files/grafana/ (deploy/grafana/) as a ConfigMap for Grafana's sidecar; args: ctx, name */}}
{{- define "rlhf.dashboard" -}}
{{- $ := .ctx -}}
{{- $d := $.Values.metrics.dashboards -}}
apiVersion: v1
kind: ConfigMap
metadata:
  name: {{ include "rlhf.fullname" $ }}-dashboard-{{ .name }}
  namespace: {{ $.Release.Namespace }}
  labels:
    {{- include "rlhf.labels" $ | nindent 4 }}
    {{ $d.label }}: {{ $d.labelValue | quote }}
  annotations:
    grafana_folder: {{ $d.folder | quote }}
data:
  rlhf-{{ .name }}.json: |-
    {{- $.Files.Get (printf "files/grafana/%s.json" .name) | nindent 4 }}
{{- end -}}
