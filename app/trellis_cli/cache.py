"""``trellis cache invalidate``: drop a tool's cached results, through the tool gateway.

It calls the gateway's InvalidateCache: the results of the calling tenant (``--as``,
TRELLIS_TENANT) by default; another tenant's (``--tenant``) or every tenant's
(``--all-tenants``) only when the calling tenant is one of the gateway's
TRELLIS_CACHE_ADMIN_TENANTS. ``--arg k=v`` keeps to the results whose argument ``k`` is
``v`` (read as JSON when it parses: ``n=3`` is the number, ``n='"3"'`` the string).

The gateway is not published outside a deployment (only the executor is), so the
command runs where the gateway is reachable: ``docker compose exec toolgateway trellis
cache invalidate ...`` or ``kubectl exec deployment/toolgateway -- trellis cache invalidate
...`` (TRELLIS_TOOLGATEWAY_TARGET is set there), or through a port-forward.
"""

from __future__ import annotations

import asyncio
import json
from typing import Annotated, Any

import typer

from trellis.clients.toolgateway import ToolGatewayClient
from trellis.runtime import context
from trellis.runtime.settings import ServiceSettings
from trellis_cli import exits
from trellis_cli.runs import client_channels

DEFAULT_TARGET = str(ServiceSettings.model_fields["toolgateway_target"].default)
TARGET_OPTION = "--target/TRELLIS_TOOLGATEWAY_TARGET"

cache_app = typer.Typer(help="The result cache: drop cached results.", no_args_is_help=True)


def parse_args(pairs: list[str]) -> dict[str, Any]:
    """``["path=notes/a.txt", "n=3"]`` -> ``{"path": "notes/a.txt", "n": 3}``."""
    args: dict[str, Any] = {}
    for pair in pairs:
        name, sep, text = pair.partition("=")
        if not sep or not name:
            raise typer.BadParameter(f"expected NAME=VALUE, got {pair!r}", param_hint="--arg")
        try:
            args[name] = json.loads(text)
        except ValueError:
            args[name] = text
    return args


@cache_app.command("invalidate")
def invalidate(
    tool: Annotated[str, typer.Option(help="The tool whose cached results go.")],
    tenant: Annotated[
        str,
        typer.Option(help="Whose results (default: the calling tenant's; others: admin only)."),
    ] = "",
    all_tenants: Annotated[
        bool, typer.Option("--all-tenants", help="Every tenant's results (admin only).")
    ] = False,
    arg: Annotated[
        list[str] | None,
        typer.Option(help="NAME=VALUE: only results whose argument NAME is VALUE; repeatable."),
    ] = None,
    caller: Annotated[
        str,
        typer.Option("--as", envvar="TRELLIS_TENANT", help="The calling tenant (x-tenant-id)."),
    ] = context.DEFAULT_TENANT,
    target: Annotated[
        str, typer.Option(envvar="TRELLIS_TOOLGATEWAY_TARGET", help="gRPC target of the gateway.")
    ] = DEFAULT_TARGET,
    timeout: Annotated[float, typer.Option(help="Seconds the call may take.")] = 10.0,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object.")] = False,
) -> None:
    """Drop TOOL's cached results (exit 0; 6 when not allowed, 5 gateway unreachable)."""
    if tenant and all_tenants:
        raise typer.BadParameter("give --tenant or --all-tenants, not both")
    args = parse_args(arg or [])

    async def main() -> int:
        channels = client_channels()
        try:
            with context.request_scope(tenant_id=caller):
                client = ToolGatewayClient(channels.get(target), timeout=timeout)
                return await client.invalidate_cache(
                    tool, tenant_id=tenant, all_tenants=all_tenants, args=args
                )
        finally:
            await channels.close()

    with exits.reported(exits.Target("tool gateway", target, TARGET_OPTION)):
        removed = asyncio.run(main())
    whose = "every tenant" if all_tenants else f"tenant {tenant or caller}"
    if as_json:
        scope = None if all_tenants else tenant or caller
        typer.echo(
            json.dumps({"tool": tool, "tenant": scope, "args": args, "invalidated": removed})
        )
    else:
        typer.echo(f"{removed} cached result(s) of {tool} dropped for {whose}")
