"""Logger factories for Hydra configs, and the check that an online W&B run can start."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from omegaconf import OmegaConf

from mha_lightning.errors import ConfigError

if TYPE_CHECKING:
    from lightning.pytorch.loggers import WandbLogger


def wandb_mode(offline: bool | None) -> str:
    """Offline unless the user says otherwise: ``offline=false`` or ``WANDB_MODE`` in the environment."""
    if offline is None:
        return os.environ.get("WANDB_MODE", "offline")
    return "offline" if offline else "online"


def wandb_logger(offline: bool | None = None, save_dir: str = ".", **kwargs) -> WandbLogger:
    """Lightning's WandbLogger, offline unless told otherwise (:func:`wandb_mode`); None-valued kwargs are dropped.

    Other kwargs go to ``wandb.init`` (``project``, ``name``, ``group``, ``tags``, ``config``: a sweep job sets
    the last three, see ``sweeps.label_wandb_run``)."""
    from lightning.pytorch.loggers import WandbLogger  # here: wandb_mode alone must not import Lightning

    # Passed as wandb.init(mode=...) rather than WandbLogger(offline=True), which would set
    # WANDB_MODE in os.environ for every later run in this process (e.g. the next sweep job).
    # Plain containers: wandb cannot serialise OmegaConf nodes (a sweep job's ``config``, its ``tags``).
    kwargs = {k: OmegaConf.to_container(v) if OmegaConf.is_config(v) else v for k, v in kwargs.items() if v is not None}
    kwargs.setdefault("tags", [])
    kwargs["tags"] = list(kwargs["tags"])
    return WandbLogger(save_dir=save_dir, mode=wandb_mode(offline), **kwargs)


# wandb's modes that talk to the server (its documented WANDB_MODE values; "dryrun" is offline).
ONLINE_MODES = ("online", "run", "shared")
# How long the check waits for the W&B server (or the proxy in front of it) to accept a connection.
REACH_TIMEOUT_SECONDS = 5.0


def check_wandb_online(node: Any) -> None:
    """A W&B logger that runs online needs an API key and a server it can reach: one line saying what to do when
    either is missing, before the run writes anything (docs/design.md, "Run folders"). Without it wandb stops
    the run with a traceback, after 8 s without a key and after 98 s of retries without a network."""
    if not node or "_target_" not in node or wandb_mode(node.get("offline")) not in ONLINE_MODES:
        return
    import wandb

    settings = wandb.setup().settings  # what wandb.init will use: the environment, wandb's settings files
    base_url, settings_key = str(settings.base_url), settings.api_key
    if wandb.run is None:
        wandb.teardown()  # set up again by the run itself, with the environment it then has
    said = "logger.wandb.offline=false" if node.get("offline") is False else f"WANDB_MODE={os.environ['WANDB_MODE']}"
    offline = "or log offline (WANDB_MODE=offline, the default; `wandb sync` uploads the run later)"
    if not _has_api_key(base_url, settings_key):
        raise ConfigError(
            f"{said} needs a W&B API key for {base_url} and none is set; run `wandb login` (or set WANDB_API_KEY), "
            f"{offline}"
        )
    problem = _unreachable(base_url)
    if problem is not None:
        raise ConfigError(f"{said}: {problem}; check the network, {offline}")


def _has_api_key(base_url: str, settings_key: str | None) -> bool:
    """Whether wandb will find a key: its environment variables, its settings, or a ~/.netrc entry (where
    `wandb login` stores it; ``NETRC`` moves the file)."""
    import netrc
    from pathlib import Path
    from urllib.parse import urlsplit

    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE") or settings_key:
        return True
    path = Path(os.environ.get("NETRC") or "~/.netrc").expanduser()
    try:
        machines = netrc.netrc(str(path)).hosts
    except (OSError, netrc.NetrcParseError):
        return False
    host = urlsplit(base_url).hostname or ""
    return host in machines or any(m == "api.wandb.ai" or m.endswith(".wandb.ai") for m in machines)


def _unreachable(base_url: str) -> str | None:
    """Why ``base_url`` (or the proxy for it) accepts no connection within REACH_TIMEOUT_SECONDS; None if it does."""
    import socket
    import threading
    import urllib.request
    from urllib.parse import urlsplit

    url = urlsplit(base_url)
    host, port = url.hostname or "", url.port or (443 if url.scheme == "https" else 80)
    proxy = urllib.request.getproxies().get(url.scheme)
    if proxy and not urllib.request.proxy_bypass(host):
        target = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        host, port, what = target.hostname or "", target.port or 80, f"the proxy {proxy} for {base_url}"
    else:
        what = base_url
    outcome: list[str | None] = []

    def connect() -> None:  # name lookup has no timeout of its own: the thread bounds both
        try:
            socket.create_connection((host, port), timeout=REACH_TIMEOUT_SECONDS).close()
            outcome.append(None)
        except OSError as e:
            outcome.append(e.strerror or str(e) or type(e).__name__)

    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(REACH_TIMEOUT_SECONDS + 1)
    if not outcome:
        return f"{what} did not answer within {REACH_TIMEOUT_SECONDS:g} s"
    return None if outcome[0] is None else f"{what} cannot be reached ({outcome[0]})"


def send_alert(loggers: list, title: str, text: str, level: str) -> int:
    """A W&B alert (``run.alert``; recorded in the run file when offline, sent when synced) on every W&B logger
    of ``loggers`` -> how many were sent. Call it from global rank 0 only (its loggers hold the run)."""
    from lightning.pytorch.loggers import WandbLogger

    sent = 0
    for lg in loggers:
        if isinstance(lg, WandbLogger):
            # wait_duration 0: W&B would otherwise drop a second alert of the same title within a minute.
            lg.experiment.alert(title=title, text=text, level=level, wait_duration=0)
            sent += 1
    return sent
