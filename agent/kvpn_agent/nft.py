"""Runs nft: loads the agent's table in JSON batches (one transaction each) and lists it back."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Sequence

from kvpn_agent.ruleset import (
    FAMILY,
    TABLE,
    Json,
    ObservedRuleset,
    PeerUpdate,
    Ruleset,
    delete_commands,
    parse_table,
    replace_commands,
    update_commands,
)


class NftError(Exception):
    """An nft run failed; the text carries what nft said."""


class Nft:
    """Runs nft JSON batches; ``prefix`` runs nft elsewhere (``ip netns exec NS``) in tests."""

    def __init__(self, prefix: Sequence[str] = (), nft: str = "nft", timeout: float = 30.0) -> None:
        self.argv = [*prefix, nft]
        self.timeout = timeout

    def run(self, commands: list[Json]) -> None:
        if not commands:
            return
        payload = json.dumps({"nftables": [{"metainfo": {"json_schema_version": 1}}, *commands]})
        proc = subprocess.run(
            [*self.argv, "-j", "-f", "-"],
            input=payload,
            capture_output=True,
            text=True,
            timeout=self.timeout,
            check=False,
        )
        if proc.returncode != 0:
            raise NftError(f"nft batch of {len(commands)} commands failed: {proc.stderr.strip()[:2000]}")

    def list_table(self) -> ObservedRuleset | None:
        """The table as the kernel holds it, or None when it does not exist."""
        proc = subprocess.run(
            [*self.argv, "-j", "list", "table", FAMILY, TABLE],
            capture_output=True,
            text=True,
            timeout=self.timeout,
            check=False,
        )
        if proc.returncode != 0:
            if "No such file or directory" in proc.stderr:
                return None
            raise NftError(f"nft list table {FAMILY} {TABLE} failed: {proc.stderr.strip()[:2000]}")
        return parse_table(json.loads(proc.stdout))

    def replace(self, ruleset: Ruleset) -> None:
        self.run(replace_commands(ruleset))

    def update(self, ruleset: Ruleset, update: PeerUpdate) -> None:
        self.run(update_commands(ruleset, update))

    def delete(self) -> None:
        self.run(delete_commands())
