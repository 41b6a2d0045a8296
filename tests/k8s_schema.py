"""A structural schema for the Kubernetes objects that deploy/ and `moeserve plan --emit k8s` write, checked with
jsonschema and no cluster: the fields the API server requires, their types, and the probes' shape. Not the full
OpenAPI schema of Kubernetes (kubeconform would need to download it); enough to catch a misspelled or misplaced
field in the parts we write."""

from __future__ import annotations

import jsonschema

_PORT = {"oneOf": [{"type": "integer", "minimum": 1, "maximum": 65535}, {"type": "string"}]}
_PROBE = {"type": "object", "additionalProperties": False,
          "properties": {"httpGet": {"type": "object", "required": ["path", "port"], "additionalProperties": False,
                                     "properties": {"path": {"type": "string"}, "port": _PORT,
                                                    "scheme": {"enum": ["HTTP", "HTTPS"]}}},
                         "exec": {"type": "object", "required": ["command"]},
                         "tcpSocket": {"type": "object"},
                         **{k: {"type": "integer", "minimum": 0} for k in (
                             "initialDelaySeconds", "periodSeconds", "timeoutSeconds", "failureThreshold",
                             "successThreshold")}}}
_CONTAINER = {
    "type": "object", "required": ["name", "image"], "additionalProperties": False,
    "properties": {
        "name": {"type": "string"}, "image": {"type": "string"},
        "command": {"type": "array", "items": {"type": "string"}},
        "args": {"type": "array", "items": {"type": "string"}},
        "ports": {"type": "array", "items": {"type": "object", "required": ["containerPort"], "properties": {
            "containerPort": {"type": "integer"}, "name": {"type": "string", "maxLength": 15},
            "protocol": {"enum": ["TCP", "UDP", "SCTP"]}}}},
        "env": {"type": "array", "items": {"type": "object", "required": ["name"], "additionalProperties": False,
                                           "properties": {"name": {"type": "string"}, "value": {"type": "string"},
                                                          "valueFrom": {"type": "object"}}}},
        "resources": {"type": "object", "additionalProperties": False,
                      "properties": {"limits": {"type": "object"}, "requests": {"type": "object"}}},
        "startupProbe": _PROBE, "livenessProbe": _PROBE, "readinessProbe": _PROBE,
        "lifecycle": {"type": "object", "properties": {"preStop": {"type": "object"}}, "additionalProperties": False},
        "volumeMounts": {"type": "array", "items": {"type": "object", "required": ["name", "mountPath"]}},
        "workingDir": {"type": "string"},
    }}
_POD_SPEC = {"type": "object", "required": ["containers"],
             "properties": {"containers": {"type": "array", "minItems": 1, "items": _CONTAINER},
                            "terminationGracePeriodSeconds": {"type": "integer", "minimum": 0},
                            "volumes": {"type": "array", "items": {"type": "object", "required": ["name"]}},
                            "subdomain": {"type": "string"}, "hostname": {"type": "string"},
                            "nodeSelector": {"type": "object"}, "affinity": {"type": "object"},
                            "tolerations": {"type": "array"}},
             "additionalProperties": False}
_TEMPLATE = {"type": "object", "required": ["spec"],
             "properties": {"metadata": {"type": "object"}, "spec": _POD_SPEC}}
_META = {"type": "object", "required": ["name"], "properties": {"name": {"type": "string",
                                                                         "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"}}}

SCHEMAS = {
    ("apps/v1", "Deployment"): {"required": ["selector", "template"],
                                "properties": {"replicas": {"type": "integer"}, "selector": {"type": "object"},
                                               "template": _TEMPLATE}},
    ("apps/v1", "StatefulSet"): {"required": ["selector", "template", "serviceName"],
                                 "properties": {"replicas": {"type": "integer"}, "selector": {"type": "object"},
                                                "serviceName": {"type": "string"},
                                                "podManagementPolicy": {"enum": ["OrderedReady", "Parallel"]},
                                                "template": _TEMPLATE}},
    ("leaderworkerset.x-k8s.io/v1", "LeaderWorkerSet"): {
        "required": ["leaderWorkerTemplate"],
        "properties": {"replicas": {"type": "integer"}, "startupPolicy": {"enum": ["LeaderCreated", "LeaderReady"]},
                       "leaderWorkerTemplate": {
                           "type": "object", "required": ["size", "workerTemplate"], "additionalProperties": False,
                           "properties": {"size": {"type": "integer", "minimum": 1},
                                          "restartPolicy": {"enum": ["RecreateGroupOnPodRestart", "None"]},
                                          "leaderTemplate": _TEMPLATE, "workerTemplate": _TEMPLATE}}}},
    ("v1", "Service"): {"required": ["ports"], "properties": {"ports": {"type": "array", "minItems": 1, "items": {
        "type": "object", "required": ["port"], "properties": {"port": {"type": "integer"}, "targetPort": _PORT}}},
        "clusterIP": {"type": "string"}, "selector": {"type": "object"}}},
    ("autoscaling/v2", "HorizontalPodAutoscaler"): {"required": ["scaleTargetRef", "maxReplicas"],
                                                    "properties": {"maxReplicas": {"type": "integer"},
                                                                   "minReplicas": {"type": "integer"},
                                                                   "metrics": {"type": "array"}}},
}


def validate(obj: dict) -> None:
    """Raise jsonschema.ValidationError (or KeyError for an unknown kind) when `obj` is malformed."""
    key = (obj.get("apiVersion"), obj.get("kind"))
    spec_schema = SCHEMAS[key]
    jsonschema.validate(obj, {"type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
                              "properties": {"metadata": _META, "spec": {"type": "object", **spec_schema}}})
