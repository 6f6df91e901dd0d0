module rlhf-platform/deploy/k8s/tools/prometheus-operator

go 1.26.0

// Not built: the module's CustomResourceDefinitions of ServiceMonitor and PrometheusRule are
// installed into the test cluster, so that the API server validates the chart's monitoring objects.
require github.com/prometheus-operator/prometheus-operator v0.85.0
