"""Operator commands: `bailian-gateway keys|accounts|usage|db|reconcile|config`."""

from __future__ import annotations

import csv
import io
import json
import os
import sys
from datetime import datetime, timedelta
from decimal import Decimal

import click
from flask import Flask, current_app
from flask.cli import AppGroup, FlaskGroup, with_appcontext
from sqlalchemy import Engine

from app.billing import ledger
from app.billing.prices import exact, stored, to_cent
from app.config import ConfigError, Settings, load_settings
from app.gateway import current_gateway
from app.store import create_key, list_keys, revoke_key
from app.store.schema import SchemaError, read_revision, upgrade_schema

keys_cli = AppGroup("keys", help="Create, revoke and list gateway API keys.")
db_cli = AppGroup("db", help="Show and upgrade the database's schema revision.")


def _upgraded_engine() -> Engine:
    """Return the app's database, migrated to head as the server would on its start."""
    # The console script's app does not migrate as it is made (so that `db current` changes
    # nothing); the keys commands work on the schema the server does.
    engine = current_gateway().engine
    try:
        upgrade_schema(engine)
    except SchemaError as exc:
        raise click.ClickException(str(exc)) from exc
    return engine


@keys_cli.command("create")
@click.argument("account")
@click.option("--models", default=None, help="Comma-separated model allowlist (default: all).")
def create_key_command(account: str, models: str | None) -> None:
    """Create a key for ACCOUNT (created if new); the key is printed once, on the last line."""
    allowlist = [m.strip() for m in models.split(",") if m.strip()] if models else None
    secret = create_key(_upgraded_engine(), account, allowlist)
    click.echo(f"Created a key for account {account!r}. Store it now: it is not shown again.")
    click.echo(secret)


@keys_cli.command("revoke")
@click.argument("key")
def revoke_key_command(key: str) -> None:
    """Revoke KEY, given as the secret or as the id `keys list` shows."""
    if not revoke_key(_upgraded_engine(), key):
        raise click.ClickException("no active key matches")
    click.echo("Key revoked.")


@keys_cli.command("list")
def list_keys_command() -> None:
    """List keys without their secrets."""
    click.echo(f"{'ID':>4}  {'ACCOUNT':<20} {'KEY':<12} {'STATUS':<8} {'CREATED':<19}  MODELS")
    for key in list_keys(_upgraded_engine()):
        status = "revoked" if key.revoked_at else "active"
        models = ",".join(sorted(key.models)) if key.models is not None else "*"
        created = key.created_at.strftime("%Y-%m-%d %H:%M:%S")
        click.echo(
            f"{key.key_id:>4}  {key.account_name:<20} {'sk-...' + key.hint:<12} "
            f"{status:<8} {created:<19}  {models}"
        )


@db_cli.command("current")
def db_current_command() -> None:
    """Print the database's schema revision; change nothing."""
    with current_gateway().engine.connect() as conn:
        click.echo(read_revision(conn).describe())


@db_cli.command("upgrade")
def db_upgrade_command() -> None:
    """Migrate the database to this release's schema, as the server does on its start."""
    try:
        upgrade = upgrade_schema(current_gateway().engine)
    except SchemaError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"before: {upgrade.before.describe()}")
    click.echo(f"after: {upgrade.after.describe()}")
    if not upgrade.at_head:
        raise click.ClickException(
            "the database is at a revision this release does not know (a newer release "
            "migrated it): nothing was changed"
        )


accounts_cli = AppGroup("accounts", help="Spending limits, balances and adjustments of accounts.")

# A negative amount (`-1.5`) is an argument, not an unknown option.
AMOUNT_ARGUMENTS = {"ignore_unknown_options": True}


def parse_amount(text: str, *, signed: bool) -> Decimal:
    """Return an amount typed by an operator as an exact Decimal, or fail naming it."""
    try:
        amount = exact(text)
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a number", param_hint="AMOUNT") from None
    if not signed and amount < 0:
        raise click.BadParameter("a limit cannot be negative", param_hint="AMOUNT")
    try:
        # Before rounding: 1e30 has more digits than a Decimal rounds to six places.
        ledger.check_amount(amount)
    except ledger.AmountOutOfRange:
        raise click.BadParameter(
            f"{text!r} is more than the ledger holds: at most {ledger.LARGEST_AMOUNT}, either way",
            param_hint="AMOUNT",
        ) from None
    return stored(amount)


def _currency() -> str:
    return current_gateway().settings.currency


@accounts_cli.command("limit", context_settings=AMOUNT_ARGUMENTS)
@click.argument("account")
@click.argument("amount")
@click.option(
    "--per",
    type=click.Choice([ledger.PER_MONTH, ledger.PER_TOTAL]),
    default=ledger.PER_MONTH,
    show_default=True,
    help="A limit per calendar month (UTC), or in total (prepaid credit).",
)
def limit_command(account: str, amount: str, per: str) -> None:
    """Set ACCOUNT's spending limit to AMOUNT (`none` removes it)."""
    limit = (
        None if amount.lower() == "none" else ledger.Limit(parse_amount(amount, signed=False), per)
    )
    try:
        ledger.set_limit(_upgraded_engine(), account, limit, current_gateway().clock())
    except LookupError as exc:
        raise click.ClickException(str(exc.args[0])) from None
    if limit is None:
        click.echo(f"Account {account!r} has no spending limit now.")
    else:
        period = "per month" if per == ledger.PER_MONTH else "in total"
        click.echo(f"Account {account!r}: limit {to_cent(limit.amount)} {_currency()} {period}.")


@accounts_cli.command("show")
@click.argument("account")
def show_command(account: str) -> None:
    """Show ACCOUNT's limit, what it spent and holds reserved, what remains, tasks in flight."""
    try:
        view = ledger.show_account(_upgraded_engine(), account, current_gateway().clock())
    except LookupError as exc:
        raise click.ClickException(str(exc.args[0])) from None
    currency = _currency()
    if view.limit is None:
        click.echo(f"account:   {view.name}\nlimit:     none")
    else:
        per = "per month" if view.limit.per == ledger.PER_MONTH else "in total"
        click.echo(
            f"account:   {view.name}\nlimit:     {to_cent(view.limit.amount)} {currency} {per}"
        )
    click.echo(f"period:    {view.period}")
    click.echo(f"spent:     {to_cent(view.spent)} {currency}")
    click.echo(f"reserved:  {to_cent(view.reserved)} {currency}")
    remaining = "unlimited" if view.remaining is None else f"{to_cent(view.remaining)} {currency}"
    click.echo(f"remaining: {remaining}")
    click.echo(f"in flight: {view.in_flight}")


@accounts_cli.command("adjust", context_settings=AMOUNT_ARGUMENTS)
@click.argument("account")
@click.argument("amount")
@click.option("--reason", required=True, help="Why: kept in the ledger row.")
def adjust_command(account: str, amount: str, reason: str) -> None:
    """Credit (positive AMOUNT) or debit (negative AMOUNT) ACCOUNT with a ledger row."""
    value = parse_amount(amount, signed=True)
    try:
        ledger.adjust(_upgraded_engine(), account, value, reason, current_gateway().clock())
    except (LookupError, ledger.AmountOutOfRange) as exc:
        raise click.ClickException(str(exc.args[0])) from None
    what = "credited" if value >= 0 else "debited"
    click.echo(f"Account {account!r} {what} {to_cent(abs(value))} {_currency()}.")


def _day(text: str | None, name: str) -> datetime | None:
    if text is None:
        return None
    try:
        return datetime.strptime(text, "%Y-%m-%d")
    except ValueError:
        raise click.BadParameter("expected YYYY-MM-DD", param_hint=name) from None


@click.command("usage")
@click.option("--account", default=None, help="Only this account.")
@click.option("--model", default=None, help="Only this model.")
@click.option("--since", default=None, help="From this day on (YYYY-MM-DD, UTC).")
@click.option("--until", default=None, help="Up to and including this day (YYYY-MM-DD, UTC).")
@click.option(
    "--by",
    "by",
    multiple=True,
    help="Group by account, model, day or key (repeat, or comma-separate).",
)
@click.option(
    "--format",
    "output",
    type=click.Choice(["table", "csv", "json"]),
    default="table",
    show_default=True,
)
@with_appcontext
def usage_command(
    account: str | None,
    model: str | None,
    since: str | None,
    until: str | None,
    by: tuple[str, ...],
    output: str,
) -> None:
    """Report charged amounts, seconds of video and tasks, summed from the ledger."""
    groups = tuple(name.strip() for value in by for name in value.split(",") if name.strip())
    for name in groups:
        if name not in ledger.USAGE_GROUPS:
            raise click.BadParameter(
                f"{name!r}; expected one of {', '.join(ledger.USAGE_GROUPS)}", param_hint="--by"
            )
    end = _day(until, "--until")
    rows = ledger.usage(
        _upgraded_engine(),
        account=account,
        model=model,
        since=_day(since, "--since"),
        until=end + timedelta(days=1) if end is not None else None,
        by=groups,
    )
    currency = _currency()
    header = [*groups, "kind", "tasks", "seconds", "amount", "currency"]
    records = [
        [*row.group, row.kind, str(row.tasks), str(row.seconds), str(row.amount), currency]
        for row in rows
    ]
    if output == "json":
        # Amounts and seconds stay exact decimal strings; a count is a number.
        objects: list[dict[str, str | int]] = [
            dict(zip(header, record, strict=True)) for record in records
        ]
        for item, row in zip(objects, rows, strict=True):
            item["tasks"] = row.tasks
        click.echo(json.dumps(objects))
    elif output == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(records)
        click.echo(buffer.getvalue(), nl=False)
    else:
        shown = [[*r[:-3], r[-3], to_cent(Decimal(r[-2])), r[-1]] for r in records]
        widths = [max(len(x) for x in column) for column in zip(header, *shown, strict=True)]
        for line in [header, *shown]:
            click.echo(
                "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True))
            )


@click.command("reconcile")
@with_appcontext
def reconcile_command() -> None:
    """Run one reconciler pass (journal, submissions in flight, running tasks, retention)."""
    from app.reconcile import iter_lines

    _upgraded_engine()
    report = current_app.extensions["reconciler"].run_pass()
    for line in iter_lines(report):
        click.echo(line)


# Added to the console script itself, not to the app's CLI: checking must not build the app,
# which opens the database.
config_cli = click.Group("config", help="Check the configuration without starting anything.")


@config_cli.command("check")
@click.option(
    "--file",
    "path",
    default=None,
    metavar="FILE",
    help="The TOML file to check (default: the one GATEWAY_CONFIG names).",
)
def check_config_command(path: str | None) -> None:
    """Validate the file and the channel keys it names; print a summary, or the mistake."""
    environ = dict(os.environ)
    if path is not None:
        environ["GATEWAY_CONFIG"] = path
    try:
        settings = load_settings(environ)
    except ConfigError as exc:
        # The very message the service stops with, so an operator can search the log for it.
        click.echo(str(exc), err=True)
        sys.exit(1)
    click.echo(f"OK: {environ.get('GATEWAY_CONFIG') or 'no configuration file (GATEWAY_CONFIG)'}")
    for line in _summary(settings):
        click.echo(line)


def _summary(settings: Settings) -> list[str]:
    """Return the channels and the models offered, and what is served or priced but not offered."""
    lines = [f"channels: {len(settings.channels)}"]
    for channel in settings.channels:
        lines.append(
            f"  {channel.name}: {channel.base_url}, priority {channel.priority}, "
            f"weight {channel.weight}, models {', '.join(sorted(channel.models))}"
        )
    offered = settings.offered_models
    lines.append(
        f"models offered: {len(offered)}" + (f": {', '.join(sorted(offered))}" if offered else "")
    )
    served = {model for channel in settings.channels for model in channel.models}
    unpriced, unserved = sorted(served - offered), sorted(set(settings.prices) - offered)
    if unpriced:
        lines.append(f"not offered, no price: {', '.join(unpriced)}")
    if unserved:
        lines.append(f"not offered, no channel: {', '.join(unserved)}")
    return lines


def _create_app() -> Flask:
    from app import create_app

    return create_app(upgrade_schema=False)


cli = FlaskGroup(create_app=_create_app, add_version_option=False, help="Operate bailian-gateway.")
cli.add_command(config_cli)


def main() -> None:
    """Run the `bailian-gateway` console script."""
    cli.main(prog_name="bailian-gateway")


if __name__ == "__main__":  # `python -m app.cli`: what gunicorn's master runs before a reload
    main()
