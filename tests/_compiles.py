"""Counting XLA compilations in tests (jax.monitoring's backend-compile events).

The same event bench/benchlib.CompileCounter listens to; a persistent-cache hit counts
too, since what matters is that jit asked for a new program.
"""

import contextlib

import jax

_BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"


@contextlib.contextmanager
def count_compiles():
    """Yields a list that collects the name of every function compiled inside the block."""
    names = []

    def listener(event, duration, **kwargs):
        del duration
        if event == _BACKEND_COMPILE:
            names.append(str(kwargs.get("fun_name", "?")))

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield names
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
