"""What `@champion` does when the deployment refuses a version, however the refusal comes: a blue/green
rollout whose checks fail (deploy/rollout.py), an Argo Rollouts revision aborted on Kubernetes
(deploy/kubernetes.py), or a version refused before that someone makes `@champion` again (both
watchers). The version is tagged why (`deploy.verdict=refused`, `deploy.reason`) and the alias goes
back to the version that serves, so the registry never names, for longer than one check of a watcher,
a champion that serves nothing. A refused version is not retried until a person rolls it out by hand.
"""

from __future__ import annotations

from pipelines import registry

VERDICT_TAG = "deploy.verdict"
REASON_TAG = "deploy.reason"
REFUSED = "refused"


def refuse(name: str, version: str, live_version: str | None, reason: str) -> bool:
    """Tag `version` refused with `reason` and, while `@champion` names it, point the alias back at
    `live_version` (None: nothing serves, the alias stays); whether the alias moved."""
    registry.tag_version(name, version, {VERDICT_TAG: REFUSED, REASON_TAG: reason[:250]})
    if live_version is None:
        return False
    return registry.move_champion_back(name, live_version, from_version=version,
                                       reason=f"deploy refused v{version}: {reason[:200]}")


def refused_reason(name: str, version: str) -> str | None:
    """Why the deployment refused `version` before; None when it did not."""
    tags = registry.resolve(name, version=version).tags
    return tags.get(REASON_TAG, "") if tags.get(VERDICT_TAG) == REFUSED else None


def keep_off_refused(name: str, champion: str, live_version: str | None) -> str | None:
    """When `@champion` names `champion`, a version the deployment refused before (set again in the
    MLflow UI, say): point the alias back at `live_version` without retrying the rollout, and return
    what was done, one line; None when `champion` was not refused."""
    reason = refused_reason(name, champion)
    if reason is None:
        return None
    if live_version is None:
        return f"@champion is v{champion}, refused before ({reason}), and nothing serves to point it back at"
    registry.move_champion_back(name, live_version, from_version=champion,
                                reason=f"set again after the deployment refused it: {reason[:200]}")
    return (f"@champion was set to v{champion}, which the deployment refused before ({reason}): "
            f"back to the live v{live_version}, not retried")
