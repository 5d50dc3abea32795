"""Loaded by Kamailio's app_python3 (modparam "load"): makes our virtualenv importable, then hands over.

Kamailio embeds Debian's /usr/bin/python3 with the system sys.path; a venv is not active inside it,
so its site-packages is added here (site.addsitedir also runs the .pth files of editable installs).
"""

import os
import site
import sys

_venv = os.environ.get("KEMI_O365_VENV") or os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "..", ".venv"
)
site.addsitedir(
    os.path.join(
        os.path.abspath(_venv), "lib", f"python{sys.version_info[0]}.{sys.version_info[1]}", "site-packages"
    )
)

from kemi_o365.kemi import mod_init  # noqa: E402  (needs the path above)

__all__ = ["mod_init"]
