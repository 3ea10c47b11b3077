"""The `meshjoin` command: operators' view of the fleet, and one reconcile on demand.

Command groups from other installed packages (the sandbox's `meshjoin sandbox ...`) are found
through the `meshjoin.cli` entry point group, so this module never imports them by name.
"""

from __future__ import annotations

from importlib.metadata import entry_points

import click


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


@click.group(cls=PluginGroup)
@click.version_option(package_name="meshjoin")
def cli():
    """meshjoin: join labelled GCE VMs into the Istio mesh on GKE, and keep them healthy."""


def main() -> None:
    cli()
