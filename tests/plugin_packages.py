"""Plugin packages for tests, as `pip install` leaves them in a site directory: the module and its
distribution's .dist-info with the `liveloop.plugins` entry points. A process finds them when the
directory is on its path (sys.path in process, PYTHONPATH for a service process)."""

from __future__ import annotations

import shutil
import textwrap
from pathlib import Path


def install_plugin_package(
    site: Path, version: str, module_body: str, entry_points: dict[str, str], module: str = "acme_plugins"
) -> None:
    """Install (or upgrade in place) the distribution `acme-plugins` at `version` into `site`."""
    for old in site.glob("acme_plugins-*.dist-info"):
        shutil.rmtree(old)
    path = site / f"{module.replace('.', '/')}.py"  # a module of a package: its directory exists
    path.write_text(textwrap.dedent(module_body))
    info = site / f"acme_plugins-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: acme-plugins\nVersion: {version}\n")
    lines = "".join(f"{name} = {module}:{target}\n" for name, target in entry_points.items())
    (info / "entry_points.txt").write_text(f"[liveloop.plugins]\n{lines}")
