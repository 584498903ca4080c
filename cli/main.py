"""``shardbroker``: serve, check-config, passwd, version, and store inspection.

Typer lives only under ``cli/``. Bad configuration is reported as one line naming
the setting, with exit status 2, never a traceback; so is a usage error (an unknown option,
a missing argument): ``main`` runs the commands outside click's standalone mode and prints
the error itself. ``-h`` is ``--help`` everywhere; ``shardbroker --version`` prints the
version. A reader that closes standard output early (``| head``) ends the command quietly.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from shardbroker import __version__, _compiled
from shardbroker.config import DEFAULT_TOML, Config, ConfigError, config_table, load_config

CONTEXT = {"help_option_names": ["-h", "--help"]}
app = typer.Typer(help="ShardBroker: a sharded, durable MQTT 3.1/3.1.1/5.0 broker.",
                  no_args_is_help=True, add_completion=False, context_settings=CONTEXT,
                  rich_markup_mode=None, pretty_exceptions_enable=False)


def _version_line() -> str:
    """The version, the Python, and whether the hot path runs compiled (``_compiled.py``)."""
    return f"shardbroker {__version__} (Python {sys.version.split()[0]}; {_compiled.state()})"


def _show_version(value: bool) -> None:
    if value:
        typer.echo(_version_line())
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_show_version, is_eager=True,
                                          help="print the version and exit")] = False,
) -> None:
    """ShardBroker: a sharded, durable MQTT 3.1/3.1.1/5.0 broker."""

try:
    from shardbroker.cli.store import app as store_app

    app.add_typer(store_app, name="store")
except ImportError:  # pragma: no cover - store CLI not installed
    pass

from shardbroker.cli.cluster import app as cluster_app
from shardbroker.cli.ctl import app as ctl_app

app.add_typer(ctl_app, name="ctl")
app.add_typer(cluster_app, name="cluster")


def _load(config: Path | None, overrides: dict[str, object]) -> Config:
    try:
        return load_config(config, overrides)
    except ConfigError as exc:
        typer.echo(f"shardbroker: configuration error: {exc}", err=True)
        raise typer.Exit(2) from None


@app.command()
def serve(
    config: Annotated[Path | None, typer.Option("--config", "-c", help="TOML configuration file")] = None,
    host: Annotated[str | None, typer.Option(help="address to listen on [server.host]")] = None,
    port: Annotated[int | None, typer.Option(help="TCP port, 0 for any free one [server.port]")] = None,
    workers: Annotated[int | None, typer.Option(help="worker processes, 0 = one per core [server.workers]")] = None,
    data_dir: Annotated[Path | None, typer.Option(help="where the stores live [server.data_dir]")] = None,
    log_level: Annotated[str | None, typer.Option(help="debug, info, warning, error [server.log_level]")] = None,
    log_format: Annotated[str | None, typer.Option(help="text or json [server.log_format]")] = None,
    durability: Annotated[str | None, typer.Option(help="fsync or no-fsync [storage.durability]")] = None,
) -> None:
    """Run the broker until SIGTERM or Ctrl-C; SIGHUP reloads the configuration."""
    overrides: dict[str, object] = {
        "server.host": host, "server.port": port, "server.workers": workers,
        "server.data_dir": str(data_dir) if data_dir is not None else None,
        "server.log_level": log_level, "server.log_format": log_format,
        "storage.durability": durability,
    }
    cfg = _load(config, overrides)
    from shardbroker.process.runtime import setup_logging
    from shardbroker.process.supervisor import Supervisor

    setup_logging(cfg.server.log_level, cfg.server.log_format)
    try:
        # a reload reads the same file again, with the same flags on top
        code = Supervisor(cfg, config.absolute() if config is not None else None, overrides).run()
    except SystemExit as exc:
        if isinstance(exc.code, str):
            typer.echo(exc.code, err=True)
            raise typer.Exit(2) from None
        raise
    raise typer.Exit(code)


@app.command("check-config")
def check_config(file: Annotated[Path, typer.Argument(help="TOML configuration file")]) -> None:
    """Validate a configuration file and print the resolved settings, as TOML that ``serve
    --config`` reads back to the same configuration."""
    cfg = _load(file, {})
    typer.echo(config_toml(cfg), nl=False)
    typer.echo(f"# {file}: ok ({cfg.server.worker_count} workers)")


def config_toml(cfg: Config) -> str:
    """Every setting of ``cfg`` as TOML: a table per section, ``[[listener]]`` tables last."""
    from shardbroker.process.supervisor import config_overrides

    sections: dict[str, list[str]] = {}
    listeners: list[dict[str, object]] = []
    for name, value in config_overrides(cfg).items():
        if name == "listener":
            listeners = list(value)  # type: ignore[call-overload]
            continue
        section, key = name.split(".", 1)
        sections.setdefault(section, []).append(f"{key} = {_toml_value(value)}")
    lines: list[str] = []
    for section, body in sections.items():
        lines += [f"[{section}]", *body, ""]
    for table in listeners:
        lines += ["[[listener]]", *(f"{k} = {_toml_value(v)}" for k, v in table.items() if v is not None), ""]
    return "\n".join(lines)


def _toml_value(value: object) -> str:
    """A TOML literal for a setting's value (a string, number, boolean or list of them)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    # A JSON string is a TOML basic string, but for DEL, which TOML wants escaped.
    return json.dumps(str(value), ensure_ascii=False).replace("\x7f", "\\u007f")


@app.command("default-config")
def default_config() -> None:
    """Print the embedded default configuration (a starting point for a file)."""
    typer.echo(DEFAULT_TOML)


@app.command("settings")
def settings() -> None:
    """List every setting with its default and meaning."""
    for name, default, text in config_table():
        typer.echo(f"{name:32} {default:24} {text}")


@app.command("passwd")
def passwd(
    file: Annotated[Path, typer.Argument(help="password file (Mosquitto's format; made if missing)")],
    user: Annotated[str, typer.Argument(help="the user to add, change or delete")],
    delete: Annotated[bool, typer.Option("--delete", "-D", help="delete the user")] = False,
    stdin: Annotated[bool, typer.Option("--stdin", help="read the password from the first line of stdin")] = False,
    iterations: Annotated[int, typer.Option(help="PBKDF2-HMAC-SHA512 rounds for the new hash")] = 210_000,
) -> None:
    """Add a user, change its password, or delete it. The password is asked for twice (or read
    from stdin with --stdin), never taken from the command line. Files written by
    mosquitto_passwd are read, and Mosquitto reads the files this writes. The user's
    SCRAM-SHA-256 keys go to FILE.scram beside it (SCRAM-SHA-512 needs nothing more)."""
    import getpass

    from shardbroker.security import passwords, scram

    if not user or ":" in user or any(ord(ch) < 32 for ch in user):
        typer.echo("shardbroker passwd: a username must be non-empty, without ':' or control characters", err=True)
        raise typer.Exit(2)
    if iterations < 1:
        typer.echo("shardbroker passwd: --iterations must be at least 1", err=True)
        raise typer.Exit(2)
    try:
        pf = passwords.load(file) if file.exists() else passwords.PasswordFile()
    except passwords.PasswordFileError as exc:
        typer.echo(f"shardbroker passwd: {exc}", err=True)
        raise typer.Exit(2) from None
    for problem in pf.problems:
        typer.echo(f"shardbroker passwd: warning: {file}: {problem} (the line is dropped)", err=True)
    sidecar = scram.sidecar_path(file)
    try:
        keys = scram.load(sidecar) or scram.ScramFile()
    except passwords.PasswordFileError as exc:
        typer.echo(f"shardbroker passwd: {exc}", err=True)
        raise typer.Exit(2) from None
    if delete:
        if pf.entries.pop(user, None) is None:
            typer.echo(f"shardbroker passwd: {file}: no user {user!r}", err=True)
            raise typer.Exit(1)
        keys.entries.pop(user, None)
    else:
        if stdin:
            line = sys.stdin.readline()
            password = line.removesuffix("\n")
        else:
            password = getpass.getpass("Password: ")
            if getpass.getpass("Reenter password: ") != password:
                typer.echo("shardbroker passwd: the passwords do not match", err=True)
                raise typer.Exit(1)
        if not password:
            typer.echo("shardbroker passwd: empty password", err=True)
            raise typer.Exit(1)
        entry = pf.entries[user] = passwords.hash_password(password.encode("utf-8"), iterations)
        try:
            keys.entries[user] = (scram.derive(scram.SHA256, password, iterations), scram.fingerprint(entry))
        except ValueError as exc:
            keys.entries.pop(user, None)
            typer.echo(f"shardbroker passwd: warning: {user} can log in by password, not by SCRAM: {exc}", err=True)
    try:
        passwords.save(file, pf)
        if keys.entries or sidecar.exists():
            scram.save(sidecar, keys)
    except passwords.PasswordFileError as exc:
        typer.echo(f"shardbroker passwd: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"{file}: {'deleted' if delete else 'set'} {user}")


@app.command()
def version() -> None:
    """Print the version."""
    typer.echo(_version_line())


# click's exceptions, wherever this typer version takes click from (its own copy or click).
_errors = sys.modules[typer.BadParameter.__module__]
_Never = type("_Never", (Exception,), {})
_NoArgsIsHelp: type[Exception] = getattr(_errors, "NoArgsIsHelpError", _Never)
_Abort: type[BaseException] = getattr(_errors, "Abort", typer.Abort)


def main(argv: list[str] | None = None) -> None:
    """Run the command line; exit with the command's status."""
    command = typer.main.get_command(app)
    try:
        code = command.main(args=argv, prog_name="shardbroker", standalone_mode=False)
    except _NoArgsIsHelp as exc:  # a group given no command: its help
        typer.echo(exc.format_message(), err=True)  # type: ignore[attr-defined]
        sys.exit(2)
    except _errors.UsageError as exc:
        where = exc.ctx.command_path if exc.ctx is not None else "shardbroker"
        typer.echo(f"{where}: {_one_line(exc.format_message())} (see {where} -h)", err=True)
        sys.exit(exc.exit_code)
    except _errors.ClickException as exc:
        typer.echo(f"shardbroker: {_one_line(exc.format_message())}", err=True)
        sys.exit(exc.exit_code)
    except (_Abort, typer.Abort):
        typer.echo("shardbroker: aborted", err=True)
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)


def _one_line(text: str) -> str:
    return " ".join(text.split())


if __name__ == "__main__":
    main()
