"""Access verbs: `detops keys create|list|revoke` (API keys of tenants, serving/gateway/keys.py).

The keys live in the jobs database (DETOPS_DATABASE_URL, default the embedded SQLite file under
jobs.data_dir) as HMAC-SHA256 hashes peppered with DETOPS_KEY_PEPPER: run these with the same two
variables as the service."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from pipelines.cli.common import user_errors

keys = typer.Typer(help="API keys: create (printed once), list, revoke.", no_args_is_help=True)


def _key_store():  # noqa: ANN202 (imports kept inside: `detops --help` stays fast)
    from serving.gateway.keys import open_key_store

    return open_key_store()


@keys.command("create")
@user_errors
def create(
    tenant: Annotated[str, typer.Option(help="the tenant the key acts for (a-z, 0-9, _ . -)")],
    scopes: Annotated[str, typer.Option(help="comma-separated: detect, jobs:write, jobs:read, admin")]
    = "detect,jobs:write,jobs:read",
    name: Annotated[Optional[str], typer.Option(help="a note: who or what uses it")] = None,
) -> None:
    """Create a key; it is printed once, alone on the last line (only its hash is stored)."""
    record, key = _key_store().create(tenant, scopes, name)
    typer.echo(f"key {record.key_id} for tenant {record.tenant}, scopes {','.join(sorted(record.scopes))} "
               "(shown once: store it now)")
    typer.echo(key)


@keys.command("list")
@user_errors
def list_keys(tenant: Annotated[Optional[str], typer.Option(help="only this tenant's keys")] = None) -> None:
    """Every key's id, tenant, scopes, creation and revocation (never a secret)."""
    rows = _key_store().list(tenant)
    if not rows:
        typer.echo("no keys")
    for k in rows:
        state = f"revoked {k.revoked_at:%Y-%m-%d %H:%M:%S}" if k.revoked_at else "active"
        typer.echo(f"{k.key_id}  {k.tenant}  {','.join(sorted(k.scopes))}  created {k.created_at:%Y-%m-%d %H:%M:%S}  "
                   f"{state}  {k.name or ''}".rstrip())


@keys.command("revoke")
@user_errors
def revoke(key_id: Annotated[str, typer.Argument(help="the key's id (detops keys list)")]) -> None:
    """Revoke a key: every worker of every colour refuses it within gateway.key_cache_ttl_s."""
    record = _key_store().revoke(key_id.strip())
    typer.echo(f"revoked {record.key_id} (tenant {record.tenant})")
