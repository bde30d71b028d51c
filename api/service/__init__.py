"""The prediction service: ``create_app(settings)`` and its ``Settings``."""

from api.service.app import create_app
from api.service.settings import Settings

__all__ = ["Settings", "create_app"]
