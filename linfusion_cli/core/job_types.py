"""The typed view of a job (`base/job.py`), written from the settings table so that mypy sees every built-in
setting as an attribute with its type and refuses a misspelt one (`job.cosine_scale1`). Settings a plug-in adds
later are read by name (`job.value("toy_lift")`) or through `JobSpec`'s attributes at run time.

    python -m linfusion_cli.core.job_types     # rewrite base/job.py after declaring a setting

tests/test_config.py fails when base/job.py and the table disagree.
"""

from __future__ import annotations

import sys
from pathlib import Path

from ..base.settings import Setting
from .settings import table

JOB_MODULE = Path(__file__).resolve().parent.parent / "base" / "job.py"
TYPES = {
    "str": "str",
    "int": "int",
    "px": "int",
    "float": "float",
    "bool": "bool",
    "floats": "list[float]",
    "refs": "list[str]",
    "texts": "list[str]",
}
HEADER = '''"""One image's resolved settings as the engine, adapters and refine methods read them: every built-in setting an
attribute with its type. Written by `python -m linfusion_cli.core.job_types` from the settings table: do not edit
by hand."""

from __future__ import annotations

from typing import Any


class Job:
    """The types of a job's settings; `core.settings.JobSpec` holds the values."""

'''
FOOTER = '''
    def value(self, name: str) -> Any:
        """A setting by name: one a plug-in declared, which this view does not list."""
        raise NotImplementedError

    def settings(self) -> dict[str, Any]:
        """Every setting's value (for reports, sidecars, replay)."""
        raise NotImplementedError
'''


def annotation(setting: Setting) -> str:
    kind = TYPES[setting.kind]
    return kind if setting.default is not None else f"{kind} | None"


def job_module() -> str:
    """base/job.py as the settings table says it."""
    lines = [f"    {name}: {annotation(setting)}\n" for name, setting in table().items()]
    return HEADER + "".join(lines) + FOOTER


if __name__ == "__main__":
    JOB_MODULE.write_text(job_module())
    sys.stdout.write(f"wrote {JOB_MODULE}\n")
