"""Errors that name where they came from: the user's file and line, a checkpoint key, a file."""


class FlameError(Exception):
    pass


class ShapeError(FlameError, ValueError):
    """A shape or dtype rule refused its inputs. The tracer prefixes the user's source line."""


class TraceError(FlameError):
    pass
