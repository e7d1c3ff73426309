"""`builder artifacts list|show|verify|rm|export`: the local registry."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from builder.cli.keys import KeyDirOption, RegistryDirOption


def _public_key(key_dir: Optional[Path], registry_dir: Optional[Path], pub: Optional[Path]):
    from agent.errors import AgentError
    from agent.manifest import load_public_key
    from builder.artifacts.signing import key_paths
    from builder.errors import UsageError
    from builder.targets.profile_build import default_key_dir

    path = pub or key_paths(key_dir or default_key_dir(registry_dir)).public
    try:
        return load_public_key(path)
    except AgentError as exc:
        raise UsageError(f"no usable public key at {path} ({exc}); run `builder keys init` or pass --public-key") from exc


PublicKeyOption = typer.Option(None, "--public-key", help="Verify against this public key PEM instead of the local one.")


def register(app: typer.Typer) -> None:
    group = typer.Typer(help="The local artifact registry.", no_args_is_help=True)
    app.add_typer(group, name="artifacts")

    @group.command("list")
    def list_artifacts(registry_dir: Optional[Path] = RegistryDirOption,
                       model: Optional[str] = typer.Option(None, "--model"),
                       profile: Optional[str] = typer.Option(None, "--profile", "-p", help="Only this device profile."),
                       as_json: bool = typer.Option(False, "--json")) -> None:
        """List registered artifacts."""
        import json
        from dataclasses import asdict

        from rich.table import Table

        from builder.artifacts.registry import Registry
        from builder.units import format_bytes

        records = Registry(registry_dir).records(model, profile)
        if as_json:
            print(json.dumps([asdict(r) | {"metrics": dict(r.metrics)} for r in records], indent=2))
            return
        table = Table(title=f"Artifacts ({len(records)})")
        for col in ("artifact", "model", "version", "profile", "runtime", "precision", "format", "size", "host ms"):
            table.add_column(col)
        for r in records:
            host = r.metrics.get("host_latency_ms")
            table.add_row(r.artifact_id[:12], r.model_name, r.model_version, r.profile, r.runtime, r.precision, r.format,
                          format_bytes(r.size_bytes), "-" if host is None else f"{host:.3f}")
        from builder.cli.tables import print_table

        print_table(table, keep=("artifact", "profile"), drop_order=("format", "runtime", "host ms", "version"))

    @group.command("show")
    def show(artifact_id: str, registry_dir: Optional[Path] = RegistryDirOption) -> None:
        """Print an artifact's manifest (JSON)."""
        import json

        from builder.artifacts.registry import Registry

        print(json.dumps(Registry(registry_dir).manifest(artifact_id).to_dict(), indent=2, sort_keys=True))

    @group.command("verify")
    def verify(artifact_id: str, registry_dir: Optional[Path] = RegistryDirOption, key_dir: Optional[Path] = KeyDirOption,
               public_key: Optional[Path] = PublicKeyOption,
               as_json: bool = typer.Option(False, "--json", help="Print the result as JSON.")) -> None:
        """Check the manifest signature and every payload's size and sha256; non-zero exit on any mismatch."""
        from builder.artifacts.registry import Registry

        manifest = Registry(registry_dir).verify(artifact_id, _public_key(key_dir, registry_dir, public_key))
        if as_json:
            import json

            print(json.dumps({"artifact_id": manifest.artifact_id, "signature": "valid",
                              "payloads": [{"name": p.name, "size_bytes": p.size_bytes, "sha256": p.sha256}
                                           for p in manifest.payloads]}, indent=2))
            return
        print(f"ok: {manifest.artifact_id} signature valid, {len(manifest.payloads)} payloads match")

    @group.command("rm")
    def remove(artifact_id: str, registry_dir: Optional[Path] = RegistryDirOption) -> None:
        """Remove an artifact (and payload files no other artifact uses)."""
        from builder.artifacts.registry import Registry

        registry = Registry(registry_dir)
        full = registry.resolve(artifact_id)
        freed = registry.remove(full)
        print(f"removed {full} ({len(freed)} payload files deleted)")

    @group.command("export")
    def export(artifact_id: str, dest: Path, registry_dir: Optional[Path] = RegistryDirOption,
               key_dir: Optional[Path] = KeyDirOption, public_key: Optional[Path] = PublicKeyOption,
               no_verify: bool = typer.Option(False, "--no-verify", help="Skip the signature check (no local key).")) -> None:
        """Write a self-contained artifact directory (payloads + manifest.json + manifest.sig), verified."""
        from builder.artifacts.registry import Registry

        key = None if no_verify else _public_key(key_dir, registry_dir, public_key)
        path = Registry(registry_dir).export(artifact_id, dest, key)
        print(f"exported to {path}")
