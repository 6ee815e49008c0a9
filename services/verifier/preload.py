"""Imported by the pool's forkserver only (never by the service itself): loads and warms the
checkers once, so each forked worker starts with them ready."""

from services.verifier.sandbox import warm_up

warm_up()
