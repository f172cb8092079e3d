"""``trellis keys``: make API keys and the hashes the executor is configured with.

The executor never sees a key in its configuration, only its SHA-256
(``trellis.runtime.auth``): ``new`` prints a fresh key once, for the client, and the
line to add to ``TRELLIS_API_KEYS_FILE`` (or the entry for ``TRELLIS_API_KEYS``);
``hash`` does the same for a key you already have, read from stdin so it stays out of
shell history and process lists.
"""

from __future__ import annotations

import json
import sys
from typing import Annotated

import typer

from trellis.runtime import auth

keys_app = typer.Typer(
    help="API keys: make one, or hash one for the executor.", no_args_is_help=True
)

Tenant = Annotated[str, typer.Option(help="The tenant the key acts for.")]
Json = Annotated[bool, typer.Option("--json", help="One JSON object instead of text.")]


def _tenant(tenant: str) -> str:
    try:
        return auth.validate_tenant(tenant)
    except auth.KeyConfigError as error:
        raise typer.BadParameter(str(error), param_hint="--tenant") from None


@keys_app.command("new")
def new(tenant: Tenant, as_json: Json = False) -> None:
    """A new random key for TENANT, and its hash line for the executor."""
    tenant = _tenant(tenant)
    key = auth.new_key()
    key_hash = auth.hash_key(key)
    if as_json:
        typer.echo(json.dumps({"key": key, "sha256": key_hash, "tenant": tenant}))
        return
    typer.echo(f"key:  {key}")
    typer.echo("      (give it to the client, e.g. as TRELLIS_API_KEY; it is not stored anywhere)")
    typer.echo(f"line: {auth.key_line(key_hash, tenant)}")
    typer.echo("      (append it to TRELLIS_API_KEYS_FILE, or put this in TRELLIS_API_KEYS:")
    typer.echo(f"      {json.dumps({key_hash: tenant})})")


@keys_app.command("hash")
def hash_(tenant: Tenant = "default", as_json: Json = False) -> None:
    """The hash line of a key read from stdin (the key itself is not printed)."""
    tenant = _tenant(tenant)
    key = sys.stdin.readline().strip()
    if not key:
        raise typer.BadParameter("give the key on stdin, e.g. `trellis keys hash < key.txt`")
    key_hash = auth.hash_key(key)
    if as_json:
        typer.echo(json.dumps({"sha256": key_hash, "tenant": tenant}))
    else:
        typer.echo(auth.key_line(key_hash, tenant))
