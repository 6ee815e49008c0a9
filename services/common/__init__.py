"""Shared service skeleton: FastAPI app factory, auth, body limit, graceful serving."""

from services.common.app import ControlAuth, create_app, require_token
from services.common.serve import run_service, serve, setup_logging

__all__ = ["ControlAuth", "create_app", "require_token", "run_service", "serve", "setup_logging"]
