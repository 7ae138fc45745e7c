"""What runs the service in production.

On one machine (`detops deploy`): nginx as the front door and two colours, each a `bentoml serve` of one
pinned registry version, switched blue/green after verification (rollout.py), following the registry's
`@champion` (watch.py). On Kubernetes: the manifests under deploy/k8s/.
"""
