"""Per-image messages of the imaging libraries go to ``logging``, never straight to stderr.

A bad file's outcome is its reject reason; what Pillow warns (``warnings.warn``), what Pillow logs
(the ``PIL`` logger) and what libtiff prints (its C warning and error handlers write to stderr)
would otherwise break ``--quiet`` and interleave with the progress bar, in the driver and in Ray's
workers (whose stderr Ray forwards). They are logged at DEBUG under ``engine.pillow`` and
``engine.libtiff``, so ``--verbose`` shows them. (libjpeg's decoder messages Pillow already
drops.)
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform
import threading
import warnings

PILLOW_LOG = logging.getLogger("engine.pillow")
LIBTIFF_LOG = logging.getLogger("engine.libtiff")
_installed: list[object] = []  # the ctypes callbacks, kept alive for as long as libtiff may call them


def route_library_messages() -> None:
    """Install the routes once per process (imported with ``engine.imaging``)."""
    if _installed:
        return
    _installed.append(True)
    if logging.getLogger("PIL").level == logging.NOTSET:  # its per-file errors repeat the reject reason
        logging.getLogger("PIL").setLevel(logging.CRITICAL)
    real = warnings.showwarning

    def showwarning(message, category, filename, lineno, file=None, line=None):
        if f"{os.sep}PIL{os.sep}" in filename:
            PILLOW_LOG.debug("%s: %s", category.__name__, message)
        else:
            real(message, category, filename, lineno, file, line)

    warnings.showwarning = showwarning
    _route_libtiff()


def _loaded_libtiff() -> str | None:
    """The path of the libtiff that Pillow's ``_imaging`` uses (a wheel bundles its own copy)."""
    from PIL import Image  # noqa: F401 - loads _imaging and with it libtiff

    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.rsplit(None, 1)[-1]
                if os.path.basename(path).startswith("libtiff") and ".so" in path:
                    return path
    except OSError:
        pass
    return None


def _route_libtiff() -> None:
    path = _loaded_libtiff()
    if path is None:
        return
    try:
        libtiff = ctypes.CDLL(path)  # the library already loaded: the same handlers Pillow's calls use
        libc = ctypes.CDLL(None)
    except OSError:
        return
    handler_type = ctypes.CFUNCTYPE(None, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_void_p)
    # va_list reaches the handler as a pointer on these ABIs, so vsnprintf can format it
    can_format = platform.machine() in ("x86_64", "AMD64", "aarch64", "arm64")

    def make(kind: str):
        def handler(module, fmt, args):
            try:
                text = (fmt or b"").decode("utf-8", "replace")
                if can_format and fmt:
                    buf = ctypes.create_string_buffer(1024)
                    libc.vsnprintf(
                        buf, ctypes.c_size_t(len(buf)), ctypes.c_char_p(fmt), ctypes.c_void_p(args)
                    )
                    text = buf.value.decode("utf-8", "replace")
                LIBTIFF_LOG.debug("%s %s: %s", kind, (module or b"").decode("utf-8", "replace"), text)
            except Exception:  # noqa: BLE001 - ctypes would print it to stderr; a message is not worth that
                pass
            except BaseException as exc:
                # an exception can't cross C: an image's timeout (or ^C) that landed here is raised
                # again once the decoder is back in Python
                ctypes.pythonapi.PyThreadState_SetAsyncExc(
                    ctypes.c_ulong(threading.get_ident()), ctypes.py_object(type(exc))
                )

        return handler_type(handler)

    warning, error = make("warning"), make("error")
    for name, callback in (("TIFFSetWarningHandler", warning), ("TIFFSetErrorHandler", error)):
        setter = getattr(libtiff, name, None)
        if setter is not None:
            setter.restype = ctypes.c_void_p
            setter(callback)
            _installed.append(callback)
