"""Blue/green on one machine: what `detops deploy up | rollout | rollback | status | down` do.

The front door (nginx, `deploy.port`) routes every client to the live colour. A rollout builds the idle
colour from the new registry version, waits for it, and verifies it before any client sees it: the
smoke check always, then optionally a shadow window (live traffic mirrored to it) and a canary window
(a share of live traffic), with gates on error rate, p95 against the live colour and agreement. Pass:
nginx routes the next requests to it (deploy/nginx.py: no reload, no connection dropped), the old
colour stays warm for `deploy.keep_previous_s` (an instant rollback), then drains and stops. Fail:
the idle colour is stopped, traffic never left the live one, the verdict is recorded, `@champion` goes
back to the live version and the refused version is tagged so the watcher does not retry it.

After the switch, while the old colour is warm, the new live version is judged on its own live traffic
with the same gates (error rate, p95 against the previous version's just before the switch): when one
breaks, the deployment switches back by itself and records why (`after_switch`, `guard`). Whoever runs
attached does that watching: `detops deploy watch`, or `detops deploy rollout` unless `--detach`; the
old colour is retired by them too when its time is up (or by the next command that reconciles).

Every command first reconciles the recorded state with what runs (a colour or nginx killed, a rollout
whose command died) and repairs what it can; all of it under one lock (deploy/state.py).
"""

from __future__ import annotations

import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx

from deploy import colours, nginx, policy
from deploy.state import DeployState, Rollout, Stack, now, other
from deploy.verify import (
    Check,
    VerificationFailed,
    access_log_offset,
    after_switch_gates,
    agreement,
    gates,
    model_requests,
    read_access_log,
    recent_access_log,
    smoke,
    traffic,
    write_report,
)
from pipelines import processes, registry
from pipelines.config.deploy import DeployConfig
from pipelines.config.serving import ServeConfig
from pipelines.errors import DetopsError


class RolloutRefused(DetopsError):
    """A rollout did not pass its verification: traffic stayed on the live colour (exit code 4); or the
    version broke after the switch and traffic went back to the previous one."""

    exit_code = 4


SMOKE_TENANT = "detops.deploy"  # the deployment's own tenant: its smoke-check keys, minted per check
SMOKE_SCOPES = "detect"


class Deployer:
    """The blue/green stack of one project directory (its `deploy.state_dir`)."""

    def __init__(self, cfg: DeployConfig, serve: ServeConfig) -> None:
        self.cfg = cfg
        self.serve = serve
        self.state = DeployState(cfg.state_dir)
        self.prefix = (Path(cfg.state_dir) / "nginx").resolve()
        self.front_door = f"http://{cfg.host}:{cfg.port}"
        self.notes: list[str] = []  # what reconciling found and did, for the command to print

    # ------------------------------------------------------------------ commands
    def up(self) -> Stack:
        """Serve `@champion` behind the front door (or repair what runs); returns once the front door
        answers with the live version."""
        nginx.executable()  # say how to install nginx before anything starts
        with self.state.lock():
            stack = self._reconcile()
            if stack.live is None:
                version = registry.alias_version(self.serve.model_name, registry.CHAMPION)
                if version is None:
                    raise DetopsError(f"no version of {self.serve.model_name} is @champion: register and promote one")
                rollout = self.state.start_rollout(version, None, "blue", "up")
                try:
                    process = colours.start(self.cfg, self.serve, "blue", version)
                    stack.colours["blue"] = process
                    self.state.save(stack)
                    figures = {"smoke": self._smoke("blue", version)}
                    checks = gates(figures, self.cfg)
                    _raise_on_failure(checks)
                except (DetopsError, httpx.HTTPError) as exc:
                    colours.stop(stack.colours.pop("blue", None), drain_s=0)
                    self.state.save(stack)
                    self.state.finish_rollout(rollout, "refused", _reason(exc))
                    policy.refuse(self.serve.model_name, version, None, _reason(exc))
                    raise RolloutRefused(f"deploy up: v{version} refused: {_reason(exc)}") from None
                stack.live, stack.live_since = "blue", now()
                self.state.save(stack)
                self._route(stack)
                self._wait_front_door(version)
                self._start_job_workers(stack)
                self.state.finish_rollout(rollout, "passed", figures=figures)
                write_report(Path(self.cfg.reports), rollout, checks)
                self._mark_live(version)
            return stack

    def rollout(self, version: str, *, trigger: str = "command") -> Rollout:
        """Roll `version` out blue/green; RolloutRefused (traffic untouched) when it fails its checks."""
        with self.state.lock():
            return self._rollout(self._reconcile(), str(version), trigger)

    def follow(self, version: str, *, trigger: str) -> Rollout | None:
        """Make `version` live as the watcher does: an instant switch when it is the warm colour's
        version (it passed its verification and served until moments ago), else a full rollout. None
        when `@champion` is no longer `version` once the lock is held: a rollout or rollback that held
        it moved the alias, and following the stale one would undo that command."""
        with self.state.lock():
            if registry.alias_version(self.serve.model_name, registry.CHAMPION) != str(version):
                return None
            stack = self._reconcile()
            if stack.live is not None and self._warm_version(stack) == str(version):
                return self._switch_to_warm(stack, trigger, "")
            return self._rollout(stack, str(version), trigger)

    def rollback(self, *, reason: str = "manual rollback", trigger: str = "command") -> Rollout:
        """Back to the previous version: an nginx switch while its colour is warm, else a full rollout of
        it. `@champion` follows, recorded as a rollback with `reason`."""
        with self.state.lock():
            stack = self._reconcile()
            if stack.live is None or stack.previous_version is None:
                raise DetopsError("deploy rollback: no previous version recorded (nothing was rolled out yet)")
            target, bad = stack.previous_version, stack.live_version
            if self._warm_version(stack) == target:
                rollout = self._switch_to_warm(stack, trigger, f"rollback: {reason}")
            else:
                rollout = self._rollout(stack, target, trigger)
            self._record_rollback(bad, target, reason)
            return rollout

    def guard(self, rollout_id: int | None = None) -> tuple[str, str]:
        """One look at the live version after a rollout's switch, while the previous colour is warm:
        ("watching", figures) while its gates hold; ("rolled_back", why) when one broke and traffic went
        back to the warm previous version; ("retired", ...) when the keep-warm time is over (the previous
        colour stopped); ("none", ...) when nothing is watched (or, with `rollout_id`, not that rollout)."""
        with self.state.lock():
            stack = self.state.stack()
            watched = stack.after_switch
            if watched is None or (rollout_id is not None and watched["rollout"] != rollout_id):
                return "none", "no rollout is being watched after its switch"
            idle = other(stack.live)
            warm = stack.colours.get(idle)
            if warm is None or warm.version != stack.previous_version or not processes.alive(warm.pid):
                stack.after_switch = None
                self.state.save(stack)
                return "none", f"the previous colour {idle} is gone: v{stack.live_version} is no longer watched"
            if warm.retire_at and datetime.fromisoformat(warm.retire_at) <= datetime.now(timezone.utc):
                self._retire(stack, idle)
                return "retired", (f"v{stack.live_version} held through the keep-warm time: v{warm.version} "
                                   f"({idle}) retired")
            entries = read_access_log(self.prefix / nginx.ACCESS_LOG, watched["log_offset"])
            live = traffic(entries, stack.colours[stack.live].port, ("live",))
            checks = after_switch_gates(live, watched["before"], self.cfg)
            failed = [c for c in checks if not c.passed]
            if not failed:
                return "watching", f"v{stack.live_version}: {live['requests']} requests, {live['errors']} failed"
            bad, target = stack.live_version, warm.version
            why = f"after the switch: {_failure(failed[0])}"
            self._switch_to_warm(stack, "guard", f"automatic rollback: {why}")
            rollout = self.state.rollout(watched["rollout"])
            if rollout is not None:
                figures = {**rollout.figures, "after_switch": live}
                rollout = self.state.finish_rollout(rollout, "rolled_back", why, figures)
                write_report(Path(self.cfg.reports), rollout, [*gates_or_empty(figures, self.cfg), *checks])
            self._record_rollback(bad, target, why)
            return "rolled_back", f"v{bad} broke {why}; v{target} is live again"

    def watch_after_switch(self, rollout_id: int, say: Any = print) -> str:
        """Stay attached while rollout `rollout_id`'s previous colour is warm, judging the new version
        every `deploy.watch.live_check_s` (`guard`); returns how the window ended, RolloutRefused when
        the version was rolled back. Bounded by the keep-warm time."""
        deadline = time.monotonic() + self.cfg.keep_previous_s + 60.0
        while True:
            outcome, text = self.guard(rollout_id)
            if outcome == "rolled_back":
                raise RolloutRefused(text)
            if outcome != "watching" or time.monotonic() > deadline:
                return text
            time.sleep(self.cfg.watch.live_check_s)

    def down(self) -> None:
        """Stop the front door and both colours (by PID), letting in-flight requests finish."""
        with self.state.lock():
            stack = self.state.stack()
            if stack.nginx_pid:
                nginx.stop(stack.nginx_pid, drain_s=self.cfg.drain_s)
            for process in stack.colours.values():
                colours.stop(process, drain_s=self.cfg.drain_s)
            for worker in stack.job_workers:  # a worker finishes its chunk in flight (Celery's warm shutdown)
                if processes.same_process(worker):
                    processes.stop(worker[0], timeout_s=max(self.cfg.drain_s, 10.0))
            if stack.live_version:
                registry.tag_version(self.serve.model_name, stack.live_version, {"retired_at": now()})
            self.state.save(Stack(previous_version=stack.live_version or stack.previous_version))

    def status(self, last: int = 10) -> dict[str, Any]:
        """What runs, what is live since when, the previous version and whether it is warm, the last
        rollouts; read only (reconciling is left to the commands that act)."""
        stack = self.state.stack()
        colour_status = {}
        for colour, process in stack.colours.items():
            colour_status[colour] = {**asdict(process), "running": processes.alive(process.pid),
                                     "ready": colours.healthy(self.cfg, colour, process)}
        idle = other(stack.live) if stack.live else None
        warm = bool(idle and idle in colour_status and colour_status[idle]["ready"]
                    and stack.colours[idle].version == stack.previous_version)
        problems = []
        if stack.nginx_pid and not processes.alive(stack.nginx_pid):
            problems.append(f"nginx (pid {stack.nginx_pid}) is not running: the front door is down")
        if stack.live and not colour_status.get(stack.live, {}).get("ready"):
            problems.append(f"the live colour {stack.live} is not ready")
        if stack.rollout_in_progress:
            rollout = self.state.rollout(stack.rollout_in_progress)
            problems.append(f"rollout {stack.rollout_in_progress} (v{rollout.version if rollout else '?'}) did not "
                            "finish: its command stopped; the next deploy command cleans it up")
        nginx_running = bool(stack.nginx_pid and processes.alive(stack.nginx_pid))
        return {"front_door": self.front_door, "nginx": {"pid": stack.nginx_pid, "running": nginx_running},
                "live": {"colour": stack.live, "version": stack.live_version, "since": stack.live_since},
                "previous": {"version": stack.previous_version, "warm": warm,
                             "retire_at": stack.colours[idle].retire_at if warm else None},
                "colours": colour_status, "problems": problems,
                "rollouts": [asdict(r) for r in self.state.rollouts(last)]}

    def repair(self) -> list[str]:
        """Reconcile the recorded stack with what runs (see `_reconcile`); what was repaired."""
        with self.state.lock():
            self.notes = []
            self._reconcile()
            return self.notes

    # ------------------------------------------------------------------ mechanics
    def _warm_version(self, stack: Stack) -> str | None:
        """The version of the idle colour when it runs and is ready (a warm previous colour), else None."""
        idle = other(stack.live)
        process = stack.colours.get(idle)
        return process.version if process is not None and colours.healthy(self.cfg, idle, process) else None

    def _switch_to_warm(self, stack: Stack, trigger: str, reason: str) -> Rollout:
        idle = other(stack.live)
        rollout = self.state.start_rollout(stack.colours[idle].version, stack.live_version, idle, trigger)
        started = time.monotonic()
        self._switch(stack, idle, watch=None)
        figures = {"switch_s": round(time.monotonic() - started, 3), "warm": True}
        rollout = self.state.finish_rollout(rollout, "passed", reason, figures)
        write_report(Path(self.cfg.reports), rollout, [])
        self._mark_live(rollout.version)
        return rollout

    def _rollout(self, stack: Stack, version: str, trigger: str) -> Rollout:
        if stack.live is None:
            raise DetopsError("nothing is deployed: run `detops deploy up` first")
        registry.resolve(self.serve.model_name, version=version)
        live_version = stack.live_version
        if version == live_version:
            raise DetopsError(f"v{version} is already live on {stack.live}")
        idle = other(stack.live)
        rollout = self.state.start_rollout(version, live_version, idle, trigger)
        stack.rollout_in_progress = rollout.id
        self.state.save(stack)
        figures: dict[str, Any] = {}
        checks: list[Check] = []
        try:
            started = time.monotonic()
            warm = stack.colours.get(idle)
            if warm is not None and warm.version == version and colours.healthy(self.cfg, idle, warm):
                warm.retire_at = None  # the warm previous colour is the one wanted: no new start
            else:
                colours.stop(stack.colours.pop(idle, None), drain_s=0)
                self.state.save(stack)
                stack.colours[idle] = colours.start(self.cfg, self.serve, idle, version)
                self.state.save(stack)
            figures["ready_s"] = round(time.monotonic() - started, 2)
            figures["smoke"] = self._smoke(idle, version)
            _raise_on_failure(gates(figures, self.cfg))
            for kind, window in (("shadow", self.cfg.shadow), ("canary", self.cfg.canary)):
                if window.enabled:
                    figures[kind] = self._traffic_window(stack, idle, kind)
            checks = gates(figures, self.cfg)
            _raise_on_failure(checks)
        except (DetopsError, httpx.HTTPError) as exc:
            reason = _reason(exc)
            colours.stop(stack.colours.pop(idle, None), drain_s=0)
            stack.rollout_in_progress = None
            self.state.save(stack)
            self._route(stack)  # only the live colour again (a shadow or canary window may have been cut short)
            rollout = self.state.finish_rollout(rollout, "refused", reason, figures)
            write_report(Path(self.cfg.reports), rollout, checks or gates_or_empty(figures, self.cfg))
            policy.refuse(self.serve.model_name, version, live_version, reason)
            raise RolloutRefused(f"rollout of v{version} refused, traffic stays on v{live_version}: {reason}") from None
        switched = time.monotonic()
        self._switch(stack, idle, watch=rollout.id)
        figures["switch_s"] = round(time.monotonic() - switched, 3)
        stack.rollout_in_progress = None
        self.state.save(stack)
        rollout = self.state.finish_rollout(rollout, "passed", "", figures)
        write_report(Path(self.cfg.reports), rollout, checks)
        self._mark_live(version)
        if trigger == "command" and registry.alias_version(self.serve.model_name, registry.CHAMPION) != version:
            # What a person rolled out by hand is what should be live: the watcher must not undo it.
            registry.set_champion(self.serve.model_name, version, reason="detops deploy rollout")
        return rollout

    def _switch(self, stack: Stack, colour: str, *, watch: int | None) -> None:
        """Make `colour` live (one flag file nginx reads per request) and wait until the front door
        answers with its version; the colour that was live stays warm for `deploy.keep_previous_s`.
        `watch`: the rollout whose new version is then judged on its live traffic (`guard`); None for a
        switch back (a rollback is not itself rolled back)."""
        old = stack.live
        log = self.prefix / nginx.ACCESS_LOG
        before = traffic(recent_access_log(log), stack.colours[old].port, ("live",)) if old else None
        offset = access_log_offset(log)
        stack.previous_version = stack.live_version
        stack.live, stack.live_since = colour, now()
        stack.colours[colour].retire_at = None
        self._route(stack)
        self._wait_front_door(stack.colours[colour].version)
        stack.after_switch = None
        if old and old in stack.colours:
            retire_at = datetime.now(timezone.utc) + timedelta(seconds=self.cfg.keep_previous_s)
            stack.colours[old].retire_at = retire_at.replace(microsecond=0).isoformat()
            if watch is not None:
                stack.after_switch = {"rollout": watch, "log_offset": offset, "before": before}
        self.state.save(stack)

    def _retire(self, stack: Stack, colour: str) -> None:
        """Drain and stop a warm previous colour whose time is up; the live version is no longer watched."""
        process = stack.colours.pop(colour)
        stack.after_switch = None
        colours.stop(process, drain_s=self.cfg.drain_s)
        self.state.save(stack)
        registry.tag_version(self.serve.model_name, process.version, {"retired_at": now()})

    def _record_rollback(self, bad: str | None, target: str, reason: str) -> None:
        """The registry says what happened: `bad` tagged rolled back with why, `@champion` on `target`."""
        if bad is not None:
            registry.tag_version(self.serve.model_name, bad, {"deploy.verdict": "rolled_back",
                                                               "deploy.reason": reason[:250]})
        registry.move_champion_back(self.serve.model_name, target, reason=f"rollback: {reason}"[:250])

    def _route(self, stack: Stack, *, shadow: bool = False, canary: bool = False) -> None:
        """Route clients to the live colour (a flag file nginx reads per request: no reload), mirroring
        to the idle one with `shadow`, splitting to it with `canary`; (re)write and `nginx -t` the
        configuration first, reloading a running nginx only when it changed, or start nginx."""
        text = nginx.render(host=self.cfg.host, port=self.cfg.port, blue_port=self.cfg.blue_port,
                            green_port=self.cfg.green_port, prefix=self.prefix,
                            canary_percent=self.cfg.canary.weight_percent, max_body_bytes=self._max_body(),
                            timeout_s=self.serve.timeout_s)
        changed = nginx.write_config(text, self.prefix)
        nginx.set_routing(self.prefix, live=stack.live, shadow=shadow, canary=canary)
        if stack.nginx_pid and processes.alive(stack.nginx_pid):
            if changed:
                nginx.reload(stack.nginx_pid)
        else:
            stack.nginx_pid = nginx.start(self.prefix, url=f"{self.front_door}/livez")
            self.state.save(stack)

    def _traffic_window(self, stack: Stack, idle: str, kind: str) -> dict[str, Any]:
        """Mirror (shadow) or split (canary) live traffic to `idle` until the window's request or time
        bound; the figures of both colours, then routing back to the live colour alone."""
        window = getattr(self.cfg, kind)
        log = self.prefix / nginx.ACCESS_LOG
        offset, since = access_log_offset(log), datetime.now(timezone.utc)
        idle_port = stack.colours[idle].port
        self._route(stack, shadow=kind == "shadow", canary=kind == "canary")
        deadline = time.monotonic() + window.max_seconds
        try:
            while time.monotonic() < deadline:
                if model_requests(read_access_log(log, offset), kind) >= window.max_requests:
                    break
                time.sleep(0.2)
        finally:
            self._route(stack)
        time.sleep(0.5)  # requests routed before the flag changed finish and are logged
        entries = read_access_log(log, offset)
        live_port = stack.colours[stack.live].port
        idle_figures = traffic(entries, idle_port, (kind,))
        return {"seconds": round(window.max_seconds - max(deadline - time.monotonic(), 0), 1),
                "live": traffic(entries, live_port, ("live",)), "idle": idle_figures,
                "agreement": agreement(Path(self.serve.prediction_log), since=since,
                                       live_version=stack.live_version, new_version=stack.colours[idle].version,
                                       kind=kind, expected=idle_figures["requests"] - idle_figures["errors"])}

    def _smoke(self, colour: str, version: str) -> dict[str, Any]:
        dest = Path(tempfile.mkdtemp(prefix="detops-smoke-"))
        reference = registry.download_smoke_reference(self.serve.model_name, version, dest)
        with _smoke_key() as key:
            return smoke(colours.url_of(self.cfg, colour), reference, iou=self.cfg.smoke_iou,
                         conf_tolerance=self.cfg.smoke_conf_tolerance, api_key=key)

    def _wait_front_door(self, version: str, timeout_s: float = 30.0) -> None:
        """Until the front door answers with `version` (nginx's new workers have taken over)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.front_door}/readyz", timeout=2).headers.get("x-model-version") == version:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.02)
        raise DetopsError(f"the front door {self.front_door} did not answer with v{version} within {timeout_s:.0f} s")

    def _reconcile(self) -> Stack:
        """Compare the recorded stack with what runs and repair it: an unfinished rollout is marked
        interrupted and its colour stopped, a dead colour is dropped (the live one restarted), a dead
        nginx restarted, a warm colour past its time stopped. What was done goes to `self.notes`."""
        stack = self.state.stack()
        if stack.rollout_in_progress is not None:
            rollout = self.state.rollout(stack.rollout_in_progress)
            if rollout is not None and rollout.verdict == "running":
                self.state.finish_rollout(rollout, "interrupted", "the command running it stopped before it ended")
                idle = rollout.colour
                if idle != stack.live:
                    colours.stop(stack.colours.pop(idle, None), drain_s=0)
                self.notes.append(f"rollout {rollout.id} (v{rollout.version}) had been interrupted: cleaned up")
            stack.rollout_in_progress = None
        for colour, process in list(stack.colours.items()):
            if colour == stack.live:
                if not colours.healthy(self.cfg, colour, process):
                    colours.stop(process, drain_s=0)
                    stack.colours[colour] = colours.start(self.cfg, self.serve, colour, process.version)
                    self.notes.append(f"the live colour {colour} (v{process.version}) was down: restarted")
            elif not processes.alive(process.pid):
                del stack.colours[colour]
                self.notes.append(f"the idle colour {colour} (v{process.version}) was gone: forgotten")
            elif process.retire_at and datetime.fromisoformat(process.retire_at) <= datetime.now(timezone.utc):
                self._retire(stack, colour)
        if stack.live is not None and stack.live not in stack.colours:
            stack.live = None  # cannot happen after the restart above, unless the state file was edited
        if stack.live is not None and not (stack.nginx_pid and processes.alive(stack.nginx_pid)):
            if stack.nginx_pid:
                # A killed master leaves its workers in its process group, still holding the port's socket.
                processes.stop(stack.nginx_pid, timeout_s=1.0)
                self.notes.append(f"nginx (pid {stack.nginx_pid}) was down: restarted")
            stack.nginx_pid = None
            self.state.save(stack)
            self._route(stack)
        if stack.live is not None:
            dead = len(stack.job_workers) - len([w for w in stack.job_workers if processes.same_process(w)])
            if dead:
                self.notes.append(f"{dead} job worker(s) had stopped: restarted")
            self._start_job_workers(stack)
        self.state.save(stack)
        return stack

    def _start_job_workers(self, stack: Stack) -> None:
        """Keep `deploy.job_workers` `detops worker` pools running; they follow the live version on
        their own (serving/jobs/models.py reads it from the state), so a switch restarts none of them."""
        stack.job_workers = [w for w in stack.job_workers if processes.same_process(w)]
        while len(stack.job_workers) < self.cfg.job_workers:
            log = Path(self.cfg.state_dir) / "logs" / f"worker-{len(stack.job_workers)}.log"
            argv = [sys.executable, "-m", "pipelines.cli", "worker"]
            stack.job_workers.append(processes.handle(processes.spawn(argv, log=log, cwd=Path.cwd()).pid))
        self.state.save(stack)

    def _mark_live(self, version: str) -> None:
        """The registry shows what is live and since when: `deployed_at` on the version now live (its
        `retired_at` cleared), and the verdict."""
        registry.tag_version(self.serve.model_name, version, {"deployed_at": now(), "retired_at": None,
                                                               "deploy.verdict": "passed", "deploy.reason": None})

    def _max_body(self) -> int:
        return self.serve.max_upload_bytes * self.serve.max_batch_images + 1024 * 1024


@contextmanager
def _smoke_key() -> Iterator[str | None]:
    """The deployment's own key for one smoke check: minted in the keys database for tenant
    `detops.deploy` with scope `detect`, revoked when the check ends (with any a killed command left
    behind), never printed. None when the colours run with authentication off."""
    from serving.gateway.keys import open_key_store
    from serving.settings import load_gateway_config

    if not load_gateway_config().auth:
        yield None
        return
    keys = open_key_store()
    try:
        for stale in keys.list(SMOKE_TENANT):
            if stale.revoked_at is None:
                keys.revoke(stale.key_id)
        record, key = keys.create(SMOKE_TENANT, SMOKE_SCOPES, "detops deploy smoke check")
        try:
            yield key
        finally:
            keys.revoke(record.key_id)
    finally:
        keys.store.close()


def _failure(c: Check) -> str:
    value = "-" if c.value is None else f"{c.value:.4g}"
    return f"{c.name} check failed ({value} {c.comparison} {c.threshold:g} expected): {c.note}"


def _raise_on_failure(checks: list[Check]) -> None:
    failed = [c for c in checks if not c.passed]
    if failed:
        raise VerificationFailed(_failure(failed[0]))


def gates_or_empty(figures: dict[str, Any], cfg: DeployConfig) -> list[Check]:
    """The checks that can be computed from what a refused rollout got to measure."""
    return gates(figures, cfg) if "smoke" in figures else []


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:500]
