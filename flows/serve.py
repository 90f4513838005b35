"""Serve the distillation flow as a Prefect deployment on a cron schedule (`dmsae serve`).

The deployment's parameters are the fully resolved config, so a scheduled run is the same run as
`dmsae run` with that config: every stage whose artifact exists finishes Cached, and only what a
changed input (e.g. an updated corpus file, whose fingerprint is part of the keys) touches runs again.
"""

from __future__ import annotations

from typing import Any

from dmsae.config import Config
from dmsae.errors import UserError

DEFAULT_CRON = "0 3 * * *"  # nightly at 03:00 (UTC unless the server says otherwise)


def deployment_parameters(cfg: Config) -> dict[str, Any]:
    """The flow parameters of a served config: progress bars off, nobody watches a terminal."""
    return {"config": cfg.model_dump(mode="json"), "show_progress": False}


def check_cron(cron: str) -> str:
    from prefect.client.schemas.schedules import CronSchedule

    try:
        CronSchedule(cron=cron)
    except ValueError:
        raise UserError(f"--cron {cron!r}: not a cron expression; use five fields, e.g. --cron "
                        f"'{DEFAULT_CRON}' (every day at 03:00)") from None
    return cron


def require_server() -> str:
    """The API URL. Prefect's ephemeral mode has no scheduler and dies with the process, so a schedule
    needs a real server."""
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        raise UserError("dmsae serve needs a Prefect server: start one (prefect server start) and set "
                        "PREFECT_API_URL, e.g. PREFECT_API_URL=http://127.0.0.1:4200/api dmsae serve ...")
    return str(url)


def serve_config(cfg: Config, cron: str | None = DEFAULT_CRON, name: str | None = None) -> None:
    """Register the deployment `dmsae-distill/<name>` and execute its runs until interrupted (blocks)."""
    from prefect.types.entrypoint import EntrypointType

    from flows.distill import distill

    if cron is not None:
        check_cron(cron)
    require_server()
    # a module path, not a file path: the flow module lives in site-packages in the Docker image
    distill.serve(
        name=name or cfg.name,
        cron=cron,
        parameters=deployment_parameters(cfg),
        description=f"dmsae distillation '{cfg.name}' (store {cfg.store})",
        tags=["dmsae"],
        entrypoint_type=EntrypointType.MODULE_PATH,
    )
