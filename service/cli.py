"""`itp-serve`: run the prediction service with uvicorn, configured from the environment."""

from __future__ import annotations

import uvicorn

from service.app import create_app
from service.settings import Settings


def main() -> None:
    settings = Settings()
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port,
                log_level=settings.log_level)


if __name__ == "__main__":
    main()
