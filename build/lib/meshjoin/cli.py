"""The `meshjoin` command: operators' view of the fleet, and one reconcile on demand.

It uses the same settings (`MESHJOIN_*` environment) and the same reconcile as the functions, against
the real APIs or, with `source .sandbox/env`, the sandbox. Command groups from other installed
packages (the sandbox's `meshjoin sandbox ...`) are found through the `meshjoin.cli` entry point
group, so this module never imports them by name.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import datetime, timezone
from functools import wraps
from importlib.metadata import entry_points

import click

from .errors import ApiPermissionError, MeshjoinError, SettingsError, TransientError


class PluginGroup(click.Group):
    """A click group that also offers the commands registered under the `meshjoin.cli` entry points."""

    def _plugins(self) -> dict:
        return {ep.name: ep for ep in entry_points(group="meshjoin.cli")}

    def list_commands(self, ctx):
        return sorted(set(super().list_commands(ctx)) | set(self._plugins()))

    def get_command(self, ctx, name):
        command = super().get_command(ctx, name)
        if command is None and name in self._plugins():
            command = self._plugins()[name].load()
        return command


def friendly_errors(fn):
    """meshjoin's errors become one clear line (exit 1), never a traceback."""

    @wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except SettingsError as exc:
            raise click.ClickException(f"settings: {exc} (source .sandbox/env for the sandbox)") from None
        except ApiPermissionError as exc:
            raise click.ClickException(str(exc)) from None
        except TransientError as exc:
            raise click.ClickException(f"failed, retrying may help: {exc}") from None
        except MeshjoinError as exc:
            raise click.ClickException(str(exc)) from None
        except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except Exception as exc:  # noqa: BLE001 - a bug one VM's data triggers: name it, never a traceback
            subject = f"{kwargs['vm']}: " if kwargs.get("vm") else ""
            raise click.ClickException(f"{subject}unexpected {type(exc).__name__}: {str(exc)[:300]} "
                                       "(please report it; -v shows meshjoin's log)") from None

    return wrapper


def _runtime():
    from .runtime import Runtime

    return Runtime.from_env()


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _resolve(rt, name: str, zone: str | None, project: str | None = None):
    """The VM key for NAME: in --project (default: whichever VM project has it; with --zone, the host
    project) and --zone, or the one zone where a VM of that name exists."""
    from .model import VmKey

    if project and project not in rt.settings.vm_projects:
        raise click.ClickException(f"project {project!r} is not among MESHJOIN_VM_PROJECTS "
                                   f"({', '.join(rt.settings.vm_projects)})")
    if zone:
        return VmKey(project or rt.settings.project, zone, name)
    found = rt.compute.find(name, project)
    if not found:
        where = f"project {project}" if project else f"projects {', '.join(rt.settings.vm_projects)}"
        raise click.ClickException(f"no VM named {name!r} in {where}; pass --zone for one that was deleted")
    if len(found) > 1:
        places = ", ".join(f"{vm.key.project}/{vm.key.zone}" for vm in found)
        raise click.ClickException(f"VMs named {name!r} exist in several places ({places}): pass --zone "
                                   "(and --project)")
    return found[0].key


def _console():
    from rich.console import Console

    # Piped output keeps whole rows instead of wrapping at rich's default 80 columns.
    return Console() if sys.stdout.isatty() else Console(width=200)


ZONE_OPTION = click.option("--zone", help="The VM's zone (default: the one zone that has a VM of that name).")
PROJECT_OPTION = click.option("--project", help="The VM's project, one of MESHJOIN_VM_PROJECTS (default: the "
                                                "one that has a VM of that name; with --zone, MESHJOIN_PROJECT).")


@click.group(cls=PluginGroup)
@click.version_option(package_name="meshjoin")
@click.option("-v", "--verbose", is_flag=True, help="Show meshjoin's INFO log lines (JSON, on stderr).")
def cli(verbose: bool):
    """meshjoin: join labelled GCE VMs into the Istio mesh on GKE, and keep them healthy.

    Settings come from MESHJOIN_* environment variables (see README); against the local sandbox,
    `source .sandbox/env` first.
    """
    from .logs import configure

    configure(logging.INFO if verbose else logging.WARNING, stream=sys.stderr)


STATE_STYLE = {"joined": "green", "waiting": "cyan", "denied": "red", "error": "red", "pending": "yellow",
               "stopped": "dim",
               "orphaned": "magenta", "expiring": "yellow", "left": "dim"}


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (a JSON list).")
@friendly_errors
def status(as_json: bool):
    """Every VM that is labelled mesh=join or registered: identity, address, state, certificate."""
    from .fleet import ATTENTION, fleet_rows

    rt = _runtime()
    inventory = rt.sweeper.inventory()
    if not inventory.vms and inventory.unlisted_projects:
        raise click.ClickException("; ".join(inventory.failures))
    rows = fleet_rows(inventory, _now(), rt.settings)
    if as_json:
        click.echo(json.dumps([r.as_dict() for r in rows], indent=2))
    else:
        from rich.table import Table

        table = Table(title=f"meshjoin fleet in {', '.join(rt.settings.vm_projects)}")
        several = len(rt.settings.vm_projects) > 1  # then the VM's project is part of its name
        for column in ("VM", *(("project",) if several else ()), "zone", "namespace/SA", "address", "state", "key",
                       "cert expires", "time left", "updated"):
            table.add_column(column)
        for r in rows:
            left = "" if r.cert_seconds_left is None else _duration(r.cert_seconds_left)
            identity = f"{r.namespace}/{r.service_account}" if r.namespace else ""
            state = f"[{STATE_STYLE.get(r.state, 'white')}]{r.state}[/]"
            key = "legacy secret" if r.legacy else r.key_id and f"{r.key_id} ×{r.key_certs}"
            table.add_row(r.name, *((r.project,) if several else ()), r.zone, identity, r.address, state, key,
                          r.cert_not_after, left, r.updated[:19])
        console = _console()
        console.print(table)
        attention = [r for r in rows if r.state in ATTENTION]
        for r in attention:
            console.print(f"[{STATE_STYLE.get(r.state, 'white')}]{r.name}[/]: {r.reason}")
    for error in inventory.failures:
        click.echo(f"warning: incomplete listing: {error}", err=True)


def _duration(seconds: int) -> str:
    if seconds <= 0:
        return "expired"
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


@cli.command()
@click.argument("vm")
@ZONE_OPTION
@PROJECT_OPTION
@click.option("--json", "as_json", is_flag=True)
@friendly_errors
def explain(vm: str, zone: str | None, project: str | None, as_json: bool):
    """Why VM is (or is not) in the mesh: facts, policy decision, last status, what to do."""
    from . import names
    from .fleet import explain as explain_vm

    rt = _runtime()
    key = _resolve(rt, vm, zone, project)
    observed = rt.compute.get_vm(key)
    entries = list(rt.kube.list("WorkloadEntry", f"{names.MANAGED_BY_LABEL}={names.MANAGED_BY},"
                                                 f"{names.VM_LABEL}={key.instance}"))
    # The VM's own report (guest attributes meshjoin/*): what the agent says it holds.
    report = rt.compute.guest_attributes(key) if observed is not None and observed.wants_mesh else {}
    result = explain_vm(key, observed, rt.settings, entry_exists=bool(entries), now=_now(), agent_report=report)
    if as_json:
        click.echo(json.dumps({**result.__dict__, "status": result.status.wire()}, indent=2, default=str))
        return
    console = _console()
    console.print(f"[bold]{result.vm}[/]")
    for fact, value in result.facts.items():
        console.print(f"  {fact}: {value}")
    console.print(f"[bold]decision:[/] {result.decision}")
    if result.status:
        console.print(f"[bold]last status:[/] {result.status.state} — {result.status.reason or ''} "
                      f"(updated {result.status.updated or '?'})")
    for advice in result.advice:
        console.print(f"[bold]→[/] {advice}")


@cli.command()
@click.argument("vm")
@ZONE_OPTION
@PROJECT_OPTION
@click.option("--force", is_flag=True,
              help="Re-certify the VM's current key now (a fresh certificate), even if none is due.")
@friendly_errors
def join(vm: str, zone: str | None, project: str | None, force: bool):
    """Reconcile VM now: read what its agent reports, certify its key if it handed in a new one.

    The VM's key never leaves it: meshjoin certifies the public key of the CSR its agent wrote
    (guest attribute meshjoin/csr); without one, the VM waits and `meshjoin explain` says why.
    """
    from .plan import Verb

    rt = _runtime()
    outcome = rt.reconciler.reconcile(_resolve(rt, vm, zone, project), force_new_cert=force)
    click.echo(f"{vm}: {outcome.verb}: {outcome.reason}")
    if outcome.verb == Verb.FAILED:
        sys.exit(1)


@cli.command()
@click.argument("vm")
@ZONE_OPTION
@PROJECT_OPTION
@friendly_errors
def leave(vm: str, zone: str | None, project: str | None):
    """Take VM out of the mesh now: its WorkloadEntry and bootstrap metadata (and a legacy per-VM secret).

    Its last certificate stays valid until it expires (MESHJOIN_CERT_TTL): meshjoin issues no more."""
    rt = _runtime()
    key = _resolve(rt, vm, zone, project)
    outcome = rt.reconciler.leave(key)
    click.echo(f"{vm}: {outcome.verb}: {outcome.reason}")
    observed = rt.compute.get_vm(key)
    if observed is not None and observed.wants_mesh:
        click.echo(f"note: {vm} still carries mesh=join, so the next event or sweep joins it again; "
                   "remove the label to keep it out", err=True)


@cli.command()
@click.option("--dry-run", is_flag=True, help="Report what the sweep would do, change nothing.")
@click.option("--inline", is_flag=True,
              help="Do the per-VM work in this process instead of publishing it to the events topic "
                   "(for operators without Pub/Sub access; also the mode when MESHJOIN_EVENTS_TOPIC is unset).")
@click.option("--json", "as_json", is_flag=True)
@friendly_errors
def reconcile(dry_run: bool, inline: bool, as_json: bool):
    """One maintenance sweep now: missed joins, renewals, CA re-issue, pruning.

    Like the maintenance function, it lists and plans here and publishes each VM's work to the events
    topic, where the events function does it; --inline does that work here, paced by this process's
    share of the quotas."""
    rt = _runtime()
    inline = inline or rt.publisher is None
    if as_json:
        summary = rt.sweeper.sweep(dry_run=dry_run, inline=inline)
    else:
        from rich.progress import Progress

        with Progress(transient=True, console=_console()) as progress:
            task = progress.add_task("reconciling", total=None)
            summary = rt.sweeper.sweep(
                dry_run=dry_run, inline=inline,
                progress=lambda done, total: progress.update(task, completed=done, total=total))
    planned = [a.describe() for a in summary.plan.actions]
    if as_json:
        click.echo(json.dumps({**summary.as_log_fields(), "mode": "inline" if inline else "published",
                               "planned": planned, "notes": summary.plan.notes, "errors": summary.errors}, indent=2))
        return
    console = _console()
    verb = "would do" if dry_run else "did" if inline else "planned (per-VM work published to the events topic)"
    console.print(f"[bold]{verb}[/] {len(planned)} action(s):")
    for line in planned:
        console.print(f"  {line}")
    if not dry_run:
        counts = ", ".join(f"{k}={v}" for k, v in summary.counts.items())
        console.print(f"[bold]summary:[/] {counts} in {summary.duration_s:.1f}s")
    for note in summary.plan.notes + summary.errors:
        console.print(f"[red]{note}[/]")


@cli.command()
@click.argument("vm")
@ZONE_OPTION
@PROJECT_OPTION
@friendly_errors
def render(vm: str, zone: str | None, project: str | None):
    """The bootstrap meshjoin would write for VM (no key material: the VM makes its own key)."""
    from . import bootstrap, names
    from .model import Denial
    from .policy import decide_identity

    rt = _runtime()
    key = _resolve(rt, vm, zone, project)
    observed = rt.compute.get_vm(key)
    if observed is None:
        raise click.ClickException(f"{key} does not exist")
    identity = decide_identity(observed, rt.settings)
    if isinstance(identity, Denial):
        raise click.ClickException(f"{vm} would be denied: {identity.reason}")
    # The VM's own items, and what every VM shares (project metadata, from Terraform: rendered here from the
    # settings, which come from the same variables); cluster.env as the agent joins it from both.
    items = {**bootstrap.deployment_items(rt.settings),
             **bootstrap.bootstrap_items(key, identity, rt.settings,
                                         root_pem=rt.secrets.plugin_ca().bundle.root_certs_pem)}
    items[names.CLUSTER_ENV_KEY] = bootstrap.cluster_env(key, identity, rt.settings)
    # The certificate chain is the one meshjoin last signed for the VM's own key (public), if any.
    items[names.CERT_CHAIN_KEY] = observed.metadata.get(names.CERT_CHAIN_KEY, "(none yet: the VM's key is certified "
                                                                             "once its agent wrote a CSR)")
    for title, item in (("cluster.env", f"{names.CLUSTER_ENV_KEY} + {names.MESH_ENV_KEY}"),
                        ("/etc/istio/config/mesh", names.MESH_CONFIG_KEY),
                        ("/etc/hosts lines", names.HOSTS_KEY), ("key algorithm", names.KEY_ALGORITHM_KEY),
                        ("cert-chain.pem", names.CERT_CHAIN_KEY), ("root-cert.pem", names.ROOT_CERT_KEY),
                        ("startup-script", names.STARTUP_SCRIPT_KEY)):
        click.echo(f"==> {title} (metadata {item})")
        click.echo(items.get(item.split(" + ")[0], "").rstrip("\n") or "(empty)")
        click.echo()


def main() -> None:
    cli()
