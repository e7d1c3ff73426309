"""`builder keys init`: the Ed25519 key pair that signs every artifact manifest."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

KeyDirOption = typer.Option(None, "--key-dir", help="Key directory (default: <data dir>/keys; data dir = --data-dir or $EDGEFLEET_HOME).")
# --registry-dir: the old name of --data-dir, still accepted (docs/cli.md)
RegistryDirOption = typer.Option(None, "--data-dir", "--registry-dir", help="EdgeFleet data directory: registry, keys, fleet store (default: $EDGEFLEET_HOME or the user data dir).")


def register(app: typer.Typer) -> None:
    group = typer.Typer(help="Signing keys: the private key signs manifests, agents trust the public key.", no_args_is_help=True)
    app.add_typer(group, name="keys")

    @group.command("init")
    def init(key_dir: Optional[Path] = KeyDirOption, registry_dir: Optional[Path] = RegistryDirOption,
             force: bool = typer.Option(False, "--force", help="Replace an existing key (agents trusting the old one will refuse new artifacts).")) -> None:
        """Create the signing key pair (private key file mode 0600)."""
        from builder.artifacts.signing import init_keys, key_paths
        from builder.targets.profile_build import default_key_dir

        directory = key_dir or default_key_dir(registry_dir)
        existing = key_paths(directory)
        if existing.private.is_file() and existing.public.is_file() and not force:
            # Idempotent: every walkthrough starts with `keys init`, and agents already trust this key.
            paths = existing
            print(f"a signing key already exists at {paths.private}: kept (--force replaces it; agents trusting "
                  "the old key would then refuse new artifacts)")
        else:
            paths = init_keys(directory, force=force)
        from agent.manifest import load_public_key, public_key_id

        print(f"private key: {paths.private} (mode 0600, keep it secret)")
        print(f"public key:  {paths.public} (copy to devices as the trusted key)")
        print(f"key id:      {public_key_id(load_public_key(paths.public))}")

    @group.command("show")
    def show(key_dir: Optional[Path] = KeyDirOption, registry_dir: Optional[Path] = RegistryDirOption,
             as_json: bool = typer.Option(False, "--json", help="Print the path and key id as JSON.")) -> None:
        """Print the public key path and id."""
        from agent.errors import AgentError
        from agent.manifest import load_public_key, public_key_id
        from builder.artifacts.signing import key_paths
        from builder.errors import UsageError
        from builder.targets.profile_build import default_key_dir

        paths = key_paths(key_dir or default_key_dir(registry_dir))
        try:
            key = load_public_key(paths.public)
        except AgentError as exc:
            raise UsageError(f"no public key at {paths.public}; run `builder keys init`") from exc
        if as_json:
            import json

            print(json.dumps({"public_key": str(paths.public), "key_id": public_key_id(key)}, indent=2))
            return
        print(f"public key: {paths.public}\nkey id:     {public_key_id(key)}")
